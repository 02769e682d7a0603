"""The identifiers a receiver files an instance under, read from the head of its encoding.

Both receivers need only SOP Instance, Study Instance and Series Instance UID of each instance. pydicom builds an
element object for each of the hundred-odd elements before them (~0.4 ms per CT image, the largest cost of the
DCMTK backend's ingest, profiled); ``_walk`` reads tags and lengths with ``struct`` and skips the rest. It is a
fast path only: on anything it does not handle (deflate, an encoding cut short, an odd structure) it answers
None and the caller reads the same bytes with pydicom, so the answer never depends on the path taken.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.uid import UID

from pacsflow.core.uids import is_valid_uid

_SOP_INSTANCE_UID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID = 0x00080018, 0x0020000D, 0x0020000E
_WANTED = {_SOP_INSTANCE_UID: "sop", _STUDY_INSTANCE_UID: "study", _SERIES_INSTANCE_UID: "series"}
_KEYWORDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_MEDIA_SOP_INSTANCE_UID, _TRANSFER_SYNTAX_UID = 0x00020003, 0x00020010
_ITEM_TAGS = (0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD)  # item, item delimiter, sequence delimiter
_DELIMITERS = (0xFFFEE00D, 0xFFFEE0DD)
_LAST_TAG = 0xFFFFFFFF
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FL",
        b"FD",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"SL",
        b"SS",
        b"ST",
        b"TM",
        b"UI",
        b"UL",
        b"US",
    }
)
_MEDIA_SOP_CLASS_UID = 0x00020002
_META_WANTED = {_MEDIA_SOP_CLASS_UID: "sop_class", _MEDIA_SOP_INSTANCE_UID: "sop", _TRANSFER_SYNTAX_UID: "syntax"}
_ROWS = 0x00280010
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double float, pixel data
_IMAGE_TAGS = _PIXEL_DATA_TAGS | {_ROWS}
_HEAD_BYTES = 64 * 1024  # the elements up to SeriesInstanceUID fit in far less, file meta included


class HeaderProblem(Enum):
    """Why a received instance cannot be filed; the value is the reason recorded in the receiver's stats."""

    INVALID_UID = "invalid UID"
    SOP_INSTANCE_MISMATCH = "SOP Instance UID differs from the request"
    INCOMPLETE = "data set incomplete or its lengths inconsistent"


