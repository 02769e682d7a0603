"""A retrieved series as one 3-D image: voxels in a numpy array with spacing, origin and direction.

Slices are ordered by their position along the slice normal (ImagePositionPatient projected on the cross
product of the ImageOrientationPatient cosines), never by InstanceNumber or file name, which scanners and
PACS do not keep consistent. A series that is not one volume (images of different sizes or orientations,
missing slices, two slices at one position, no geometry) is rejected with :class:`NotAVolume` and a reason
that says which. Multi-frame instances (enhanced CT/MR) are read frame by frame from their functional groups.

Geometry follows SimpleITK's conventions so the two can be compared directly: ``spacing`` and ``origin`` are
(x, y, z) in mm, ``direction`` is the 3x3 matrix whose columns are the row cosine, the column cosine and the
slice normal, flattened row-major; ``voxels`` is indexed ``[slice, row, column]``.

Only headers are read to order and check a series (:func:`scan_series`); pixels are read for the whole volume
(:func:`load_volume`) or one slice (:func:`read_slice`), so a preview of a 2,000-slice CT reads one file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import SupportsFloat

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.utils import pixel_array  # pydicom.pixels re-exports it without __all__

from pacsflow.core.storage import SUFFIX, TEMP_PREFIX

# Cosines equal to this many decimals count as one orientation (scanners write 6 to 10 decimals).
ORIENTATION_TOLERANCE = 1e-4
# A gap between two slices may differ from the median gap by this share before a slice counts as missing.
SPACING_TOLERANCE = 0.1
# Slices may be shifted in-plane by this many mm (rounding of positions) and still form one stack.
IN_PLANE_TOLERANCE_MM = 0.01


class NotAVolume(ValueError):
    """The series cannot be read as one 3-D image; the message says why (never an identifier)."""


@dataclass(frozen=True)
class Frame:
    """One 2-D image of a series: a file, and the frame in it for multi-frame instances (None otherwise)."""

    path: Path
    frame: int | None
    position: tuple[float, float, float]
    slope: float
    intercept: float


@dataclass(frozen=True)
class SeriesGeometry:
    """The checked, ordered frames of a series and the geometry of the volume they form."""

    frames: tuple[Frame, ...]
    rows: int
    columns: int
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    window: tuple[float, float] | None  # (center, width) from the header, in modality units
    inverted: bool  # MONOCHROME1: low values are white

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.frames), self.rows, self.columns


@dataclass(frozen=True)
class Volume:
    voxels: np.ndarray  # [slice, row, column], modality values (rescale slope and intercept applied)
    geometry: SeriesGeometry

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.geometry.origin

    @property
    def direction(self) -> tuple[float, ...]:
        return self.geometry.direction


def series_files(directory: Path) -> list[Path]:
    """The complete instances of a series directory of the storage layout (temp files of a receive skipped)."""
    if not directory.is_dir():
        return []
    return sorted(
        path for path in directory.iterdir() if path.name.endswith(SUFFIX) and not path.name.startswith(TEMP_PREFIX)
    )


def load_volume(directory: Path) -> Volume:
    """Every slice of the series in ``directory`` as one volume."""
    geometry = scan_series(series_files(directory))
    voxels = np.empty(geometry.shape, dtype=np.float32)
    for index in range(len(geometry.frames)):
        voxels[index] = read_slice(geometry, index)
    return Volume(voxels, geometry)


def read_slice(geometry: SeriesGeometry, index: int) -> np.ndarray:
    """One slice of the ordered series in modality values (reads one file, one frame of it)."""
    frame = geometry.frames[index]
    raw = pixel_array(frame.path, index=frame.frame) if frame.frame is not None else pixel_array(frame.path)
    return (raw.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)).astype(np.float32)


def scan_series(paths: Sequence[Path]) -> SeriesGeometry:
    """Read the headers of ``paths``, check that they form one volume and order the frames along the normal."""
    if not paths:
        raise NotAVolume("no instances on disk")
    headers = [dcmread(path, stop_before_pixels=True) for path in paths]
    multi_frame = [h for h in headers if int(h.get("NumberOfFrames", 1) or 1) > 1]
    if multi_frame and len(headers) > 1:
        raise NotAVolume("the series holds several instances and at least one is multi-frame")
    planes = list(_multi_frame_planes(paths[0], headers[0]) if multi_frame else _single_frame_planes(paths, headers))
    first = headers[0]
    if int(first.get("SamplesPerPixel", 1) or 1) != 1:
        raise NotAVolume("colour images (SamplesPerPixel > 1) are not a grey-level volume")
    if any("Rows" not in h or "Columns" not in h for h in headers):
        raise NotAVolume("an image has no Rows/Columns")
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise NotAVolume("images of different sizes")
    rows, columns = sizes.pop()
    orientation = _common(
        np.array([p.orientation for p in planes]),
        ORIENTATION_TOLERANCE,
        "varying ImageOrientationPatient (more than one stack or a localizer)",
    )
    pixel_spacing = _common(np.array([p.pixel_spacing for p in planes]), ORIENTATION_TOLERANCE, "varying PixelSpacing")
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    positions = np.array([p.position for p in planes])
    order = np.argsort(positions @ normal, kind="stable")
    planes = [planes[i] for i in order]
    positions = positions[order]
    slice_spacing = _slice_spacing(positions, normal, row_cosine, column_cosine, planes[0].thickness)
    direction = np.column_stack([row_cosine, column_cosine, normal])
    return SeriesGeometry(
        frames=tuple(Frame(p.path, p.frame, p.position, p.slope, p.intercept) for p in planes),
        rows=rows,
        columns=columns,
        spacing=(float(pixel_spacing[1]), float(pixel_spacing[0]), slice_spacing),
        origin=planes[0].position,
        direction=tuple(float(v) for v in direction.flatten()),
        window=header_window(first),
        inverted=str(first.get("PhotometricInterpretation", "")) == "MONOCHROME1",
    )


@dataclass(frozen=True)
class _Plane:
    path: Path
    frame: int | None
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, ...]
    thickness: float | None
    slope: float
    intercept: float


def _single_frame_planes(paths: Sequence[Path], headers: Sequence[Dataset]) -> Iterable[_Plane]:
    for path, header in zip(paths, headers, strict=True):
        if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            raise NotAVolume(
                "an image has no ImagePositionPatient/ImageOrientationPatient "
                "(projection images such as mammography are not volumes)"
            )
        yield _Plane(
            path,
            None,
            _point(header.ImagePositionPatient, "ImagePositionPatient"),
            _floats(header.ImageOrientationPatient, 6, "ImageOrientationPatient"),
            _floats(header.get("PixelSpacing") or (1.0, 1.0), 2, "PixelSpacing"),
            _optional_float(header.get("SliceThickness")),
            float(header.get("RescaleSlope", 1) or 1),
            float(header.get("RescaleIntercept", 0) or 0),
        )


def _multi_frame_planes(path: Path, header: Dataset) -> Iterable[_Plane]:
    """Frames of an enhanced multi-frame instance: per-frame groups override the shared ones."""
    shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
    frames = int(header.NumberOfFrames)
    if len(per_frame) != frames:
        raise NotAVolume("a multi-frame instance without one functional group per frame")
    for index, groups in enumerate(per_frame):

        def item(sequence: str, groups: Dataset = groups) -> Dataset | None:
            for source in (groups, shared):
                items = source[sequence].value if sequence in source else None
                if items and isinstance(items[0], Dataset):
                    return items[0]
            return None

        position, orientation = item("PlanePositionSequence"), item("PlaneOrientationSequence")
        if position is None or orientation is None or "ImagePositionPatient" not in position:
            raise NotAVolume("a frame has no plane position/orientation")
        measures = item("PixelMeasuresSequence") or Dataset()
        rescale = item("PixelValueTransformationSequence") or header
        yield _Plane(
            path,
            index,
            _point(position.ImagePositionPatient, "ImagePositionPatient"),
            _floats(orientation.ImageOrientationPatient, 6, "ImageOrientationPatient"),
            _floats(measures.get("PixelSpacing") or (1.0, 1.0), 2, "PixelSpacing"),
            _optional_float(measures.get("SliceThickness")),
            float(rescale.get("RescaleSlope", 1) or 1),
            float(rescale.get("RescaleIntercept", 0) or 0),
        )


def _point(values: Iterable[SupportsFloat | str], name: str) -> tuple[float, float, float]:
    x, y, z = _floats(values, 3, name)
    return x, y, z


def _floats(values: Iterable[SupportsFloat | str], count: int, name: str) -> tuple[float, ...]:
    """The numbers of a header value (pydicom's values are untyped: a wrong one is a TypeError, caught)."""
    try:
        result = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise NotAVolume(f"{name} is not numeric") from None
    if len(result) != count:
        raise NotAVolume(f"{name} has {len(result)} values, not {count}")
    return result


def _optional_float(value: SupportsFloat | str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _common(values: np.ndarray, tolerance: float, reason: str) -> np.ndarray:
    first: np.ndarray = values[0]
    if np.abs(values - first).max(initial=0.0) > tolerance:
        raise NotAVolume(reason)
    return first


def _slice_spacing(
    positions: np.ndarray,
    normal: np.ndarray,
    row_cosine: np.ndarray,
    column_cosine: np.ndarray,
    thickness: float | None,
) -> float:
    """The distance between slices along the normal; rejects gaps, duplicates and shifted stacks."""
    in_plane = positions @ np.column_stack([row_cosine, column_cosine])
    if np.abs(in_plane - in_plane[0]).max(initial=0.0) > IN_PLANE_TOLERANCE_MM:
        raise NotAVolume("slices are not stacked along the normal (shifted in-plane or tilted gantry)")
    if len(positions) == 1:
        return float(thickness or 1.0)
    gaps = np.diff(positions @ normal)
    if gaps.min() <= IN_PLANE_TOLERANCE_MM:
        raise NotAVolume("two slices at the same position (more than one stack or repeated acquisition)")
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > SPACING_TOLERANCE * median:
        raise NotAVolume(f"missing slices or irregular spacing (gaps from {gaps.min():.2f} to {gaps.max():.2f} mm)")
    return float(gaps.mean())


def header_window(header: Dataset) -> tuple[float, float] | None:
    """The first window of the header (several are alternatives; the first is the default)."""
    values = []
    for keyword in ("WindowCenter", "WindowWidth"):
        value = header.get(keyword)
        if isinstance(value, MultiValue):
            value = value[0] if value else None
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            return None
    center, width = values
    return (center, width) if width > 0 else None
