"""De-identification of one data set: the DICOM PS3.15 Basic Application Level Confidentiality Profile with
the options a research team chose, keyed so a project's releases stay consistent across runs.

dicognito's ``Anonymizer`` walks the data set (file meta, every nested sequence) and shifts dates; pacsflow's
handler runs in front of dicognito's own for every element and decides by a keep-list: an element is kept
only when it is known to be safe (technical values, codes, numbers, pixel data), replaced when it carries
identity (keyed pseudonyms and UIDs, shifted dates), and otherwise removed (or emptied where the IOD needs
it present). Unknown free text is therefore removed, never kept by omission. Instances that may show
identifiers in their pixels are held back before any of this (:func:`hold_back_reason`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import dicognito
from dicognito.anonymizer import Anonymizer
from dicognito.datetimeanonymizer import DateTimeAnonymizer
from dicognito.element_anonymizer import ElementAnonymizer
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from pacsflow.core.release.keys import ReleaseKeys
from pacsflow.core.release.settings import ReleaseSettings

STANDARD_UID_PREFIX = "1.2.840.10008."  # DICOM's own UIDs (classes, transfer syntaxes, coding schemes)
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
ULTRASOUND_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2", "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3",
})
DUMMY_DATE, DUMMY_DATETIME = "19000101", "19000101000000"

# Identifiers replaced by a keyed pseudonym (PatientID by the patient pseudonym, the others by a keyed ID).
PATIENT_ID = "PatientID"
KEYED_IDS = frozenset({
    "AccessionNumber", "StudyID", "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberProcedure", "FillerOrderNumberProcedure", "AdmissionID", "ServiceEpisodeID",
})
# Attributes the profile removes but the IODs require present (Type 2): emptied instead.
EMPTIED = frozenset({"ReferringPhysicianName", "PatientBirthDate", "ContrastBolusAgent", "PatientComments"})
# Text-valued attributes known to hold no identity: technical values and codes.
SAFE_TEXT = frozenset({
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "RescaleType", "ConvolutionKernel",
    "PositionReferenceIndicator", "WindowCenterWidthExplanation", "ContrastBolusRoute", "FilterType",
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue",
    "ImplementationVersionName", "DeidentificationMethod", "FrameLaterality",
    "ReconstructionMethod", "DetectorConfiguration", "TransducerData", "ProcessingFunction",
    "AcquisitionDeviceProcessingCode", "LUTExplanation", "FrameType", "ScanningSequence",
})
# Free-text descriptions: kept only with the Clean Descriptors option, with identifiers cut out.
DESCRIPTORS = frozenset({
    "StudyDescription", "SeriesDescription", "ProtocolName", "PerformedProcedureStepDescription",
    "RequestedProcedureDescription", "ScheduledProcedureStepDescription", "AcquisitionDeviceProcessingDescription",
})
# Device identity: kept only with the Retain Device Identity option.
DEVICE_IDENTITY = frozenset({
    "StationName", "DeviceSerialNumber", "DetectorID", "GantryID", "PlateID", "CassetteID", "PerformedStationName",
    "DeviceUID", "PerformedStationAETitle",
})
# Kept by value type, but removed by the profile (Table E.1-1, X).
REMOVED_NON_TEXT = frozenset({
    "PatientSize", "PatientWeight", "PatientBirthTime", "PregnancyStatus", "SmokingStatus", "PatientSexNeutered",
    "IconImageSequence", "OriginalAttributesSequence", "ReferencedPatientPhotoSequence", "OtherPatientIDsSequence",
    "DigitalSignaturesSequence", "EncryptedAttributesSequence", "MACParametersSequence", "ReferencedPatientSequence",
    "PatientAge",
})
TEXT_VRS = frozenset({"AE", "AS", "LO", "LT", "SH", "ST", "UC", "UR", "UT", "UN", "PN"})
_LONG_NUMBER = re.compile(r"\d{5,}")
_FILE_META_GROUP = 0x0002
_OVERLAY_CURVE_GROUPS = (0x5000, 0x6000)


def hold_back_reason(ds: Dataset, settings: ReleaseSettings) -> str | None:
    """Why an instance must not be released because its pixels may show identifiers, or None."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "burned-in annotation"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary capture"
    if not settings.allow_ultrasound and (ds.get("Modality") == "US" or sop_class in ULTRASOUND_SOP_CLASSES):
        return "ultrasound"
    return None


class Deidentifier:
    """De-identifies data sets in place for one project and one set of options (reuse it: building is slow)."""

    def __init__(self, settings: ReleaseSettings, keys: ReleaseKeys) -> None:
        self.settings = settings
        self._dates = DateTimeAnonymizer(0)
        self._profile = _ProfileHandler(settings, keys, self._dates)
        self._anonymizer = Anonymizer(seed=keys.library_seed())
        self._anonymizer.add_element_handler(self._profile)  # runs before dicognito's own handlers

    def deidentify(self, ds: Dataset) -> None:
        self._profile.begin(ds)
        self._anonymizer.anonymize(ds)
        self._mark(ds)

    def _mark(self, ds: Dataset) -> None:
        """The de-identification attributes of PS3.15 E.1.1 (which profile and options were applied)."""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = f"pacsflow release, dicognito {dicognito.__version__}"
        ds.DeidentificationMethodCodeSequence = [_code(value, meaning) for value, meaning in self._method_codes()]
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self.settings.retain_longitudinal_dates else "REMOVED")

    def _method_codes(self) -> Iterator[tuple[str, str]]:
        yield "113100", "Basic Application Confidentiality Profile"
        if self.settings.clean_descriptors:
            yield "113105", "Clean Descriptors Option"
        if self.settings.retain_longitudinal_dates:
            yield "113107", "Retain Longitudinal Temporal Information Modified Dates Option"
        if self.settings.retain_device_identity:
            yield "113109", "Retain Device Identity Option"
        if self.settings.private_tag_allowlist:
            yield "113111", "Retain Safe Private Option"


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


