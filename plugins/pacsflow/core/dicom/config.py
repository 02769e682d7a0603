"""Settings of a PACS peer and of pacsflow's own receiver, independent of where they come from."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal, get_args

from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

from pacsflow.core.errors import ConfigurationError

RetrieveMethod = Literal["c-move", "c-get"]
# pynetdicom: pure Python, TLS. dcmtk: DCMTK storescp per association (faster; Linux, no TLS).
ReceiverBackend = Literal["pynetdicom", "dcmtk"]
# shared: the host's receiver, started by the first retrieval task that needs it and stopped when none does;
# embedded: inside the task (one retrieval task at a time per data root); service: started by the operator.
ReceiverMode = Literal["shared", "embedded", "service"]

# Every transfer syntax pynetdicom knows except those that deflate the whole data set: inflating is the one step
# whose memory a peer controls (1 MB on the wire became 2.1 GB), so Deflated is accepted only when listed.
DEFAULT_RECEIVE_SYNTAXES: tuple[str, ...] = tuple(str(s) for s in ALL_TRANSFER_SYNTAXES if not UID(s).is_deflated)
KNOWN_SYNTAXES = frozenset(str(s) for s in ALL_TRANSFER_SYNTAXES)
# The storage SOP classes pynetdicom knows: what both receivers accept and C-GET proposes.
STORAGE_SOP_CLASSES: tuple[UID, ...] = tuple(
    context.abstract_syntax for context in StoragePresentationContexts if context.abstract_syntax is not None
)
MIN_PDU, MAX_PDU = 4096, 16 * 1024 * 1024
DCMTK_MAX_PDU = 131072  # storescp's upper limit


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True)
class PacsConfig:
    """How to reach one PACS as a query/retrieve SCU."""

    host: str
    port: int
    called_ae: str
    calling_ae: str = "PACSFLOW"
    # Slow-starting PACS are normal (minutes before the first C-STORE of a C-MOVE): generous defaults.
    acse_timeout: float = 30.0
    dimse_timeout: float = 300.0
    network_timeout: float = 300.0
    max_pdu: int = 0
    retrieve_method: RetrieveMethod = "c-move"
    # A PACS caps C-FIND results; a response with exactly this many matches is reported as capped.
    result_cap: int | None = None
    tls: TlsConfig | None = None


class ReceiverConfigError(ConfigurationError):
    """A receiver setting that cannot work; the message names the setting."""


@dataclass(frozen=True)
class ReceiverConfig:
    """pacsflow's C-STORE SCP, the move destination the PACS knows by ``ae_title``.

    Every socket it accepts has a timeout: ``acse_timeout`` until the peer's A-ASSOCIATE-RQ (and a TLS handshake)
    is in, ``network_timeout`` for any read or write afterwards, ``dimse_timeout`` for a DIMSE message. The PACS
    opens its association when it is ready to send, so these can be much shorter than the client's.
    """

    ae_title: str = "PACSFLOW"
    host: str = "127.0.0.1"
    port: int = 11113
    # Empty tuples mean "accept any"; production deployments should list the PACS.
    allowed_calling_aes: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ("127.0.0.1", "::1")
    max_associations: int = 10
    mode: ReceiverMode = "shared"
    tls: TlsConfig | None = field(default=None)
    backend: ReceiverBackend = "pynetdicom"
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    # Advertised maximum P-DATA PDU; a longer PDU from the peer ends its association (memory per association is
    # bounded by it). The DCMTK backend advertises at most 128 KiB (storescp's limit).
    max_pdu: int = 1024 * 1024
    transfer_syntaxes: tuple[str, ...] = DEFAULT_RECEIVE_SYNTAXES
    # With Deflated in transfer_syntaxes: the largest data set inflated (streamed to disk, never in memory).
    max_inflated_bytes: int = 4 * 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.backend not in get_args(ReceiverBackend):
            raise ReceiverConfigError(
                f"unknown receiver backend {self.backend!r}: use one of {get_args(ReceiverBackend)}"
            )
        if self.mode not in get_args(ReceiverMode):
            raise ReceiverConfigError(f"unknown receiver_mode {self.mode!r}: use one of {get_args(ReceiverMode)}")
        if self.max_associations < 1:
            raise ReceiverConfigError("max_associations must be at least 1")
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ReceiverConfigError(
                    f"{name} must be between 0 and 3600 seconds (a socket without a timeout "
                    "lets one silent peer hold a slot forever)"
                )
        if not MIN_PDU <= self.max_pdu <= MAX_PDU:
            raise ReceiverConfigError(
                f"max_pdu must be between {MIN_PDU} and {MAX_PDU} bytes (0, unlimited, lets "
                "a peer make the receiver read a PDU of any size into memory)"
            )
        unknown = [s for s in self.transfer_syntaxes if s not in KNOWN_SYNTAXES]
        if unknown or not self.transfer_syntaxes:
            raise ReceiverConfigError(
                f"transfer_syntaxes must be a non-empty list of transfer syntax UIDs "
                f"pynetdicom knows; not known: {unknown}"
            )
        if self.max_inflated_bytes < 1:
            raise ReceiverConfigError("max_inflated_bytes must be positive")
        if _is_remote(self.host) and self.allowed_addresses and all(map(_is_loopback, self.allowed_addresses)):
            raise ReceiverConfigError(
                f"receiver host {self.host!r} accepts remote peers but allowed_addresses lists only loopback "
                f"addresses {list(self.allowed_addresses)}: add the PACS's address to allowed_addresses "
                "(receiver_allowed_addresses in the dicom connection, --allow-address for the service), or bind "
                "127.0.0.1"
            )

    @property
    def accepts_deflated(self) -> bool:
        return any(UID(s).is_deflated for s in self.transfer_syntaxes)

    @property
    def max_connections(self) -> int:
        """Connections served at once (threads), associations included; those beyond are closed on accept.
        Twice the association cap: room for the peers the cap will answer busy, and for a legitimate PACS while
        silent connections wait for their ``acse_timeout``."""
        return 2 * self.max_associations


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _is_remote(host: str) -> bool:
    """True when binding ``host`` accepts connections from other machines."""
    return host in ("", "0.0.0.0", "::") or not _is_loopback(host)
