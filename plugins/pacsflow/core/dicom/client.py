"""The PACS client: C-ECHO, C-FIND, C-MOVE and C-GET over one reused association.

TCP_NODELAY is set on the association socket: small DIMSE exchanges are otherwise held back by Nagle's
algorithm (10x fewer C-FINDs per second measured here). Identifiers are never logged.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu_primitives import _UI, A_ABORT, A_P_ABORT
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # pynetdicom generates these names at import
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacsflow.core.dicom import status as dimse
from pacsflow.core.dicom.config import STORAGE_SOP_CLASSES, PacsConfig, ReceiverConfig
from pacsflow.core.dicom.errors import PacsConfigurationError, PacsTransientError
from pacsflow.core.dicom.header import withhold_values_from_pydicom_log
from pacsflow.core.dicom.receiver import store_handler
from pacsflow.core.dicom.results import FindResult, QueryLevel, ReceiverStats, RetrieveReport
from pacsflow.core.dicom.transport import (
    adjust_association,
    application_entity,
    client_tls,
    discard_unfinished_stream,
    park_reactor,
    stream_to,
)
from pacsflow.core.storage import StorageLayout
from pacsflow.core.uids import is_valid_uid

# C-GET stores come back through the receiver's handler, with its defaults: no Deflated (inflating is the one step
# whose memory a peer controls).
_GET_STORES = ReceiverConfig()
_GET_STORE_SYNTAXES = [s for s in DEFAULT_TRANSFER_SYNTAXES if not UID(s).is_deflated]
_QUERY_RETRIEVE_MODELS = (
    Verification,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)
_UNIQUE_KEYS: dict[str, tuple[str, ...]] = {
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}
_NOT_RETURNED = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}
_COUNTS = ("completed", "failed", "warning")
# Some PACS (pynetdicom's qrscp) answer "move destination unknown" (0xA801) both for an AE title they do not
# know and for a receiver they could not connect to. A destination never reached yet is asked again after
# these pauses before the answer counts as a configuration error; one reached before is a transient failure.
UNKNOWN_DESTINATION_PAUSES_SECONDS = (1.0, 3.0)

# One response of a DIMSE exchange: (status code, status dataset, identifier or None).
Response = tuple[int, Dataset, Dataset | None]
# Sends one request on an association; yields (status, identifier), status None when the association ended.
Send = Callable[[Association], Iterable[tuple[Dataset | None, Dataset | None]]]


class PacsClient:
    """One association to one PACS, opened on first use and reopened once if the peer dropped it."""

    def __init__(self, config: PacsConfig) -> None:
        self.config = config
        self._assoc: Association | None = None
        self._assoc_stores = False  # negotiated with storage SCP roles (needed by C-GET)
        self._get_store: Callable[[Event], int] | None = None
        self.get_stats = ReceiverStats()  # what C-GET stored, across this client's life
        self._reached_destinations: set[str] = set()  # move destinations the PACS has delivered to

    def __enter__(self) -> PacsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    # -- operations -----------------------------------------------------------------------------------
    def echo(self) -> None:
        for code, _, _ in self._exchange("C-ECHO", lambda assoc: [(assoc.send_c_echo(), None)]):
            _require_ok(code, "C-ECHO")

    def find(self, level: QueryLevel, query: Mapping[str, str]) -> FindResult:
        """Study Root C-FIND; ``query`` maps keywords to values ("" asks the PACS to return the attribute)."""
        identifier = _identifier(level, query)
        matches: list[dict[str, Any]] = []

        def send(assoc: Association) -> Iterable[tuple[Dataset | None, Dataset | None]]:
            return assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)

        for code, _, response in self._exchange("C-FIND", send):
            if code in dimse.PENDING:
                if response is not None:
                    matches.append(_plain(response))
                continue
            stopped_early = dimse.find_stopped_early(code)
            if not stopped_early:
                _require_ok(code, "C-FIND")
            cap = self.config.result_cap
            capped = stopped_early or (cap is not None and len(matches) >= cap)
            return FindResult(matches=matches, status=code, capped=capped)
        raise PacsTransientError("C-FIND: the PACS sent no final response")

    def move(self, level: QueryLevel, keys: Mapping[str, str], destination_ae: str) -> RetrieveReport:
        """C-MOVE to ``destination_ae`` (a node the PACS knows), by exact unique keys only."""
        identifier = _retrieve_identifier(level, keys)

        def send(assoc: Association) -> Iterable[tuple[Dataset | None, Dataset | None]]:
            return assoc.send_c_move(identifier, destination_ae, StudyRootQueryRetrieveInformationModelMove)

        pauses = iter(UNKNOWN_DESTINATION_PAUSES_SECONDS)
        while True:
            try:
                report = _retrieve_report(self._exchange("C-MOVE", send), "C-MOVE")
            except PacsConfigurationError as error:
                if error.status != dimse.MOVE_DESTINATION_UNKNOWN:
                    raise
                if destination_ae in self._reached_destinations:
                    raise _unreachable_destination(error) from error
                pause = next(pauses, None)
                if pause is None:
                    raise
                time.sleep(pause)
                continue
            if report.completed:
                self._reached_destinations.add(destination_ae)
            return report

    def get(self, level: QueryLevel, keys: Mapping[str, str], layout: StorageLayout) -> RetrieveReport:
        """C-GET: the PACS stores back on this association, through the receiver's own store handler."""
        identifier = _retrieve_identifier(level, keys)
        layout.root.mkdir(parents=True, exist_ok=True)

        def send(assoc: Association) -> Iterable[tuple[Dataset | None, Dataset | None]]:
            stream_to(assoc, layout.root)
            return assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)

        self._get_store = store_handler(layout, self.get_stats, _GET_STORES)
        try:
            return _retrieve_report(self._exchange("C-GET", send, stores=True), "C-GET")
        finally:
            self._get_store = None

    def retrieve(
        self, level: QueryLevel, keys: Mapping[str, str], *, destination_ae: str, layout: StorageLayout
    ) -> RetrieveReport:
        if self.config.retrieve_method == "c-get":
            return self.get(level, keys, layout)
        return self.move(level, keys, destination_ae)

    # -- association ----------------------------------------------------------------------------------
    def _exchange(self, operation: str, send: Send, *, stores: bool = False) -> Iterator[Response]:
        """Responses of one request. A reused association the peer dropped before answering (idle timeout,
        restart) is replaced once, transparently; any other loss is a transient error."""
        for attempt in (1, 2):
            reused = self._assoc is not None and self._assoc.is_established
            assoc = self._association(stores=stores)
            answered = False
            try:
                for status, identifier in send(assoc):
                    if status is None or "Status" not in status:
                        peer_aborted = assoc.acse.is_aborted()
                        self._drop_association()
                        if peer_aborted and reused and not answered and attempt == 1:
                            break  # the association was stale: open a new one and send again
                        raise dimse.association_lost(
                            operation,
                            peer_aborted=peer_aborted,
                            dimse_timeout=self.config.dimse_timeout,
                            network_timeout=self.config.network_timeout,
                        )
                    answered = True
                    yield int(status.Status), status, identifier
                else:
                    return
            finally:
                park_reactor(assoc)

    def _association(self, *, stores: bool = False) -> Association:
        if self._assoc is not None and self._assoc.is_established and (self._assoc_stores or not stores):
            return self._assoc
        self.close()
        withhold_values_from_pydicom_log()  # a PACS's answers can hold malformed values: patient data
        self._assoc = self._associate(stores=stores or self.config.retrieve_method == "c-get")
        return self._assoc

    def _associate(self, *, stores: bool) -> Association:
        config = self.config
        ae = application_entity(config.calling_ae)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (
            config.acse_timeout,
            config.dimse_timeout,
            config.network_timeout,
        )
        ae.maximum_pdu_size = config.max_pdu
        for abstract in _QUERY_RETRIEVE_MODELS:
            ae.add_requested_context(abstract)
        roles: list[_UI] = []
        if stores:  # C-GET stores come back on this association: propose storage with us as SCP
            for sop_class in STORAGE_SOP_CLASSES[: 128 - len(_QUERY_RETRIEVE_MODELS)]:
                ae.add_requested_context(sop_class, _GET_STORE_SYNTAXES)
                roles.append(build_role(sop_class, scp_role=True))
        rejection: dict[str, int] = {}
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, _on_connection(rejection)),
            (evt.EVT_C_STORE, self._on_get_store),
            (evt.EVT_ACSE_RECV, _capture_rejection(rejection)),
            (evt.EVT_CONN_CLOSE, lambda event: discard_unfinished_stream(event.assoc)),
        ]
        try:
            assoc = ae.associate(
                config.host,
                config.port,
                ae_title=config.called_ae,
                ext_neg=roles,
                evt_handlers=handlers,
                tls_args=client_tls(config.tls, config.host),
            )
        except (OSError, ssl.SSLError) as error:
            raise PacsTransientError(f"cannot connect to the PACS: {error.__class__.__name__}") from None
        if assoc.is_established:
            self._assoc_stores = stores
            return assoc
        if assoc.is_rejected:
            raise dimse.rejection_error(rejection.get("result"), rejection.get("source"), rejection.get("reason"))
        if assoc.is_aborted and rejection.get("accepted") and not assoc.accepted_contexts:
            raise PacsConfigurationError("the PACS accepted none of the query/retrieve SOP classes")
        raise dimse.association_not_established(
            connected="connected" in rejection,
            aborted="aborted" in rejection,
            closed="closed" in rejection,
            acse_timeout=config.acse_timeout,
        )

    def _on_get_store(self, event: Event) -> int:
        if self._get_store is None:  # not inside get(): refuse rather than write somewhere unexpected
            return dimse.OUT_OF_RESOURCES
        return self._get_store(event)

    def _drop_association(self) -> None:
        if self._assoc is not None:
            self._assoc.abort()
        self._assoc = None


