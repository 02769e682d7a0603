"""Series previews: the middle slice along the normal (or the projection image itself), windowed, a PNG of the
image's size with nothing but pixels, cached 0600 next to the data and rebuilt when an instance is newer."""

from __future__ import annotations

import os
import stat
import zlib

import numpy as np
import pytest
from pacsflow.core.volume import read_slice, scan_series, series_files
from pacsflow.ui.preview import CACHE_NAME, NoPreview, encode_png, preview_png, render_preview, windowed
from pydicom import dcmread

from tests.core.test_volume import COLUMNS, ROWS, SLICES, _pixels, write_ct_series


def decode(png: bytes) -> np.ndarray:
    """The grey levels of an 8-bit greyscale PNG with filter 0 rows (what encode_png writes)."""
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    position, idat = 8, b""
    while position < len(png):
        length = int.from_bytes(png[position : position + 4], "big")
        if png[position + 4 : position + 8] == b"IDAT":
            idat += png[position + 8 : position + 8 + length]
        position += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, width + 1)
    assert not rows[:, 0].any()
    return rows[:, 1:]


def test_the_preview_is_the_middle_slice_along_the_normal_in_the_header_window(tmp_path):
    pixels = _pixels(7)
    write_ct_series(tmp_path / "ct", pixels)
    png = render_preview(series_files(tmp_path / "ct"), "CT").png
    grey = decode(png)
    assert grey.shape == (ROWS, COLUMNS)
    middle = pixels[SLICES // 2].astype(np.float32) * 2 - 1024  # the files' slope and intercept
    np.testing.assert_array_equal(grey, np.clip((middle - (40 - 200)) * 255 / 400, 0, 255).astype(np.uint8))
    geometry = scan_series(series_files(tmp_path / "ct"))
    np.testing.assert_array_equal(grey, windowed(read_slice(geometry, SLICES // 2), (40.0, 400.0)))


def test_without_a_header_window_the_percentiles_set_it():
    image = np.arange(10_000, dtype=np.float32).reshape(100, 100)
    grey = windowed(image, None).flatten()
    low, high = np.percentile(image, (1, 99))
    assert (grey[image.flatten() <= low] == 0).all() and (grey[image.flatten() >= high] == 255).all()
    assert (grey[(image.flatten() > low + 100) & (image.flatten() < high - 100)] % 255 != 0).all()
    assert (np.diff(grey.astype(int)) >= 0).all()


def _rewrite_all(directory, **values):
    for path in series_files(directory):
        ds = dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def test_monochrome1_is_inverted_and_projection_images_are_shown_themselves(tmp_path):
    pixels = _pixels(8)
    write_ct_series(tmp_path / "mg", pixels)
    _rewrite_all(tmp_path / "mg", Modality="MG", PhotometricInterpretation="MONOCHROME1")
    first = min(series_files(tmp_path / "mg"), key=lambda p: int(dcmread(p).InstanceNumber))
    expected = 255 - windowed(dcmread(first).pixel_array * 2.0 - 1024, (40.0, 400.0))
    np.testing.assert_array_equal(decode(render_preview(series_files(tmp_path / "mg"), "MG").png), expected)


def test_no_preview_for_burned_in_annotation_or_a_series_that_is_not_a_volume(tmp_path):
    write_ct_series(tmp_path / "burned", _pixels(9))
    _rewrite_all(tmp_path / "burned", BurnedInAnnotation="YES")
    with pytest.raises(NoPreview, match="burned-in"):
        render_preview(series_files(tmp_path / "burned"), "CT")
    write_ct_series(tmp_path / "gap", _pixels(9), skip=2)
    with pytest.raises(NoPreview, match="not one volume: missing slices"):
        render_preview(series_files(tmp_path / "gap"), "CT")


def test_the_preview_is_cached_private_and_rebuilt_when_an_instance_is_newer(tmp_path):
    paths = write_ct_series(tmp_path / "ct", _pixels(10))
    first = preview_png(tmp_path / "ct", "CT")
    cache = tmp_path / "ct" / CACHE_NAME
    assert cache.read_bytes() == first and stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert series_files(tmp_path / "ct") == sorted(paths)  # the cache is not taken for an instance
    _rewrite_all(tmp_path / "ct", WindowCenter=1000)
    newer = cache.stat().st_mtime_ns + 1_000_000_000
    for path in paths:
        os.utime(path, ns=(newer, newer))
    assert preview_png(tmp_path / "ct", "CT") != first


def test_encode_png_takes_only_grey_bytes():
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2), np.uint16))
    assert decode(encode_png(np.array([[0, 255]], np.uint8))).tolist() == [[0, 255]]
