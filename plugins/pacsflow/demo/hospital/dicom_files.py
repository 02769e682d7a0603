"""Write the planned PACS studies as small, valid DICOM Part 10 files (Explicit VR Little Endian).

One dataset per series is built once and only its per-instance elements change between files: that keeps
10,000 ANs to a few minutes. Nothing here is random, so the bytes are a pure function of the plan.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
)

from pacsflow.core.storage import StorageLayout
from pacsflow.demo.hospital.plan import (
    INSTITUTIONS,
    MG_VIEWS,
    OPERATORS,
    UID_ROOT,
    PlannedExam,
    PlannedSeries,
    PlannedStudy,
)

SOP_CLASSES = {
    "CT": CTImageStorage,
    "MG": DigitalMammographyXRayImageStorageForPresentation,
    "US": UltrasoundImageStorage,
    "MR": MRImageStorage,
}
IMPLEMENTATION_CLASS_UID = UID(UID_ROOT + "0.1")
IMPLEMENTATION_VERSION = "PACSFLOW_DEMO_1"
BITS_STORED = 12
SLICE_MM = 2.0
# A vendor-style private block that copies patient data, as real scanners do (the release must drop it).
PRIVATE_GROUP = 0x0029
PRIVATE_CREATOR = "PACSFLOW DEMO"
PIXEL_DATA = 0x7FE00010


class PixelSource:
    """Cheap deterministic 16-bit images: windows into one precomputed ramp, shifted per instance."""

    SHIFTS = 4096

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self._bytes_per_image = image_size * image_size * 2
        ramp = array("H", ((i * 7) % (1 << BITS_STORED) for i in range(image_size * image_size + self.SHIFTS)))
        if sys.byteorder == "big":
            ramp.byteswap()
        self._ramp = ramp.tobytes()

    def image(self, index: int) -> bytes:
        start = (index * 37 % self.SHIFTS) * 2
        return self._ramp[start : start + self._bytes_per_image]


def write_exam(exam: PlannedExam, layout: StorageLayout, pixels: PixelSource) -> int:
    """Write every instance of the exam's PACS studies under ``layout``; returns the number of files."""
    written = 0
    for study in exam.studies:
        for series in study.series:
            written += _write_series(exam, study, series, layout, pixels)
    return written


def _write_series(
    exam: PlannedExam, study: PlannedStudy, series: PlannedSeries, layout: StorageLayout, pixels: PixelSource
) -> int:
    ds = _series_dataset(exam, study, series, pixels.image_size)
    encodings = convert_encodings(ds.get("SpecificCharacterSet"))
    series_elements = _encoded_elements(ds, encodings)
    layout.series_dir(study.uid, series.uid).mkdir(parents=True, exist_ok=True)
    for number, sop_uid in enumerate(series.sop_uids, start=1):
        instance = _instance_dataset(study, series, number, sop_uid, pixels)
        body = series_elements | _encoded_elements(instance, encodings)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        layout.instance_path(study.uid, series.uid, sop_uid).write_bytes(
            _file_header(ds.file_meta) + b"".join(body[tag] for tag in sorted(body))
        )
    return len(series.sop_uids)


def _instance_dataset(
    study: PlannedStudy, series: PlannedSeries, number: int, sop_uid: str, pixels: PixelSource
) -> Dataset:
    """The elements that differ between the instances of one series."""
    acquired = study.study_datetime + timedelta(minutes=2 * series.number, seconds=number)
    ds = Dataset()
    ds.SOPInstanceUID = UID(sop_uid)
    ds.InstanceNumber = number
    ds.AcquisitionDate = ds.ContentDate = _da(acquired)
    ds.AcquisitionTime = ds.ContentTime = _tm(acquired)
    _set_geometry(ds, series, number)
    ds.add_new(PIXEL_DATA, "OW", pixels.image(series.number * 101 + number))  # OW: BitsAllocated is 16
    return ds


