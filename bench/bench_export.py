"""Benchmark of the Parquet metadata export (entry ``export_parquet`` in ``bench/results.json``).

Compares ``export_instances`` with the naive loop the issue names (full ``pydicom.dcmread`` of each file,
a list of dicts, one ``pa.Table.from_pylist`` + ``pq.write_table``) on the same synthetic CT files, then
shows the export's peak RSS at growing cohort sizes (``--memory-scan``, 10k and 100k instances by default).

    PYTHONPATH=plugins python -m bench.bench_export                    # 2,000 files + 10k/100k memory scan
    PYTHONPATH=plugins python -m bench.bench_export --files 10000 --no-memory-scan
    PYTHONPATH=plugins python -m bench.bench_export --memory-scan 10000 100000 200000
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pacsflow.core.export import export_instances
from pacsflow.core.export.schema import DICOM_COLUMNS
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import IS, DSfloat, PersonName

from bench.results import record

INSTANCES_PER_SERIES = 200
SERIES_PER_STUDY = 3
STUDY_DAYS = 30  # studies spread over this many study dates (partitions)
UID_ROOT = "1.2.826.0.1.3680043.8.498."


# -- synthetic CT headers ---------------------------------------------------------------------------
def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _uid(*parts: int) -> str:
    return UID_ROOT + ".".join(str(part) for part in parts)


def ct_dataset(index: int, pixels: int = 64) -> Dataset:  # noqa: PLR0915  one statement per element, as a scanner writes
    """A CT image header like a scanner writes (~300 elements with sequences and private groups)."""
    study, rest = divmod(index, INSTANCES_PER_SERIES * SERIES_PER_STUDY)
    series, instance = divmod(rest, INSTANCES_PER_SERIES)
    study_date = dt.date(2024, 1, 1) + dt.timedelta(days=study % STUDY_DAYS)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"]
    ds.InstanceCreationDate = study_date.strftime("%Y%m%d")
    ds.InstanceCreationTime = "101500.123000"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = _uid(3, study, series, instance)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = "101010.000000"
    ds.SeriesTime = f"1011{series:02d}.000000"
    ds.AcquisitionTime = f"1012{instance % 60:02d}.{instance:06d}"
    ds.ContentTime = ds.AcquisitionTime
    ds.AcquisitionDateTime = ds.AcquisitionDate + ds.AcquisitionTime
    ds.AccessionNumber = f"ACC{study:08d}"
    ds.Modality = "CT"
    ds.Manufacturer = "SIEMENS"
    ds.InstitutionName = "Hôpital Universitaire de Genève"
    ds.InstitutionAddress = "Rue Gabrielle-Perret-Gentil 4, 1205 Genève"
    ds.ReferringPhysicianName = "Müller^Jürg^^Dr."
    ds.StationName = "CTAWP12345"
    ds.StudyDescription = "CT THORAX ABDOMEN MIT KM"
    ds.ProcedureCodeSequence = Sequence([_code("CTTHAB", "L", "CT Thorax Abdomen")])
    ds.SeriesDescription = f"Thorax {series} 1.0 B31f"
    ds.InstitutionalDepartmentName = "Radiologie"
    ds.PerformingPhysicianName = "Dupont^Marie"
    ds.OperatorsName = ["Tech^One", "Tech^Two"]
    ds.ManufacturerModelName = "SOMATOM Definition AS+"
    ds.ReferencedImageSequence = Sequence([_referenced(study, series, n) for n in range(3)])
    ds.SourceImageSequence = Sequence([_referenced(study, series, 9000)])
    ds.DerivationDescription = "Reconstruction"
    ds.PatientName = f"Zoë^Brontë-{study}"
    ds.PatientID = f"PID{study:07d}"
    ds.IssuerOfPatientID = "HUG"
    ds.PatientBirthDate = "19600229"
    ds.PatientSex = "F"
    ds.OtherPatientIDs = f"X{study}"
    ds.PatientAge = "064Y"
    ds.PatientSize = "1.68"
    ds.PatientWeight = "71.5"
    ds.EthnicGroup = ""
    ds.AdditionalPatientHistory = "Follow-up"
    ds.PatientIdentityRemoved = "NO"
    ds.ContrastBolusAgent = "Iomeron 400"
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = "80"
    ds.ContrastBolusStartTime = "101100"
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL_CT"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "54321"
    ds.SoftwareVersions = ["syngo CT 2012B", "VA44A"]
    ds.ProtocolName = "Thorax-Abdomen KM"
    ds.ReconstructionDiameter = "380"
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "145"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "210"
    ds.Exposure = "105"
    ds.FilterType = "0"
    ds.GeneratorPower = "25"
    ds.FocalSpots = "1.2"
    ds.DateOfLastCalibration = "20231220"
    ds.TimeOfLastCalibration = "071500"
    ds.ConvolutionKernel = ["B31f"]
    ds.PatientPosition = "FFS"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.6
    ds.TotalCollimationWidth = 38.4
    ds.TableSpeed = 46.0
    ds.TableFeedPerRotation = 23.0
    ds.SpiralPitchFactor = 0.6
    ds.CTDIvol = 7.4
    ds.CTDIPhantomTypeCodeSequence = Sequence([_code("113691", "DCM", "IEC Body Dosimetry Phantom")])
    ds.StudyInstanceUID = _uid(1, study)
    ds.SeriesInstanceUID = _uid(2, study, series)
    ds.StudyID = str(study)
    ds.SeriesNumber = series + 1
    ds.AcquisitionNumber = 2
    ds.InstanceNumber = instance + 1
    ds.ImagePositionPatient = [-190.0, -190.0, -1.0 * instance]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = _uid(4, study)
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = -1.0 * instance
    ds.ImageComments = "KM venös"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = pixels
    ds.PixelSpacing = [0.742, 0.742]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SmallestImagePixelValue = 0
    ds.LargestImagePixelValue = 4095
    ds.WindowCenter = [40, 400]
    ds.WindowWidth = [400, 1500]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenterWidthExplanation = ["WINDOW1", "WINDOW2"]
    ds.RequestedProcedureDescription = "CT Thorax Abdomen"
    ds.RequestAttributesSequence = Sequence([_request(study)])
    ds.PerformedProcedureStepStartDate = ds.StudyDate
    ds.PerformedProcedureStepStartTime = "101000"
    ds.PerformedProcedureStepID = f"PPS{study}"
    ds.PerformedProcedureStepDescription = "CT Thorax Abdomen"
    ds.CTExposureSequence = Sequence([_exposure()])
    _private_groups(ds, instance)
    ds.PixelData = bytes(pixels * pixels * 2)
    ds.file_meta = _file_meta(ds)
    return ds


def _referenced(study: int, series: int, instance: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = _uid(3, study, series, instance)
    return item


def _request(study: int) -> Dataset:
    item = Dataset()
    item.RequestedProcedureID = f"RP{study}"
    item.ScheduledProcedureStepID = f"SPS{study}"
    item.ScheduledProcedureStepDescription = "CT Thorax Abdomen"
    item.ScheduledProtocolCodeSequence = Sequence([_code("P1", "L", "Thorax-Abdomen")])
    return item


def _exposure() -> Dataset:
    item = Dataset()
    item.ExposureTimeInms = 500.0
    item.XRayTubeCurrentInmA = 210.0
    item.KVP = "120"
    item.CTDIvol = 7.4
    return item


def _private_groups(ds: Dataset, instance: int) -> None:
    """Vendor private data, as real CT headers carry (dozens of elements)."""
    for group, creator in ((0x0019, "SIEMENS CT VA0  COAD"), (0x0021, "SIEMENS MED"), (0x0029, "SIEMENS CSA")):
        block = ds.private_block(group, creator, create=True)
        for offset in range(0x10, 0x10 + 40):
            if offset % 3 == 0:
                block.add_new(offset, "DS", f"{instance * 0.5 + offset:.3f}")
            elif offset % 3 == 1:
                block.add_new(offset, "LO", f"param-{offset}")
            else:
                block.add_new(offset, "US", offset)


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(prefix=UID_ROOT, entropy_srcs=["pacsflow-bench"])
    return meta


def element_count(ds: Dataset) -> int:
    return sum(1 for _ in ds.iterall())


def _write_files(directory: str, indices: range, pixels: int) -> None:
    for index in indices:
        ct_dataset(index, pixels).save_as(Path(directory) / f"{index:07d}.dcm", enforce_file_format=True)


def ensure_cohort(directory: Path, count: int, pixels: int) -> list[Path]:
    """The first ``count`` files of a cached cohort, generating the missing ones on every core."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / ".generated"
    generated = int(marker.read_text()) if marker.exists() else 0
    if generated < count:
        step = 500
        with ProcessPoolExecutor() as pool:
            list(
                pool.map(
                    _write_files,
                    repeat(str(directory)),
                    [range(start, min(start + step, count)) for start in range(generated, count, step)],
                    repeat(pixels),
                )
            )
        marker.write_text(str(count))
    return [directory / f"{index:07d}.dcm" for index in range(count)]


