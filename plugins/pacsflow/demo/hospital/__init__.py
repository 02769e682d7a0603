"""A deterministic demo hospital: a RIS (SQL ``exams`` table), DICOM files for a PACS, and the ground truth.

The same ``seed`` gives byte-identical files and the same RIS rows. Every hospital of at least 20 ANs holds
each of the real-world quirks the pipeline must survive (see ``Quirk``), about 20% of ANs absent from the PACS.

    hospital = build_hospital(Path("var/hospital"), accessions=60, seed=7)
    truth = load_ground_truth(hospital.ground_truth_path)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from pacsflow.demo.hospital.dicom_files import write_exams
from pacsflow.demo.hospital.plan import (
    COHORT_MODALITIES,
    FIRST_DAY,
    INTERVAL,
    LAST_DAY,
    SERIES_RULES,
    SITE_PREFIX,
    PlannedExam,
    Quirk,
    plan_hospital,
    quirk_counts,
    span_interval,
)
from pacsflow.demo.hospital.ris import exams_table, write_ris
from pacsflow.demo.hospital.truth import (
    dropped_series,
    expected_instances,
    expected_outcomes,
    ground_truth,
    load_ground_truth,
    within,
    write_ground_truth,
)

__all__ = [
    "COHORT_MODALITIES",
    "INTERVAL",
    "SERIES_RULES",
    "SITE_PREFIX",
    "Hospital",
    "Quirk",
    "build_hospital",
    "dropped_series",
    "exams_table",
    "expected_instances",
    "expected_outcomes",
    "load_ground_truth",
    "plan_hospital",
    "quirk_counts",
    "within",
]

MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class Hospital:
    ris_url: str
    dicom_dir: Path  # the files to load into the PACS: <dicom_dir>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm
    ground_truth_path: Path
    interval: tuple[datetime, datetime]  # UTC, half-open, covers every exam datetime
    files_written: int = 0


def build_hospital(
    out_dir: Path,
    *,
    accessions: int = 60,
    seed: int = 7,
    image_size: int = 32,
    ris_url: str | None = None,
    first_day: date = FIRST_DAY,
    last_day: date = LAST_DAY,
) -> Hospital:
    """Build (or rebuild from scratch) the hospital in ``out_dir``; the RIS defaults to SQLite in it."""
    if not isinstance(accessions, int) or accessions < 1:
        raise ValueError("accessions must be a whole number >= 1")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError("seed must be a whole number >= 0 (it becomes a UID component)")
    if not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be between 1 and {MAX_IMAGE_SIZE}")
    out_dir = Path(out_dir).resolve()
    dicom_dir = out_dir / "dicom"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dicom_dir, ignore_errors=True)
    dicom_dir.mkdir()
    url = ris_url or f"sqlite:///{out_dir / 'ris.sqlite'}"

    exams: list[PlannedExam] = plan_hospital(accessions, seed, first_day, last_day)
    write_ris(url, exams)
    files = write_exams(exams, dicom_dir, image_size)
    truth_path = out_dir / "ground_truth.json"
    write_ground_truth(truth_path, ground_truth(exams, seed))
    return Hospital(
        ris_url=url,
        dicom_dir=dicom_dir,
        ground_truth_path=truth_path,
        interval=span_interval(first_day, last_day),
        files_written=files,
    )
