"""The research release, proven on a demo hospital: no identifier the source holds survives in any released
file (elements, nested sequences, file meta, raw bytes) or any column of the released Parquet; pixels are
unchanged; a re-run is byte-identical; held-back instances are reported; dciodvfy finds no new errors."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from pacsflow.core.audit import AuditStore, SeriesStatus
from pacsflow.core.pipeline import RunContext
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.release.keys import ReleaseKeys, key_file
from pacsflow.core.release.profile import Deidentifier
from pacsflow.core.release.settings import ReleaseSettings
from pacsflow.core.release.stage import release_run, release_series_rows
from pacsflow.core.storage import StorageLayout
from pacsflow.demo.hospital import build_hospital, load_ground_truth
from pacsflow.demo.hospital.plan import INSTITUTIONS, OPERATORS, REFERRING_PHYSICIANS
from pacsflow.demo.hospital.ris import exams_table
from pydicom.dataset import Dataset
from sqlalchemy import create_engine, select

SECRET = b"release-test-secret-0123456789abcdef"
RUN_KEY = "test/release"
BURNED_IN_SERIES = "1.2.826.0.1.3680043.10.1234.99.2.1"
SECONDARY_CAPTURE_SERIES = "1.2.826.0.1.3680043.10.1234.99.2.2"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    hospital = build_hospital(tmp_path_factory.mktemp("hospital"), accessions=30, seed=11, image_size=16)
    _add_risky_series(hospital.dicom_dir)
    return hospital


def _add_risky_series(root: Path) -> None:
    """Two series a PACS may hold that must not be released: burned-in annotation, secondary capture."""
    source = sorted(root.rglob("*.dcm"))[0]
    for series_uid, change in ((BURNED_IN_SERIES, "burned"), (SECONDARY_CAPTURE_SERIES, "sc")):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = series_uid + ".1"
        if change == "burned":
            ds.BurnedInAnnotation = "YES"
        else:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        layout = StorageLayout(root)
        layout.series_dir(ds.StudyInstanceUID, series_uid).mkdir(parents=True)
        ds.save_as(layout.instance_path(ds.StudyInstanceUID, series_uid, ds.SOPInstanceUID), enforce_file_format=True)


def _register_every_series(store: AuditStore, root: Path) -> None:
    """Record every series on disk as retrieved, as the retrieval stage does (the release reads the store)."""
    by_study: dict[str, set[str]] = defaultdict(set)
    for path in root.rglob("*.dcm"):
        by_study[path.parent.parent.name].add(path.parent.name)
    studies = sorted(by_study)
    store.replace_cohort(RUN_KEY, [{"accession_number": f"AN{i}", "an_ref": f"an:{i}"} for i in range(len(studies))])
    for index, study_uid in enumerate(studies):
        store.record_resolution(
            RUN_KEY,
            f"AN{index}",
            resolution="resolved",
            resolved_by="accession_number",
            detail=None,
            rules_tried=[],
            study_uids=[study_uid],
            batch_of=lambda _uid: 0,
        )
        store.record_series_listing(
            RUN_KEY,
            f"AN{index}",
            study_uid,
            [
                {
                    "series_uid": uid,
                    "modality": None,
                    "description": None,
                    "body_part": None,
                    "pacs_instance_count": None,
                    "drop_reason": None,
                    "status": SeriesStatus.COMPLETE,
                }
                for uid in sorted(by_study[study_uid])
            ],
        )


def _release(hospital, out: Path, settings: ReleaseSettings | None = None, workers: int = 2):
    with AuditStore.connect(f"sqlite:///{out / 'audit.sqlite'}") as store:
        _register_every_series(store, hospital.dicom_dir)
        ctx = RunContext(store=store, run_key=RUN_KEY, pseudonymizer=Pseudonymizer(b"k" * 32))
        report = release_run(
            ctx,
            StorageLayout(hospital.dicom_dir),
            settings or ReleaseSettings(project="default"),
            release_root=out / "release",
            key_dir=out / "keys",
            run_id="manual__test",
            secret=SECRET,
            workers=workers,
        )
        rows = release_series_rows(store.engine, RUN_KEY)
    return report, rows


@pytest.fixture(scope="module")
def released(hospital, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    os.umask(0o022)  # the usual umask (a forkserver worker keeps its server's): the release must not depend on it
    report, rows = _release(hospital, out)
    return out / "release", report, rows


# -- what the source holds ----------------------------------------------------------------------------
def _name_parts(name: object) -> set[str]:
    return {part for part in re.split(r"[\^= ]+", str(name)) if len(part) >= 3} | ({str(name)} if name else set())


@pytest.fixture(scope="module")
def source(hospital) -> tuple[set[str], dict[str, set[str]]]:
    """Every identifier of the source (global), and the original dates of each study (scanned per study:
    shifted dates of one patient may coincide with another exam's original date by chance)."""
    identifiers: set[str] = set()
    dates_of_study: dict[str, set[str]] = defaultdict(set)
    for path in hospital.dicom_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for element in [*ds.file_meta.iterall(), *ds.iterall()]:
            if element.VR == "UI" and element.value and not str(element.value).startswith("1.2.840.10008."):
                if element.keyword not in ("ImplementationClassUID",):
                    identifiers.add(str(element.value))
            elif element.VR == "PN" and element.value:
                identifiers |= _name_parts(element.value)
            elif element.VR == "DA" and element.value:
                date = str(element.value)
                if element.keyword == "PatientBirthDate":
                    identifiers.add(date)
                dates_of_study[ds.StudyInstanceUID] |= {date, f"{date[:4]}-{date[4:6]}-{date[6:]}"}
        for keyword in ("PatientID", "AccessionNumber", "InstitutionName", "InstitutionAddress"):
            if ds.get(keyword):
                identifiers.add(str(ds.get(keyword)))
    engine = create_engine(hospital.ris_url)
    with engine.connect() as conn:
        for row in conn.execute(select(exams_table)).mappings():
            identifiers |= {row["accession_number"], row["patient_id"], *_name_parts(row["patient_name"])}
            identifiers.add(row["patient_birth_date"].strftime("%Y%m%d"))
            if row["study_instance_uid"]:
                identifiers.add(row["study_instance_uid"])
    engine.dispose()
    for name in (*REFERRING_PHYSICIANS, *OPERATORS):
        identifiers |= _name_parts(name)
    identifiers |= {text for pair in INSTITUTIONS for text in pair}
    return {i for i in identifiers if i}, dates_of_study


def _encodings(text: str) -> set[bytes]:
    return {text.encode(codec) for codec in ("utf-8", "latin-1") if _encodable(text, codec)}


def _encodable(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _element_texts(ds: Dataset) -> str:
    """Every element's text, NUL-separated (no identifier holds a NUL, so a match never spans two elements)."""
    texts = []
    for element in [*ds.file_meta.iterall(), *ds.iterall()]:
        if element.VR in ("SQ", "OB", "OW") or element.tag == 0x7FE00010:
            continue
        texts.append(str(element.value))
    return "\0".join(texts)


def test_demo_source_holds_what_the_scan_looks_for(hospital, source):
    identifiers, dates = source
    assert any(i in identifiers for i in (INSTITUTIONS[0][0], INSTITUTIONS[1][0]))
    assert {"Whitaker", "Okonkwo", "Lindqvist"} & identifiers
    assert len([i for i in identifiers if i.startswith("P00")]) >= 10
    assert any(pydicom.dcmread(p).get((0x0029, 0x1010)) for p in list(hospital.dicom_dir.rglob("*.dcm"))[:1])
    assert dates


def test_released_files_hold_no_source_identifier(source, released):
    release_root, report, _ = released
    identifiers, dates_of_study = source
    keys = ReleaseKeys(SECRET)
    study_of_released = {keys.uid(uid): uid for uid in dates_of_study}
    files = sorted((release_root / "dicom").rglob("*.dcm"))
    assert len(files) == report.released > 100
    encoded = {text: _encodings(text) for text in identifiers.union(*dates_of_study.values())}
    hits = []
    for path in files:
        ds = pydicom.dcmread(path)
        own_dates = dates_of_study[study_of_released[ds.StudyInstanceUID]]
        texts = _element_texts(ds)
        raw = path.read_bytes()
        for identifier in identifiers | own_dates:
            if identifier in texts or any(code in raw for code in encoded[identifier]):
                hits.append((path.name, identifier))
        if any(element.tag.is_private for element in ds):
            hits.append((path.name, "private tag"))
    assert hits == []


def test_released_parquet_holds_only_deidentified_metadata(source, released):
    release_root, report, _ = released
    identifiers, dates_of_study = source
    keys = ReleaseKeys(SECRET)
    study_of_released = {keys.uid(uid): uid for uid in dates_of_study}
    files = sorted((release_root / "metadata" / "instances").rglob("*.parquet"))
    assert files
    rows = [row for path in files for row in pq.read_table(path).to_pylist()]
    assert len(rows) == report.released
    hits = []
    for row in rows:
        own_dates = dates_of_study[study_of_released[row["study_instance_uid"]]]
        for column, value in row.items():
            text = str(value)
            hits += [(column, i) for i in identifiers | own_dates if value is not None and i in text]
    assert hits == []
    assert {row["patient_id"][:2] for row in rows} == {"PF"}
    assert not [row for row in rows if "manual__test" in str(row)]  # the run id names real dates: not released
    assert all(row["patient_birth_date"] is None for row in rows)


def test_pixel_data_unchanged(hospital, released):
    release_root, _, _ = released
    keys = ReleaseKeys(SECRET)
    compared = 0
    for source in hospital.dicom_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(source)
        target = StorageLayout(release_root / "dicom").instance_path(
            keys.uid(ds.StudyInstanceUID), keys.uid(ds.SeriesInstanceUID), keys.uid(ds.SOPInstanceUID)
        )
        if target.exists():
            assert pydicom.dcmread(target).PixelData == ds.PixelData
            compared += 1
    assert compared > 100


def test_rerun_gives_byte_identical_files(hospital, released, tmp_path):
    release_root, _, _ = released
    _release(hospital, tmp_path, workers=1)
    first = {
        p.relative_to(release_root): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (release_root / "dicom").rglob("*.dcm")
    }
    again = {
        p.relative_to(tmp_path / "release"): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (tmp_path / "release" / "dicom").rglob("*.dcm")
    }
    assert first == again


def test_other_project_is_unlinkable_and_same_project_stable():
    assert ReleaseKeys(SECRET).uid("1.2.3.4") == ReleaseKeys(SECRET).uid("1.2.3.4")
    assert ReleaseKeys(SECRET).uid("1.2.3.4") != ReleaseKeys(b"another-project-secret-0123456789").uid("1.2.3.4")
    assert ReleaseKeys(SECRET).patient_pseudonym("P1") != ReleaseKeys(b"x" * 32).patient_pseudonym("P1")


def test_held_back_instances_are_reported_per_series(hospital, released):
    _, report, rows = released
    by_series = {row["series_uid"]: row for row in rows}
    assert by_series[BURNED_IN_SERIES]["status"] == "held_back"
    assert by_series[BURNED_IN_SERIES]["reasons"] == "burned-in annotation: 1"
    assert by_series[SECONDARY_CAPTURE_SERIES]["reasons"] == "secondary capture: 1"
    truth = load_ground_truth(hospital.ground_truth_path)
    us_series = {
        s["series_instance_uid"]
        for a in truth["accessions"]
        for st in a["studies"]
        for s in st["series"]
        if s["modality"] == "US"
    }
    assert us_series and all(by_series[uid]["status"] == "held_back" for uid in us_series)
    assert all(by_series[uid]["reasons"].startswith("ultrasound: ") for uid in us_series)
    assert report.held_back == sum(row["held_back"] for row in rows)
    assert report.released == sum(row["released"] for row in rows)
    assert all(row["released_series_uid"] for row in rows if row["status"] == "released")


def test_released_series_loads_as_one_volume(released):
    release_root, _, _ = released
    for series_dir in (release_root / "dicom").glob("*/*"):
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in series_dir.glob("*.dcm")]
        if headers[0].Modality != "CT" or len(headers) < 3:
            continue
        assert len({(h.StudyInstanceUID, h.SeriesInstanceUID, h.FrameOfReferenceUID) for h in headers}) == 1
        assert len({tuple(h.ImageOrientationPatient) for h in headers}) == 1
        positions = sorted(float(h.ImagePositionPatient[2]) for h in headers)
        steps = {round(b - a, 3) for a, b in pairwise(positions)}
        assert len(steps) == 1 and steps != {0.0}
        assert len({h.SOPInstanceUID for h in headers}) == len(headers)


def _dciodvfy_errors(path: Path) -> set[str]:
    result = subprocess.run(  # its exit status does not tell errors from warnings: the output is read
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60, check=False
    )
    return {
        re.sub(r"\d+", "N", line.strip())
        for line in (result.stdout + result.stderr).splitlines()
        if line.startswith("Error")
    }


def test_dciodvfy_reports_no_new_errors(hospital, released):
    assert shutil.which("dciodvfy"), "dicom3tools missing: run scripts/install-system-deps.sh"
    release_root, _, _ = released
    keys = ReleaseKeys(SECRET)
    checked = 0
    for source in sorted(hospital.dicom_dir.rglob("*.dcm"))[::7]:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        target = StorageLayout(release_root / "dicom").instance_path(
            keys.uid(ds.StudyInstanceUID), keys.uid(ds.SeriesInstanceUID), keys.uid(ds.SOPInstanceUID)
        )
        if not target.exists():
            continue
        assert _dciodvfy_errors(target) - _dciodvfy_errors(source) == set(), source.name
        checked += 1
    assert checked >= 10


def _demo_dataset(hospital) -> Dataset:
    return pydicom.dcmread(sorted(hospital.dicom_dir.rglob("*.dcm"))[0])


def test_options_change_what_is_kept(hospital):
    keys = ReleaseKeys(SECRET)
    default = _demo_dataset(hospital)
    Deidentifier(ReleaseSettings(), keys).deidentify(default)
    assert default.SeriesDescription and default.StudyDate and default.StudyDate != _demo_dataset(hospital).StudyDate
    assert (0x0029, 0x1010) not in default

    strict = _demo_dataset(hospital)
    strict.StationName = "CT-ROOM-7"
    Deidentifier(ReleaseSettings(clean_descriptors=False, retain_longitudinal_dates=False), keys).deidentify(strict)
    assert "SeriesDescription" not in strict and "StationName" not in strict
    assert strict.StudyDate == "19000101" and strict.LongitudinalTemporalInformationModified == "REMOVED"

    device = _demo_dataset(hospital)
    device.StationName = "CT-ROOM-7"
    Deidentifier(ReleaseSettings(retain_device_identity=True), keys).deidentify(device)
    assert device.StationName == "CT-ROOM-7"

    private = _demo_dataset(hospital)
    Deidentifier(ReleaseSettings(private_tag_allowlist=["0029,xx11,PACSFLOW DEMO"]), keys).deidentify(private)
    assert (0x0029, 0x1011) in private and (0x0029, 0x1010) not in private
    codes = {item.CodeValue for item in private.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113105", "113107", "113111"}


def test_descriptors_are_cleaned_of_identifiers(hospital):
    ds = _demo_dataset(hospital)
    family = str(ds.PatientName).split("^")[0]
    ds.SeriesDescription = f"CHEST {family} {ds.PatientID} 1234567"
    Deidentifier(ReleaseSettings(), ReleaseKeys(SECRET)).deidentify(ds)
    assert ds.SeriesDescription == "CHEST"


def test_patient_dates_shift_together(hospital):
    keys = ReleaseKeys(SECRET)
    ds = _demo_dataset(hospital)
    original = (ds.StudyDate, ds.AcquisitionDate, ds.StudyTime)
    Deidentifier(ReleaseSettings(), keys).deidentify(ds)
    assert ds.StudyTime == original[2]  # whole days: times of day kept
    from datetime import datetime

    shift = datetime.strptime(ds.StudyDate, "%Y%m%d") - datetime.strptime(original[0], "%Y%m%d")
    assert -730 <= shift.days <= -62
    assert (datetime.strptime(ds.AcquisitionDate, "%Y%m%d") - datetime.strptime(original[1], "%Y%m%d")) == shift


def test_key_file_is_created_once_private_and_complete(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from pacsflow.core.release.keys import project_secret

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: project_secret("proj-a", tmp_path / "keys"), range(16)))
    path = key_file(tmp_path / "keys", "proj-a")
    assert len(keys) == 1 and path.read_bytes() in keys and len(path.read_bytes()) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    path.write_bytes(b"")  # what a crash of the old, non-atomic writer left behind
    with pytest.raises(ValueError, match="restore it from a backup"):
        project_secret("proj-a", tmp_path / "keys")


def test_release_root_and_files_are_private(released):
    release_root, _, _ = released
    assert release_root.stat().st_mode & 0o077 == 0
    assert all(p.stat().st_mode & 0o077 == 0 for p in (release_root / "dicom").rglob("*.dcm"))
    directories = [p for p in (release_root / "dicom").rglob("*") if p.is_dir()]
    assert directories and {oct(d.stat().st_mode & 0o777) for d in directories} == {"0o700"}
