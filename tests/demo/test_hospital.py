"""The demo hospital: deterministic, holds every quirk, and its ground truth matches its files and its RIS."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pydicom
import pytest
from pacsflow.core.ris import load_template, query_cohort
from pacsflow.core.series_rules import SeriesRules
from pacsflow.demo.environment import REPO_ROOT
from pacsflow.demo.hospital import (
    SITE_PREFIX,
    Hospital,
    Quirk,
    build_hospital,
    dropped_series,
    exams_table,
    expected_instances,
    expected_outcomes,
    load_ground_truth,
    plan_hospital,
)
from sqlalchemy import create_engine, inspect, select

from tests.helpers import fits_latin1

SEED = 5
SIZE = 40
IMAGE_SIZE = 8
SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
}


def build(directory: Path, accessions: int = SIZE, seed: int = SEED) -> Hospital:
    return build_hospital(directory, accessions=accessions, seed=seed, image_size=IMAGE_SIZE)


def file_hashes(hospital: Hospital) -> dict[str, str]:
    return {
        str(p.relative_to(hospital.dicom_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(hospital.dicom_dir.rglob("*.dcm"))
    }


def ris_rows(url: str) -> list[dict]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [
                dict(row)
                for row in connection.execute(select(exams_table).order_by(exams_table.c.accession_number)).mappings()
            ]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Hospital:
    return build(tmp_path_factory.mktemp("hospital"))


@pytest.fixture(scope="module")
def truth(hospital) -> dict:
    return load_ground_truth(hospital.ground_truth_path)


@pytest.fixture(scope="module")
def headers(hospital) -> dict[Path, pydicom.Dataset]:
    return {path: pydicom.dcmread(path) for path in sorted(hospital.dicom_dir.rglob("*.dcm"))}


@pytest.fixture(scope="module")
def studies_on_disk(headers) -> dict[str, list[pydicom.Dataset]]:
    by_study: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for ds in headers.values():
        by_study[ds.StudyInstanceUID].append(ds)
    return by_study


@pytest.fixture(scope="module")
def ris(hospital) -> dict[str, dict]:
    return {row["accession_number"]: row for row in ris_rows(hospital.ris_url)}


# -- determinism -------------------------------------------------------------------------------------------
def test_the_same_seed_gives_identical_files_ris_and_truth(hospital, tmp_path):
    again = build(tmp_path / "again")
    assert file_hashes(again) == file_hashes(hospital)
    assert ris_rows(again.ris_url) == ris_rows(hospital.ris_url)
    assert again.ground_truth_path.read_bytes() == hospital.ground_truth_path.read_bytes()


def test_another_seed_gives_another_hospital(hospital, tmp_path):
    other = build(tmp_path / "other", accessions=SIZE // 2, seed=SEED + 1)
    assert not set(file_hashes(other).values()) & set(file_hashes(hospital).values())
    assert ris_rows(other.ris_url) != ris_rows(hospital.ris_url)


def test_a_rebuild_in_the_same_directory_replaces_everything(tmp_path):
    build(tmp_path, accessions=20, seed=1)
    smaller = build(tmp_path, accessions=10, seed=2)
    truth = load_ground_truth(smaller.ground_truth_path)
    on_disk = {(p.parent.parent.name, p.parent.name, p.stem) for p in smaller.dicom_dir.glob("*/*/*.dcm")}
    assert on_disk == all_instances(truth)
    assert [row["accession_number"] for row in ris_rows(smaller.ris_url)] == [
        a["accession_number"] for a in truth["accessions"]
    ]


def test_arguments_are_validated(tmp_path):
    for bad in ({"accessions": 0}, {"seed": -1}, {"image_size": 0}):
        with pytest.raises(ValueError):
            build_hospital(tmp_path, **bad)


# -- quirks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("accessions", "seed"), [(20, 1), (20, 2), (23, 3), (57, 4), (500, 5), (10_000, 6)])
def test_every_quirk_is_present_and_a_fifth_is_absent(accessions, seed):
    exams = plan_hospital(accessions, seed)
    quirks = Counter(exam.quirk for exam in exams)
    assert set(quirks) == set(Quirk)
    assert 0.15 <= quirks[Quirk.ABSENT] / accessions <= 0.25
    assert len({exam.accession_number for exam in exams}) == accessions


def test_small_hospitals_hold_what_fits(tmp_path):
    truth = load_ground_truth(build_hospital(tmp_path, accessions=3, seed=1, image_size=1).ground_truth_path)
    assert truth["accessions_total"] == len(truth["accessions"]) == 3


def test_each_quirk_is_what_its_name_says(truth, ris, studies_on_disk):
    pacs_ans = {ds.AccessionNumber for datasets in studies_on_disk.values() for ds in datasets}
    for accession in truth["accessions"]:
        an, quirk, row = accession["accession_number"], accession["quirk"], ris[accession["accession_number"]]
        pacs = [studies_on_disk[s["study_instance_uid"]] for s in accession["studies"]]
        pacs_an = {ds.AccessionNumber for datasets in pacs for ds in datasets}
        uids = {s["study_instance_uid"] for s in accession["studies"]}
        if quirk == "absent":
            assert not pacs and row["study_instance_uid"] not in studies_on_disk
            assert not {an, an.lstrip("0"), SITE_PREFIX + an} & pacs_ans
        elif quirk in ("normal", "mammo_with_us", "ct_with_scout", "only_filtered"):
            assert pacs_an == {an} and uids == {row["study_instance_uid"]}
        elif quirk == "stale_ris_uid":
            assert pacs_an == {an} and row["study_instance_uid"] not in studies_on_disk
        elif quirk == "ris_uid_only":
            assert pacs_an == {""} and uids == {row["study_instance_uid"]}
        elif quirk == "an_leading_zeros":
            assert an.startswith("0") and pacs_an == {an.lstrip("0")}
        elif quirk == "an_site_prefix":
            assert pacs_an == {SITE_PREFIX + an}
        elif quirk == "patient_date":
            (study,) = pacs
            assert pacs_an == {""} and row["study_instance_uid"] not in studies_on_disk
            assert {(ds.PatientID, ds.StudyDate, ds.Modality) for ds in study} == {
                (row["patient_id"], row["exam_datetime"].strftime("%Y%m%d"), row["modality"])
            }
        elif quirk == "multi_study":
            assert len(uids) == 2 and pacs_an == {an} and row["study_instance_uid"] in uids
        else:
            assert quirk == "out_of_cohort" and row["modality"] == "MR" and not accession["in_cohort"]
        if quirk != "an_leading_zeros":
            assert not an.startswith("0")


def test_series_quirks_hold_the_series_the_rules_drop(truth):
    for accession in truth["accessions"]:
        series = [s for study in accession["studies"] for s in study["series"]]
        dropped = Counter((s["modality"], s["drop_reason"]) for s in series if not s["kept"])
        if accession["quirk"] == "mammo_with_us":
            assert dropped == {("US", "modality"): 1} and any(s["modality"] == "MG" and s["kept"] for s in series)
        elif accession["quirk"] == "ct_with_scout":
            assert dropped == {("CT", "description"): 1} and sum(s["kept"] for s in series) >= 1
        elif accession["quirk"] == "only_filtered":
            assert series and not any(s["kept"] for s in series)
            assert accession["expected_outcome"] == "filtered"
        elif accession["in_cohort"]:
            assert not dropped


def test_returning_patients_are_never_seen_twice_within_three_days():
    # So the PatientID + date fallback (a +-1 day window) can only find the exam's own study.
    exams = defaultdict(list)
    for exam in plan_hospital(2000, 9):
        exams[exam.patient.patient_id].append(exam.exam_datetime)
    assert any(len(moments) > 1 for moments in exams.values())
    for moments in exams.values():
        moments.sort()
        assert all(b - a > timedelta(days=3) for a, b in pairwise(moments))


# -- ground truth against the files -------------------------------------------------------------------------
def all_instances(truth: dict) -> set[tuple[str, str, str]]:
    return {
        (study["study_instance_uid"], series["series_instance_uid"], sop)
        for a in truth["accessions"]
        for study in a["studies"]
        for series in study["series"]
        for sop in series["sop_instance_uids"]
    }


def test_every_file_is_in_the_truth_with_matching_uids(headers, truth):
    on_disk = set()
    for path, ds in headers.items():
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
            path.parent.parent.name,
            path.parent.name,
            path.stem,
        )
        on_disk.add((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    assert on_disk == all_instances(truth)


def test_files_are_valid_part10_images_of_the_right_sop_class(headers):
    for ds in headers.values():
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == SOP_CLASSES[ds.Modality]
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PhotometricInterpretation) == (
            IMAGE_SIZE,
            IMAGE_SIZE,
            16,
            "MONOCHROME2",
        )
        assert len(ds.PixelData) == IMAGE_SIZE * IMAGE_SIZE * 2
        for keyword in (
            "PatientBirthDate",
            "PatientSex",
            "StudyTime",
            "ReferringPhysicianName",
            "StudyDescription",
            "SeriesNumber",
            "BodyPartExamined",
            "Manufacturer",
            "ManufacturerModelName",
            "InstanceNumber",
            "AcquisitionDate",
            "AcquisitionTime",
        ):
            assert ds.get(keyword) not in (None, ""), keyword
        if ds.Modality == "CT":
            assert ds.ImagePositionPatient and ds.ImageOrientationPatient and ds.PixelSpacing
            assert ds.SliceThickness


def test_series_sizes_are_realistic(truth):
    for accession in truth["accessions"]:
        for study in accession["studies"]:
            for series in study["series"]:
                count = len(series["sop_instance_uids"])
                scout = series["drop_reason"] == "description"
                expected = {"MG": {4}, "US": {2}, "CT": {1} if scout else set(range(3, 9))}.get(
                    series["modality"], set(range(3, 6))
                )
                assert count in expected


def test_the_default_rules_applied_to_the_headers_give_the_truths_drop_reasons(headers, truth):
    rules = SeriesRules.parse(truth["series_rules"])
    by_series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for ds in headers.values():
        by_series[ds.SeriesInstanceUID].append(ds)
    for accession in truth["accessions"]:
        for study in accession["studies"]:
            for series in study["series"]:
                datasets = by_series[series["series_instance_uid"]]
                first = datasets[0]
                reason = rules.drop_reason(
                    {
                        "Modality": first.Modality,
                        "SeriesDescription": first.SeriesDescription,
                        "BodyPartExamined": first.BodyPartExamined,
                        "NumberOfSeriesRelatedInstances": len(datasets),
                    }
                )
                assert (reason and reason.value) == series["drop_reason"]
                assert series["kept"] is (reason is None)
                assert (first.Modality, first.SeriesDescription) == (series["modality"], series["description"])


def test_helpers_select_the_cohort(truth):
    in_cohort = [a for a in truth["accessions"] if a["in_cohort"]]
    assert set(expected_outcomes(truth)) == {a["accession_number"] for a in in_cohort}
    assert set(expected_outcomes(truth).values()) == {"retrieved", "filtered", "not_found"}
    instances = expected_instances(truth)
    assert instances < all_instances(truth)
    assert not {series for _, series, _ in instances} & set(dropped_series(truth))
    assert set(dropped_series(truth).values()) == {"modality", "description"}
    out_of_cohort_series = {
        s["series_instance_uid"]
        for a in truth["accessions"]
        if not a["in_cohort"]
        for study in a["studies"]
        for s in study["series"]
    }
    assert out_of_cohort_series and not out_of_cohort_series & {series for _, series, _ in instances}
    assert not out_of_cohort_series & set(dropped_series(truth))


def test_truth_records_the_resolution_each_quirk_needs(truth):
    for accession in truth["accessions"]:
        resolved_by = {
            "absent": None,
            "out_of_cohort": None,
            "ris_uid_only": "ris_study_uid",
            "an_leading_zeros": "normalized_accession",
            "an_site_prefix": "normalized_accession",
            "patient_date": "patient_date",
        }.get(accession["quirk"], "accession_number")
        assert accession["resolved_by"] == resolved_by
        if accession["quirk"] == "out_of_cohort":
            assert accession["expected_outcome"] is None


# -- character sets ----------------------------------------------------------------------------------------
def test_patient_names_decode_to_the_ris_name_in_every_character_set(headers, ris):
    name_of = {row["patient_id"]: row["patient_name"] for row in ris.values()}
    charsets = Counter()
    for path, ds in headers.items():
        charset = ds.get("SpecificCharacterSet")
        charsets[charset] += 1
        assert str(ds.PatientName) == name_of[ds.PatientID]
        raw = pydicom.dcmread(path, stop_before_pixels=True).get_item("PatientName").value.rstrip(b" ")
        encoding = {None: "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}[charset]
        assert raw.decode(encoding) == name_of[ds.PatientID]
    assert set(charsets) == {None, "ISO_IR 100", "ISO_IR 192"}
    assert any(not name.isascii() and not fits_latin1(name) for name in name_of.values())


# -- RIS ---------------------------------------------------------------------------------------------------
def test_ris_rows_match_the_truth(ris, truth):
    assert set(ris) == {a["accession_number"] for a in truth["accessions"]}
    for accession in truth["accessions"]:
        row = ris[accession["accession_number"]]
        assert row["patient_id"] == accession["patient_id"]
        assert row["study_instance_uid"] == accession["ris_study_instance_uid"]
        assert row["exam_datetime"] == datetime.fromisoformat(accession["exam_datetime"])
        assert row["modality"] == accession["modality"] and row["exam_code"] == accession["exam_code"]
        assert row["patient_name"] and row["patient_birth_date"] and row["exam_description"]


def test_the_cohort_sql_selects_exactly_the_in_cohort_accessions(hospital, truth):
    assert_cohort_query_matches(hospital, truth)
    inspector = inspect(create_engine(hospital.ris_url))
    assert {c["name"] for c in inspector.get_columns("exams")} == set(exams_table.c.keys())


def assert_cohort_query_matches(hospital: Hospital, truth: dict) -> None:
    start, end = hospital.interval
    assert all(start <= datetime.fromisoformat(a["exam_datetime"] + "+00:00") < end for a in truth["accessions"])
    engine = create_engine(hospital.ris_url)
    try:
        exams = list(
            query_cohort(
                engine,
                load_template("cohort_by_modality.sql", REPO_ROOT / "include" / "sql"),
                interval_start=start.replace(tzinfo=None),
                interval_end=end.replace(tzinfo=None),
                params={"modalities": truth["cohort_modalities"]},
            )
        )
    finally:
        engine.dispose()
    assert [e.accession_number for e in exams] == sorted(expected_outcomes(truth))


@pytest.mark.postgres
def test_the_ris_works_on_postgresql(postgres_url, tmp_path):
    hospital = build_hospital(tmp_path, accessions=20, seed=3, image_size=1, ris_url=postgres_url)
    truth = load_ground_truth(hospital.ground_truth_path)
    assert hospital.ris_url == postgres_url
    assert_cohort_query_matches(hospital, truth)
    again = build_hospital(tmp_path / "sqlite", accessions=20, seed=3, image_size=1)
    assert ris_rows(postgres_url) == ris_rows(again.ris_url)


# -- CLI ---------------------------------------------------------------------------------------------------
def test_the_cli_prints_counts_and_no_patient_data(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacsflow.demo.hospital",
            "--out",
            str(tmp_path),
            "--accessions",
            "20",
            "--seed",
            "3",
            "--image-size",
            "4",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO_ROOT / "plugins")},
    )
    truth = load_ground_truth(tmp_path / "ground_truth.json")
    assert "accessions        20" in completed.stdout
    rows = ris_rows(f"sqlite:///{tmp_path / 'ris.sqlite'}")
    for row in rows:
        for value in (row["accession_number"], row["patient_id"], row["patient_name"].split("^")[0]):
            assert value not in completed.stdout
    assert len(rows) == truth["accessions_total"]