def _require_ok(code: int, operation: str) -> None:
    if not dimse.is_final_ok(code):
        raise dimse.error_for(code, operation)


def _retrieve_report(responses: Iterator[Response], operation: str) -> RetrieveReport:
    """Final sub-operation counts of a C-MOVE/C-GET (from the final response, else the last pending one)."""
    counts = dict.fromkeys(_COUNTS, 0)
    for code, status, identifier in responses:
        for name in _COUNTS:
            value = status.get(f"NumberOf{name.title()}Suboperations")
            if value is not None and value != "":
                counts[name] = int(value)
        if code in dimse.PENDING:
            continue
        _require_ok(code, operation)
        return RetrieveReport(status=code, failed_sop_uids=_failed_uids(identifier), **counts)
    raise PacsTransientError(f"{operation}: the PACS sent no final response")


def _unreachable_destination(error: PacsConfigurationError) -> PacsTransientError:
    """A "move destination unknown" for a destination this PACS has delivered to before is a connection it
    could not open this time, not a configuration error."""
    return PacsTransientError(
        "C-MOVE: the PACS could not connect to pacsflow's receiver, which it reached before in this task; "
        "check the network between the PACS and the receiver",
        status=error.status,
    )


def _failed_uids(identifier: Dataset | None) -> tuple[str, ...]:
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return ()
    value = identifier.FailedSOPInstanceUIDList
    return tuple(uid for uid in (value if isinstance(value, MultiValue) else [value]) if is_valid_uid(uid))


