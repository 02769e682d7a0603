"""The hospital as data: patients, RIS exams and the PACS studies behind them, drawn from one seeded RNG.

Everything random is decided here, in one pass, so the DICOM writer and the ground truth are pure
functions of the plan and the same seed always gives the same hospital.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum

UID_ROOT = "1.2.826.0.1.3680043.10.1234."
FIRST_DAY = date(2020, 1, 1)
LAST_DAY = date(2024, 12, 31)
INTERVAL = (datetime(2020, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC))


def span_interval(first_day: date, last_day: date) -> tuple[datetime, datetime]:
    """The half-open UTC interval holding every exam of a hospital whose exams fall on these days."""
    start = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    end = datetime(last_day.year, last_day.month, last_day.day, tzinfo=UTC) + timedelta(days=1)
    return start, end


COHORT_MODALITIES = ("CT", "MG")
SERIES_RULES = {
    "include_modalities": list(COHORT_MODALITIES),
    "exclude_descriptions": ["scout", "localizer", "topogram"],
    "min_instances": 1,
}
SITE_PREFIX = "SITEA"
# Exams of one patient are further apart than this, so the PatientID + date fallback (a +-1 day window)
# can only ever find the exam's own study.
MIN_DAYS_BETWEEN_EXAMS_OF_A_PATIENT = 3
QUIRKS_GUARANTEED_FROM = 20  # hospitals of at least this many ANs hold every quirk at least once


class Quirk(StrEnum):
    NORMAL = "normal"
    ABSENT = "absent"
    STALE_RIS_UID = "stale_ris_uid"
    RIS_UID_ONLY = "ris_uid_only"
    AN_LEADING_ZEROS = "an_leading_zeros"
    AN_SITE_PREFIX = "an_site_prefix"
    PATIENT_DATE = "patient_date"
    MULTI_STUDY = "multi_study"
    MAMMO_WITH_US = "mammo_with_us"
    CT_WITH_SCOUT = "ct_with_scout"
    ONLY_FILTERED = "only_filtered"
    OUT_OF_COHORT = "out_of_cohort"


# Share of all ANs; NORMAL takes what is left (~27%).
QUIRK_SHARES = {
    Quirk.ABSENT: 0.20,
    Quirk.OUT_OF_COHORT: 0.08,
    Quirk.STALE_RIS_UID: 0.06,
    Quirk.RIS_UID_ONLY: 0.04,
    Quirk.AN_LEADING_ZEROS: 0.04,
    Quirk.AN_SITE_PREFIX: 0.04,
    Quirk.PATIENT_DATE: 0.04,
    Quirk.MULTI_STUDY: 0.04,
    Quirk.MAMMO_WITH_US: 0.06,
    Quirk.CT_WITH_SCOUT: 0.10,
    Quirk.ONLY_FILTERED: 0.03,
}

RESOLVED_BY = {
    Quirk.RIS_UID_ONLY: "ris_study_uid",
    Quirk.AN_LEADING_ZEROS: "normalized_accession",
    Quirk.AN_SITE_PREFIX: "normalized_accession",
    Quirk.PATIENT_DATE: "patient_date",
    Quirk.ABSENT: None,
    Quirk.OUT_OF_COHORT: None,
}  # every other quirk: "accession_number"


@dataclass(frozen=True)
class ExamType:
    code: str
    modality: str
    description: str
    body_part: str
    series_descriptions: tuple[str, ...]


CT_SHOULDER = ExamType(
    "CTSHA", "CT", "CT ARTHRO SHOULDER", "SHOULDER", ("ARTHRO SHOULDER 0.6 BONE", "ARTHRO SHOULDER 2.0 SOFT TISSUE")
)
CT_CHEST = ExamType("CTCHE", "CT", "CT CHEST", "CHEST", ("CHEST 1.0 LUNG", "CHEST 3.0 MEDIASTINUM"))
MAMMOGRAPHY = ExamType("MGSCR", "MG", "MAMMOGRAPHY SCREENING", "BREAST", ("SCREENING MAMMOGRAPHY",))
MR_KNEE = ExamType("MRKNE", "MR", "MR KNEE", "KNEE", ("PD TSE SAG", "T1 TSE COR"))
COHORT_EXAM_TYPES = (CT_SHOULDER, CT_CHEST, MAMMOGRAPHY)

SCOUT_DESCRIPTIONS = ("Topogram 0.6 T20s", "SCOUT", "Localizer")
US_DESCRIPTION = "US BREAST BILATERAL"
MG_VIEWS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))
EQUIPMENT = {
    "CT": (("SIEMENS", "SOMATOM Force"), ("GE MEDICAL SYSTEMS", "Revolution CT")),
    "MG": (("HOLOGIC, Inc.", "Selenia Dimensions"),),
    "US": (("Philips", "EPIQ 7"),),
    "MR": (("SIEMENS", "MAGNETOM Vida"), ("Philips", "Ingenia")),
}
REFERRING_PHYSICIANS = ("House^Gregory", "Grey^Meredith", "Quinn^Michaela", "Carter^John", "Ross^Doug")
# Where and by whom a study was made: identifiers a research release must not carry (the release proof scans
# for them). Written into every file; a pure function of the study UID, so the plan's RNG is untouched.
INSTITUTIONS = (
    ("Saint Elsewhere Hospital", "12 Elm Street, Springfield"),
    ("Princeton-Plainsboro Teaching Hospital", "1 Hospital Plaza, Princeton"),
)
OPERATORS = ("Whitaker^Rosalind", "Okonkwo^Chidi", "Lindqvist^Mats")

# Patient names by the character set their files declare (None: the DICOM default repertoire, no element).
NAMES = {
    None: (
        ("Smith", "Brown", "Taylor", "Wilson", "Martin", "Nguyen", "Okafor", "Jones"),
        ("John", "James", "Peter", "Omar"),
        ("Emily", "Sarah", "Olivia", "Anna"),
    ),
    "ISO_IR 100": (
        ("Müller", "Lefèvre", "García", "Østergård", "Schäfer", "Niño", "Dubois", "Åberg"),
        ("Jürgen", "José", "Björn", "Søren"),
        ("Zoé", "Hélène", "Inés", "Käthe"),
    ),
    "ISO_IR 192": (
        ("Dvořák", "Ångström", "Kovačević", "Wałęsa", "Şahin", "Čapek", "Nowak", "Łukasiewicz"),
        ("Łukasz", "Michał", "Tomáš", "Oğuz"),
        ("Zoë", "Małgorzata", "Ayşe", "Zuzana"),
    ),
}
CHARSET_WEIGHTS = {None: 0.5, "ISO_IR 100": 0.25, "ISO_IR 192": 0.25}


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str  # DICOM PN form, Family^Given
    birth_date: date
    sex: str
    charset: str | None  # SpecificCharacterSet of this patient's files


@dataclass(frozen=True)
class PlannedSeries:
    uid: str
    number: int
    modality: str
    description: str
    body_part: str
    manufacturer: tuple[str, str]
    sop_uids: tuple[str, ...]
    drop_reason: str | None  # under SERIES_RULES; None: kept
    localizer: bool = False


@dataclass(frozen=True)
class PlannedStudy:
    uid: str
    accession_number: str  # as the PACS holds it: may be empty or spelled differently from the RIS
    study_datetime: datetime
    description: str
    referring_physician: str
    series: tuple[PlannedSeries, ...]


@dataclass(frozen=True)
class PlannedExam:
    accession_number: str  # as the RIS holds it
    quirk: Quirk
    exam_type: ExamType
    patient: Patient
    exam_datetime: datetime  # naive UTC
    ris_study_uid: str | None
    studies: tuple[PlannedStudy, ...]

    @property
    def in_cohort(self) -> bool:
        return self.exam_type.modality in COHORT_MODALITIES

    @property
    def expected_outcome(self) -> str | None:
        if not self.in_cohort:
            return None
        if not self.studies:
            return "not_found"
        kept = any(s.drop_reason is None for study in self.studies for s in study.series)
        return "retrieved" if kept else "filtered"

    @property
    def resolved_by(self) -> str | None:
        return RESOLVED_BY.get(self.quirk, "accession_number")


class _Uids:
    """Fixed root + seed + kind + counter: the same seed gives the same UIDs, two seeds never collide."""

    def __init__(self, seed: int) -> None:
        self._prefix = f"{UID_ROOT}{seed}."
        self._counters = {"study": 0, "series": 0, "instance": 0}
        self._kinds = {"study": 1, "series": 2, "instance": 3}

    def next(self, kind: str) -> str:
        self._counters[kind] += 1
        return f"{self._prefix}{self._kinds[kind]}.{self._counters[kind]}"


def quirk_counts(accessions: int) -> dict[Quirk, int]:
    """How many ANs carry each quirk: the shares, at least one each from QUIRKS_GUARANTEED_FROM ANs."""
    floor = 1 if accessions >= QUIRKS_GUARANTEED_FROM else 0
    counts = {quirk: max(floor, round(share * accessions)) for quirk, share in QUIRK_SHARES.items()}
    while sum(counts.values()) > accessions:  # tiny hospitals: trim the biggest shares first
        biggest = max(counts, key=lambda q: (counts[q], QUIRK_SHARES[q]))
        counts[biggest] -= 1
    return {Quirk.NORMAL: accessions - sum(counts.values()), **counts}


class _Planner:
    def __init__(self, seed: int, first_day: date = FIRST_DAY, last_day: date = LAST_DAY) -> None:
        self.first_day, self.last_day = first_day, last_day
        self.rng = random.Random(seed)
        self.uids = _Uids(seed)
        self.patients: list[Patient] = []
        self.last_exam_of: dict[str, datetime] = {}

    # -- exams ------------------------------------------------------------------------------------------
    def exams(self, accessions: int) -> list[PlannedExam]:
        quirks = [quirk for quirk, count in quirk_counts(accessions).items() for _ in range(count)]
        self.rng.shuffle(quirks)
        moments = sorted(self._exam_datetime() for _ in range(accessions))
        # ANs grow with time, as RIS counters do; 8 digits, so a stripped "000..." variant never collides.
        return [
            self._exam(index, quirk, moment) for index, (quirk, moment) in enumerate(zip(quirks, moments, strict=True))
        ]

    def _exam_datetime(self) -> datetime:
        day = self.first_day + timedelta(days=self.rng.randrange((self.last_day - self.first_day).days + 1))
        minute = self.rng.randrange(7 * 60, 20 * 60)  # opening hours of the radiology department
        return datetime(day.year, day.month, day.day) + timedelta(minutes=minute)

    def _exam(self, index: int, quirk: Quirk, moment: datetime) -> PlannedExam:
        exam_type = self._exam_type(quirk)
        patient = self._patient(exam_type, moment)
        leading_zeros = quirk is Quirk.AN_LEADING_ZEROS
        accession_number = str(10_000 + index).zfill(8) if leading_zeros else str(10_000_001 + index)
        ris_uid, studies = _STUDIES[quirk](self, exam_type, accession_number, moment)
        return PlannedExam(accession_number, quirk, exam_type, patient, moment, ris_uid, tuple(studies))

    def _exam_type(self, quirk: Quirk) -> ExamType:
        if quirk is Quirk.OUT_OF_COHORT:
            return MR_KNEE
        if quirk is Quirk.MAMMO_WITH_US:
            return MAMMOGRAPHY
        if quirk is Quirk.CT_WITH_SCOUT:
            return self.rng.choice((CT_SHOULDER, CT_CHEST))
        return self.rng.choice(COHORT_EXAM_TYPES)

    # -- patients ---------------------------------------------------------------------------------------
    def _patient(self, exam_type: ExamType, moment: datetime) -> Patient:
        needs_sex = "F" if exam_type.modality == "MG" else None
        if self.patients and self.rng.random() < 0.3:  # a returning patient, if one fits
            patient = self.rng.choice(self.patients)
            far_enough = moment - self.last_exam_of[patient.patient_id] > timedelta(
                days=MIN_DAYS_BETWEEN_EXAMS_OF_A_PATIENT
            )
            if far_enough and needs_sex in (None, patient.sex):
                self.last_exam_of[patient.patient_id] = moment
                return patient
        patient = self._new_patient(needs_sex or self.rng.choice("FM"))
        self.patients.append(patient)
        self.last_exam_of[patient.patient_id] = moment
        return patient

    def _new_patient(self, sex: str) -> Patient:
        charset = self.rng.choices(list(CHARSET_WEIGHTS), weights=list(CHARSET_WEIGHTS.values()))[0]
        families, male, female = NAMES[charset]
        name = f"{self.rng.choice(families)}^{self.rng.choice(female if sex == 'F' else male)}"
        birth = date(1935, 1, 1) + timedelta(days=self.rng.randrange(365 * 65))
        return Patient(f"P{len(self.patients) + 1:07d}", name, birth, sex, charset)

    # -- studies and series -----------------------------------------------------------------------------
    def study(
        self,
        exam_type: ExamType,
        accession_number: str,
        moment: datetime,
        series: list[Callable[[int], PlannedSeries]] | None = None,
    ) -> PlannedStudy:
        makers = series if series is not None else self.standard_series(exam_type)
        return PlannedStudy(
            uid=self.uids.next("study"),
            accession_number=accession_number,
            study_datetime=moment,
            description=exam_type.description,
            referring_physician=self.rng.choice(REFERRING_PHYSICIANS),
            series=tuple(make(number) for number, make in enumerate(makers, start=1)),
        )

    def standard_series(self, exam_type: ExamType) -> list[Callable[[int], PlannedSeries]]:
        if exam_type.modality == "MG":
            return [self.series_maker(exam_type, exam_type.series_descriptions[0], "MG", len(MG_VIEWS))]
        sizes = (3, 8) if exam_type.modality == "CT" else (3, 5)
        return [
            self.series_maker(exam_type, description, exam_type.modality, self.rng.randint(*sizes))
            for description in exam_type.series_descriptions
        ]

    def series_maker(
        self,
        exam_type: ExamType,
        description: str,
        modality: str,
        instances: int,
        *,
        drop_reason: str | None = None,
        localizer: bool = False,
    ) -> Callable[[int], PlannedSeries]:
        def make(number: int) -> PlannedSeries:
            return PlannedSeries(
                uid=self.uids.next("series"),
                number=number,
                modality=modality,
                description=description,
                body_part=exam_type.body_part,
                manufacturer=self.rng.choice(EQUIPMENT[modality]),
                sop_uids=tuple(self.uids.next("instance") for _ in range(instances)),
                drop_reason=drop_reason if drop_reason else (None if modality in COHORT_MODALITIES else "modality"),
                localizer=localizer,
            )

        return make

    def scout_maker(self, exam_type: ExamType) -> Callable[[int], PlannedSeries]:
        return self.series_maker(
            exam_type, self.rng.choice(SCOUT_DESCRIPTIONS), "CT", 1, drop_reason="description", localizer=True
        )

    def us_maker(self) -> Callable[[int], PlannedSeries]:
        return self.series_maker(MAMMOGRAPHY, US_DESCRIPTION, "US", 2)

    def stale_uid_or_none(self) -> str | None:
        return self.uids.next("study") if self.rng.random() < 0.5 else None


StudyPlan = tuple[str | None, list[PlannedStudy]]  # (the RIS's StudyInstanceUID, the PACS studies)


def _normal(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    study = p.study(t, an, at)
    return study.uid, [study]


def _absent(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    return p.stale_uid_or_none(), []


def _stale_ris_uid(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    study = p.study(t, an, at)
    return p.uids.next("study"), [study]  # the PACS re-keyed the study in a migration


def _ris_uid_only(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    study = p.study(t, "", at)
    return study.uid, [study]


def _an_leading_zeros(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    return p.stale_uid_or_none(), [p.study(t, an.lstrip("0"), at)]


def _an_site_prefix(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    return p.stale_uid_or_none(), [p.study(t, SITE_PREFIX + an, at)]


def _patient_date(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    return p.uids.next("study"), [p.study(t, "", at)]


def _multi_study(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    first = p.study(t, an, at)
    second = p.study(t, an, at + timedelta(minutes=p.rng.randint(20, 90)))
    return first.uid, [first, second]


def _mammo_with_us(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    study = p.study(t, an, at, [*p.standard_series(t), p.us_maker()])
    return study.uid, [study]


def _ct_with_scout(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    study = p.study(t, an, at, [p.scout_maker(t), *p.standard_series(t)])
    return study.uid, [study]


def _only_filtered(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    # An MG exam whose PACS study holds only the ultrasound; a CT exam whose study holds only a localizer.
    only = p.us_maker() if t.modality == "MG" else p.scout_maker(t)
    study = p.study(t, an, at, [only])
    return study.uid, [study]


def _out_of_cohort(p: _Planner, t: ExamType, an: str, at: datetime) -> StudyPlan:
    if p.rng.random() < 0.25:
        return p.stale_uid_or_none(), []
    return _normal(p, t, an, at)


_STUDIES: dict[Quirk, Callable[[_Planner, ExamType, str, datetime], StudyPlan]] = {
    Quirk.NORMAL: _normal,
    Quirk.ABSENT: _absent,
    Quirk.STALE_RIS_UID: _stale_ris_uid,
    Quirk.RIS_UID_ONLY: _ris_uid_only,
    Quirk.AN_LEADING_ZEROS: _an_leading_zeros,
    Quirk.AN_SITE_PREFIX: _an_site_prefix,
    Quirk.PATIENT_DATE: _patient_date,
    Quirk.MULTI_STUDY: _multi_study,
    Quirk.MAMMO_WITH_US: _mammo_with_us,
    Quirk.CT_WITH_SCOUT: _ct_with_scout,
    Quirk.ONLY_FILTERED: _only_filtered,
    Quirk.OUT_OF_COHORT: _out_of_cohort,
}


def plan_hospital(
    accessions: int, seed: int, first_day: date = FIRST_DAY, last_day: date = LAST_DAY
) -> list[PlannedExam]:
    """Every exam of the hospital (on days from ``first_day`` to ``last_day``), sorted by AN (the RIS's spelling)."""
    if last_day < first_day:
        raise ValueError("last_day must not be before first_day")
    return sorted(_Planner(seed, first_day, last_day).exams(accessions), key=lambda exam: exam.accession_number)
