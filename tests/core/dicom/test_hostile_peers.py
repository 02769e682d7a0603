"""The receiver facing a hostile network, on both backends, through real sockets.

Each case runs a receiver in a child process and asserts: the status (or association outcome) the peer sees,
what is on disk (instances only in the layout, none partial, no second copy), the receiver's peak RSS, and that
a legitimate association succeeds during and after the attack. The DCMTK backend answers 0x0000 for instances
it then refuses at ingest (storescp answers before pacsflow sees the file): those cases assert the refusal in
the receiver's stats and the absence from the layout, which is what verification re-fetches.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import (
    DEFAULT_RECEIVE_SYNTAXES,
    PacsConfig,
    ReceiverConfig,
    TlsConfig,
)
from pacsflow.core.dicom.errors import PacsTransientError
from pacsflow.core.dicom.header import is_complete
from pacsflow.core.dicom.sharing import RECEIVER_LOCK
from pacsflow.core.dicom.status import (
    CANNOT_UNDERSTAND,
    DUPLICATE_SOP_INSTANCE,
    IDENTIFIER_MISMATCH,
    OUT_OF_RESOURCES,
)
from pacsflow.core.dicom.transport import client_tls
from pacsflow.core.storage import TEMP_PREFIX
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import _config as pynetdicom_config

from tests.core.dicom.peers import (
    RECEIVER_AE,
    ReceiverProcess,
    c_store_fragments,
    closed_by_peer,
    connect,
    ct_instance,
    deflate_bomb,
    encoded,
    eventually,
    legitimate_store_succeeds,
    part10,
    sender,
    store,
    stored_files,
)

# Each attack runs against a receiver server in a child process: the slow tier (`orthanc`: a DICOM server process).
pytestmark = pytest.mark.orthanc

BACKENDS = pytest.mark.parametrize("backend", ["pynetdicom", "dcmtk"])
ACSE_TIMEOUT = 3.0
# A receiver process idles at ~70 MB; the attacks below took the old receiver past 1.5 GB.
RSS_LIMIT_MB = 250


@pytest.fixture(autouse=True)
def _send_files_as_they_are(monkeypatch):
    """Let the test's sender put a file's data set bytes on the wire undecoded (hostile or deflated bodies)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def start(tmp_path):
    """Start a receiver child process: ``start(backend, **settings)``."""
    started: list[ReceiverProcess] = []

    def run(backend: str, **settings) -> ReceiverProcess:
        config = ReceiverConfig(
            **{
                "ae_title": RECEIVER_AE,
                "port": 0,
                "backend": backend,
                "max_associations": 3,
                "acse_timeout": ACSE_TIMEOUT,
                "dimse_timeout": 10,
                "network_timeout": 10,
                **settings,
            }
        )
        receiver = ReceiverProcess(config, tmp_path / "root").__enter__()
        started.append(receiver)
        return receiver

    yield run
    for receiver in started:
        receiver.__exit__()


def _after_the_attack(receiver: ReceiverProcess, tmp_path: Path, *, stored: int | None = None, tls_args=None):
    """A legitimate store still succeeds; then stop and check the disk and the peak RSS."""
    assert legitimate_store_succeeds(receiver, tls_args=tls_args), "a legitimate association failed after the attack"
    outcome = receiver.stop()
    assert outcome.peak_rss_mb < RSS_LIMIT_MB, f"peak RSS {outcome.peak_rss_mb} MB"
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    instances = stored_files(receiver.root)
    assert all(path.is_relative_to(receiver.root) for path in everything), "a file outside the root"
    assert not [p for p in everything if p.name.startswith(TEMP_PREFIX) or ".staging" in str(p)], "a partial file"
    assert all(is_complete(path) for path in instances), "an incomplete file in the layout"
    if stored is not None:
        assert len(instances) == stored
    return outcome


