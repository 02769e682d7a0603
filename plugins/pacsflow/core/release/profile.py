"""De-identification of one data set: the DICOM PS3.15 Basic Application Level Confidentiality Profile with
the options a research team chose, keyed so a project's releases stay consistent across runs.

Every element, of the data set and of each nested sequence item, is decided by a keep-list on its tag and
VR before its value is parsed: kept when it is known to be safe (technical values, codes, numbers, pixel
data: written back byte for byte), replaced when it carries identity (keyed pseudonyms and UIDs, dates
shifted by dicognito's DA/DT/TM shifter with the patient's keyed offset), and otherwise removed (or emptied
where the IOD needs it present). Unknown free text and private elements are therefore removed, never kept by
omission. Instances that may show identifiers in their pixels are held back before any of this
(:func:`hold_back_reason`). README "Research release" says why this, not dicognito's ``Anonymizer`` walk.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import Enum

import dicognito
from dicognito.datetimeanonymizer import DateTimeAnonymizer
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from pacsflow.core.release.keys import ReleaseKeys
from pacsflow.core.release.settings import ReleaseSettings

STANDARD_UID_PREFIX = "1.2.840.10008."  # DICOM's own UIDs (classes, transfer syntaxes, coding schemes)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1 to .7.4
ULTRASOUND_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.5.1.4.1.1.6.2",
        "1.2.840.10008.5.1.4.1.1.3.1",
        "1.2.840.10008.5.1.4.1.1.6",
        "1.2.840.10008.5.1.4.1.1.3",
    }
)
DUMMY_DATE, DUMMY_DATETIME = "19000101", "19000101000000"

# Identifiers replaced by a keyed pseudonym (PatientID by the patient pseudonym, the others by a keyed ID).
PATIENT_ID = "PatientID"
KEYED_IDS = frozenset(
    {
        "AccessionNumber",
        "StudyID",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "PerformedProcedureStepID",
        "PlacerOrderNumberImagingServiceRequest",
        "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberProcedure",
        "FillerOrderNumberProcedure",
        "AdmissionID",
        "ServiceEpisodeID",
    }
)
# Attributes the profile removes but the IODs require present (Type 2): emptied instead.
EMPTIED = frozenset({"ReferringPhysicianName", "PatientBirthDate", "ContrastBolusAgent", "PatientComments"})
# Text-valued attributes known to hold no identity: technical values and codes.
SAFE_TEXT = frozenset(
    {
        "Manufacturer",
        "ManufacturerModelName",
        "SoftwareVersions",
        "RescaleType",
        "ConvolutionKernel",
        "PositionReferenceIndicator",
        "WindowCenterWidthExplanation",
        "ContrastBolusRoute",
        "FilterType",
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
        "LongCodeValue",
        "ImplementationVersionName",
        "DeidentificationMethod",
        "FrameLaterality",
        "ReconstructionMethod",
        "DetectorConfiguration",
        "TransducerData",
        "ProcessingFunction",
        "AcquisitionDeviceProcessingCode",
        "LUTExplanation",
        "FrameType",
        "ScanningSequence",
    }
)
# Free-text descriptions: kept only with the Clean Descriptors option, with identifiers cut out.
DESCRIPTORS = frozenset(
    {
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "PerformedProcedureStepDescription",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepDescription",
        "AcquisitionDeviceProcessingDescription",
    }
)
# Device identity: kept only with the Retain Device Identity option.
DEVICE_IDENTITY = frozenset(
    {
        "StationName",
        "DeviceSerialNumber",
        "DetectorID",
        "GantryID",
        "PlateID",
        "CassetteID",
        "PerformedStationName",
        "DeviceUID",
        "PerformedStationAETitle",
    }
)
# Kept by value type, but removed by the profile (Table E.1-1, X).
REMOVED_NON_TEXT = frozenset(
    {
        "PatientSize",
        "PatientWeight",
        "PatientBirthTime",
        "PregnancyStatus",
        "SmokingStatus",
        "PatientSexNeutered",
        "IconImageSequence",
        "OriginalAttributesSequence",
        "ReferencedPatientPhotoSequence",
        "OtherPatientIDsSequence",
        "DigitalSignaturesSequence",
        "EncryptedAttributesSequence",
        "MACParametersSequence",
        "ReferencedPatientSequence",
        "PatientAge",
    }
)
# Top-level values cut out of descriptors when they occur there.
IDENTIFYING_TEXT = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "RequestingPhysician",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
)
TEXT_VRS = frozenset({"AE", "AS", "LO", "LT", "SH", "ST", "UC", "UR", "UT", "UN", "PN"})
_LONG_NUMBER = re.compile(r"\d{5,}")
_OVERLAY_CURVE_GROUPS = (0x5000, 0x6000)


def hold_back_reason(ds: Dataset, settings: ReleaseSettings) -> str | None:
    """Why an instance must not be released because its pixels may show identifiers, or None."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "burned-in annotation"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == SECONDARY_CAPTURE or sop_class.startswith(SECONDARY_CAPTURE + "."):
        return "secondary capture"
    if not settings.allow_ultrasound and (ds.get("Modality") == "US" or sop_class in ULTRASOUND_SOP_CLASSES):
        return "ultrasound"
    return None


