"""The versioned metadata schema: one definition that the reader, the writer and the published JSON share.

``include/schemas/metadata_v1.json`` is :func:`schema_document` written out; a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
PARTITION_COLUMN = "study_date"
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"  # what Hive, Spark, pyarrow and DuckDB read as null
PARTITION_TYPE = pa.date32()
TABLES = ("instances", "series", "studies")


class Kind(Enum):
    """How a DICOM value becomes an Arrow value (the decoders live in ``reader.py``)."""

    TEXT = ("text", "string", pa.string())  # SH LO ST LT UC UT CS AS AE: trimmed, charset-decoded
    NAME = ("name", "string", pa.string())  # PN, decoded per SpecificCharacterSet
    UID = ("uid", "string", pa.string())
    INT = ("int", "int32", pa.int32())  # IS US SS UL SL
    FLOAT = ("float", "float64", pa.float64())  # DS FD FL
    TEXTS = ("texts", "list<string>", pa.list_(pa.string()))  # every value of a multi-valued text attribute
    FLOATS = ("floats", "list<float64>", pa.list_(pa.float64()))
    DATE = ("date", "date32", pa.date32())  # DA
    TIMESTAMP = ("timestamp", "timestamp[us]", pa.timestamp("us"))  # DT, or DA + TM; naive local time
    COUNT = ("count", "int64", pa.int64())
    MAP = ("map", "map<string, string>", pa.map_(pa.string(), pa.string()))

    def __init__(self, label: str, type_name: str, arrow_type: pa.DataType) -> None:  # label keeps values unique
        self.type_name = type_name
        self.arrow_type = arrow_type


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    source: str  # DICOM tags read ("(0010,0010) PatientName"), or where a non-DICOM value comes from
    description: str
    nullable: bool = True
    tags: tuple[int, ...] = ()  # tags to read, in order of preference (a DT first, then DA and TM)

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.kind.arrow_type, nullable=self.nullable)


def _dicom(name: str, kind: Kind, tag: int, keyword: str, description: str, *, nullable: bool = True) -> Column:
    return Column(name, kind, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}", description, nullable, (tag,))


def _timestamp(name: str, description: str, *tags_and_keywords: tuple[int, str]) -> Column:
    source = " or ".join(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}" for tag, keyword in tags_and_keywords)
    return Column(name, Kind.TIMESTAMP, source, description, True, tuple(tag for tag, _ in tags_and_keywords))


RUN_ID = Column("run_id", Kind.TEXT, "export run", "Airflow run id of the run that wrote the row", False)
STUDY_DATE = _dicom(
    PARTITION_COLUMN,
    Kind.DATE,
    0x00080020,
    "StudyDate",
    "Hive partition key (directory study_date=YYYY-MM-DD), not stored inside the files",
)
STUDY_UID = _dicom("study_instance_uid", Kind.UID, 0x0020000D, "StudyInstanceUID", "Study Instance UID", nullable=False)
SERIES_UID = _dicom(
    "series_instance_uid", Kind.UID, 0x0020000E, "SeriesInstanceUID", "Series Instance UID", nullable=False
)
SOP_UID = _dicom("sop_instance_uid", Kind.UID, 0x00080018, "SOPInstanceUID", "SOP Instance UID", nullable=False)

ACQUISITION_DATETIME = _timestamp(
    "acquisition_datetime",
    "AcquisitionDateTime, else AcquisitionDate + AcquisitionTime",
    (0x0008002A, "AcquisitionDateTime"),
    (0x00080022, "AcquisitionDate"),
    (0x00080032, "AcquisitionTime"),
)

# Columns read from each file, in file order. TransferSyntaxUID comes from the file meta information.
DICOM_COLUMNS: tuple[Column, ...] = (
    STUDY_UID,
    SERIES_UID,
    SOP_UID,
    _dicom("sop_class_uid", Kind.UID, 0x00080016, "SOPClassUID", "SOP Class UID (the kind of object)"),
    _dicom("accession_number", Kind.TEXT, 0x00080050, "AccessionNumber", "RIS accession number"),
    _dicom("study_id", Kind.TEXT, 0x00200010, "StudyID", "Study ID given by the modality"),
    _dicom("patient_id", Kind.TEXT, 0x00100020, "PatientID", "Patient ID (MRN)"),
    _dicom("patient_name", Kind.NAME, 0x00100010, "PatientName", "Patient name, decoded per SpecificCharacterSet"),
    _dicom("patient_birth_date", Kind.DATE, 0x00100030, "PatientBirthDate", "Birth date"),
    _dicom("patient_sex", Kind.TEXT, 0x00100040, "PatientSex", "M, F or O"),
    _dicom("patient_age", Kind.TEXT, 0x00101010, "PatientAge", "Age string as recorded (e.g. 064Y)"),
    _timestamp("study_datetime", "StudyDate + StudyTime", (0x00080020, "StudyDate"), (0x00080030, "StudyTime")),
    _dicom("study_description", Kind.TEXT, 0x00081030, "StudyDescription", "Study description"),
    _dicom(
        "referring_physician_name",
        Kind.NAME,
        0x00080090,
        "ReferringPhysicianName",
        "Referring physician, decoded per SpecificCharacterSet",
    ),
    _dicom("institution_name", Kind.TEXT, 0x00080080, "InstitutionName", "Institution"),
    _dicom("modality", Kind.TEXT, 0x00080060, "Modality", "Modality (CT, MR, ...)"),
    _dicom("series_number", Kind.INT, 0x00200011, "SeriesNumber", "Series number"),
    _dicom("series_description", Kind.TEXT, 0x0008103E, "SeriesDescription", "Series description"),
    _timestamp("series_datetime", "SeriesDate + SeriesTime", (0x00080021, "SeriesDate"), (0x00080031, "SeriesTime")),
    _dicom("body_part_examined", Kind.TEXT, 0x00180015, "BodyPartExamined", "Body part examined"),
    _dicom("protocol_name", Kind.TEXT, 0x00181030, "ProtocolName", "Acquisition protocol"),
    _dicom("manufacturer", Kind.TEXT, 0x00080070, "Manufacturer", "Equipment manufacturer"),
    _dicom("manufacturer_model_name", Kind.TEXT, 0x00081090, "ManufacturerModelName", "Equipment model"),
    _dicom("station_name", Kind.TEXT, 0x00081010, "StationName", "Equipment station name"),
    _dicom("frame_of_reference_uid", Kind.UID, 0x00200052, "FrameOfReferenceUID", "Frame of reference"),
    _dicom("instance_number", Kind.INT, 0x00200013, "InstanceNumber", "Instance number within the series"),
    _dicom("image_type", Kind.TEXTS, 0x00080008, "ImageType", "Image type values (ORIGINAL, PRIMARY, ...)"),
    ACQUISITION_DATETIME,
    _timestamp(
        "content_datetime", "ContentDate + ContentTime", (0x00080023, "ContentDate"), (0x00080033, "ContentTime")
    ),
    _dicom("rows", Kind.INT, 0x00280010, "Rows", "Pixel rows"),
    _dicom("columns", Kind.INT, 0x00280011, "Columns", "Pixel columns"),
    _dicom("number_of_frames", Kind.INT, 0x00280008, "NumberOfFrames", "Frames (multi-frame objects only)"),
    _dicom("pixel_spacing", Kind.FLOATS, 0x00280030, "PixelSpacing", "Row and column spacing, mm"),
    _dicom("slice_thickness", Kind.FLOAT, 0x00180050, "SliceThickness", "Slice thickness, mm"),
    _dicom("spacing_between_slices", Kind.FLOAT, 0x00180088, "SpacingBetweenSlices", "Spacing between slices, mm"),
    _dicom(
        "image_orientation_patient",
        Kind.FLOATS,
        0x00200037,
        "ImageOrientationPatient",
        "Direction cosines of the first row and column (6 values)",
    ),
    _dicom(
        "image_position_patient",
        Kind.FLOATS,
        0x00200032,
        "ImagePositionPatient",
        "x, y, z of the upper left voxel centre, mm",
    ),
    _dicom("slice_location", Kind.FLOAT, 0x00201041, "SliceLocation", "Slice location, mm"),
    _dicom("photometric_interpretation", Kind.TEXT, 0x00280004, "PhotometricInterpretation", "MONOCHROME2, RGB, ..."),
    _dicom("bits_allocated", Kind.INT, 0x00280100, "BitsAllocated", "Bits allocated per sample"),
    _dicom("kvp", Kind.FLOAT, 0x00180060, "KVP", "Peak kilovoltage (CT, X-ray)"),
    _dicom("convolution_kernel", Kind.TEXTS, 0x00181210, "ConvolutionKernel", "Reconstruction kernel (CT)"),
)
TRANSFER_SYNTAX = _dicom(
    "transfer_syntax_uid",
    Kind.UID,
    0x00020010,
    "TransferSyntaxUID",
    "Transfer syntax of the file (file meta information)",
)
FILE_COLUMNS: tuple[Column, ...] = (
    TRANSFER_SYNTAX,
    Column("file_path", Kind.TEXT, "file", "Path of the file as given to the export", False),
    Column("file_size", Kind.COUNT, "file", "File size in bytes", False),
    Column("file_sha256", Kind.TEXT, "file", "SHA-256 of the whole file, lowercase hex (as sha256sum prints)", False),
    Column(
        "private_tags",
        Kind.MAP,
        "private elements",
        "Null unless the export was asked for private tags; "
        "then '(gggg,eeee)' -> text value of every top-level private element that is not binary",
    ),
)
INSTANCE_COLUMNS: tuple[Column, ...] = (RUN_ID, *DICOM_COLUMNS, *FILE_COLUMNS)
_BY_NAME = {column.name: column for column in (*INSTANCE_COLUMNS, STUDY_DATE)}


def _derived(name: str, kind: Kind, source: str, description: str, nullable: bool = True) -> Column:
    return Column(name, kind, source, description, nullable)


def _first(name: str) -> Column:
    column = _BY_NAME[name]
    return Column(
        name, column.kind, f"instances.{name}", "first non-null value over the group's instances", column.nullable
    )


_COUNTS = (
    _derived("instance_count", Kind.COUNT, "instances", "Instances exported", False),
    _derived("total_bytes", Kind.COUNT, "instances.file_size", "Sum of file sizes", False),
    _derived("first_acquisition_datetime", Kind.TIMESTAMP, "instances.acquisition_datetime", "Earliest"),
    _derived("last_acquisition_datetime", Kind.TIMESTAMP, "instances.acquisition_datetime", "Latest"),
)
# Instance attributes copied to the series and study tables (first non-null value in input order).
SERIES_ATTRIBUTES = (
    "study_instance_uid",
    "series_instance_uid",
    "modality",
    "series_number",
    "series_description",
    "series_datetime",
    "body_part_examined",
    "protocol_name",
    "manufacturer",
    "manufacturer_model_name",
)
STUDY_ATTRIBUTES = (
    "study_instance_uid",
    "accession_number",
    "study_id",
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
    "study_datetime",
    "study_description",
)
SERIES_COLUMNS: tuple[Column, ...] = (
    RUN_ID,
    *(_first(name) for name in SERIES_ATTRIBUTES),
    *_COUNTS,
    _derived("min_instance_number", Kind.INT, "instances.instance_number", "Smallest instance number"),
    _derived("max_instance_number", Kind.INT, "instances.instance_number", "Largest instance number"),
    _derived(
        "series_status",
        Kind.TEXT,
        "audit",
        "Retrieval status of the series in the run's audit: complete, partial or failed (instances missing: the "
        "audit's series row says how many and why); null for files exported outside a pacsflow run",
    ),
)
STUDY_COLUMNS: tuple[Column, ...] = (
    RUN_ID,
    *(_first(name) for name in STUDY_ATTRIBUTES),
    _derived("modalities", Kind.TEXTS, "instances.modality", "Distinct modalities, sorted", False),
    _derived("series_count", Kind.COUNT, "instances.series_instance_uid", "Distinct series", False),
    *_COUNTS,
)
COLUMNS_BY_TABLE: dict[str, tuple[Column, ...]] = {
    "instances": INSTANCE_COLUMNS,
    "series": SERIES_COLUMNS,
    "studies": STUDY_COLUMNS,
}


def file_schema(table: str) -> pa.Schema:
    """Schema of the Parquet files of ``table`` (the partition column lives in the directory name)."""
    return pa.schema(
        [column.field for column in COLUMNS_BY_TABLE[table]], metadata={"pacsflow.schema": f"{table}_v{SCHEMA_VERSION}"}
    )


def dataset_schema(table: str) -> pa.Schema:
    """Schema of ``table`` read as a Hive-partitioned dataset: the file columns plus ``study_date``."""
    return file_schema(table).append(STUDY_DATE.field)


def schema_document() -> dict[str, Any]:
    """The machine-readable schema published in ``include/schemas/metadata_v1.json``."""

    def describe(column: Column) -> dict[str, Any]:
        return {
            "name": column.name,
            "type": column.kind.type_name,
            "nullable": column.nullable,
            "source": column.source,
            "description": column.description,
        }

    return {
        "schema": "pacsflow-metadata",
        "version": SCHEMA_VERSION,
        "partitioning": {"flavor": "hive", "column": describe(STUDY_DATE), "null_directory": NULL_PARTITION},
        "tables": {
            table: {
                "path": f"{table}/{PARTITION_COLUMN}=YYYY-MM-DD/<run-token>-<n>.parquet",
                "columns": [describe(column) for column in columns],
            }
            for table, columns in COLUMNS_BY_TABLE.items()
        },
    }
