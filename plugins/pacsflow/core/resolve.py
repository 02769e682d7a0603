"""Accession Number -> StudyInstanceUID(s), by an ordered fallback chain whose every step is recorded.

Real PACS are messy: ANs missing or re-keyed, RIS UIDs stale after migrations, one AN across several studies.
Rules are tried in order and the first that yields exact matches wins:

1. ``accession_number``: exact AN at study level (several studies under one AN is a normal result).
2. ``ris_study_uid``: the RIS's StudyInstanceUID, if the PACS study does not carry a different AN.
3. ``normalized_accession``: configured rewrites of the AN (strip leading zeros, add/remove a site prefix).
4. ``patient_date``: PatientID + study date window (+ modality), among studies carrying no other AN;
   more than one candidate is ``ambiguous``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from pacsflow.core.dicom.errors import PacsItemError
from pacsflow.core.dicom.results import FindResult, QueryLevel
from pacsflow.core.errors import ConfigurationError, validation_problems
from pacsflow.core.ris import RisExam
from pacsflow.core.uids import accession_problem, is_valid_uid

STUDY_RETURN_KEYS = ("StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate", "ModalitiesInStudy")


class Rule(StrEnum):
    ACCESSION_NUMBER = "accession_number"
    RIS_STUDY_UID = "ris_study_uid"
    NORMALIZED_ACCESSION = "normalized_accession"
    PATIENT_DATE = "patient_date"


class Resolution(StrEnum):
    RESOLVED = "resolved"
    AMBIGUOUS = "ambiguous"
    NOT_FOUND = "not_found"
    CAPPED = "capped"
    PACS_ERROR = "pacs_error"
    INVALID = "invalid"


class Finder(Protocol):
    def find(self, level: QueryLevel, query: Mapping[str, str]) -> FindResult: ...


class ResolutionSettingsError(ConfigurationError):
    """The resolution settings are malformed; the message names the key to fix."""


class ResolutionSettings(BaseModel):
    """The AN fallback chain's settings. Strict types: ``"false"`` is not a boolean, ``"AB"`` is not a list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strip_leading_zeros: StrictBool = True
    site_prefixes: tuple[StrictStr, ...] = ()  # tried both added to and removed from the AN
    patient_date_window_days: StrictInt = Field(default=1, ge=0, le=366)
    patient_date_match_modality: StrictBool = True
    rules: tuple[Rule, ...] = tuple(Rule)

    @field_validator("site_prefixes", mode="before")
    @classmethod
    def _a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            # a ValueError is what pydantic reports as a validation error naming the key (a TypeError escapes)
            raise ValueError("must be a list of prefixes, not one text")  # noqa: TRY004
        return value

    @field_validator("site_prefixes")
    @classmethod
    def _plain_text(cls, prefixes: tuple[str, ...]) -> tuple[str, ...]:
        if any(accession_problem(prefix) for prefix in prefixes):
            raise ValueError("site prefixes must be plain text without wildcards")
        return prefixes

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> ResolutionSettings:
        """Validate plain configuration; a :class:`ResolutionSettingsError` names each key at fault."""
        try:
            return cls.model_validate(config)
        except ValidationError as error:
            raise ResolutionSettingsError(f"resolution: {validation_problems(error)}") from None

    def normalized_variants(self, accession_number: str) -> list[str]:
        """Other spellings of the AN a PACS may hold, in a stable order, without the original."""
        variants: list[str] = []
        if self.strip_leading_zeros:
            variants.append(accession_number.lstrip("0"))
        for prefix in self.site_prefixes:
            variants.append(prefix + accession_number)
            if accession_number.startswith(prefix):
                variants.append(accession_number[len(prefix) :])
        unique = dict.fromkeys(v for v in variants if v and v != accession_number and not accession_problem(v))
        return list(unique)


@dataclass(frozen=True)
class ResolutionResult:
    resolution: Resolution
    rule: Rule | None = None
    study_uids: tuple[str, ...] = ()
    detail: str | None = None  # never patient data: rule names, counts, statuses
    attempts: tuple[str, ...] = field(default=())  # the rules tried, in order


class _Capped(Exception):
    pass