class Deidentifier:
    """De-identifies data sets in place for one project and one set of options (reuse it)."""

    def __init__(self, settings: ReleaseSettings, keys: ReleaseKeys) -> None:
        self.settings = settings
        self._profile = _Profile(settings, keys)

    def deidentify(self, ds: Dataset) -> None:
        self._profile.apply(ds)
        self._mark(ds)

    def _mark(self, ds: Dataset) -> None:
        """The de-identification attributes of PS3.15 E.1.1 (which profile and options were applied)."""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = f"pacsflow release, dicognito {dicognito.__version__}"
        ds.DeidentificationMethodCodeSequence = [_code(value, meaning) for value, meaning in self._method_codes()]
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self.settings.retain_longitudinal_dates else "REMOVED"
        )

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


class _Action(Enum):
    KEEP = "keep"  # left as read: a raw element is written back byte for byte, never parsed
    REMOVE = "remove"
    DESCEND = "descend"  # a sequence: the rules apply again in each item
    CHANGE = "change"  # parsed and replaced (pseudonym, new UID, shifted date, emptied, cleaned)


class _Profile:
    """The keep-list, applied to every element of a data set and of its nested sequences. Elements are
    triaged on their tag and VR before any value is parsed: only what changes is parsed."""

    def __init__(self, settings: ReleaseSettings, keys: ReleaseKeys) -> None:
        self.settings = settings
        self.keys = keys
        self.dates = DateTimeAnonymizer(0)  # dicognito's DA/DT shifter (it shifts the paired TM too)
        self._allowed_private: dict[tuple[int, str], set[int]] = {}
        for tag in settings.private_tag_allowlist:
            self._allowed_private.setdefault((tag.group, tag.creator), set()).add(tag.element)
        self._patient_id = ""
        self._identifiers: list[str] = []

    def apply(self, ds: Dataset) -> None:
        self._begin(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            self._remap_uids(meta["MediaStorageSOPInstanceUID"])
        self._walk(ds)

    def _begin(self, ds: Dataset) -> None:
        """Per-data-set state: the patient's keyed date offset and the identifiers to cut out of descriptors
        (names, IDs and the institution at the top level; dates and other long numbers go by pattern)."""
        self._patient_id = str(ds.get(PATIENT_ID, "") or "")
        self.dates.offset = self.keys.date_shift(self._patient_id)
        found: set[str] = set()
        for keyword in IDENTIFYING_TEXT:
            if keyword in ds:
                for value in _values(ds[keyword]):
                    found.update(part for part in re.split(r"[\^= ,]+", str(value)) if len(part) >= 2)
                    found.add(str(value))
        self._identifiers = sorted((item for item in found if item), key=len, reverse=True)

    def _walk(self, ds: Dataset) -> None:
        for tag in list(ds.keys()):
            raw = ds.get_item(tag)  # not parsed
            keyword = keyword_for_tag(tag)
            vr = raw.VR or _dictionary_vr(tag)
            action = self._action(ds, tag, vr, keyword)
            if action is _Action.KEEP:
                continue
            if action is _Action.REMOVE:
                del ds[tag]
            elif action is _Action.DESCEND:
                for item in ds[tag].value:
                    self._walk(item)
            else:
                self._change(ds, ds[tag], vr, keyword)

    def _action(self, ds: Dataset, tag: BaseTag, vr: str, keyword: str) -> _Action:
        if tag.is_private:
            return _Action.KEEP if self._private_allowed(ds, tag) else _Action.REMOVE
        if tag.group & 0xFF00 in _OVERLAY_CURVE_GROUPS or keyword in REMOVED_NON_TEXT:
            return _Action.REMOVE  # overlays and curves can carry burned-in text
        if vr == "SQ":
            return _Action.DESCEND
        if vr == "UI":
            keep = keyword.endswith("ClassUID") or keyword == "TransferSyntaxUID" or self._device_kept(keyword)
            return _Action.KEEP if keep else _Action.CHANGE
        return self._value_action(vr, keyword)

    def _value_action(self, vr: str, keyword: str) -> _Action:
        """The action for an element that is neither private, nor a sequence, nor a UID."""
        if vr in ("DA", "DT") or keyword in (PATIENT_ID, "PatientName") or keyword in KEYED_IDS:
            return _Action.CHANGE
        if vr not in TEXT_VRS or keyword in SAFE_TEXT or self._device_kept(keyword):
            return _Action.KEEP  # CS, TM, numbers, binary (pixel data): kept
        if (keyword in DESCRIPTORS and self.settings.clean_descriptors) or keyword in EMPTIED:
            return _Action.CHANGE
        return _Action.REMOVE

    def _device_kept(self, keyword: str) -> bool:
        return keyword in DEVICE_IDENTITY and self.settings.retain_device_identity

    def _change(self, ds: Dataset, element: DataElement, vr: str, keyword: str) -> None:
        if vr == "UI":
            self._remap_uids(element)
        elif vr in ("DA", "DT"):
            self._date(ds, element, keyword)
        elif keyword in (PATIENT_ID, "PatientName"):
            element.value = self.keys.patient_pseudonym(self._patient_id) if element.value else ""
        elif keyword in KEYED_IDS:
            element.value = [self.keys.identifier(keyword, str(v)) for v in _values(element)] if element.value else ""
        elif keyword in EMPTIED:
            element.value = ""
        else:
            element.value = self._clean(str(element.value))

    def _private_allowed(self, ds: Dataset, tag: BaseTag) -> bool:
        if not self._allowed_private or tag.element < 0x0010:  # group length, reserved elements
            return False
        if tag.element <= 0x00FF:  # a private creator: kept when some element of its block is allowed
            return (tag.group, str(ds[tag].value).strip()) in self._allowed_private
        creator_tag = Tag(tag.group, tag.element >> 8)
        if creator_tag not in ds:
            return False
        allowed = self._allowed_private.get((tag.group, str(ds[creator_tag].value).strip()), ())
        return (tag.element & 0xFF) in allowed

    def _remap_uids(self, element: DataElement) -> None:
        if not element.value:
            return
        new = [
            value if str(value).startswith(STANDARD_UID_PREFIX) else self.keys.uid(str(value))
            for value in _values(element)
        ]
        element.value = new if len(new) > 1 else new[0]

    def _date(self, ds: Dataset, element: DataElement, keyword: str) -> None:
        if keyword in EMPTIED or not element.value:
            element.value = ""
        elif self.settings.retain_longitudinal_dates:
            self.dates(ds, element)  # this patient's keyed offset, set in _begin()
        else:
            element.value = DUMMY_DATE if element.VR == "DA" else DUMMY_DATETIME

    def _clean(self, text: str) -> str:
        """A description with every identifier of its data set and every long number cut out."""
        for identifier in self._identifiers:
            text = re.sub(re.escape(identifier), "", text, flags=re.IGNORECASE)
        return " ".join(_LONG_NUMBER.sub("", text).split())


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _values(element: DataElement) -> list[object]:
    value = element.value
    if isinstance(value, (list, MultiValue)):
        return list(value)
    return [value] if value not in (None, "") else []
