"""pacsflow's C-STORE receiver against real senders: pynetdicom, DCMTK storescu/movescu through Orthanc."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pytest
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig, TlsConfig
from pacsflow.core.dicom.dcmtk_receiver import STAGING_DIR
from pacsflow.core.dicom.errors import PacsTransientError
from pacsflow.core.dicom.receiver import StoreReceiver, open_receiver
from pacsflow.core.dicom.sharing import RECEIVER_LOCK
from pacsflow.core.dicom.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from pacsflow.core.dicom.transport import client_tls
from pacsflow.core.storage import TEMP_PREFIX, StorageLayout
from pydicom import config as pydicom_config
from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from tests.core.dicom.conftest import RECEIVER_AE
from tests.helpers import free_port

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def written_files(root: Path) -> list[Path]:
    """Files under ``root`` other than the receiver's lock (which holds no data)."""
    return [p for p in root.rglob("*") if p.is_file() and p.name != RECEIVER_LOCK]


def sender(calling_ae: str = "SENDER") -> AE:
    ae = AE(ae_title=calling_ae)
    for context in StoragePresentationContexts:
        ae.add_requested_context(context.abstract_syntax)
    return ae


def send(port: int, dataset, calling_ae: str = "SENDER") -> int | None:
    assoc = sender(calling_ae).associate("127.0.0.1", port, ae_title=RECEIVER_AE)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(dataset)
        return int(status.Status) if status is not None and "Status" in status else None
    finally:
        assoc.release()


@pytest.fixture
def receiver_config() -> ReceiverConfig:
    return ReceiverConfig(ae_title=RECEIVER_AE, port=free_port())


@contextmanager
def _invalid_values_allowed():
    """Let pydicom encode the hostile value: a real attacker's sender does not validate."""
    saved = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        pydicom_config.settings.writing_validation_mode = saved


# The DCMTK backend runs storescp child processes: a DICOM server process, hence the `orthanc` tier.
BACKENDS = pytest.mark.parametrize("backend", ["pynetdicom", pytest.param("dcmtk", marks=pytest.mark.orthanc)])


@BACKENDS
def test_a_hostile_sop_instance_uid_is_refused_and_nothing_is_written(files, receiver_config, tmp_path, backend):
    dataset = dcmread(files[0])
    dataset.SOPInstanceUID = "../../../../elsewhere/x"
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    layout = StorageLayout(tmp_path / "root")
    with _invalid_values_allowed(), open_receiver(replace(receiver_config, backend=backend), layout) as receiver:
        status = send(receiver_config.port, dataset)
        receiver.settle()
    # pynetdicom answers a failure; storescp stores it under a generated name and the ingest refuses it.
    if backend == "pynetdicom":
        assert status == CANNOT_UNDERSTAND
    assert receiver.stats.stored == 0 and receiver.stats.rejected_reasons == {"invalid UID": 1}
    assert written_files(tmp_path) == []


@BACKENDS
def test_an_unknown_calling_ae_is_rejected(files, tmp_path, backend):
    config = ReceiverConfig(ae_title=RECEIVER_AE, port=free_port(), allowed_calling_aes=("ORTHANC",), backend=backend)
    with open_receiver(config, StorageLayout(tmp_path)) as receiver:
        assert send(config.port, dcmread(files[0]), calling_ae="INTRUDER") is None
        assert send(config.port, dcmread(files[0]), calling_ae="ORTHANC") == 0x0000
    assert receiver.stats.stored == 1


@BACKENDS
def test_a_peer_address_outside_the_allow_list_is_dropped(files, tmp_path, backend):
    config = ReceiverConfig(ae_title=RECEIVER_AE, port=free_port(), allowed_addresses=("127.0.0.2",), backend=backend)
    with open_receiver(config, StorageLayout(tmp_path)) as receiver:
        assert send(config.port, dcmread(files[0])) is None
    assert receiver.stats.stored == 0 and not list(tmp_path.rglob("*.dcm"))


