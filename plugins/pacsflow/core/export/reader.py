"""Worker side of the export: read the headers of a chunk of files into one Arrow record batch.

Runs in the worker processes. Each file is read once: its bytes are hashed and its header is parsed from
memory with pydicom (``stop_before_pixels`` and only the tags of the schema), and the values are decoded
here from the raw bytes, which is several times faster than pydicom's per-element conversion.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pyarrow as pa
import pydicom
from pydicom import config as pydicom_config
from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM, validate_value

from pacsflow.core.export.aggregate import SeriesState
from pacsflow.core.export.schema import (
    DICOM_COLUMNS,
    INSTANCE_COLUMNS,
    RUN_ID,
    STUDY_DATE,
    TRANSFER_SYNTAX,
    Column,
    Kind,
    file_schema,
)
from pacsflow.core.uids import InvalidIdentifierError, require_uid

# Files up to this size are read into memory once (hash + parse); larger ones are hashed in a stream and
# their header parsed from the file, so a 1 GB multi-frame object never sits in memory.
IN_MEMORY_LIMIT = 64 * 1024 * 1024

READ_SCHEMA = file_schema("instances").append(STUDY_DATE.field)  # study_date routes rows to partitions
_READ_TAGS = sorted({tag for column in DICOM_COLUMNS for tag in column.tags})
_ROWS_TAG = 0x00280010
_REQUIRED_UIDS = tuple(column for column in INSTANCE_COLUMNS if column.kind is Kind.UID and not column.nullable)

_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
_SINGLE_VALUED_VRS = frozenset({"ST", "LT", "UT", "UR"})
_PN_DELIMITERS = {0x5C, 0x3D, 0x5E}  # \ = ^ reset ISO 2022 escapes in person names
_TEXT_DELIMITERS = {0x5C}
_BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_NOT_TEXT_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ", "AT"})
_INT32 = (-(2**31), 2**31 - 1)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD


_Number = TypeVar("_Number", int, float)


class Rejected(Exception):
    """A file that is not exported. The reason never contains a value read from the file."""


@dataclass
class ChunkResult:
    batch: pa.RecordBatch  # READ_SCHEMA
    rejected: list[tuple[str, str]]  # (path, reason)
    series: dict[str, SeriesState]  # partial aggregates of this chunk's rows


def read_chunk(paths: list[str], run_id: str, include_private: bool) -> ChunkResult:
    """Read every file of ``paths``; a file that cannot be exported is listed with its reason."""
    columns: dict[str, list[Any]] = {name: [] for name in READ_SCHEMA.names}
    rejected: list[tuple[str, str]] = []
    series: dict[str, SeriesState] = {}
    with warnings.catch_warnings():
        # pydicom warnings can quote element values (patient data): keep them out of the logs.
        warnings.simplefilter("ignore")
        for path in paths:
            try:
                row = read_instance(path, include_private)
            except Rejected as rejection:
                rejected.append((path, str(rejection)))
                continue
            row[RUN_ID.name] = run_id
            for name, values in columns.items():
                values.append(row[name])
            series.setdefault(row["series_instance_uid"], SeriesState()).add(row)
    return ChunkResult(pa.RecordBatch.from_pydict(columns, schema=READ_SCHEMA), rejected, series)


def read_instance(path: str, include_private: bool = False) -> dict[str, Any]:
    """One row of the instances table (plus ``study_date``), or :class:`Rejected`."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size <= IN_MEMORY_LIMIT:
                data = handle.read()
                digest = hashlib.sha256(data).hexdigest()
                row = _parse(BytesIO(data), size, include_private)
            else:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
                handle.seek(0)
                row = _parse(handle, size, include_private)
    except OSError as error:
        raise Rejected(
            f"cannot read the file ({errno.errorcode.get(error.errno or 0, type(error).__name__)})"
        ) from None
    row.update(file_path=str(path), file_size=size, file_sha256=digest)
    return row


def _parse(fp: BinaryIO, size: int, include_private: bool) -> dict[str, Any]:
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=None if include_private else _READ_TAGS)
        _require_complete(ds, fp, size)
        elements = _Elements(ds)
        row = {column.name: elements.decode(column) for column in (*DICOM_COLUMNS, STUDY_DATE)}
        row[TRANSFER_SYNTAX.name] = _transfer_syntax(ds)
        row["private_tags"] = elements.private_tags() if include_private else None
    except Rejected:
        raise
    except InvalidDicomError:
        raise Rejected("not a DICOM file (no DICM prefix after the 128-byte preamble)") from None
    except Exception as error:  # pydicom raises many types on corrupt input; the message may quote values
        if isinstance(error, OSError) and error.errno is not None:
            raise  # a real read error of a large file streamed from disk
        raise Rejected(f"corrupt DICOM header ({type(error).__name__})") from None
    for column in _REQUIRED_UIDS:
        _require_uid(row, column)
    return row