class _ProfileHandler(ElementAnonymizer):
    """Decides every element (returns True: dicognito's default handlers never see it); dates go to
    dicognito's shifter, set to this patient's keyed offset."""

    def __init__(self, settings: ReleaseSettings, keys: ReleaseKeys, dates: DateTimeAnonymizer) -> None:
        self.settings = settings
        self.keys = keys
        self.dates = dates
        self._allowed_private = {(tag.group, tag.creator): set() for tag in settings.private_tag_allowlist}
        for tag in settings.private_tag_allowlist:
            self._allowed_private[(tag.group, tag.creator)].add(tag.element)
        self._patient_id = ""
        self._identifiers: list[str] = []

    def begin(self, ds: Dataset) -> None:
        """Per-data-set state: the patient's keyed date offset and the identifiers to cut out of descriptors."""
        self._patient_id = str(ds.get(PATIENT_ID, "") or "")
        self.dates.offset = self.keys.date_shift(self._patient_id)
        found = set()
        for element in ds.iterall():
            if element.VR in ("PN", "DA", "DT") or element.keyword in KEYED_IDS or element.keyword == PATIENT_ID:
                for value in _values(element):
                    found.update(part for part in re.split(r"[\^= ,]+", str(value)) if len(part) >= 2)
        found.update(str(ds.get(keyword, "")) for keyword in ("InstitutionName", "InstitutionAddress"))
        self._identifiers = sorted((item for item in found if item), key=len, reverse=True)

    def __call__(self, dataset: Dataset, element: DataElement) -> bool:
        tag = element.tag
        if tag.group == _FILE_META_GROUP:
            if element.VR == "UI":
                self._remap_uids(element)
            return True
        if tag.is_private:
            if not self._private_allowed(dataset, tag):
                del dataset[tag]
            return True
        if tag.group & 0xFF00 in _OVERLAY_CURVE_GROUPS:  # overlays and curves can carry burned-in text
            del dataset[tag]
            return True
        keyword = element.keyword or keyword_for_tag(tag)
        if keyword in REMOVED_NON_TEXT:
            del dataset[tag]
            return True
        vr = element.VR
        if vr == "SQ":
            return True  # dicognito's walk descends into the items, where these rules apply again
        if vr == "UI":
            if not (keyword in DEVICE_IDENTITY and self.settings.retain_device_identity):
                self._remap_uids(element)
            return True
        if vr in ("DA", "DT"):
            return self._date(dataset, element, keyword)
        if keyword == PATIENT_ID:
            element.value = self.keys.patient_pseudonym(self._patient_id) if element.value else ""
            return True
        if keyword == "PatientName":
            element.value = self.keys.patient_pseudonym(self._patient_id)
            return True
        if keyword in KEYED_IDS:
            element.value = [self.keys.identifier(keyword, str(v)) for v in _values(element)] if element.value else ""
            return True
        if vr in TEXT_VRS:
            self._text(dataset, element, keyword)
        return True  # CS, TM and every numeric or binary value: kept

    def _private_allowed(self, dataset: Dataset, tag: BaseTag) -> bool:
        if tag.element < 0x0010:  # group length and reserved elements of a private group
            return False
        if tag.element <= 0x00FF:  # a private creator: kept when some element of its block is allowed
            return (tag.group, str(dataset[tag].value).strip()) in self._allowed_private
        creator_tag = Tag(tag.group, tag.element >> 8)
        if creator_tag not in dataset:
            return False
        allowed = self._allowed_private.get((tag.group, str(dataset[creator_tag].value).strip()), ())
        return (tag.element & 0xFF) in allowed

    def _remap_uids(self, element: DataElement) -> None:
        keyword = element.keyword
        if not element.value or keyword.endswith("ClassUID") or keyword == "TransferSyntaxUID":
            return
        new = [value if str(value).startswith(STANDARD_UID_PREFIX) else self.keys.uid(str(value))
               for value in _values(element)]
        element.value = new if len(new) > 1 else new[0]

    def _date(self, dataset: Dataset, element: DataElement, keyword: str) -> bool:
        if keyword in EMPTIED or not element.value:
            element.value = ""
            return True
        if self.settings.retain_longitudinal_dates:
            return self.dates(dataset, element)  # dicognito's shifter (and the paired TM), offset from begin()
        element.value = DUMMY_DATE if element.VR == "DA" else DUMMY_DATETIME
        return True

    def _text(self, dataset: Dataset, element: DataElement, keyword: str) -> None:
        if keyword in SAFE_TEXT:
            return
        if keyword in DEVICE_IDENTITY and self.settings.retain_device_identity:
            return
        if keyword in DESCRIPTORS and self.settings.clean_descriptors:
            element.value = self._clean(str(element.value))
            return
        if keyword in EMPTIED:
            element.value = ""
            return
        del dataset[element.tag]

    def _clean(self, text: str) -> str:
        """A description with every identifier of its data set and every long number cut out."""
        for identifier in self._identifiers:
            text = re.sub(re.escape(identifier), "", text, flags=re.IGNORECASE)
        return " ".join(_LONG_NUMBER.sub("", text).split())


def _values(element: DataElement) -> list[object]:
    value = element.value
    if isinstance(value, (list, MultiValue)):
        return list(value)
    return [value] if value not in (None, "") else []
