"""A receiver in a child process (so that its peak RSS can be measured) and the hostile peers that attack it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.storage import StorageLayout
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

RECEIVER_AE = "PACSFLOW"
SERVE = Path(__file__).with_name("serve_receiver.py")


@dataclass
class Outcome:
    """What the child receiver reported when it stopped."""

    stored: int
    rejected_reasons: dict[str, int]
    peak_rss_mb: float  # the receiver process's and its children's (storescp) highest resident set


class ReceiverProcess:
    """``open_receiver(config, layout)`` in a child process; ``stop()`` returns its stats and peak RSS."""

    def __init__(self, config: ReceiverConfig, root: Path) -> None:
        self.config, self.root = config, root
        self.layout = StorageLayout(root)
        self.port = 0
        self._process: subprocess.Popen[str] | None = None
        self.outcome: Outcome | None = None

    def __enter__(self) -> ReceiverProcess:
        settings = {k: v for k, v in asdict(self.config).items() if k != "tls"}
        if self.config.tls is not None:
            settings["tls"] = asdict(self.config.tls)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self._process = subprocess.Popen(
            [sys.executable, str(SERVE), json.dumps(settings), str(self.root)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        assert line.startswith("port "), f"the receiver did not start: {line!r}"
        self.port = int(line.split()[1])
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> Outcome:
        assert self._process is not None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        out, _ = self._process.communicate(timeout=60)
        assert self._process.returncode == 0, f"the receiver died ({self._process.returncode})"
        self.outcome = Outcome(**json.loads(out.strip().splitlines()[-1]))
        return self.outcome

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


# -- legitimate traffic ------------------------------------------------------------------------------------
def ct_instance(*, study: str | None = None, series: str | None = None, pixels: int = 64 * 64) -> Dataset:
    """A small, valid CT image with fresh UIDs (unless given)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), series or generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "HOSTILE^TEST", "HT1", "CT"
    ds.Columns = min(pixels, 32768)
    ds.Rows = pixels // ds.Columns
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(2 * pixels)
    return ds


def sender(calling_ae: str = "SENDER", syntaxes: list[str] | None = None) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in StoragePresentationContexts:
        ae.add_requested_context(context.abstract_syntax, syntaxes or [ExplicitVRLittleEndian])
    return ae


def store(
    port: int, dataset: Dataset, *, calling_ae: str = "SENDER", called_ae: str = RECEIVER_AE, tls_args: Any = None
) -> int | str:
    """The status the peer sees for one C-STORE, or "rejected"/"aborted"/"refused" for the association."""
    try:
        assoc = sender(calling_ae).associate("127.0.0.1", port, ae_title=called_ae, tls_args=tls_args)
    except OSError:
        return "refused"
    if assoc.is_rejected:
        return "rejected"
    if not assoc.is_established:
        return "aborted"
    try:
        status = assoc.send_c_store(dataset)
        return int(status.Status) if status is not None and "Status" in status else "aborted"
    finally:
        assoc.release()


def stored_files(root: Path) -> list[Path]:
    """Instances in the layout (dot entries, the receivers' own, skipped)."""
    return sorted(p for p in root.glob("*/*/*.dcm") if not any(part.startswith(".") for part in p.parts[-3:]))


def legitimate_store_succeeds(receiver: ReceiverProcess, seconds: float = 15.0, tls_args: Any = None) -> bool:
    """A real sender's C-STORE is answered success and its file is in the layout (the DCMTK backend ingests
    asynchronously: wait for it)."""
    dataset = ct_instance()
    if store(receiver.port, dataset, tls_args=tls_args) != 0x0000:
        return False
    path = receiver.layout.instance_path(dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
    return eventually(path.is_file, seconds)


def eventually(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- hostile traffic ---------------------------------------------------------------------------------------
def c_store_fragments(assoc: Any, dataset_bytes: bytes, sop_class: str, sop_uid: str, max_pdu: int) -> Iterator[Any]:
    """The P-DATA-TF PDUs of a C-STORE whose data set is ``dataset_bytes`` as given (any encoding, any damage)."""
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class)
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class, sop_uid
    request.DataSet = BytesIO(dataset_bytes)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return message.encode_msg(context.context_id, max_pdu)


def encoded(dataset: Dataset) -> bytes:
    return encode(dataset, False, True)


def part10(
    path: Path, body: bytes, *, sop_uid: str, syntax: str = ExplicitVRLittleEndian, sop_class: str = CTImageStorage
) -> Path:
    """A Part 10 file whose data set is ``body`` as given, for pynetdicom to send without decoding it
    (``_config.STORE_SEND_CHUNKED_DATASET``): the way to put any bytes, damaged or deflated, on the wire."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = sop_class, sop_uid, syntax
    with open(path, "wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(handle), meta, enforce_standard=True)
        handle.write(body)
    return path


def deflate_bomb(inflated_bytes: int) -> tuple[Dataset, bytes]:
    """A CT header followed by ``inflated_bytes`` of zero pixel data, deflated (a few hundred KB on the wire per
    hundred MB inflated), built without holding the inflated data set."""
    header = ct_instance(pixels=inflated_bytes // 2)
    del header.PixelData
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [
        compressor.compress(encoded(header)),
        compressor.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + (inflated_bytes).to_bytes(4, "little")),
    ]
    zeros = bytes(1024 * 1024)
    for _ in range(inflated_bytes // len(zeros)):
        parts.append(compressor.compress(zeros))
    parts.append(compressor.flush())
    body = b"".join(parts)
    return header, body + b"\x00" * (len(body) % 2)  # PS3.5 A.5: padded to an even length


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_by_peer(connection: socket.socket, seconds: float) -> bool:
    """Whether the receiver closes ``connection`` within ``seconds``."""
    connection.settimeout(seconds)
    try:
        while connection.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True
