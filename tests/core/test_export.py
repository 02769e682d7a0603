"""Parquet metadata export: real DICOM files written with pydicom, read back with pyarrow and DuckDB."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from pacsflow.core.export import (
    ExportReport,
    export_instances,
    open_dataset,
    run_token,
    schema_document,
)
from pacsflow.core.export.reader import parse_date, parse_datetime, parse_time
from pacsflow.core.export.schema import COLUMNS_BY_TABLE, NULL_PARTITION
from pacsflow.core.export.writer import MAX_OPEN_WRITERS
from pacsflow.core.processes import worker_context
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "include" / "schemas" / "metadata_v1.json"
RUN = "manual__2026-11-22T09:00:00+00:00"
ROOT = "1.2.826.0.1.3680043.8.498."
PATIENT_NAME = "Müller^Jürgen"
PATIENT_ID = "PID-SECRET-42"

# The schema file's type names as Arrow and DuckDB types.
ARROW_TYPES = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "list<string>": pa.list_(pa.string()),
    "list<float64>": pa.list_(pa.float64()),
    "date32": pa.date32(),
    "timestamp[us]": pa.timestamp("us"),
    "map<string, string>": pa.map_(pa.string(), pa.string()),
}
DUCKDB_TYPES = {
    "string": "VARCHAR",
    "int32": "INTEGER",
    "int64": "BIGINT",
    "float64": "DOUBLE",
    "list<string>": "VARCHAR[]",
    "list<float64>": "DOUBLE[]",
    "date32": "DATE",
    "timestamp[us]": "TIMESTAMP",
    "map<string, string>": "MAP(VARCHAR, VARCHAR)",
}


# -- building real DICOM files ----------------------------------------------------------------------
def ct(
    study: int = 1,
    series: int = 1,
    instance: int = 1,
    *,
    study_date: str | None = "20240102",
    charset: str | list[str] | None = "ISO_IR 100",
    name: str = PATIENT_NAME,
    **attributes: Any,
) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{ROOT}3.{study}.{series}.{instance}"
    ds.StudyInstanceUID = f"{ROOT}1.{study}"
    ds.SeriesInstanceUID = f"{ROOT}2.{study}.{series}"
    if study_date is not None:
        ds.StudyDate = study_date
    ds.StudyTime = "101010.5"
    ds.AcquisitionDate = study_date or ""
    ds.AcquisitionTime = f"1012{instance:02d}"
    ds.AccessionNumber = f"ACC{study}"
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19600229"
    ds.SeriesNumber = series
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.5, "0.75"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-100, -100.5, -1.25 * instance]
    ds.SliceThickness = "1.25"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword) if keyword in ds else None
        else:
            setattr(ds, keyword, value)
    ds.PixelData = bytes(4 * 4 * 2)
    return ds


def write(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or f"{ROOT}9"
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, implicit_vr=transfer_syntax == ImplicitVRLittleEndian)
    return path


def cohort(directory: Path, dates: list[str | None], per_series: int = 3) -> list[Path]:
    """One study per date, two series each of ``per_series`` instances."""
    return [
        write(ct(study, series, instance, study_date=date), directory / f"{study}-{series}-{instance}.dcm")
        for study, date in enumerate(dates, start=1)
        for series in (1, 2)
        for instance in range(1, per_series + 1)
    ]


def export(files: list[Path], out: Path, run_id: str = RUN, **options: Any) -> ExportReport:
    return export_instances(files, out, run_id, workers=options.pop("workers", 1), **options)


def instances(out: Path) -> list[dict[str, Any]]:
    return (
        open_dataset(out, "instances")
        .to_table()
        .sort_by([("run_id", "ascending"), ("sop_instance_uid", "ascending")])
        .to_pylist()
    )


def parquet_files(out: Path) -> list[str]:
    return sorted(str(path.relative_to(out)) for path in out.rglob("*.parquet"))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "metadata"


# -- schema -----------------------------------------------------------------------------------------
def test_schema_file_is_the_schema_the_code_writes() -> None:
    assert json.loads(SCHEMA_FILE.read_text(encoding="utf-8")) == schema_document()


def test_schema_readme_documents_every_column() -> None:
    readme = (SCHEMA_FILE.parent / "README.md").read_text(encoding="utf-8")
    for spec in schema_document()["tables"].values():
        for column in spec["columns"]:
            assert f"| `{column['name']}` | {column['type']} |" in readme, column["name"]


def test_round_trip_with_pyarrow_has_the_documented_types(tmp_path: Path, out: Path) -> None:
    export(cohort(tmp_path / "in", ["20240102"]), out)
    document = schema_document()
    for table, spec in document["tables"].items():
        schema = open_dataset(out, table).to_table().schema
        expected = [(column["name"], ARROW_TYPES[column["type"]]) for column in spec["columns"]]
        expected.append(("study_date", ARROW_TYPES[document["partitioning"]["column"]["type"]]))
        assert [(field.name, field.type) for field in schema] == expected
        file_schema = pq.read_schema(next((out / table).rglob("*.parquet")))
        assert [field.name for field in file_schema if not field.nullable] == [
            column["name"] for column in spec["columns"] if not column["nullable"]
        ]


def test_round_trip_with_duckdb_has_the_documented_types(tmp_path: Path, out: Path) -> None:
    export(cohort(tmp_path / "in", ["20240102", None]), out)
    document = schema_document()
    with duckdb.connect() as db:
        for table, spec in document["tables"].items():
            relation = db.sql(f"SELECT * FROM read_parquet('{out / table}/**/*.parquet', hive_partitioning=true)")
            expected = {column["name"]: DUCKDB_TYPES[column["type"]] for column in spec["columns"]}
            expected["study_date"] = "DATE"
            assert dict(zip(relation.columns, map(str, relation.types), strict=True)) == expected
        dates = db.sql(
            f"SELECT study_date, count(*) FROM read_parquet('{out}/instances/**/*.parquet', "
            "hive_partitioning=true) GROUP BY ALL ORDER BY 1 NULLS LAST"
        ).fetchall()
    assert dates == [(dt.date(2024, 1, 2), 6), (None, 6)]


def test_values_are_typed_and_missing_values_are_nulls(tmp_path: Path, out: Path) -> None:
    full = write(
        ct(1, 1, 7, AcquisitionDateTime="20240102101530.25+0100", KVP="120", NumberOfFrames=None), tmp_path / "full.dcm"
    )
    sparse = write(
        ct(
            2,
            1,
            1,
            AccessionNumber=None,
            BodyPartExamined=None,
            SliceThickness="",
            PatientBirthDate="20240230",
            StudyTime=None,
            Modality=None,
        ),
        tmp_path / "sparse.dcm",
    )
    export([full, sparse], out)
    first, second = instances(out)
    assert first["image_type"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert first["pixel_spacing"] == [0.5, 0.75]
    assert first["image_orientation_patient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert first["image_position_patient"] == [-100.0, -100.5, -8.75]
    assert (first["rows"], first["instance_number"], first["slice_thickness"], first["kvp"]) == (4, 7, 1.25, 120.0)
    assert first["acquisition_datetime"] == dt.datetime(2024, 1, 2, 10, 15, 30, 250000)  # DT wins, offset dropped
    assert first["study_datetime"] == dt.datetime(2024, 1, 2, 10, 10, 10, 500000)
    assert first["patient_birth_date"] == dt.date(1960, 2, 29)
    assert first["study_date"] == dt.date(2024, 1, 2)
    assert first["transfer_syntax_uid"] == ExplicitVRLittleEndian
    assert first["file_size"] == full.stat().st_size and len(first["file_sha256"]) == 64
    assert first["number_of_frames"] is None and first["private_tags"] is None
    for column in (
        "accession_number",
        "body_part_examined",
        "slice_thickness",
        "patient_birth_date",
        "study_datetime",
        "modality",
        "station_name",
        "kvp",
    ):
        assert second[column] is None, column
    with duckdb.connect() as db:
        nones = db.sql(
            f"SELECT count(*) FROM read_parquet('{out}/instances/**/*.parquet') "
            "WHERE accession_number = 'None' OR modality = 'None'"
        ).fetchall()
    assert nones == [(0,)]


def test_checksum_is_the_sha256_of_the_file(tmp_path: Path, out: Path) -> None:
    import hashlib

    path = write(ct(), tmp_path / "a.dcm")
    export([path], out)
    assert instances(out)[0]["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


# -- character sets ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "Nguyễn^Văn=阮^文"),
        ("ISO_IR 144", "Иванов^Иван"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),
        (None, "Plain^Ascii"),
    ],
)
def test_person_names_are_decoded_per_specific_character_set(
    tmp_path: Path, out: Path, charset: Any, name: str
) -> None:
    path = write(
        ct(charset=charset, name=name, ReferringPhysicianName=name, StudyDescription=name.split("=", maxsplit=1)[0]),
        tmp_path / "a.dcm",
    )
    export([path], out)
    row = instances(out)[0]
    reference = pydicom.dcmread(path)
    assert row["patient_name"] == str(reference.PatientName) == name
    assert row["referring_physician_name"] == name
    assert row["study_description"] == reference.StudyDescription


def test_latin1_and_utf8_files_give_the_same_text(tmp_path: Path, out: Path) -> None:
    latin = write(ct(1, charset="ISO_IR 100", name="Zoë^Brontë"), tmp_path / "latin.dcm")
    utf8 = write(ct(2, charset="ISO_IR 192", name="Zoë^Brontë"), tmp_path / "utf8.dcm")
    assert b"Zo\xeb" in latin.read_bytes() and b"Zo\xc3\xab" in utf8.read_bytes()
    export([latin, utf8], out)
    assert [row["patient_name"] for row in instances(out)] == ["Zoë^Brontë", "Zoë^Brontë"]


def test_implicit_vr_files_are_decoded_with_the_dictionary_vr(tmp_path: Path, out: Path) -> None:
    path = write(ct(), tmp_path / "implicit.dcm", ImplicitVRLittleEndian)
    export([path], out)
    row = instances(out)[0]
    assert (row["rows"], row["pixel_spacing"], row["patient_name"]) == (4, [0.5, 0.75], PATIENT_NAME)
    assert row["transfer_syntax_uid"] == ImplicitVRLittleEndian


# -- rejected files ---------------------------------------------------------------------------------
def test_corrupt_truncated_and_non_dicom_files_are_skipped_with_a_reason(tmp_path: Path, out: Path) -> None:
    good = write(ct(1, 1, 1), tmp_path / "good.dcm")
    data = write(ct(1, 1, 2), tmp_path / "source.dcm").read_bytes()
    in_pixels = tmp_path / "cut-in-pixels.dcm"
    in_pixels.write_bytes(data[:-10])
    in_header = tmp_path / "cut-in-header.dcm"
    in_header.write_bytes(data[: data.index(PATIENT_ID.encode()) + 3])
    text = tmp_path / "notes.dcm"
    text.write_text(f"{PATIENT_NAME} {PATIENT_ID}\n" * 20)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    no_uid = write(ct(1, 1, 3, SOPInstanceUID=None), tmp_path / "no-uid.dcm")
    with warnings.catch_warnings():  # pydicom may warn that the test sets an invalid UID (unless a client of
        warnings.simplefilter("ignore")  # this process turned its validation off)
        bad_uid = write(ct(1, 1, 4, StudyInstanceUID="1.2.abc"), tmp_path / "bad-uid.dcm")
    missing = tmp_path / "gone.dcm"
    files = [good, in_pixels, in_header, text, empty, no_uid, bad_uid, missing]

    report = export(files, out)

    reasons = dict(report.rejected)
    assert report.instances == 1 and set(reasons) == set(files) - {good}
    assert reasons[in_pixels].startswith("truncated") and reasons[in_header].startswith("truncated")
    assert reasons[text].startswith("not a DICOM file") and reasons[empty].startswith("not a DICOM file")
    assert reasons[no_uid] == "SOPInstanceUID is missing"
    assert "StudyInstanceUID is not a valid DICOM UID" in reasons[bad_uid]
    assert reasons[missing] == "cannot read the file (ENOENT)"
    for reason in reasons.values():
        assert PATIENT_ID not in reason and "Müller" not in reason and "1.2.abc" not in reason
    assert [row["file_path"] for row in instances(out)] == [str(good)]


def test_encapsulated_pixel_data_is_checked_fragment_by_fragment(tmp_path: Path, out: Path) -> None:
    def jpeg(instance: int) -> Path:
        ds = ct(1, 1, instance, Rows=4, Columns=4)
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(100) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        return write(ds, tmp_path / f"{instance}.dcm", JPEGBaseline8Bit)

    complete, cut = jpeg(1), jpeg(2)
    cut.write_bytes(cut.read_bytes()[:-20])
    report = export([complete, cut], out)
    assert report.instances == 1 and report.rejected == [(cut, "truncated (pixel data ends after the end of the file)")]


def test_a_non_image_object_without_pixel_data_is_exported(tmp_path: Path, out: Path) -> None:
    ds = ct(
        Rows=None,
        Columns=None,
        BitsAllocated=None,
        BitsStored=None,
        HighBit=None,
        SamplesPerPixel=None,
        PixelRepresentation=None,
        PhotometricInterpretation=None,
    )
    del ds.PixelData
    report = export([write(ds, tmp_path / "sr.dcm")], out)
    assert report.instances == 1 and not report.rejected


# -- partitions and re-runs -------------------------------------------------------------------------
def test_partitioned_by_study_date_in_hive_style(tmp_path: Path, out: Path) -> None:
    report = export(cohort(tmp_path / "in", ["20240102", "20240103", None]), out)
    token = run_token(RUN)
    assert parquet_files(out) == sorted(
        f"{table}/study_date={date}/{token}-0.parquet"
        for table in ("instances", "series", "studies")
        for date in ("2024-01-02", "2024-01-03", NULL_PARTITION)
    )
    assert sorted(map(str, report.paths)) == sorted(str(out / name) for name in parquet_files(out))
    assert report.bytes_written == sum(path.stat().st_size for path in report.paths)
    assert (report.instances, report.series, report.studies) == (18, 6, 3)


def test_run_token_is_safe_and_deterministic() -> None:
    token = run_token(RUN)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", token) and token == run_token(RUN)
    assert run_token("../../etc/passwd").startswith("etc_passwd-")
    assert run_token("a:b") != run_token("a/b")  # same sanitised text, different runs
    with pytest.raises(ValueError):
        run_token("")


def test_re_running_a_run_replaces_its_rows(tmp_path: Path, out: Path) -> None:
    files = cohort(tmp_path / "in", ["20240102", "20240103"])
    export(files, out)
    first = instances(out)
    export(files, out)
    assert instances(out) == first and len(first) == 12
    export(files[:6], out)  # the re-run no longer sees the second study: its partition loses the run's rows
    assert len(instances(out)) == 6
    assert not list((out / "instances" / "study_date=2024-01-03").glob("*.parquet"))
    with duckdb.connect() as db:
        counts = db.sql(
            f"SELECT count(*), count(DISTINCT sop_instance_uid) FROM "
            f"read_parquet('{out}/instances/**/*.parquet', hive_partitioning=true)"
        ).fetchall()
    assert counts == [(6, 6)]


def test_two_runs_append_and_keep_their_own_rows(tmp_path: Path, out: Path) -> None:
    files = cohort(tmp_path / "in", ["20240102"])
    export(files, out, "scheduled__2026-11-21T02:00:00+00:00")
    export(files[:2], out, "scheduled__2026-11-22T02:00:00+00:00")
    export(files, out, "scheduled__2026-11-21T02:00:00+00:00")
    runs = open_dataset(out).to_table().group_by("run_id").aggregate([("sop_instance_uid", "count")]).to_pylist()
    assert sorted((row["run_id"], row["sop_instance_uid_count"]) for row in runs) == [
        ("scheduled__2026-11-21T02:00:00+00:00", 6),
        ("scheduled__2026-11-22T02:00:00+00:00", 2),
    ]
    assert len(list((out / "studies").rglob("*.parquet"))) == 2


def test_a_failed_run_leaves_the_previous_result_and_no_temp_files(tmp_path: Path, out: Path) -> None:
    files = cohort(tmp_path / "in", ["20240102"])
    export(files, out)
    before = instances(out)

    def dies_halfway():
        yield from files[:3]
        raise RuntimeError("source listing failed")

    with pytest.raises(RuntimeError):
        export(dies_halfway(), out, row_group_size=1)
    assert instances(out) == before
    assert [path for path in out.rglob("*") if path.is_file() and path.suffix != ".parquet"] == []


def test_temp_files_of_a_crashed_attempt_are_swept(tmp_path: Path, out: Path) -> None:
    leftover = out / "instances" / "study_date=2024-01-02" / f".{run_token(RUN)}-0.parquet.tmp"
    other_run = leftover.with_name(f".{run_token('other')}-0.parquet.tmp")
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    other_run.write_bytes(b"partial")  # another run may be writing right now: not ours to remove
    export(cohort(tmp_path / "in", ["20240102"]), out)
    assert not leftover.exists() and other_run.exists()


# -- streaming, row groups, aggregates --------------------------------------------------------------
def test_rows_are_written_in_row_groups_across_many_partitions(tmp_path: Path, out: Path) -> None:
    dates = [f"202401{day:02d}" for day in range(1, MAX_OPEN_WRITERS + 4)]
    by_study = cohort(tmp_path / "in", dates, per_series=2)
    interleaved = [
        path for group in zip(*[by_study[i :: len(dates)] for i in range(len(dates))], strict=True) for path in group
    ]
    report = export(iter(interleaved), out, row_group_size=3)
    rows = instances(out)
    assert report.instances == len(rows) == len(by_study)
    assert {row["sop_instance_uid"] for row in rows} == {pydicom.dcmread(p).SOPInstanceUID for p in by_study}
    for path in (out / "instances").rglob("*.parquet"):
        assert (
            max(pq.ParquetFile(path).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(path).num_row_groups))
            <= 3
        )
    assert sum(pq.ParquetFile(path).num_row_groups for path in (out / "instances").rglob("*.parquet")) > len(dates)


def test_worker_processes_give_the_same_rows_as_one_process(tmp_path: Path) -> None:
    files = cohort(tmp_path / "in", ["20240102", "20240103", None], per_series=30)
    export(files, tmp_path / "one", workers=1)
    export([*files, tmp_path / "missing.dcm"], tmp_path / "two", workers=2)
    assert instances(tmp_path / "one") == instances(tmp_path / "two")


def test_workers_start_by_forkserver_in_a_multi_threaded_process(tmp_path: Path) -> None:
    files = cohort(tmp_path / "in", ["20240102"], per_series=5)
    outcome: dict[str, Any] = {}

    def in_thread() -> None:  # like an Airflow task process, which runs more than one thread
        outcome["method"] = worker_context().get_start_method()
        outcome["report"] = export(files, tmp_path / "out", workers=2)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert outcome["method"] == "forkserver" and outcome["report"].instances == len(files)


def test_series_and_study_tables_aggregate_the_instances(tmp_path: Path, out: Path) -> None:
    files = [write(ct(1, 1, instance), tmp_path / f"a{instance}.dcm") for instance in (3, 1, 2)]
    files.append(write(ct(1, 2, 5, Modality="SR", AcquisitionTime=None), tmp_path / "b.dcm"))
    files.append(write(ct(2, 1, 1, study_date="20240105"), tmp_path / "c.dcm"))
    export(files, out)
    series = {row["series_instance_uid"]: row for row in open_dataset(out, "series").to_table().to_pylist()}
    first = series[f"{ROOT}2.1.1"]
    assert (first["instance_count"], first["min_instance_number"], first["max_instance_number"]) == (3, 1, 3)
    assert first["total_bytes"] == sum(path.stat().st_size for path in files[:3])
    assert first["first_acquisition_datetime"] == dt.datetime(2024, 1, 2, 10, 12, 1)
    assert first["last_acquisition_datetime"] == dt.datetime(2024, 1, 2, 10, 12, 3)
    assert series[f"{ROOT}2.1.2"]["first_acquisition_datetime"] is None
    studies = {row["study_instance_uid"]: row for row in open_dataset(out, "studies").to_table().to_pylist()}
    study = studies[f"{ROOT}1.1"]
    assert (study["series_count"], study["instance_count"], study["modalities"]) == (2, 4, ["CT", "SR"])
    assert (study["patient_name"], study["accession_number"], study["study_date"]) == (
        PATIENT_NAME,
        "ACC1",
        dt.date(2024, 1, 2),
    )
    assert studies[f"{ROOT}1.2"]["study_date"] == dt.date(2024, 1, 5)


def test_private_tags_only_when_asked_for(tmp_path: Path, out: Path) -> None:
    ds = ct()
    block = ds.private_block(0x0019, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "secret protocol")
    block.add_new(0x11, "DS", ["1.5", "2"])
    block.add_new(0x12, "OB", b"\x00\x01")
    path = write(ds, tmp_path / "a.dcm")
    export([path], out)
    assert instances(out)[0]["private_tags"] is None
    export([path], out, include_private=True)
    assert dict(instances(out)[0]["private_tags"]) == {
        "(0019,0010)": "ACME 1.0",
        "(0019,1010)": "secret protocol",
        "(0019,1011)": "1.5\\2",
    }


# -- DICOM date and time parsing --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20240229", dt.date(2024, 2, 29)),
        ("2024.02.29", dt.date(2024, 2, 29)),
        ("20230229", None),
        ("2024", None),
        ("", None),
        ("abcdefgh", None),
    ],
)
def test_parse_date(text: str, expected: dt.date | None) -> None:
    assert parse_date(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10", dt.time(10)),
        ("1012", dt.time(10, 12)),
        ("101230.5", dt.time(10, 12, 30, 500000)),
        ("10:12:30", dt.time(10, 12, 30)),
        ("235960", dt.time(23, 59, 59)),
        ("2512", None),
        ("10.", dt.time(10)),
        ("1x", None),
    ],
)
def test_parse_time(text: str, expected: dt.time | None) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20240102101530.123456-0500", dt.datetime(2024, 1, 2, 10, 15, 30, 123456)),
        ("20240102", dt.datetime(2024, 1, 2)),
        ("202401", None),
        ("20240102xx", None),
    ],
)
def test_parse_datetime(text: str, expected: dt.datetime | None) -> None:
    assert parse_datetime(text) == expected


def test_every_table_has_a_run_id_column() -> None:
    assert all(columns[0].name == "run_id" for columns in COLUMNS_BY_TABLE.values())


def _export_in_a_daemon(files, out, queue):
    queue.put(export_instances(files, out, "daemon-run").instances)


def test_export_runs_inside_a_daemonic_process(tmp_path) -> None:
    """An Airflow task under Celery's prefork pool is daemonic: it may not start a worker pool."""
    import multiprocessing

    files = cohort(tmp_path / "dicom", ["20240102"], per_series=3)
    queue = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(
        target=_export_in_a_daemon, args=(files, tmp_path / "out", queue), daemon=True
    )
    process.start()
    process.join(60)
    assert process.exitcode == 0 and queue.get(timeout=5) == len(files)