@BACKENDS
def test_a_sender_aborting_in_the_middle_of_an_instance_leaves_no_file(files, receiver_config, tmp_path, backend):
    """A scripted sender: the first P-DATA fragments of a C-STORE, then A-ABORT."""
    receiver_config = replace(receiver_config, backend=backend)
    dataset = dcmread(files[0])
    dataset.Rows = dataset.Columns = 256
    dataset.PixelData = bytes(256 * 256 * 2)  # 32 fragments of 4 KiB
    layout = StorageLayout(tmp_path / "root")
    with open_receiver(receiver_config, layout) as receiver:
        assoc = sender().associate("127.0.0.1", receiver_config.port, ae_title=RECEIVER_AE)
        fragments = _c_store_fragments(assoc, dataset, max_pdu=4096)
        for fragment in itertools.islice(fragments, 8):  # the command and the start of the dataset
            assoc.dul.send_pdu(fragment)
        # Streamed: the partial instance is on disk, inside the root (not in memory, not in the system temp).
        assert _eventually(lambda: written_files(layout.root)), "nothing streamed to disk"
        assoc.abort()
        # Gone while the receiver runs (a standalone service may run for months), not only at its next sweep.
        assert _eventually(lambda: not written_files(layout.root)), "a partial file stayed"
    assert sum(1 for _ in fragments) > 0, "the whole instance was sent; make it larger"
    assert receiver.stats.stored == receiver.stats.rejected == 0


def _eventually(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _c_store_fragments(assoc, dataset, max_pdu: int) -> Iterator:
    """The P-DATA-TF PDUs pynetdicom would send for a C-STORE of ``dataset``."""
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == dataset.SOPClassUID)
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = dataset.SOPClassUID, dataset.SOPInstanceUID
    syntax = context.transfer_syntax[0]
    request.DataSet = BytesIO(encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return message.encode_msg(context.context_id, max_pdu)


def test_leftover_temp_files_are_swept_at_start(receiver_config, tmp_path):
    leftover = tmp_path / "1.2" / "1.2.3" / f"{TEMP_PREFIX}999-1.2.3.4.dcm"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial patient data")
    with StoreReceiver(receiver_config, StorageLayout(tmp_path)):
        assert not leftover.exists()


def test_port_zero_binds_a_free_port(files, tmp_path):
    with StoreReceiver(ReceiverConfig(ae_title=RECEIVER_AE, port=0), StorageLayout(tmp_path)) as receiver:
        assert receiver.port > 0
        assert send(receiver.port, dcmread(files[0])) == 0x0000


def test_an_unknown_called_ae_is_rejected(files, receiver_config, tmp_path):
    with StoreReceiver(receiver_config, StorageLayout(tmp_path)) as receiver:
        assoc = sender().associate("127.0.0.1", receiver_config.port, ae_title="SOMEONE_ELSE")
        assert assoc.is_rejected
    assert receiver.stats.stored == 0


def test_tls_with_client_certificates(files, pki, tmp_path):
    server = TlsConfig(ca_file=str(pki.ca), cert_file=str(pki.server_cert), key_file=str(pki.server_key))
    client = TlsConfig(ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    config = ReceiverConfig(ae_title=RECEIVER_AE, port=0, tls=server)
    with StoreReceiver(config, StorageLayout(tmp_path)) as receiver:
        pacs_like = PacsConfig(
            host="127.0.0.1", port=receiver.port, called_ae=RECEIVER_AE, acse_timeout=5, network_timeout=5
        )
        with PacsClient(replace(pacs_like, tls=client)) as verified:
            verified.echo()  # the server certificate is checked against the CA and the host name
        for refused in (pacs_like, replace(pacs_like, tls=TlsConfig(ca_file=str(pki.ca)))):  # plain, no cert
            with PacsClient(refused) as stranger, pytest.raises(PacsTransientError):
                stranger.echo()
        assoc = sender().associate(
            "127.0.0.1", receiver.port, ae_title=RECEIVER_AE, tls_args=client_tls(client, "127.0.0.1")
        )
        assert assoc.send_c_store(dcmread(files[0])).Status == 0x0000
        assoc.release()
    assert receiver.stats.stored == 1


@pytest.fixture
def tiny_filesystem(tmp_path) -> Path:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], check=False, capture_output=True
        ).returncode
    ):
        pytest.skip("needs root to mount a 64 KiB tmpfs (CI runs as root)")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # lazy: a file a failed test left open


def test_a_full_disk_answers_out_of_resources_and_leaves_no_partial_file(files, receiver_config, tiny_filesystem):
    dataset = dcmread(files[0])
    dataset.PixelData = bytes(256 * 1024)
    dataset.Rows, dataset.Columns = 256, 512
    with StoreReceiver(receiver_config, StorageLayout(tiny_filesystem)) as receiver:
        assert send(receiver_config.port, dataset) == OUT_OF_RESOURCES
    assert receiver.stats.rejected_reasons == {"disk full": 1}
    assert written_files(tiny_filesystem) == []