def _encoded_elements(ds: Dataset, encodings: list[str]) -> dict[BaseTag, bytes]:
    """Each element of ``ds`` encoded on its own in Explicit VR Little Endian, by tag: the series-wide ones
    are encoded once per series and joined, in tag order, with each instance's (pydicom's whole-dataset write
    per file took most of a large hospital's build time)."""
    encoded = {}
    for element in ds:
        out = DicomBytesIO()
        out.is_implicit_VR, out.is_little_endian = False, True
        write_data_element(out, element, encodings)
        encoded[element.tag] = out.getvalue()
    return encoded


def _file_header(file_meta: FileMetaDataset) -> bytes:
    """The Part 10 preamble, prefix and File Meta Information group."""
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = False, True
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, file_meta, enforce_standard=True)
    return out.getvalue()


def _series_dataset(exam: PlannedExam, study: PlannedStudy, series: PlannedSeries, image_size: int) -> Dataset:
    patient = exam.patient
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[series.modality]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if patient.charset:  # absent: the default repertoire (plain ASCII names)
        ds.SpecificCharacterSet = patient.charset
    ds.SOPClassUID = SOP_CLASSES[series.modality]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if series.localizer else "AXIAL"]
    ds.StudyDate = ds.SeriesDate = _da(study.study_datetime)
    ds.StudyTime = ds.SeriesTime = _tm(study.study_datetime)
    ds.AccessionNumber = study.accession_number
    ds.Modality = series.modality
    ds.Manufacturer, ds.ManufacturerModelName = series.manufacturer
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.BodyPartExamined = series.body_part
    _set_site(ds, exam, study)
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = "1"
    ds.SeriesNumber = series.number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = image_size
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    _set_modality_specifics(ds, series)
    return ds


def _set_site(ds: Dataset, exam: PlannedExam, study: PlannedStudy) -> None:
    """Institution, staff, the order (nested) and a private copy of the patient's identity."""
    pick = int(study.uid.rsplit(".", 1)[1])
    ds.InstitutionName, ds.InstitutionAddress = INSTITUTIONS[pick % len(INSTITUTIONS)]
    ds.OperatorsName = OPERATORS[pick % len(OPERATORS)]
    ds.PerformingPhysicianName = study.referring_physician
    request = Dataset()
    request.AccessionNumber = study.accession_number
    request.RequestedProcedureID = exam.accession_number
    request.StudyInstanceUID = study.uid
    ds.RequestAttributesSequence = [request]
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", exam.patient.patient_id)
    block.add_new(0x11, "LO", exam.patient.birth_date.strftime("%Y%m%d"))


def _set_modality_specifics(ds: Dataset, series: PlannedSeries) -> None:
    if series.modality in ("CT", "MR"):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = SLICE_MM
        ds.FrameOfReferenceUID = series.uid + ".1"  # within 64 characters: series UIDs are short
        ds.PatientPosition = "HFS"
    if series.modality == "CT":
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
    elif series.modality == "MG":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [0.07, 0.07]
        ds.BurnedInAnnotation = "NO"
    elif series.modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = 30
        ds.RepetitionTime = 3000
        ds.EchoTrainLength = 8
        ds.MagneticFieldStrength = 3


def _set_geometry(ds: Dataset, series: PlannedSeries, number: int) -> None:
    if series.modality in ("CT", "MR"):
        z = round(-SLICE_MM * number, 1)
        ds.ImagePositionPatient = [-8.0, -8.0, z]
        ds.SliceLocation = z
    elif series.modality == "MG":
        laterality, ds.ViewPosition = MG_VIEWS[(number - 1) % len(MG_VIEWS)]
        ds.ImageLaterality = laterality
        ds.PatientOrientation = ["A", "R"] if laterality == "R" else ["P", "L"]


def _da(moment: datetime) -> str:
    return moment.strftime("%Y%m%d")


def _tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S")


def write_exams(exams: Iterable[PlannedExam], root: Path, image_size: int) -> int:
    """Write the PACS side of ``exams`` under ``root``; returns the number of files."""
    layout, pixels = StorageLayout(root), PixelSource(image_size)
    return sum(write_exam(exam, layout, pixels) for exam in exams)