def _require_uid(row: dict[str, Any], column: Column) -> None:
    keyword = column.source.split()[-1]
    if row[column.name] is None:
        raise Rejected(f"{keyword} is missing")
    try:
        require_uid(row[column.name], keyword)
    except InvalidIdentifierError as error:
        raise Rejected(str(error)) from None


def _transfer_syntax(ds: Dataset) -> str | None:
    value = ds.file_meta.get("TransferSyntaxUID")
    return (str(value).strip("\0 ") if value is not None else "") or None


# -- truncation -------------------------------------------------------------------------------------
def _require_complete(ds: Dataset, fp: BinaryIO, size: int) -> None:
    """Reject a file cut short: pydicom reads a truncated header without complaint."""
    position = fp.tell()
    if position > size:  # an element skipped by seeking ended beyond the end of the file
        raise Rejected("truncated (an element ends after the end of the file)")
    for element in ds.values():
        if (
            isinstance(element, RawDataElement)
            and element.length != _UNDEFINED_LENGTH
            and element.value is not None
            and len(element.value) < element.length
        ):
            raise Rejected("truncated (an element ends after the end of the file)")
    if position < size:
        implicit, little = ds.original_encoding
        if not _pixel_data_complete(fp, size, bool(implicit), little is not False):
            raise Rejected("truncated (pixel data ends after the end of the file)")
    elif _ROWS_TAG in ds:
        raise Rejected("truncated (image attributes present but no pixel data)")


