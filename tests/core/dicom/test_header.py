"""The receivers' header reader: same answer as pydicom's, on every file pydicom ships and on damaged ones."""

from __future__ import annotations

import io
import logging
import random
import warnings
from pathlib import Path

import pydicom
import pytest
from pacsflow.core.dicom import header
from pacsflow.core.dicom.header import HeaderProblem, InstanceUids, file_uids
from pacsflow.core.dicom.inflate import InflateError, inflate_file
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_partial
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

SOP, STUDY, SERIES = "1.2.3.4.5.6", "1.2.3.4", "1.2.3.4.5"
SERIES_UID_TAG = 0x0020000E
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # those pydicom ships (no download)


def _pydicom_answer(data: bytes) -> tuple[object, InstanceUids]:
    """What pydicom reads up to SeriesInstanceUID: the reference the fast path must agree with."""
    dataset = read_partial(io.BytesIO(data), stop_when=lambda tag, vr, length: tag > SERIES_UID_TAG)
    return dataset.file_meta.get("MediaStorageSOPInstanceUID"), InstanceUids.of(dataset)


def _part10_files() -> list[Path]:
    return sorted(path for path in TEST_FILES.rglob("*") if path.is_file() and path.read_bytes()[128:132] == b"DICM")


@pytest.mark.parametrize("path", _part10_files(), ids=lambda path: path.name)
def test_every_pydicom_test_file_gives_pydicoms_uids(path, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = dcmread(path, stop_before_pixels=True)
        if header.is_deflated(path.read_bytes()[: header._HEAD_BYTES]):
            with pytest.raises(ValueError, match="deflated"):  # never inflated whole in memory
                file_uids(path)
            path = tmp_path / path.name
            path.write_bytes((TEST_FILES / path.name).read_bytes())
            inflate_file(path, max_bytes=100 * 1024 * 1024)
        meta_sop_uid, uids = file_uids(path)
        in_one_pass = header.complete_file_uids(path)
    assert (meta_sop_uid, uids) == (full.file_meta.get("MediaStorageSOPInstanceUID"), InstanceUids.of(full))
    assert in_one_pass == (meta_sop_uid, uids, header.is_complete(path))


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "SC_rgb_jpeg_gdcm.dcm"]
)
def test_a_whole_image_is_complete_and_every_cut_of_it_is_not(name, tmp_path):
    data = (TEST_FILES / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data)
    assert header.is_complete(path)
    cuts = sorted({*random.Random(7).sample(range(1, len(data)), 200), len(data) - 1, 200})
    for cut in cuts:
        path.write_bytes(data[:cut])
        assert not header.is_complete(path), f"cut at {cut} of {len(data)} taken for complete"
        assert not _complete_in_one_pass(path), f"cut at {cut} of {len(data)} taken for complete in one pass"
    path.write_bytes(data + b"\x00\x00")
    assert not header.is_complete(path)