def resolve_accession(finder: Finder, exam: RisExam, settings: ResolutionSettings) -> ResolutionResult:
    """Run the fallback chain for one exam. PACS errors on an item are recorded, not raised."""
    problem = accession_problem(exam.accession_number)
    if problem:
        return ResolutionResult(Resolution.INVALID, detail=f"accession number refused: {problem}")
    attempts: list[str] = []
    try:
        for rule in settings.rules:
            attempts.append(rule.value)
            studies = _RULES[rule](finder, exam, settings)
            if len(studies) > 1 and rule is Rule.PATIENT_DATE:
                return ResolutionResult(
                    Resolution.AMBIGUOUS,
                    rule,
                    tuple(studies),
                    f"{len(studies)} studies match patient and date",
                    tuple(attempts),
                )
            if studies:
                return ResolutionResult(Resolution.RESOLVED, rule, tuple(studies), attempts=tuple(attempts))
    except _Capped:
        return ResolutionResult(
            Resolution.CAPPED, detail=f"PACS result cap reached in rule {attempts[-1]}", attempts=tuple(attempts)
        )
    except PacsItemError as error:
        return ResolutionResult(Resolution.PACS_ERROR, detail=str(error), attempts=tuple(attempts))
    return ResolutionResult(Resolution.NOT_FOUND, detail="no rule matched", attempts=tuple(attempts))


def _find_studies(finder: Finder, keys: Mapping[str, str]) -> list[dict[str, Any]]:
    query = dict.fromkeys(STUDY_RETURN_KEYS, "") | dict(keys)
    result = finder.find("STUDY", query)
    if result.capped:
        raise _Capped()
    return result.matches


def _study_uids(matches: Iterable[Mapping[str, Any]], keep: Callable[[Mapping[str, Any]], bool]) -> list[str]:
    uids = (m.get("StudyInstanceUID") for m in matches if keep(m))
    return list(dict.fromkeys(uid for uid in uids if is_valid_uid(uid)))


def _by_accession(finder: Finder, exam: RisExam, _: ResolutionSettings) -> list[str]:
    return _exact_accession(finder, exam.accession_number)


def _exact_accession(finder: Finder, accession_number: str) -> list[str]:
    # Some PACS match ANs loosely (case, padding): keep only exact equals.
    matches = _find_studies(finder, {"AccessionNumber": accession_number})
    return _study_uids(matches, lambda m: (m.get("AccessionNumber") or "").strip() == accession_number)


def _by_ris_uid(finder: Finder, exam: RisExam, _: ResolutionSettings) -> list[str]:
    uid = exam.study_instance_uid
    if not is_valid_uid(uid):
        return []
    matches = _find_studies(finder, {"StudyInstanceUID": uid})
    # A study that carries another AN belongs to another exam: the RIS UID is stale, not a match.
    return _study_uids(
        matches,
        lambda m: (
            m.get("StudyInstanceUID") == uid and (m.get("AccessionNumber") or "").strip() in ("", exam.accession_number)
        ),
    )


def _by_normalized(finder: Finder, exam: RisExam, settings: ResolutionSettings) -> list[str]:
    for variant in settings.normalized_variants(exam.accession_number):
        studies = _exact_accession(finder, variant)
        if studies:
            return studies
    return []


def _by_patient_date(finder: Finder, exam: RisExam, settings: ResolutionSettings) -> list[str]:
    if not exam.patient_id or exam.exam_datetime is None or accession_problem(exam.patient_id):
        return []
    window = timedelta(days=settings.patient_date_window_days)
    first, last = (exam.exam_datetime - window).date(), (exam.exam_datetime + window).date()
    matches = _find_studies(finder, {"PatientID": exam.patient_id, "StudyDate": f"{first:%Y%m%d}-{last:%Y%m%d}"})
    wanted_modality = exam.modality.upper() if exam.modality and settings.patient_date_match_modality else None

    def candidate(match: Mapping[str, Any]) -> bool:
        if match.get("PatientID") != exam.patient_id:
            return False
        if (match.get("AccessionNumber") or "").strip() not in ("", exam.accession_number):
            return False
        return wanted_modality is None or wanted_modality in _study_modalities(finder, match)

    return _study_uids(matches, candidate)


def _study_modalities(finder: Finder, study: Mapping[str, Any]) -> set[str]:
    """ModalitiesInStudy, or, from a PACS that does not return it, the modalities of the study's series."""
    value = study.get("ModalitiesInStudy")
    if value is None:
        uid = study.get("StudyInstanceUID")
        if not is_valid_uid(uid):
            return set()
        series = finder.find("SERIES", {"StudyInstanceUID": uid, "SeriesInstanceUID": "", "Modality": ""})
        return {str(m.get("Modality") or "").upper() for m in series.matches}
    values = value if isinstance(value, list) else str(value).split("\\")
    return {str(v).upper() for v in values}


_RULES: dict[Rule, Callable[[Finder, RisExam, ResolutionSettings], list[str]]] = {
    Rule.ACCESSION_NUMBER: _by_accession,
    Rule.RIS_STUDY_UID: _by_ris_uid,
    Rule.NORMALIZED_ACCESSION: _by_normalized,
    Rule.PATIENT_DATE: _by_patient_date,
}
