"""Deflated data sets inflated as a stream, with a bound, before anything parses them.

pydicom inflates a Deflated Explicit VR Little Endian data set whole, in memory (a 1 MB C-STORE took a receiver
to 2.1 GB). Receivers accept Deflated only when configured to, and then rewrite the received file as Explicit VR
Little Endian here, a chunk at a time: memory stays at a few MiB and the inflated size is capped.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from typing import IO, BinaryIO

from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from pacsflow.core.dicom.header import meta_end
from pacsflow.core.storage import SUFFIX, TEMP_PREFIX

CHUNK = 1024 * 1024


class InflateError(ValueError):
    """The deflated stream is damaged, or inflates to more than the bound (``too_large``)."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.too_large = reason, too_large


def inflate_file(path: Path, max_bytes: int) -> None:
    """Replace the deflated DICOM file at ``path`` by its Explicit VR Little Endian equivalent. Raises
    ``InflateError`` (and leaves ``path`` as it was) when it is damaged or would exceed ``max_bytes``."""
    with open(path, "rb") as source:
        body_start = meta_end(source.read(CHUNK))
        if body_start is None:
            raise InflateError("deflated file with unreadable file meta")
        file_meta = read_file_meta_info(path)
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        source.seek(body_start)
        # kept (delete=False) to replace ``path``; closed by the ``with`` below, removed on failure
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115
            dir=path.parent, prefix=TEMP_PREFIX, suffix=SUFFIX, delete=False
        )
        try:
            with handle:
                handle.write(b"\x00" * 128 + b"DICM")
                write_file_meta_info(DicomFileLike(handle), file_meta, enforce_standard=True)
                _inflate(source, handle, max_bytes)
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise


def _inflate(source: BinaryIO, target: IO[bytes], max_bytes: int) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof:
            pending = source.read(CHUNK)
            if not pending:
                break
            while pending and not inflater.eof:
                out = inflater.decompress(pending, CHUNK)  # at most CHUNK bytes out per call
                total += len(out)
                if total > max_bytes:
                    raise InflateError("inflates to more than max_inflated_bytes", too_large=True)
                target.write(out)
                pending = inflater.unconsumed_tail
    except zlib.error as error:
        raise InflateError("damaged deflate stream") from error
    if not inflater.eof:
        raise InflateError("deflate stream cut short")
