"""The ground truth of a demo hospital (what a perfect extraction must produce) and helpers to read it.

Every fact is stated by construction, from the plan: the generator knows why it put each series there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pacsflow.demo.hospital.plan import (
    COHORT_MODALITIES,
    INTERVAL,
    SERIES_RULES,
    PlannedExam,
    PlannedSeries,
    PlannedStudy,
)


def ground_truth(exams: list[PlannedExam], seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "accessions_total": len(exams),
        "interval": [moment.isoformat() for moment in INTERVAL],
        "cohort_modalities": list(COHORT_MODALITIES),
        "series_rules": SERIES_RULES,
        "accessions": [_accession(exam) for exam in exams],
    }


def _accession(exam: PlannedExam) -> dict[str, Any]:
    return {
        "accession_number": exam.accession_number,
        "in_cohort": exam.in_cohort,
        "quirk": exam.quirk.value,
        "expected_outcome": exam.expected_outcome,
        "resolved_by": exam.resolved_by,
        "exam_datetime": exam.exam_datetime.isoformat(),
        "modality": exam.exam_type.modality,
        "exam_code": exam.exam_type.code,
        "patient_id": exam.patient.patient_id,
        "ris_study_instance_uid": exam.ris_study_uid,
        "studies": [_study(study) for study in exam.studies],
    }


def _study(study: PlannedStudy) -> dict[str, Any]:
    return {
        "study_instance_uid": study.uid,
        "accession_number": study.accession_number,  # as the PACS holds it
        "series": [_series(series) for series in study.series],
    }


def _series(series: PlannedSeries) -> dict[str, Any]:
    return {
        "series_instance_uid": series.uid,
        "modality": series.modality,
        "description": series.description,
        "kept": series.drop_reason is None,
        "drop_reason": series.drop_reason,
        "sop_instance_uids": list(series.sop_uids),
    }


def write_ground_truth(path: Path, truth: dict[str, Any]) -> None:
    path.write_text(json.dumps(truth, sort_keys=True, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")


def load_ground_truth(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def within(truth: dict[str, Any], start: datetime, end: datetime) -> dict[str, Any]:
    """The ground truth of the exams in ``[start, end)`` (aware UTC): what a run over that interval extracts."""

    def inside(accession: dict[str, Any]) -> bool:
        moment = datetime.fromisoformat(accession["exam_datetime"]).replace(tzinfo=UTC)
        return start <= moment < end

    return {**truth, "accessions": [a for a in truth["accessions"] if inside(a)]}


def _cohort_series(truth: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for accession in truth["accessions"]:
        if accession["in_cohort"]:
            for study in accession["studies"]:
                for series in study["series"]:
                    yield study["study_instance_uid"], series


def expected_instances(truth: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(StudyUID, SeriesUID, SOPUID) of every instance a perfect run retrieves (kept series, in-cohort ANs)."""
    return {
        (study_uid, series["series_instance_uid"], sop_uid)
        for study_uid, series in _cohort_series(truth)
        if series["kept"]
        for sop_uid in series["sop_instance_uids"]
    }


def dropped_series(truth: dict[str, Any]) -> dict[str, str]:
    """SeriesUID -> drop reason, for every series of an in-cohort AN that the default rules drop."""
    return {
        series["series_instance_uid"]: series["drop_reason"]
        for _, series in _cohort_series(truth)
        if not series["kept"]
    }


def expected_outcomes(truth: dict[str, Any]) -> dict[str, str]:
    """AN -> "retrieved" | "filtered" | "not_found", for every in-cohort AN."""
    return {a["accession_number"]: a["expected_outcome"] for a in truth["accessions"] if a["in_cohort"]}