def _identifier(level: str, query: Mapping[str, str]) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    # Our keys may hold non-ASCII names; a PACS answers in a character set of its choice, which we decode.
    identifier.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in query.items():
        setattr(identifier, keyword, value)
    return identifier


def _retrieve_identifier(level: str, keys: Mapping[str, str]) -> Dataset:
    """Refuse a retrieve whose unique keys are empty or patterns: it could match the whole archive."""
    if level not in _UNIQUE_KEYS:
        raise ValueError(f"unknown query/retrieve level {level!r}")
    for keyword in _UNIQUE_KEYS[level]:
        values = str(keys.get(keyword) or "").split("\\")
        if not all(is_valid_uid(value) for value in values):
            raise ValueError(
                f"refusing a {level}-level retrieve: {keyword} must be one or more exact UIDs "
                "(an empty or wildcard key could match the whole archive)"
            )
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in _UNIQUE_KEYS[level]:
        setattr(identifier, keyword, keys[keyword])
    return identifier


def _plain(response: Dataset) -> dict[str, Any]:
    """A C-FIND match as keyword -> plain Python value (names decoded per SpecificCharacterSet)."""
    return {
        element.keyword: _plain_value(element.value)
        for element in response
        if element.keyword and element.keyword not in _NOT_RETURNED
    }


def _plain_value(value: Any) -> Any:
    if value is None or value == "" or isinstance(value, bytes):
        return None  # binary values have no place in a query answer
    if isinstance(value, Sequence):
        return [_plain(item) for item in value]
    if isinstance(value, MultiValue):
        return [_plain_value(item) for item in value]
    for number in (int, float):  # IS, US, SL, DS...: pydicom's subclasses become plain numbers
        if isinstance(value, number):
            return number(value)
    return str(value)  # names (PersonName) and text


def _on_connection(into: dict[str, int]) -> Callable[[Event], None]:
    def on_conn_open(event: Event) -> None:
        adjust_association(event.assoc)
        into["connected"] = 1

    return on_conn_open


def _capture_rejection(into: dict[str, int]) -> Callable[[Event], None]:
    """What the PACS answered the A-ASSOCIATE-RQ with: a rejection, an acceptance or an abort."""

    def on_acse_recv(event: Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]  # pynetdicom sets it from the event's data
        result = getattr(primitive, "result", None)
        if result in (0x01, 0x02):
            into.update(result=result, source=primitive.result_source, reason=primitive.diagnostic)
        elif result == 0x00:
            into["accepted"] = 1
        elif isinstance(primitive, A_ABORT):
            into["aborted"] = 1
        elif isinstance(primitive, A_P_ABORT):
            into["closed"] = 1

    return on_acse_recv