def _complete_in_one_pass(path: Path) -> bool:
    """Whether the one pass takes ``path`` for complete; no pydicom warning (they quote values) gets out."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            complete = header.complete_file_uids(path)[2]
        except Exception:  # pydicom could not read the UIDs of what is left: not filed either
            complete = False
    assert not caught, [str(warning.message) for warning in caught]
    return complete


def test_a_deflated_file_inflates_within_its_bound_only(tmp_path):
    path = tmp_path / "image_dfl.dcm"
    path.write_bytes((TEST_FILES / "image_dfl.dcm").read_bytes())
    with pytest.raises(InflateError, match="max_inflated_bytes"):
        inflate_file(path, max_bytes=1000)
    assert path.read_bytes() == (TEST_FILES / "image_dfl.dcm").read_bytes() and len(list(tmp_path.iterdir())) == 1
    inflate_file(path, max_bytes=10 * 1024 * 1024)
    assert header.is_complete(path)
    assert dcmread(path).PixelData == dcmread(TEST_FILES / "image_dfl.dcm").PixelData


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "SC_rgb_jpeg_gdcm.dcm"]
)
def test_the_fast_path_reads_implicit_explicit_and_big_endian_files_itself(name):
    data = (TEST_FILES / name).read_bytes()
    fast = header._uids_fast(data[: header._HEAD_BYTES])
    assert fast is not None and fast[1].problem(fast[0]) is None
    assert fast == _pydicom_answer(data)


def _dataset_with_nested_undefined_length_sequences() -> Dataset:
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "123", "nested"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "9.9.9"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    item["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", SOP
    ds.ReferencedImageSequence = Sequence([item, Dataset(item)])  # (0008,1140): before the study and series UIDs
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.PatientName = "Test^Header"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.InstanceNumber = 1
    return ds


def _save(ds: Dataset, path: Path, syntax: UID) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, SOP
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian], ids=lambda syntax: syntax.name
)
def test_nested_undefined_length_sequences_before_the_uids(syntax, tmp_path):
    path = _save(_dataset_with_nested_undefined_length_sequences(), tmp_path / "nested.dcm", syntax)
    data = path.read_bytes()
    assert b"\xfe\xff\xdd\xe0" in data or b"\xff\xfe\xe0\xdd" in data  # really encoded with delimiters
    assert header._uids_fast(data) == (SOP, InstanceUids(SOP, STUDY, SERIES))
    assert file_uids(path) == _pydicom_answer(data)


def test_deflated_files_are_read_once_inflated_never_by_pydicom_whole(tmp_path):
    path = _save(
        _dataset_with_nested_undefined_length_sequences(), tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian
    )
    assert header._uids_fast(path.read_bytes()) is None
    with pytest.raises(ValueError, match="deflated"):
        file_uids(path)
    inflate_file(path, max_bytes=1024 * 1024)
    assert header._uids_fast(path.read_bytes()) == (SOP, InstanceUids(SOP, STUDY, SERIES))


def test_a_buffer_cut_before_the_series_uid_is_left_to_pydicom():
    data = (TEST_FILES / "CT_small.dcm").read_bytes()
    head = data[: data.index(b"1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322")]  # its SeriesInstanceUID
    assert header._uids_fast(head) is None
    meta_sop_uid, uids = file_uids(TEST_FILES / "CT_small.dcm")
    assert uids.series == "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322" and uids.problem(meta_sop_uid) is None


def test_damaged_files_get_pydicoms_answer_whenever_the_fast_path_answers():
    """Random byte flips in the headers of every test file: the fast path either declines or agrees."""
    rng = random.Random(20261125)
    answered = 0
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for path in _part10_files():
                original = path.read_bytes()
                for _ in range(40):
                    data = bytearray(original)
                    for _ in range(rng.randint(1, 3)):
                        data[rng.randrange(132, min(len(data), 3000))] = rng.randrange(256)
                    fast = header._uids_fast(bytes(data[: header._HEAD_BYTES]))
                    if fast is None or fast[1].problem(fast[0]) is not None:
                        continue
                    answered += 1
                    assert fast == _pydicom_answer(bytes(data))
    finally:
        logging.disable(logging.NOTSET)
    assert answered > 1000  # the fast path does answer for most damage (outside the UIDs)


@pytest.mark.parametrize(
    ("uids", "requested", "problem"),
    [
        (InstanceUids(SOP, STUDY, SERIES), SOP, None),
        (InstanceUids(SOP, STUDY, SERIES), "1.2.3.4.5.7", HeaderProblem.SOP_INSTANCE_MISMATCH),
        (InstanceUids(SOP, "../../etc", SERIES), SOP, HeaderProblem.INVALID_UID),
        (InstanceUids(SOP, STUDY, None), SOP, HeaderProblem.INVALID_UID),
    ],
)
def test_problems_of_received_uids(uids, requested, problem):
    assert uids.problem(requested) is problem