# -- the naive reference ----------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """pydicom's value as a plain Python value, the way a quick script converts it."""
    if isinstance(value, (list, MultiValue)):
        return [_plain(item) for item in value]
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, (DSfloat, float)):
        return float(value)
    if isinstance(value, (IS, int)):
        return int(value)
    return None if value in ("", None) else str(value)


def naive_export(paths: list[Path], out_file: Path, checksum: bool = True) -> int:
    """The issue's reference: full dcmread of each file, a list of dicts, one table write."""
    rows = []
    for path in paths:
        ds = pydicom.dcmread(path)
        row = {keyword: _plain(ds.get(keyword)) for keyword in NAIVE_KEYWORDS}
        row["TransferSyntaxUID"] = str(ds.file_meta.TransferSyntaxUID)
        row["file_path"] = str(path)
        row["file_size"] = path.stat().st_size
        if checksum:
            row["file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), out_file)
    return len(rows)


NAIVE_KEYWORDS = sorted({keyword_for_tag(tag) for column in DICOM_COLUMNS for tag in column.tags})


# -- measurements -----------------------------------------------------------------------------------
def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def compare_rates(paths: list[Path], work: Path, workers: int | None, repeat: int) -> dict[str, float]:
    """Median rate of each contender over ``repeat`` interleaved rounds (other load on the host is shared)."""
    _drop_page_cache_hint(paths)
    contenders: dict[str, Callable[[], Any]] = {
        "naive": lambda: naive_export(paths, work / "naive.parquet"),
        "naive_no_checksum": lambda: naive_export(paths, work / "naive-no-checksum.parquet", checksum=False),
        "pacsflow": lambda: _export_all(paths, work / "metadata", workers),
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, contender in contenders.items():
            seconds, _ = timed(contender)
            rates[name].append(len(paths) / seconds)
    return {name: statistics.median(values) for name, values in rates.items()}


def _export_all(paths: list[Path], out: Path, workers: int | None) -> None:
    report = export_instances(paths, out, "bench__rate", workers=workers)
    if report.instances != len(paths) or report.rejected:
        raise RuntimeError(f"export rejected {len(report.rejected)} files: {report.rejected[:3]}")


def _drop_page_cache_hint(paths: list[Path]) -> None:
    """Read every file once so all contenders start with a warm page cache (we measure CPU, not disk)."""
    for path in paths:
        path.read_bytes()


class PeakRss:
    """Samples the summed RSS of a process and its children every 20 ms, in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_total = self.peak_parent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                parent = self.process.memory_info().rss
                children = sum(_rss(child) for child in self.process.children(recursive=True))
            except psutil.NoSuchProcess:
                return
            self.peak_parent = max(self.peak_parent, parent)
            self.peak_total = max(self.peak_total, parent + children)
            self._stop.wait(0.02)


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


_EXPORT_IN_CHILD = """
import sys
from pathlib import Path
from pacsflow.core.export import export_instances
from pacsflow.core.export.schema import DICOM_COLUMNS
root, count, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
files = (root / f"{index:07d}.dcm" for index in range(count))  # streamed, never a list
report = export_instances(files, out, "bench__memory", workers=int(sys.argv[4]) if sys.argv[4] != "None" else None)
assert report.instances == count, (report.instances, report.rejected[:3])
"""


def export_peak_rss(cohort: Path, count: int, work: Path, workers: int | None) -> tuple[float, int, int]:
    """(seconds, peak RSS of the exporting process, peak RSS of it and its workers) for ``count`` files."""
    out = work / f"memory-{count}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    child = psutil.Popen(
        [sys.executable, "-c", _EXPORT_IN_CHILD, str(cohort), str(count), str(out), str(workers)], env=os.environ.copy()
    )
    with PeakRss(child.pid) as peak:
        returncode = child.wait()
    if returncode:
        raise RuntimeError(f"export of {count} files failed (exit {returncode})")
    return time.perf_counter() - started, peak.peak_parent, peak.peak_total


# -- command line -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Rate comparison, then the memory scan, recorded together as the entry ``export_parquet``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2_000, help="files for the rate comparison")
    parser.add_argument("--pixels", type=int, default=64, help="rows = columns of the synthetic images")
    parser.add_argument("--workers", type=int, default=None, help="export worker processes (default: cores)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the rate comparison (median)")
    parser.add_argument(
        "--memory-scan",
        nargs="+",
        type=int,
        default=[10_000, 100_000],
        metavar="N",
        help="cohort sizes of the peak-RSS scan (default: 10000 100000)",
    )
    parser.add_argument("--no-memory-scan", action="store_true", help="only the rate comparison")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pacsflow-bench-ct",
        help="cache of generated files (reused between runs)",
    )
    parser.add_argument("--no-record", action="store_true", help="do not write bench/results.json")
    args = parser.parse_args(argv)
    cohort = args.data / f"ct-{args.pixels}px"
    with tempfile.TemporaryDirectory(prefix="pacsflow-bench-export-") as temp:
        entry = _rate(cohort, args, Path(temp))
        if not args.no_memory_scan:
            entry |= _memory_scan(cohort, args, Path(temp))
    if not args.no_record:
        record("export_parquet", "files/s", **entry)
    return 0


def _rate(cohort: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    paths = ensure_cohort(cohort, args.files, args.pixels)
    load_before = os.getloadavg()[0]  # other work on the host slows the parallel export most
    elements = element_count(pydicom.dcmread(paths[0]))
    rates = compare_rates(paths, work, args.workers, args.repeat)
    ratio = rates["pacsflow"] / rates["naive"]
    print(
        f"export_parquet: {args.files} CT files, {elements} elements each, {paths[0].stat().st_size} bytes, "
        f"{os.cpu_count()} cores, median of {args.repeat}, load average {load_before:.2f}"
    )
    print(f"  {'naive dcmread loop + one table write':<42} {rates['naive']:>8.0f} files/s")
    print(f"  {'  (same, without the checksum column)':<42} {rates['naive_no_checksum']:>8.0f} files/s")
    print(f"  {'pacsflow export_instances':<42} {rates['pacsflow']:>8.0f} files/s   {ratio:.2f}x (target 3x)")
    return {
        "pacsflow": round(rates["pacsflow"], 1),
        "reference": round(rates["naive"], 1),
        "reference_without_checksum": round(rates["naive_no_checksum"], 1),
        "target_ratio": 3,
        "files": args.files,
        "elements_per_file": elements,
        "file_bytes": paths[0].stat().st_size,
        "cores": os.cpu_count(),
        "repeat": args.repeat,
        "load_average_before": round(load_before, 2),
    }


def _memory_scan(cohort: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    counts = sorted(args.memory_scan)
    ensure_cohort(cohort, counts[-1], args.pixels)
    print(f"export peak memory ({os.cpu_count()} cores, {args.pixels}x{args.pixels} CT files)")
    print(f"  {'instances':>10} {'files/s':>9} {'parent RSS MB':>14} {'parent+workers RSS MB':>22}")
    parent_mb, total_mb = {}, {}
    for count in counts:
        seconds, parent, total = export_peak_rss(cohort, count, work, args.workers)
        parent_mb[str(count)], total_mb[str(count)] = round(parent / 2**20, 1), round(total / 2**20, 1)
        print(f"  {count:>10} {count / seconds:>9.0f} {parent_mb[str(count)]:>14.1f} {total_mb[str(count)]:>22.1f}")
    return {
        "peak_rss_mb_parent": parent_mb,
        "peak_rss_mb_with_workers": total_mb,
        "peak_rss_growth": round(total_mb[str(counts[-1])] / total_mb[str(counts[0])], 3),
    }


if __name__ == "__main__":
    sys.exit(main())