def withhold_values_from_pydicom_log() -> None:
    """pydicom quotes the values it finds malformed (an incoming UID is patient data) in its log and, when it
    validates what it reads, in warnings, which Airflow copies into the task log. pacsflow checks what it uses
    itself (a UID before it names a path), so pydicom's reading validation is off and only its logged errors get
    through. Both settings are process-wide; the receivers and the client apply them when they start (never at
    import)."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


@dataclass(frozen=True)
class InstanceUids:
    sop: object = None
    study: object = None
    series: object = None

    @classmethod
    def of(cls, dataset: object) -> InstanceUids:
        """The UIDs pydicom read into ``dataset`` (strings, or what pydicom made of a malformed value)."""
        values = [getattr(dataset, keyword, None) for keyword in _KEYWORDS]
        return cls(*(str(value) if isinstance(value, str) else value for value in values))

    def problem(self, expected_sop_uid: object) -> HeaderProblem | None:
        """Why the instance cannot be filed under these UIDs, or None. They become path components only
        once this is None (each is then a valid UID)."""
        if not all(is_valid_uid(uid) for uid in (self.sop, self.study, self.series)):
            return HeaderProblem.INVALID_UID
        if self.sop != expected_sop_uid:
            return HeaderProblem.SOP_INSTANCE_MISMATCH
        return None


class _CannotTell(Exception):
    """The bytes end before the walk does, or hold something the fast path does not read: ask pydicom."""


class _Reader:
    """Bytes (or a memory map) of one byte order, and a position in them."""

    def __init__(self, data: bytes | mmap.mmap, position: int, little_endian: bool, *, whole: bool = False) -> None:
        self.data, self.position = data, position
        self.whole = whole or len(data) < _HEAD_BYTES  # else the data may go on past what was read
        order = "<" if little_endian else ">"
        # an element's head at once: tag, then VR and 16-bit length (explicit VR) or a 32-bit length (implicit VR)
        self.explicit_head, self.implicit_head = struct.Struct(order + "HH2sH"), struct.Struct(order + "HHI")
        self._u32 = struct.Struct(order + "I")

    def take(self, size: int) -> bytes:
        end = self.position + size
        if end > len(self.data):
            raise _CannotTell
        chunk, self.position = self.data[self.position : end], end
        return chunk

    def skip(self, size: int) -> None:
        """Step over a value without reading it."""
        if self.position + size > len(self.data):
            raise _CannotTell
        self.position += size

    def u32_at(self, position: int) -> int:
        if position + 4 > len(self.data):
            raise _CannotTell
        return int(self._u32.unpack_from(self.data, position)[0])


def _element_head(reader: _Reader, position: int, implicit_vr: bool, last: int = _LAST_TAG) -> tuple[int, int, int]:
    """(tag, value length, where the value starts) of the element at ``position``, its head read with one
    ``unpack_from``: every element of a file passes here. Past ``last`` only the tag is read (what follows may be
    encoded otherwise)."""
    if position + 8 > len(reader.data):
        raise _CannotTell
    if implicit_vr:
        group, element, length = reader.implicit_head.unpack_from(reader.data, position)
        return group << 16 | element, length, position + 8
    group, element, vr, length = reader.explicit_head.unpack_from(reader.data, position)
    tag = group << 16 | element
    if tag in _ITEM_TAGS:  # items and delimiters have no VR in any syntax
        return tag, reader.u32_at(position + 4), position + 8
    if tag > last or vr in _SHORT_VRS:
        return tag, length, position + 8
    if vr in _LONG_VRS:
        return tag, reader.u32_at(position + 8), position + 12
    raise _CannotTell  # not a VR: damaged, or not explicit VR after all (a mislabelled transfer syntax)


def _skip_undefined(reader: _Reader, implicit_vr: bool) -> None:
    """Skip a sequence or item of undefined length, nested ones included, up to its delimiter."""
    while True:
        tag, length, reader.position = _element_head(reader, reader.position, implicit_vr)
        if tag in _DELIMITERS:
            return
        if length == _UNDEFINED:
            _skip_undefined(reader, implicit_vr)
        else:
            reader.skip(length)


def _walk(
    reader: _Reader, implicit_vr: bool, wanted: dict[int, str], last: int, *, require: tuple[str, ...] | None = None
) -> dict[str, str]:
    """Values of the ``wanted`` tags of a data set, up to the tag ``last``; the reader stops before the first
    element after it. A wanted tag not seen (of ``require``, if given) may be one a damaged tag hid: only pydicom
    can tell then."""
    found: dict[str, str] = {}
    while reader.position < len(reader.data) or not reader.whole:
        tag, length, start = _element_head(reader, reader.position, implicit_vr, last)
        if tag in _ITEM_TAGS:  # an item where a data element belongs
            raise _CannotTell
        if tag > last:  # stop before it: after the file meta, the data set may be encoded otherwise
            break
        reader.position = start
        if length == _UNDEFINED:
            _skip_undefined(reader, implicit_vr)
            continue
        value = reader.take(length)
        if tag in wanted:
            found[wanted[tag]] = value.decode("latin-1").rstrip("\x00 ")
    if not set(wanted.values() if require is None else require) <= found.keys():
        raise _CannotTell
    return found


def _uids_fast(head: bytes) -> tuple[object, InstanceUids] | None:
    """(MediaStorageSOPInstanceUID, the data set's UIDs) from the head of a DICOM file, or None."""
    if head[128:132] != b"DICM":
        return None
    try:  # file meta: always explicit VR little endian, group 0002 only
        reader = _Reader(head, 132, little_endian=True)
        meta = _walk(reader, False, {_MEDIA_SOP_INSTANCE_UID: "sop", _TRANSFER_SYNTAX_UID: "syntax"}, 0x0002FFFF)
        syntax = UID(meta.get("syntax", ""))
        if not syntax.is_transfer_syntax or syntax.is_deflated:
            return None
        data_set = _Reader(head, reader.position, syntax.is_little_endian)
        return meta.get("sop"), InstanceUids(**_walk(data_set, syntax.is_implicit_VR, _WANTED, _SERIES_INSTANCE_UID))
    except _CannotTell:
        return None


def file_uids(path: Path) -> tuple[object, InstanceUids]:
    """(MediaStorageSOPInstanceUID of the file meta, the data set's UIDs) of a DICOM file.
    Raises what pydicom raises for a file it cannot read."""
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    fast = _uids_fast(head)
    if fast is not None:
        return fast
    if is_deflated(head):  # pydicom would inflate all of it in memory, however large: inflate_file first
        raise ValueError("a deflated data set reached the header reader")
    with warnings.catch_warnings():  # pydicom's warnings about a malformed value quote it: patient data
        warnings.simplefilter("ignore")
        dataset = dcmread(
            path, stop_before_pixels=True, specific_tags=[_SOP_INSTANCE_UID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID]
        )
        # values are converted (and validated, warning) when first read
        return dataset.file_meta.get("MediaStorageSOPInstanceUID"), InstanceUids.of(dataset)


def _syntax(head: bytes) -> UID | None:
    """The transfer syntax in the file meta at the head of a DICOM file, if the fast path can read it."""
    if head[128:132] != b"DICM":
        return None
    try:
        meta = _walk(_Reader(head, 132, little_endian=True), False, {_TRANSFER_SYNTAX_UID: "syntax"}, 0x0002FFFF)
    except _CannotTell:
        return None
    return UID(meta["syntax"])


def meta_end(head: bytes) -> int | None:
    """Where the data set starts (the end of the file meta) in the head of a DICOM file, if readable."""
    if head[128:132] != b"DICM":
        return None
    reader = _Reader(head, 132, little_endian=True)
    try:
        _walk_to_end(reader, False, last=0x0002FFFF)
    except _CannotTell:
        return None
    return reader.position


def is_deflated(head: bytes) -> bool:
    """True when the file whose head this is declares a deflated transfer syntax."""
    syntax = _syntax(head)
    return syntax is not None and syntax.is_deflated


def is_complete(path: Path) -> bool:
    """True when the file is a DICOM file whose every element, down to the last pixel data fragment, is there
    as its declared length says, and nothing follows: a file cut short (a receiver killed mid-object) or a body
    whose lengths disagree fails, and so does an image (image SOP class, or Rows present) without its pixel
    data. A non-image object cut exactly between two elements cannot be told from a whole one. Tags and lengths
    are read through a memory map and values skipped: only the pages holding them are touched."""
    return _read_whole(path, {}) is not None


def complete_file_uids(path: Path) -> tuple[object, InstanceUids, bool]:
    """``file_uids`` and ``is_complete`` of a file, in one pass over it when the fast path can read it."""
    found: dict[str, str] = {}
    meta_sop_uid = _read_whole(path, found)
    if meta_sop_uid is not None and len(found) == len(_WANTED):
        return meta_sop_uid or None, InstanceUids(**found), True
    meta_sop, uids = file_uids(path)
    return meta_sop, uids, is_complete(path)


def _read_whole(path: Path, found: dict[str, str]) -> str | None:
    """Walk a whole file (``is_complete``), filling ``found`` with the data set's UIDs. Returns its file meta's
    MediaStorageSOPInstanceUID ("" when absent) if it is complete, else None."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 132:
            return None
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[128:132] != b"DICM":
                return None
            try:
                meta_reader = _Reader(data, 132, little_endian=True, whole=True)
                meta = _walk(meta_reader, False, _META_WANTED, 0x0002FFFF, require=("syntax", "sop_class"))
                syntax = UID(meta["syntax"])
                if not syntax.is_transfer_syntax or syntax.is_deflated:
                    return None
                data_set = _Reader(data, meta_reader.position, syntax.is_little_endian, whole=True)
                seen = _walk_to_end(data_set, syntax.is_implicit_VR, _LAST_TAG, found)
            except (_CannotTell, struct.error, RecursionError):  # nesting deeper than any real data set
                return None
    # A file cut short exactly between two elements still ends at an element boundary: what is missing then
    # is the end of the data set, the pixel data of an image.
    has_pixels = bool(seen & _PIXEL_DATA_TAGS) or (_ROWS not in seen and not _is_image(meta["sop_class"]))
    return meta.get("sop", "") if data_set.position == size and has_pixels else None


def _is_image(sop_class_uid: str) -> bool:
    """An image storage SOP class (its instances carry pixel data)."""
    return "Image Storage" in UID(sop_class_uid).name


def _walk_to_end(reader: _Reader, implicit_vr: bool, last: int, found: dict[str, str] | None = None) -> set[int]:
    """Skip every element up to the tag ``last`` (or the end), checking each length against the bytes there.
    Returns which of the image tags (Rows, pixel data) it saw at the top level; with ``found``, also fills it
    with the values of the top-level UIDs of ``_WANTED``."""
    seen: set[int] = set()
    data, end = reader.data, len(reader.data)
    position = reader.position
    while position < end:
        tag, length, value = _element_head(reader, position, implicit_vr, last)
        if tag in _ITEM_TAGS:
            raise _CannotTell
        if tag > last:
            break
        if tag in _IMAGE_TAGS:
            seen.add(tag)
        if length == _UNDEFINED:
            reader.position = value
            _skip_undefined(reader, implicit_vr)
            position = reader.position
            continue
        position = value + length
        if position > end:
            raise _CannotTell
        if found is not None and tag in _WANTED:
            found[_WANTED[tag]] = bytes(data[value:position]).decode("latin-1").rstrip("\x00 ")
    reader.position = position
    return seen
