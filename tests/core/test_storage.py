"""The layout: files appear complete, are never replaced, and every new directory entry is made durable."""

from __future__ import annotations

from pathlib import Path

import pytest
from pacsflow.core import storage
from pacsflow.core.storage import Placement, StorageLayout

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def _temp(layout: StorageLayout, data: bytes) -> Path:
    layout.root.mkdir(parents=True, exist_ok=True)
    path = layout.root / f"{storage.TEMP_PREFIX}{len(list(layout.root.iterdir()))}.dcm"
    path.write_bytes(data)
    return path


def test_new_study_and_series_directories_are_fsynced_in_their_parents(tmp_path, monkeypatch):
    """A crash after the answer must not lose a directory entry: spy on fsync (no peer can show a lost entry)."""
    layout = StorageLayout(tmp_path / "root")
    synced: list[Path] = []
    real = storage.fsync_path
    monkeypatch.setattr(storage, "fsync_path", lambda path: (synced.append(Path(path)), real(path)))
    assert layout.commit(_temp(layout, b"a"), STUDY, SERIES, SOP) is Placement.STORED
    series_dir = layout.series_dir(STUDY, SERIES)
    assert {layout.root, series_dir.parent, series_dir} <= set(synced)  # root: the study; study: the series
    synced.clear()
    assert layout.commit(_temp(layout, b"b"), STUDY, SERIES, "1.2.3.4.6") is Placement.STORED
    assert series_dir in synced and layout.root not in synced and series_dir.parent not in synced


def test_a_second_copy_is_kept_out_and_the_first_stays(tmp_path):
    layout = StorageLayout(tmp_path / "root")
    assert layout.commit(_temp(layout, b"first"), STUDY, SERIES, SOP) is Placement.STORED
    assert layout.commit(_temp(layout, b"first"), STUDY, SERIES, SOP) is Placement.ALREADY_STORED
    assert layout.commit(_temp(layout, b"other"), STUDY, SERIES, SOP) is Placement.DIFFERENT_COPY
    assert layout.commit(_temp(layout, b"first"), "1.2.9", SERIES, SOP) is Placement.OTHER_LOCATION
    assert layout.instance_path(STUDY, SERIES, SOP).read_bytes() == b"first"
    assert not layout.series_dir("1.2.9", SERIES).exists()
    assert [p for p in layout.root.iterdir() if p.name.startswith(storage.TEMP_PREFIX)] == []


def test_a_claim_whose_file_was_removed_moves_with_the_instance(tmp_path):
    layout = StorageLayout(tmp_path / "root")
    layout.commit(_temp(layout, b"x"), STUDY, SERIES, SOP)
    layout.instance_path(STUDY, SERIES, SOP).unlink()  # an operator cleaned up a study
    assert layout.commit(_temp(layout, b"x"), "1.2.9", SERIES, SOP) is Placement.STORED
    assert layout.stored_sop_uids("1.2.9", SERIES) == {SOP}


@pytest.mark.parametrize("placement", list(Placement))
def test_only_the_two_conflicts_are_refusals(placement):
    assert placement.refused == (placement in (Placement.DIFFERENT_COPY, Placement.OTHER_LOCATION))
