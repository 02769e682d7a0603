"""pacsflow's adjustments of pynetdicom: applied per AE and association, never at import, and only to the
pynetdicom version they were verified against."""

from __future__ import annotations

import subprocess
import sys
import time
from copy import deepcopy
from dataclasses import replace

import pynetdicom
import pytest
from pacsflow.core.dicom import transport
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig
from pacsflow.core.dicom.receiver import StoreReceiver
from pacsflow.core.dicom.transport import VERIFIED_PYNETDICOM, PynetdicomVersionError, application_entity
from pacsflow.core.storage import StorageLayout
from pynetdicom import evt
from pynetdicom.association import Association

from tests.helpers import free_port

_STATE = """
import logging, tempfile
{imports}
from pynetdicom import _config, dimse_messages
from pynetdicom.association import Association
print(
    _config.LOG_REQUEST_IDENTIFIERS, _config.LOG_RESPONSE_IDENTIFIERS, _config.STORE_RECV_CHUNKED_DATASET,
    _config.LOG_HANDLER_LEVEL, Association._serve_request.__module__,
    dimse_messages.NamedTemporaryFile is tempfile.NamedTemporaryFile,
    logging.getLogger("pynetdicom").level, logging.getLogger("pydicom").level,
)
"""
_PACSFLOW = """
import pacsflow.core.dicom.client, pacsflow.core.dicom.receiver, pacsflow.core.dicom.dcmtk_receiver
import pacsflow.core.dicom.__main__
"""


def _state(imports: str) -> list[str]:
    script = _STATE.format(imports=imports)
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120)
    return done.stdout.split()


def test_importing_pacsflow_leaves_pynetdicom_and_library_loggers_as_they_are():
    untouched = _state("import pydicom, pynetdicom")
    assert untouched[:6] == ["True", "True", "False", "standard", "pynetdicom.association", "True"]  # pynetdicom's
    assert _state(_PACSFLOW) == untouched


def test_another_pynetdicom_version_is_refused_where_the_adjustments_apply(monkeypatch, tmp_path):
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    port = free_port()
    with (
        pytest.raises(PynetdicomVersionError) as error,
        StoreReceiver(ReceiverConfig(port=port), StorageLayout(tmp_path)),
    ):
        pass
    assert f"verified against pynetdicom {VERIFIED_PYNETDICOM}" in str(error.value)
    assert "pynetdicom 3.1.0 is installed" in str(error.value)
    with (
        PacsClient(PacsConfig(host="127.0.0.1", port=port, called_ae="ANY")) as client,
        pytest.raises(PynetdicomVersionError),
    ):
        client.echo()


def test_each_accepted_association_gets_its_own_copy_of_the_receiver_contexts(tmp_path):
    # pynetdicom deep-copies the server's contexts per accepted association (0.2 s with every storage context)
    with StoreReceiver(ReceiverConfig(port=free_port()), StorageLayout(tmp_path)) as receiver:
        assert receiver._server is not None
        served = receiver._server.contexts
        copied = deepcopy(served)
    assert [(c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role) for c in copied] == [
        (c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role) for c in served
    ]
    assert len(served) > 100
    for mine, theirs in zip(copied, served, strict=True):
        assert mine is not theirs and mine.transfer_syntax is not theirs.transfer_syntax  # nothing mutable shared
        assert mine.abstract_syntax is theirs.abstract_syntax  # the UIDs are shared: not pynetdicom's deep copy


def test_associations_bind_none_of_pynetdicoms_logging_handlers():
    # they format every PDU and DIMSE message, SOP Instance UIDs included, for a logger that drops it at WARNING
    assoc = Association(application_entity("PACSFLOW"), "requestor")
    logged = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)
    assert [assoc.get_handlers(event) for event in logged] == [[], [], [], []]


def test_an_idle_association_waits_instead_of_polling(pacs, monkeypatch):
    """pynetdicom's DUL thread looked at its socket every 0.5 ms and the reactor every 1 ms: 10% of a core per
    association, idle or not. Adopted, the DUL waits on its socket and its bell (at most
    ``DUL_MAX_WAIT_SECONDS`` between looks), and the reactor of an association we requested sleeps between
    requests."""
    looks = []
    await_work = transport._WaitingDul._await_work
    monkeypatch.setattr(transport._WaitingDul, "_await_work", lambda dul: (looks.append(1), await_work(dul))[1])
    with PacsClient(pacs.config) as client:
        client.echo()
        assoc = client._association()
        time.sleep(0.05)
        looks.clear()
        time.sleep(0.5)
        assert 0 < len(looks) <= 0.5 / transport.DUL_MAX_WAIT_SECONDS + 2  # polling: about 1,000
        assert assoc._is_paused and not assoc._reactor_checkpoint.is_set()
        client.echo()  # and the association still serves


def test_a_request_wakes_the_waiting_dul_at_once(pacs, monkeypatch):
    """What another thread hands the DUL (a request, a release) rings its bell: with looks a minute apart, a
    request after an idle moment is still sent at once (not answered within the DIMSE timeout otherwise)."""
    monkeypatch.setattr(transport, "DUL_MAX_WAIT_SECONDS", 60.0)
    with PacsClient(replace(pacs.config, dimse_timeout=5)) as client:
        client.echo()
        time.sleep(0.2)  # the DUL waits now
        for _ in range(3):
            client.echo()