@BACKENDS
def test_dcmtk_storescu_into_the_receiver(files, receiver_config, tmp_path, backend):
    layout = StorageLayout(tmp_path)
    batch = files[:10]
    with open_receiver(replace(receiver_config, backend=backend), layout) as receiver:
        subprocess.run(
            [
                "storescu",
                "-aet",
                "DCMTK",
                "-aec",
                RECEIVER_AE,
                "127.0.0.1",
                str(receiver_config.port),
                *map(str, batch),
            ],
            check=True,
            env=DCMTK_ENV,
            capture_output=True,
        )
    assert receiver.stats.stored == len(batch) and receiver.stats.rejected == 0
    for path in batch:
        original = dcmread(path)
        stored = dcmread(
            layout.instance_path(original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
        )
        assert stored.PixelData == original.PixelData and stored.PatientName == original.PatientName
    assert not (layout.root / STAGING_DIR).exists()  # the DCMTK backend's staging is gone with it


def test_dcmtk_movescu_through_orthanc_into_the_receiver(pacs, receiver_ports, a_series, tmp_path):
    study, series, count = a_series
    layout = StorageLayout(tmp_path)
    config = ReceiverConfig(ae_title=RECEIVER_AE, port=receiver_ports[RECEIVER_AE])
    with StoreReceiver(config, layout) as receiver:
        subprocess.run(
            [
                "movescu",
                "-S",
                "-aet",
                "DCMTK",
                "-aec",
                pacs.config.called_ae,
                "-aem",
                RECEIVER_AE,
                "-k",
                "QueryRetrieveLevel=SERIES",
                "-k",
                f"StudyInstanceUID={study}",
                "-k",
                f"SeriesInstanceUID={series}",
                "127.0.0.1",
                str(pacs.config.port),
            ],
            check=True,
            env=DCMTK_ENV,
            capture_output=True,
        )
    assert receiver.stats.stored == count == len(layout.stored_sop_uids(study, series))


@BACKENDS
def test_the_receiver_answers_busy_beyond_its_association_cap(tmp_path, backend):
    config = ReceiverConfig(ae_title=RECEIVER_AE, port=free_port(), max_associations=1, backend=backend)
    pacs_like = PacsConfig(host="127.0.0.1", port=config.port, called_ae=RECEIVER_AE, acse_timeout=5)
    with open_receiver(config, StorageLayout(tmp_path)), PacsClient(pacs_like) as first:
        first.echo()
        with PacsClient(pacs_like) as second, pytest.raises(PacsTransientError, match="busy"):
            second.echo()


@BACKENDS
@pytest.mark.orthanc  # the receiver service in a child process
def test_the_standalone_service_receives_and_stops_on_sigterm(files, tmp_path, backend):
    port = free_port()
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pacsflow.core.dicom",
            "--root",
            str(tmp_path),
            "--ae-title",
            RECEIVER_AE,
            "--port",
            str(port),
            "--backend",
            backend,
        ],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        deadline = time.monotonic() + 30
        while (status := send(port, dcmread(files[0]))) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 0x0000
    finally:
        service.send_signal(signal.SIGTERM)
        _, log = service.communicate(timeout=20)
    assert service.returncode == 0
    assert b"1 stored" in log
    header = dcmread(files[0], stop_before_pixels=True)
    assert StorageLayout(tmp_path).stored_sop_uids(header.StudyInstanceUID, header.SeriesInstanceUID) == {
        header.SOPInstanceUID
    }
    assert shutil.which("storescu")  # DCMTK is part of the test set-up, not optional


@BACKENDS
def test_received_instances_are_readable_by_the_service_account_only(files, receiver_config, tmp_path, backend):
    os.umask(0o022)  # a service started with the usual umask: the receiver must not depend on it
    layout = StorageLayout(tmp_path / "data" / "dicom")
    with open_receiver(replace(receiver_config, backend=backend), layout) as receiver:
        subprocess.run(
            [
                "storescu",
                "-aet",
                "DCMTK",
                "-aec",
                RECEIVER_AE,
                "127.0.0.1",
                str(receiver_config.port),
                *map(str, files[:3]),
            ],
            check=True,
            env=DCMTK_ENV,
            capture_output=True,
        )
    assert receiver.stats.stored == 3
    stored = list(layout.root.glob("*/*/*.dcm"))
    assert len(stored) == 3
    assert {oct(path.stat().st_mode & 0o777) for path in stored} == {"0o600"}
    directories = {layout.root, *(p.parent for p in stored), *(p.parent.parent for p in stored)}
    assert {oct(d.stat().st_mode & 0o777) for d in directories} == {"0o700"}