@BACKENDS
def test_silent_connections_block_neither_the_accept_loop_nor_tls(backend, start, tmp_path, pki):
    """pynetdicom did the TLS handshake in its accept loop: one silent connection blocked every client."""
    tls = TlsConfig(ca_file=str(pki.ca), cert_file=str(pki.server_cert), key_file=str(pki.server_key))
    receiver = start(backend, tls=tls if backend == "pynetdicom" else None, acse_timeout=6.0)
    silent = [connect(receiver.port) for _ in range(3)]
    began = time.monotonic()
    client = TlsConfig(ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    pacs_like = PacsConfig(
        host="127.0.0.1",
        port=receiver.port,
        called_ae=RECEIVER_AE,
        acse_timeout=5,
        network_timeout=5,
        tls=client if backend == "pynetdicom" else None,
    )
    with PacsClient(pacs_like) as pacs:
        pacs.echo()
    assert time.monotonic() - began < 3, "the echo waited for the silent connections"
    assert not closed_by_peer(silent[0], 0.1)  # still open: the echo succeeded during the attack
    assert all(closed_by_peer(connection, ACSE_TIMEOUT + 6) for connection in silent), "a silent peer kept its slot"
    tls_args = client_tls(pacs_like.tls, "127.0.0.1") if pacs_like.tls else None
    _after_the_attack(receiver, tmp_path, stored=1, tls_args=tls_args)


@BACKENDS
def test_slowloris_connections_time_out_and_never_take_the_legitimate_peers_slot(backend, start, tmp_path):
    receiver = start(backend)
    trickling = []
    for _ in range(receiver.config.max_connections - 1):  # one byte each: a PDU header never completed
        connection = connect(receiver.port)
        connection.sendall(b"\x01")
        trickling.append(connection)
    time.sleep(0.3)
    assert legitimate_store_succeeds(receiver, seconds=ACSE_TIMEOUT / 2), "the slowloris held every slot"
    # Beyond the cap, closed at once; at most two are admitted: the last free slot, and the one the legitimate
    # association frees when its thread (storescp) ends.
    flood = [connect(receiver.port) for _ in range(20)]
    assert sum(closed_by_peer(connection, 1.0) for connection in flood) >= len(flood) - 2
    assert all(closed_by_peer(connection, ACSE_TIMEOUT + 3) for connection in trickling + flood)
    _after_the_attack(receiver, tmp_path, stored=2)


@BACKENDS
def test_deflated_is_refused_by_default(backend, start, tmp_path):
    receiver = start(backend)
    assert DeflatedExplicitVRLittleEndian not in DEFAULT_RECEIVE_SYNTAXES
    assoc = sender(syntaxes=[DeflatedExplicitVRLittleEndian]).associate(
        "127.0.0.1", receiver.port, ae_title=RECEIVER_AE
    )
    assert not [cx for cx in assoc.accepted_contexts if cx.transfer_syntax[0] == DeflatedExplicitVRLittleEndian]
    if assoc.is_established:
        assoc.release()
    _after_the_attack(receiver, tmp_path, stored=1)


@BACKENDS
def test_a_deflate_bomb_is_inflated_with_a_bound_and_refused(backend, start, tmp_path):
    receiver = start(
        backend,
        transfer_syntaxes=(DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian),
        max_inflated_bytes=32 * 1024 * 1024,
    )
    header, bomb = deflate_bomb(1024 * 1024 * 1024)  # 1 GiB inflated, ~1 MB on the wire
    bomb_file = part10(
        tmp_path / "bomb.dcm", bomb, sop_uid=header.SOPInstanceUID, syntax=DeflatedExplicitVRLittleEndian
    )
    small, small_body = deflate_bomb(2 * 1024 * 1024)  # a legitimate deflated instance, under the bound
    small_file = part10(
        tmp_path / "small.dcm", small_body, sop_uid=small.SOPInstanceUID, syntax=DeflatedExplicitVRLittleEndian
    )
    assoc = sender(syntaxes=[DeflatedExplicitVRLittleEndian]).associate(
        "127.0.0.1", receiver.port, ae_title=RECEIVER_AE
    )
    bomb_status = assoc.send_c_store(bomb_file).Status
    small_status = assoc.send_c_store(small_file).Status
    assoc.release()
    assert small_status == 0x0000
    assert bomb_status == (OUT_OF_RESOURCES if backend == "pynetdicom" else 0x0000)
    small_path = receiver.layout.instance_path(small.StudyInstanceUID, small.SeriesInstanceUID, small.SOPInstanceUID)
    assert eventually(small_path.is_file)
    outcome = _after_the_attack(receiver, tmp_path.joinpath("root"), stored=2)  # the small one, inflated; legit
    assert outcome.rejected_reasons == {"inflates to more than max_inflated_bytes": 1}


@BACKENDS
def test_a_pdu_longer_than_the_maximum_ends_the_association_before_it_is_read(backend, start, tmp_path):
    """pynetdicom read a PDU whole, of any announced length: 400 MB in one PDU took it to 1.7 GB."""
    receiver = start(backend, max_pdu=65536)
    assoc = sender().associate("127.0.0.1", receiver.port, ae_title=RECEIVER_AE)
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    sent = 0
    chunk = bytes(1024 * 1024)
    try:
        raw.sendall(b"\x04\x00" + (400 * 1024 * 1024).to_bytes(4, "big"))
        while sent < 400 * 1024 * 1024:
            raw.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    assoc.abort()
    assert sent < 400 * 1024 * 1024, "the receiver read the whole PDU"
    _after_the_attack(receiver, tmp_path, stored=1)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _start_a_large_store(port: int, tmp_path: Path, megabytes: int = 64):
    """An association sending the first part of a large instance, left hanging mid-object."""
    dataset = ct_instance(pixels=megabytes * 1024 * 1024 // 2)
    assoc = sender().associate("127.0.0.1", port, ae_title=RECEIVER_AE)
    fragments = c_store_fragments(assoc, encoded(dataset), dataset.SOPClassUID, dataset.SOPInstanceUID, 16384)
    for fragment in itertools.islice(fragments, 1000):  # ~16 MB of 64
        assoc.dul.send_pdu(fragment)
    return assoc


@BACKENDS
def test_a_receiver_killed_mid_object_never_files_a_truncated_instance(backend, start, tmp_path):
    receiver = start(backend)
    assoc = _start_a_large_store(receiver.port, tmp_path)
    assert eventually(
        lambda: any(p.stat().st_size > 8 * 1024 * 1024 for p in receiver.root.rglob("*") if p.is_file()), 20
    ), "the instance did not start streaming to disk"
    if backend == "dcmtk":  # storescp dies (OOM, a signal): its partial file stays in staging
        (storescp,) = _children(receiver.pid)
        os.kill(storescp, signal.SIGKILL)
        assert eventually(lambda: not any(p.is_file() for p in (receiver.root / ".staging-dcmtk").rglob("*")))
    else:  # the receiver process itself dies; the next one starts on the same root
        os.kill(receiver.pid, signal.SIGKILL)
        receiver.__exit__()
        receiver = start(backend)
    assoc.abort()
    outcome = _after_the_attack(receiver, tmp_path, stored=1)
    if backend == "dcmtk":
        assert outcome.rejected_reasons == {"incomplete (storescp ended abnormally)": 1}


@BACKENDS
def test_stopping_the_receiver_mid_object_files_nothing(backend, start, tmp_path):
    """pacsflow's own stop (SIGTERM, as from Airflow) while a peer is mid-object."""
    receiver = start(backend)
    assoc = _start_a_large_store(receiver.port, tmp_path)
    assert eventually(
        lambda: any(p.stat().st_size > 8 * 1024 * 1024 for p in receiver.root.rglob("*") if p.is_file()), 20
    )
    outcome = receiver.stop()
    assoc.abort()
    left = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != RECEIVER_LOCK]  # the lock holds no data
    assert stored_files(receiver.root) == [] and left == []
    assert outcome.stored == 0 and outcome.peak_rss_mb < RSS_LIMIT_MB


@BACKENDS
def test_a_second_copy_never_replaces_the_first_nor_lands_under_another_study(backend, start, tmp_path):
    receiver = start(backend)
    original = ct_instance()
    assert store(receiver.port, original) == 0x0000
    path = receiver.layout.instance_path(original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    assert eventually(path.is_file)
    first_bytes = path.read_bytes()
    refused = DUPLICATE_SOP_INSTANCE if backend == "pynetdicom" else 0x0000
    assert store(receiver.port, original) == 0x0000  # a re-send of the same bytes: success, nothing written
    altered = ct_instance(study=original.StudyInstanceUID, series=original.SeriesInstanceUID)
    altered.SOPInstanceUID, altered.PatientName = original.SOPInstanceUID, "OTHER^BYTES"
    assert store(receiver.port, altered) == refused
    elsewhere = ct_instance()  # same SOP Instance UID under another study
    elsewhere.SOPInstanceUID = original.SOPInstanceUID
    assert store(receiver.port, elsewhere) == refused
    time.sleep(0.5)  # the DCMTK backend's ingest
    outcome = _after_the_attack(receiver, tmp_path, stored=2)
    assert path.read_bytes() == first_bytes
    assert outcome.rejected_reasons == {
        "SOP Instance already stored with other bytes": 1,
        "SOP Instance UID already stored under another study or series": 1,
    }


@BACKENDS
def test_hostile_uids_mismatches_and_damaged_bodies_are_never_filed(backend, start, tmp_path):
    receiver = start(backend)
    expected = {"pynetdicom": (CANNOT_UNDERSTAND, IDENTIFIER_MISMATCH, CANNOT_UNDERSTAND), "dcmtk": (0, 0, 0)}[backend]
    traversal = ct_instance()
    traversal.SOPInstanceUID = "1.2.3.45"  # then overwritten in the bytes, same length: pydicom refuses to encode it
    body = encoded(traversal).replace(b"1.2.3.45", b"../../xx")
    mismatch = ct_instance()
    damaged = ct_instance(pixels=4096)
    cut = encoded(damaged)[:-1000]  # its pixel data shorter than declared
    statuses = []
    for name, data, sop_uid in (
        ("traversal", body, "../../xx"),
        ("mismatch", encoded(mismatch), generate_uid()),
        ("damaged", cut, damaged.SOPInstanceUID),
    ):
        assoc = sender().associate("127.0.0.1", receiver.port, ae_title=RECEIVER_AE)
        statuses.append(int(assoc.send_c_store(part10(tmp_path / f"{name}.dcm", data, sop_uid=sop_uid)).Status))
        assoc.release()
    assert tuple(statuses) == expected
    time.sleep(0.5)
    outcome = _after_the_attack(receiver, tmp_path / "root", stored=1)
    assert outcome.rejected_reasons == {
        "invalid UID": 1,
        "SOP Instance UID differs from the request": 1,
        "data set incomplete or its lengths inconsistent": 1,
    }


@BACKENDS
def test_rejected_peers_see_an_associate_rj_every_time(backend, start, tmp_path):
    receiver = start(backend, allowed_calling_aes=("SENDER",))
    outcomes = [store(receiver.port, ct_instance(), calling_ae="INTRUDER") for _ in range(20)]
    outcomes += [store(receiver.port, ct_instance(), called_ae="SOMEONE_ELSE") for _ in range(5)]
    assert outcomes == ["rejected"] * 25
    _after_the_attack(receiver, tmp_path, stored=1)


@BACKENDS
def test_the_association_cap_answers_busy_and_frees_up(backend, start, tmp_path):
    receiver = start(backend)
    held = [sender().associate("127.0.0.1", receiver.port, ae_title=RECEIVER_AE) for _ in range(3)]
    assert all(assoc.is_established for assoc in held)
    config = PacsConfig(host="127.0.0.1", port=receiver.port, called_ae=RECEIVER_AE, acse_timeout=5)
    with PacsClient(config) as extra, pytest.raises(PacsTransientError, match="busy"):
        extra.echo()
    for assoc in held:
        assoc.release()
    time.sleep(0.3)
    _after_the_attack(receiver, tmp_path, stored=1)
