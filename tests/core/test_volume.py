"""A series as one volume, checked against SimpleITK's ImageSeriesReader on the same files (same voxels, same
geometry), and the series it must refuse."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pacsflow.core.volume import NotAVolume, load_volume, read_slice, scan_series, series_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ROWS, COLUMNS, SLICES = 12, 10, 7
# An oblique stack (rotated about z, then tilted) so a wrong axis or sign shows.
ROW_COSINE = np.array([np.cos(0.3), np.sin(0.3), 0.0])
COLUMN_COSINE = np.array([-np.sin(0.3) * np.cos(0.2), np.cos(0.3) * np.cos(0.2), np.sin(0.2)])
NORMAL = np.cross(ROW_COSINE, COLUMN_COSINE)
ORIGIN = np.array([-40.5, 12.25, 103.0])
SLICE_GAP = 1.25


def _base(sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.Modality = "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, size=(SLICES, ROWS, COLUMNS), dtype=np.uint16)


def write_ct_series(directory: Path, pixels: np.ndarray, *, skip: int | None = None) -> list[Path]:
    """Single-frame CT instances written in shuffled order with instance numbers that disagree with position."""
    directory.mkdir(parents=True, exist_ok=True)
    template = _base(CT_IMAGE)
    numbers = list(range(1, SLICES + 1))
    random.Random(3).shuffle(numbers)
    paths = []
    for index in range(SLICES):
        if index == skip:
            continue
        ds = template.copy()
        ds.file_meta = template.file_meta.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = numbers[index]
        ds.ImageOrientationPatient = [*ROW_COSINE, *COLUMN_COSINE]
        ds.ImagePositionPatient = [float(v) for v in ORIGIN + index * SLICE_GAP * NORMAL]
        ds.PixelSpacing = [0.8, 0.7]  # row spacing, column spacing
        ds.SliceThickness = SLICE_GAP
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = pixels[index].tobytes()
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sitk_volume(directory: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    return reader.Execute()


def test_a_series_loads_as_simpleitk_reads_it(tmp_path):
    pixels = _pixels(1)
    write_ct_series(tmp_path / "ct", pixels)
    volume = load_volume(tmp_path / "ct")
    reference = sitk_volume(tmp_path / "ct")

    assert volume.voxels.shape == sitk.GetArrayFromImage(reference).shape == (SLICES, ROWS, COLUMNS)
    np.testing.assert_array_equal(volume.voxels, sitk.GetArrayFromImage(reference).astype(np.float32))
    np.testing.assert_allclose(volume.spacing, reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(volume.origin, reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.direction, reference.GetDirection(), atol=1e-4)
    # and both are the truth the files were written from: slices along the normal, rescale applied
    np.testing.assert_array_equal(volume.voxels, pixels.astype(np.float32) * 2 - 1024)
    assert volume.geometry.window == (40.0, 400.0)


def test_one_slice_is_read_alone_in_position_order(tmp_path):
    pixels = _pixels(2)
    write_ct_series(tmp_path / "ct", pixels)
    geometry = scan_series(series_files(tmp_path / "ct"))
    np.testing.assert_array_equal(read_slice(geometry, SLICES // 2), pixels[SLICES // 2] * 2.0 - 1024)


def write_enhanced_ct(path: Path, pixels: np.ndarray, frame_order: list[int]) -> None:
    """One enhanced CT instance holding the stack, its frames stored in ``frame_order``."""
    ds = _base(ENHANCED_CT)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = len(frame_order)
    shared = Dataset()
    orientation, measures, rescale = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [*ROW_COSINE, *COLUMN_COSINE]
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.7], SLICE_GAP
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 2, -1024, "HU"
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for index in frame_order:
        position, groups = Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in ORIGIN + index * SLICE_GAP * NORMAL]
        groups.PlanePositionSequence = Sequence([position])
        per_frame.append(groups)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = pixels[frame_order].tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_a_multi_frame_instance_is_the_same_volume_as_its_single_frames(tmp_path):
    pixels = _pixels(3)
    write_ct_series(tmp_path / "single", pixels)
    (tmp_path / "multi").mkdir()
    order = [4, 0, 6, 2, 1, 5, 3]
    write_enhanced_ct(tmp_path / "multi" / "1.2.3.dcm", pixels, order)
    single, multi = load_volume(tmp_path / "single"), load_volume(tmp_path / "multi")
    np.testing.assert_array_equal(multi.voxels, single.voxels)
    np.testing.assert_allclose(multi.spacing, single.spacing, atol=1e-6)
    np.testing.assert_allclose(multi.origin, single.origin, atol=1e-6)
    np.testing.assert_allclose(multi.direction, single.direction, atol=1e-6)


def _rewrite(path: Path, **values: object) -> None:
    from pydicom import dcmread

    ds = dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("missing", "missing slices"),
        ("size", "different sizes"),
        ("orientation", "varying ImageOrientationPatient"),
        ("duplicate", "same position"),
        ("projection", "no ImagePositionPatient"),
        ("empty", "no instances"),
    ],
)
def test_a_series_that_is_not_one_volume_is_refused_with_the_reason(tmp_path, damage, reason):
    directory = tmp_path / "ct"
    paths = write_ct_series(directory, _pixels(4), skip=3 if damage == "missing" else None)
    if damage == "size":
        _rewrite(paths[2], Rows=ROWS + 1, PixelData=np.zeros((ROWS + 1, COLUMNS), np.uint16).tobytes())
    elif damage == "orientation":
        _rewrite(paths[2], ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    elif damage == "duplicate":
        from pydicom import dcmread

        _rewrite(paths[2], ImagePositionPatient=dcmread(paths[1]).ImagePositionPatient)
    elif damage == "projection":
        from pydicom import dcmread

        ds = dcmread(paths[0])
        del ds.ImagePositionPatient
        ds.save_as(paths[0])
    elif damage == "empty":
        for path in paths:
            path.unlink()
    with pytest.raises(NotAVolume, match=reason):
        load_volume(directory)
