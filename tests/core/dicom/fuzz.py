"""Mutated associations for the receiver fuzz run (tests/core/dicom/test_fuzz_receiver.py, bench/bench_fuzz.py).

Each case is one association written byte by byte: a real A-ASSOCIATE-RQ, the P-DATA-TF PDUs of a C-STORE, an
A-RELEASE-RQ, then one mutation: bytes of the data set changed (framing intact, so the receiver's parsing of the
data set is what is exercised), the data set cut short or padded, a PDU cut short, a PDU length field changed
(smaller, larger, 4 GB), random bytes in a PDU, a random PDU inserted, a PDU repeated. The peer records the
C-STORE status it sees, if any.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass
from io import BytesIO

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from tests.core.dicom.peers import RECEIVER_AE, ct_instance, encoded

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
MUTATIONS = (
    "data set bytes",
    "data set cut",
    "data set padded",
    "PDU cut",
    "length smaller",
    "length larger",
    "length 4 GB",
    "random bytes",
    "random PDU",
    "PDU repeated",
)
_STATUS = b"\x00\x00\x00\x09\x02\x00\x00\x00"  # (0000,0900) Status, implicit VR, length 2


def _item(kind: int, body: bytes) -> bytes:
    return bytes([kind, 0]) + struct.pack(">H", len(body)) + body


def associate_rq(called: str, calling: str, max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing CT Image Storage (context 1) in Explicit VR Little Endian (PS3.8 9.3.2)."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, CTImageStorage.encode()) + _item(0x40, ExplicitVRLittleEndian.encode())
    user = _item(0x51, struct.pack(">I", max_pdu))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT)
        + _item(0x20, context)
        + _item(0x50, user)
    )
    return b"\x01\x00" + struct.pack(">I", len(body)) + body


def c_store_pdus(data_set: bytes, sop_uid: str, max_pdu: int = 16384) -> list[bytes]:
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, sop_uid
    request.DataSet = BytesIO(data_set)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


@dataclass
class Case:
    number: int
    mutation: str
    sop_uid: str
    study_uid: str
    series_uid: str
    pdus: list[bytes]


def make_case(rng: random.Random, number: int) -> Case:
    dataset = ct_instance(pixels=rng.choice([64, 4096, 64 * 1024]))
    data = bytearray(encoded(dataset))
    mutation = rng.choice(MUTATIONS)
    if mutation == "data set bytes":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(min(len(data), 600))] = rng.randrange(256)
    elif mutation == "data set cut":
        data = data[: rng.randrange(len(data))]
    elif mutation == "data set padded":
        data += bytes(rng.randrange(256) for _ in range(rng.choice([2, 8, 100])))
    pdus = [associate_rq(RECEIVER_AE, "FUZZER"), *c_store_pdus(bytes(data), dataset.SOPInstanceUID), RELEASE_RQ]
    target = rng.randrange(len(pdus))
    pdu = bytearray(pdus[target])
    if mutation == "PDU cut":
        pdus[target:] = [bytes(pdu[: rng.randrange(1, len(pdu))])]
    elif mutation.startswith("length"):
        length = struct.unpack(">I", pdu[2:6])[0]
        new = {
            "length smaller": rng.randrange(max(length, 1)),
            "length larger": length + rng.randint(1, 70000),
            "length 4 GB": 0xFFFFFFFF,
        }[mutation]
        pdu[2:6] = struct.pack(">I", new)
        pdus[target] = bytes(pdu)
    elif mutation == "random bytes":
        for _ in range(rng.randint(1, 16)):
            pdu[rng.randrange(len(pdu))] = rng.randrange(256)
        pdus[target] = bytes(pdu)
    elif mutation == "random PDU":
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        pdus.insert(target, bytes([rng.randint(1, 7), 0]) + struct.pack(">I", len(junk)) + junk)
    elif mutation == "PDU repeated":
        pdus.insert(target, pdus[target])
    return Case(number, mutation, dataset.SOPInstanceUID, dataset.StudyInstanceUID, dataset.SeriesInstanceUID, pdus)


def run_case(port: int, case: Case, idle_seconds: float = 0.5) -> int | None:
    """Send the case's bytes over a real socket; the C-STORE status the peer saw (None: none seen)."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.settimeout(idle_seconds)
        try:
            for pdu in case.pdus:
                connection.sendall(pdu)
                if pdu[0] == 0x01:  # wait for the A-ASSOCIATE-AC (or RJ) before P-DATA
                    received += connection.recv(65536)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                received += chunk
        except OSError:
            pass
    index = received.find(_STATUS)
    if index < 0 or len(received) < index + len(_STATUS) + 2:
        return None
    return int.from_bytes(received[index + len(_STATUS) : index + len(_STATUS) + 2], "little")
