"""A PNG preview of a retrieved series, rendered from the files on disk and cached next to them.

Cross-sectional series: the middle slice of the volume ordered along the normal (:mod:`pacsflow.core.volume`);
projection images (mammography, radiographs): the first image by InstanceNumber. Windowed with the header's
window when it has one, else between the 1st and 99th percentile. Only pixels are drawn: no text, no
identifier; an image whose header declares burned-in annotation is not previewed at all. The PNG keeps the
image's own size (rows x columns) and is written with mode 0600 as ``.pacsflow-preview.png`` in the series
directory, rebuilt when an instance is newer than it.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.pixels.utils import pixel_array  # pydicom.pixels re-exports it without __all__

from pacsflow.core.volume import NotAVolume, header_window, read_slice, scan_series, series_files

CACHE_NAME = ".pacsflow-preview.png"
PROJECTION_MODALITIES = frozenset({"MG", "CR", "DX", "RF", "XA", "IO", "PX"})
PERCENTILES = (1.0, 99.0)


class NoPreview(ValueError):
    """Why a series has no preview (a reason for the auditor; never an identifier)."""


@dataclass(frozen=True)
class Preview:
    png: bytes
    rows: int
    columns: int


def preview_png(series_dir: Path, modality: str | None) -> bytes:
    """The series' preview, from the cache when no instance is newer, else rendered (and cached when the data
    root is writable); raises :class:`NoPreview` with the reason when there is none."""
    files = series_files(series_dir)
    if not files:
        raise NoPreview("no instance of this series is on disk")
    cache = series_dir / CACHE_NAME
    newest = max(path.stat().st_mtime_ns for path in files)
    if cache.exists() and cache.stat().st_mtime_ns >= newest:
        return cache.read_bytes()
    png = render_preview(files, modality).png
    with suppress(OSError):  # a read-only data root: serve without caching
        _write_private(cache, png)
    return png


def render_preview(files: list[Path], modality: str | None) -> Preview:
    header = dcmread(files[0], stop_before_pixels=True)
    if str(header.get("BurnedInAnnotation", "")).upper() == "YES":
        raise NoPreview("the images declare burned-in annotation (it may show identifiers)")
    if (modality or "").upper() in PROJECTION_MODALITIES:
        image, window, inverted = _projection_image(files)
    else:
        try:
            geometry = scan_series(files)
        except NotAVolume as error:
            raise NoPreview(f"not one volume: {error}") from None
        image = read_slice(geometry, len(geometry.frames) // 2)
        window, inverted = geometry.window, geometry.inverted
    grey = windowed(image, window)
    if inverted:
        grey = 255 - grey
    return Preview(encode_png(grey), *grey.shape)


def _projection_image(files: list[Path]) -> tuple[np.ndarray, tuple[float, float] | None, bool]:
    first = min(
        files,
        key=lambda path: (
            int(dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"]).get("InstanceNumber") or 0),
            path.name,
        ),
    )
    header = dcmread(first, stop_before_pixels=True)
    if int(header.get("SamplesPerPixel", 1) or 1) != 1:
        raise NoPreview("colour images are not previewed")
    raw = pixel_array(first, index=0) if int(header.get("NumberOfFrames", 1) or 1) > 1 else pixel_array(first)
    image = raw.astype(np.float32) * float(header.get("RescaleSlope", 1) or 1) + float(
        header.get("RescaleIntercept", 0) or 0
    )
    return image, header_window(header), str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1"


def windowed(image: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """8-bit grey levels: the header window (center, width) when given, else the 1st-99th percentile range."""
    if window is not None:
        center, width = window
        low, high = center - width / 2, center + width / 2
    else:
        low, high = (float(v) for v in np.percentile(image, PERCENTILES))
    if high <= low:
        high = low + 1
    scaled = (image.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def encode_png(grey: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG (stdlib zlib; no imaging library needed)."""
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError("encode_png takes a 2-D uint8 array")
    rows, columns = grey.shape
    raw = np.hstack([np.zeros((rows, 1), np.uint8), grey]).tobytes()  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", columns, rows, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _write_private(path: Path, data: bytes) -> None:
    """Atomically, readable by the service account only (the image is patient data)."""
    fd, temp = tempfile.mkstemp(prefix=".pacsflow-preview-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