def _pixel_data_complete(fp: BinaryIO, size: int, implicit: bool, little: bool) -> bool:
    """``fp`` is at the pixel data element: does its value (or its fragments) fit in the file?"""
    endian = "<" if little else ">"
    header = fp.read(8)
    if len(header) < 8:
        return False
    length: int
    if implicit:
        length = struct.unpack(f"{endian}L", header[4:])[0]
    elif header[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        extra = fp.read(4)
        if len(extra) < 4:
            return False
        length = struct.unpack(f"{endian}L", extra)[0]
    else:
        length = struct.unpack(f"{endian}H", header[6:])[0]
    if length != _UNDEFINED_LENGTH:
        return fp.tell() + length <= size
    return _fragments_complete(fp, size, endian)


def _fragments_complete(fp: BinaryIO, size: int, endian: str) -> bool:
    """Walk the items of encapsulated pixel data up to the sequence delimiter, by seeking."""
    item = struct.Struct(f"{endian}HHL")
    while True:
        header = fp.read(8)
        if len(header) < 8:
            return False
        group, element, length = item.unpack(header)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            return True
        if tag != _ITEM or fp.tell() + length > size:
            return False
        fp.seek(length, 1)


# -- values -----------------------------------------------------------------------------------------
class _Elements:
    """The top-level elements of one header, decoded straight from their raw bytes."""

    def __init__(self, ds: Dataset) -> None:
        self._by_tag = {int(element.tag): element for element in ds.values()}
        charset = ds.original_character_set
        # pydicom gives one str when there is no SpecificCharacterSet; decode_bytes wants a list and would
        # iterate the str ("Unknown encoding 'i'" once per text element of every such file)
        self._charset = [charset] if isinstance(charset, str) else list(charset)

    def decode(self, column: Column) -> Any:
        if column.kind is Kind.TIMESTAMP:
            return self._timestamp(column.tags)
        values = self.values(column.tags[0])
        return None if values is None else _CONVERTERS[column.kind](values)

    def values(self, tag: int) -> list[Any] | None:
        """The element's values (strings, or numbers for binary VRs), or None when absent or empty."""
        element = self._by_tag.get(tag)
        if element is None:
            return None
        if not isinstance(element, RawDataElement):  # converted by pydicom while reading (not the usual path)
            return _converted_values(element.value)
        raw = element.value
        if not raw:
            return None
        vr = _vr(element, tag)
        if vr in _BINARY_FORMATS:
            return _unpack(raw, _BINARY_FORMATS[vr], element.is_little_endian)
        return None if vr in _NOT_TEXT_VRS else self._text_values(raw, vr)

    def _text_values(self, raw: bytes, vr: str) -> list[str] | None:
        if vr in _CHARSET_VRS:
            text = decode_bytes(raw, self._charset, _PN_DELIMITERS if vr == "PN" else _TEXT_DELIMITERS)
        else:
            text = raw.decode("latin-1")
        if vr in _SINGLE_VALUED_VRS:
            text = text.rstrip("\0 ")
            return [text] if text else None
        values = [item.strip("\0 ") for item in text.split("\\")]
        return values if any(values) else None

    def _timestamp(self, tags: tuple[int, ...]) -> dt.datetime | None:
        """The DT element when the column has one and it is set, else its DA + TM pair (both needed)."""
        if len(tags) == 3:
            values = self.values(tags[0])
            if values is not None:
                return parse_datetime(str(values[0]))
            tags = tags[1:]
        date_values, time_values = self.values(tags[0]), self.values(tags[1])
        if date_values is None or time_values is None:
            return None
        day, clock = parse_date(str(date_values[0])), parse_time(str(time_values[0]))
        return None if day is None or clock is None else dt.datetime.combine(day, clock)

    def private_tags(self) -> list[tuple[str, str]]:
        """``(gggg,eeee)`` -> text of every top-level private element whose value is text or numbers."""
        pairs = []
        for tag in self._by_tag:
            if tag >> 16 & 1:  # odd group: private
                values = self.values(tag)
                if values is not None:
                    pairs.append((f"({tag >> 16:04X},{tag & 0xFFFF:04X})", "\\".join(str(value) for value in values)))
        return pairs


def _converted_values(value: Any) -> list[Any] | None:
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    kept = [
        item if isinstance(item, (int, float)) else str(item)
        for item in values
        if item is not None and str(item).strip() != ""
    ]
    return kept or None


def _unpack(raw: bytes, code: str, little_endian: bool) -> list[int | float] | None:
    count = len(raw) // struct.calcsize(code)
    return (
        list(struct.unpack(f"{'<' if little_endian else '>'}{count}{code}", raw[: count * struct.calcsize(code)]))
        or None
    )


def _vr(element: RawDataElement, tag: int) -> str:
    """The element's VR: explicit in the file, else (implicit VR, or UN) the dictionary's."""
    if element.VR and element.VR != "UN":
        return element.VR
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def _text(values: list[Any]) -> str | None:
    text = "\\".join(str(value) for value in values).strip()
    return text or None


def _int(values: list[Any]) -> int | None:
    number = _number(values[0], int)
    return number if number is not None and _INT32[0] <= number <= _INT32[1] else None


def _float(values: list[Any]) -> float | None:
    return _number(values[0], float)


def _floats(values: list[Any]) -> list[float] | None:
    numbers = [_number(value, float) for value in values]
    floats = [number for number in numbers if number is not None]
    return floats if len(floats) == len(numbers) else None


def _texts(values: list[Any]) -> list[str]:
    return [str(value) for value in values]


def _number(value: Any, kind: type[_Number]) -> _Number | None:
    number: int | float
    if isinstance(value, (int, float)):
        number = value
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
    if not math.isfinite(number) or (kind is int and number != int(number)):
        return None
    return kind(number)


def parse_date(text: str) -> dt.date | None:
    """DA ``YYYYMMDD`` (or the ACR-NEMA ``YYYY.MM.DD``) read by pydicom; None when not a real date."""
    value = text.strip()
    if not value.replace(".", "").isdigit():  # pydicom's int() would also take signs, blanks and "_"
        return None
    day = _pydicom_value(DA, value)
    return None if day is None else dt.date(day.year, day.month, day.day)


def parse_time(text: str) -> dt.time | None:
    """TM ``HH[MM[SS[.FFFFFF]]]`` read by pydicom, also in the ACR-NEMA ``HH:MM:SS`` form and with a stray
    trailing ``.``; None when not a real time. A leap second (60) reads as 59."""
    clock = _pydicom_value(TM, text.strip().replace(":", "").removesuffix("."))
    return None if clock is None else dt.time(clock.hour, clock.minute, clock.second, clock.microsecond)


def parse_datetime(text: str) -> dt.datetime | None:
    """DT ``YYYYMMDD[HH[MM[SS[.F]]]][&ZZXX]`` read by pydicom, as naive local time (a UTC offset is dropped).

    None when not a real date and time, or less precise than a day: ``YYYY`` or ``YYYYMM`` is valid DICOM but
    would become a timestamp at a precision the acquisition never had. pydicom's parser accepts a conformant
    prefix followed by anything, so the whole value is first checked by pydicom's DT validator (which also
    accepts query ranges: refused by the shape check)."""
    value = text.strip()
    if not _DATETIME_SHAPE.fullmatch(value):
        return None
    try:
        validate_value("DT", value, pydicom_config.RAISE)
    except ValueError:  # the message quotes the value: not kept
        return None
    moment = _pydicom_value(DT, value)
    return None if moment is None else dt.datetime.combine(moment.date(), moment.time())


_DATETIME_SHAPE = re.compile(r"\d{8}[\d.]*(?:[+-]\d{4})?")  # a full date, then time and offset; no range
_DateOrTime = TypeVar("_DateOrTime", DA, TM, DT)


def _pydicom_value(vr: type[_DateOrTime], text: str) -> _DateOrTime | None:
    """pydicom's value of ``text`` for the VR, or None when it is empty or not valid."""
    try:
        return vr(text)
    except (ValueError, OverflowError):  # the message quotes the value: not kept
        return None


_CONVERTERS: dict[Kind, Callable[[list[Any]], Any]] = {
    Kind.TEXT: _text,
    Kind.NAME: _text,
    Kind.UID: _text,
    Kind.INT: _int,
    Kind.FLOAT: _float,
    Kind.TEXTS: _texts,
    Kind.FLOATS: _floats,
    Kind.DATE: lambda values: parse_date(str(values[0])),
}


def iter_chunks(paths: Iterable[Path | str], size: int) -> Iterable[list[str]]:
    chunk: list[str] = []
    for path in paths:
        chunk.append(str(path))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
