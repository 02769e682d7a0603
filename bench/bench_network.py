"""Benchmarks of the DICOM network layer against DCMTK, same Orthanc, same run (issue #3).

Entries in ``bench/results.json``:
- ``resolve_an``: AN -> StudyInstanceUID, pacsflow (one association, ``resolve_accession``) vs ``findscu``
  started once per AN. Targets: >= 200 AN/s and >= 6x findscu.
- ``retrieve_cmove`` / ``retrieve_cget`` / ``retrieve_cmove_dcmtk``: MB/s retrieving two CT studies (1,000
  instances of 512x512x16-bit, 534 MB) with pacsflow's C-MOVE (into ``StoreReceiver``), C-GET, and C-MOVE into
  the DCMTK receiver backend vs DCMTK ``movescu`` + ``storescp``. Target: >= 0.6x DCMTK's MB/s. Peak RSS of the
  retrieving process is recorded with each, per study, and for one large multi-frame instance (210 MB) retrieved
  on its own: memory must not grow with the size of a study or of an object.

Orthanc and every DCMTK tool run with ``TCP_NODELAY=1`` (without it DCMTK is ~6x slower and the comparison would
flatter pacsflow). Generated data and Orthanc's storage are cached under ``$TMPDIR/pacsflow-bench-net``.

    PYTHONPATH=plugins:. python -m bench.bench_network
    PYTHONPATH=plugins:. python -m bench.bench_network --repeat 1 --accessions 300 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from itertools import repeat
from pathlib import Path
from typing import Any

import psutil
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig
from pacsflow.core.dicom.dcmtk import dcmtk_program
from pacsflow.core.dicom.dcmtk_receiver import DcmtkStoreReceiver
from pacsflow.core.dicom.receiver import StoreReceiver, open_receiver
from pacsflow.core.resolve import Resolution, ResolutionSettings, Rule, resolve_accession
from pacsflow.core.ris import RisExam
from pacsflow.core.storage import StorageLayout
from pacsflow.demo.sandbox import SandboxPacs, free_port, orthanc

from bench.results import record

UID_ROOT = "1.2.826.0.1.3680043.8.498."
DATA_VERSION = "1"  # bump when the generated data changes: the cached Orthanc is rebuilt
# Two studies of different sizes, so the retrieval's peak RSS can be compared between a small and a large one.
STUDY_SERIES: tuple[tuple[int, ...], ...] = ((100, 100), (200, 200, 200, 200))
PIXELS = 512
TINY_PIXELS = 16
LARGE_FRAMES = 400  # one multi-frame instance of 512x512x16-bit x 400 = 210 MB
PACSFLOW_AE, DCMTK_AE = "PACSFLOWRCV", "DCMTKRCV"
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- data -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Study:
    study_uid: str
    series: tuple[tuple[str, int], ...]  # (SeriesInstanceUID, instances)

    @property
    def instances(self) -> int:
        return sum(count for _, count in self.series)


def _study_uid(kind: int, study: int) -> str:
    return f"{UID_ROOT}77.{kind}.{study}"


def retrieval_studies() -> list[Study]:
    return [
        Study(
            _study_uid(1, index),
            tuple((f"{_study_uid(1, index)}.{series}", count) for series, count in enumerate(counts, start=1)),
        )
        for index, counts in enumerate(STUDY_SERIES)
    ]


def large_object_study() -> Study:
    study_uid = _study_uid(3, 0)
    return Study(study_uid, ((f"{study_uid}.1", 1),))


def accession(index: int) -> str:
    return f"BN{index:07d}"


def _write_ct(directory: str, placements: list[tuple[int, str, str, str, str]], pixels: int) -> None:
    """Realistic CT files (see bench_export) re-parented into the benchmark's own studies and series."""
    from bench.bench_export import ct_dataset  # here, not at the top: it pulls pyarrow into the measured child

    for index, study_uid, series_uid, an, name in placements:
        ds = ct_dataset(index, pixels)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.AccessionNumber = study_uid, series_uid, an
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series_uid}.{index}"
        ds.PatientID = f"BENCH{an}"
        ds.save_as(Path(directory) / name, enforce_file_format=True)


def _write_large_object(path: Path) -> None:
    from bench.bench_export import ct_dataset  # see _write_ct

    study = large_object_study()
    ds = ct_dataset(0, PIXELS)
    ds.StudyInstanceUID, (ds.SeriesInstanceUID, _) = study.study_uid, study.series[0]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SeriesInstanceUID}.1"
    ds.AccessionNumber, ds.PatientID = "RTLARGE", "BENCHLARGE"
    ds.NumberOfFrames = LARGE_FRAMES
    ds.PixelData = bytes(PIXELS * PIXELS * 2 * LARGE_FRAMES)
    ds.save_as(path, enforce_file_format=True)


def ensure_data(root: Path, accessions: int) -> tuple[list[Path], list[Path]]:
    """(the CT files of the retrieval studies and the large object, one small study per AN), generated once."""
    big, small = root / f"ct-{PIXELS}px", root / "accessions"
    big_jobs, small_jobs = [], []
    index = 0
    for number, study in enumerate(retrieval_studies()):
        for series_uid, count in study.series:
            for _ in range(count):
                big_jobs.append((index, study.study_uid, series_uid, f"RT{number:05d}", f"{index:07d}.dcm"))
                index += 1
    for number in range(accessions):
        study_uid = _study_uid(2, number)
        small_jobs.append((number, study_uid, f"{study_uid}.1", accession(number), f"{number:07d}.dcm"))
    for directory, jobs, pixels in ((big, big_jobs, PIXELS), (small, small_jobs, TINY_PIXELS)):
        directory.mkdir(parents=True, exist_ok=True)
        missing = [job for job in jobs if not (directory / job[-1]).exists()]
        if missing:
            chunks = [missing[start : start + 100] for start in range(0, len(missing), 100)]
            with ProcessPoolExecutor() as pool:
                list(pool.map(_write_ct, repeat(str(directory)), chunks, repeat(pixels)))
    large = root / "large-object.dcm"
    if not large.exists():
        _write_large_object(large)
    return [big / job[-1] for job in big_jobs] + [large], [small / job[-1] for job in small_jobs]


def _orthanc_instances(pacs: SandboxPacs) -> int:
    with urllib.request.urlopen(f"{pacs.http_url}/statistics", timeout=30) as response:
        return int(json.load(response)["CountInstances"])


def _orthanc_holds(pacs: SandboxPacs, study_uid: str) -> bool:
    request = urllib.request.Request(f"{pacs.http_url}/tools/lookup", data=study_uid.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return bool(json.load(response))


def ensure_loaded(pacs: SandboxPacs, files: list[Path]) -> None:
    """Load into Orthanc what its (cached) storage does not hold yet (it may hold more ANs than this run uses)."""

    def complete() -> bool:
        return _orthanc_instances(pacs) >= len(files) and _orthanc_holds(pacs, large_object_study().study_uid)

    if not complete():
        started = time.perf_counter()
        stored = pacs.load(files)
        print(f"  loaded {stored} instances into Orthanc in {time.perf_counter() - started:.0f} s", flush=True)
    if not complete():
        raise SystemExit("Orthanc does not hold every generated instance")


# -- resolution -------------------------------------------------------------------------------------
def resolve_pacsflow(config: PacsConfig, ans: Sequence[str], expected: dict[str, str]) -> tuple[float, list[str]]:
    """(AN/s, what went wrong for ANs not resolved to their one study), over one association."""
    settings = ResolutionSettings(rules=(Rule.ACCESSION_NUMBER,))
    started = time.perf_counter()
    with PacsClient(config) as client:
        results = [resolve_accession(client, RisExam(accession_number=an), settings) for an in ans]
    elapsed = time.perf_counter() - started
    wrong = [
        f"{result.resolution.value}: {result.detail}"
        for an, result in zip(ans, results, strict=True)
        if result.resolution is not Resolution.RESOLVED or result.study_uids != (expected[an],)
    ]
    return len(ans) / elapsed, wrong


def resolve_findscu(config: PacsConfig, ans: Sequence[str], expected: dict[str, str]) -> float:
    """``findscu`` once per AN (what a script around DCMTK does), answers read from its verbose output."""
    wrong = 0
    started = time.perf_counter()
    for an in ans:
        completed = subprocess.run(
            [
                dcmtk_program("findscu"),
                "-v",
                "-S",
                "-aet",
                "FINDSCU",
                "-aec",
                config.called_ae,
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"AccessionNumber={an}",
                "-k",
                "StudyInstanceUID",
                config.host,
                str(config.port),
            ],
            env=NODELAY_ENV,
            capture_output=True,
            text=True,
            check=False,  # a miss is counted from the output, not raised
        )
        answered = _findscu_study_uids(completed.stdout + completed.stderr)
        wrong += completed.returncode != 0 or expected[an] not in answered
    elapsed = time.perf_counter() - started
    if wrong:
        raise SystemExit(f"resolve_an: findscu resolved {wrong} of {len(ans)} ANs wrongly")
    return len(ans) / elapsed


def _findscu_study_uids(verbose_output: str) -> set[str]:
    """StudyInstanceUIDs in findscu's ``-v`` dump (the first is the request's empty key; odd lengths are padded)."""
    return {match.group(1).strip("\x00 ") for match in _FINDSCU_UID.finditer(verbose_output)}


_FINDSCU_UID = re.compile(r"\(0020,000d\) UI \[([^\]]*)\]")


# -- retrieval: one run of one contender --------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    seconds: float
    files: int
    bytes: int
    peak_rss: int  # bytes, of the process(es) receiving
    detail: dict[str, Any]

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds

    @property
    def instances_per_s(self) -> float:
        return self.files / self.seconds


def _tree_size(root: Path, pattern: str) -> tuple[int, int]:
    files = [path for path in root.glob(pattern) if path.is_file() and not path.name.startswith(".")]
    return len(files), sum(path.stat().st_size for path in files)


def _peak_rss_sampler(pid: int) -> Any:
    from bench.bench_export import PeakRss  # see _write_ct

    return PeakRss(pid)


def _verified(
    name: str, root: Path, *, pattern: str, studies: list[Study], seconds: float, peak: int, detail: dict[str, Any]
) -> Run:
    files, size = _tree_size(root, pattern)
    expected = sum(study.instances for study in studies)
    if files != expected:
        raise SystemExit(f"{name}: {files} files arrived, {expected} expected: the benchmark is void")
    return Run(seconds, files, size, peak, detail)


def movescu_study(config: PacsConfig, study_uid: str, *, destination_ae: str) -> None:
    """DCMTK ``movescu``: one study-level C-MOVE to ``destination_ae`` (what a script around DCMTK does)."""
    subprocess.run(
        [
            dcmtk_program("movescu"),
            "-q",
            "-S",
            "-aet",
            "MOVESCU",
            "-aec",
            config.called_ae,
            "-aem",
            destination_ae,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            config.host,
            str(config.port),
        ],
        env=NODELAY_ENV,
        check=True,
    )


def run_dcmtk(config: PacsConfig, studies: list[Study], port: int, out: Path) -> Run:
    """``storescp`` (bit-preserving, max PDU) receiving what ``movescu`` asks Orthanc to send, study by study."""
    out.mkdir(parents=True)
    receiver = psutil.Popen(
        [dcmtk_program("storescp"), "-q", "-aet", DCMTK_AE, "-pdu", "131072", "+B", "-od", str(out), str(port)],
        env=NODELAY_ENV,
    )
    try:
        _wait_for_port(port, receiver)
        with _peak_rss_sampler(receiver.pid) as peak:
            started = time.perf_counter()
            for study in studies:
                movescu_study(config, study.study_uid, destination_ae=DCMTK_AE)
            seconds = time.perf_counter() - started
    finally:
        receiver.terminate()
        receiver.wait(timeout=20)
    return _verified(
        "dcmtk movescu+storescp", out, pattern="*", studies=studies, seconds=seconds, peak=peak.peak_total, detail={}
    )


def _wait_for_port(port: int, process: psutil.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the receiver exited at start-up (code {process.returncode})")
        if any(conn.laddr.port == port for conn in psutil.net_connections("tcp") if conn.status == "LISTEN"):
            return
        time.sleep(0.05)
    raise SystemExit("the receiver did not listen in time")


def run_pacsflow(method: str, config: PacsConfig, studies: list[Study], port: int, out: Path) -> Run:
    """pacsflow in a child process (so its RSS is its own), C-MOVE into StoreReceiver or C-GET."""
    job = {
        "method": method,
        "config": asdict(config),
        "port": port,
        "out": str(out),
        "studies": [study.study_uid for study in studies],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "plugins"), str(REPO_ROOT)])}
    child = psutil.Popen(
        [sys.executable, "-m", "bench.bench_network", "--child", json.dumps(job)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    with _peak_rss_sampler(child.pid) as peak:
        stdout, _ = child.communicate()
    if child.returncode:
        raise SystemExit(f"pacsflow {method} failed (exit {child.returncode})")
    result = json.loads(stdout)
    return _verified(
        f"pacsflow {method}",
        out,
        pattern="*/*/*.dcm",
        studies=studies,
        seconds=result.pop("seconds"),
        peak=peak.peak_total,
        detail=result,
    )


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child: start the receiver (C-MOVE), then retrieve study by study, timing only the retrieval."""
    config = PacsConfig(**job["config"])
    layout = StorageLayout(Path(job["out"]))
    per_study: list[dict[str, Any]] = []
    with _receiver(job, layout) as receiver, PacsClient(config) as client:
        client.echo()  # associate before the clock starts, as movescu's association is cheap too
        started = time.perf_counter()
        for study_uid in job["studies"]:
            _reset_peak_rss()
            begun = time.perf_counter()
            keys = {"StudyInstanceUID": study_uid}
            report = (
                client.get("STUDY", keys, layout)
                if job["method"] == "c-get"
                else client.move("STUDY", keys, PACSFLOW_AE)
            )
            if receiver is not None:
                receiver.settle()  # the DCMTK backend's staged files into the layout (no-op for StoreReceiver)
            if report.completed != _stored_count(layout, study_uid):  # move() returns once all is in the layout
                raise SystemExit(f"{job['method']}: the PACS sent {report.completed}, the layout holds fewer")
            per_study.append(
                {
                    "seconds": round(time.perf_counter() - begun, 3),
                    "completed": report.completed,
                    "failed": report.failed,
                    "peak_rss_mb": round(_peak_rss() / 2**20, 1),
                }
            )
        seconds = time.perf_counter() - started
        stats = client.get_stats if receiver is None else receiver.stats
    if stats.rejected:
        raise SystemExit(f"the receiver refused {stats.rejected} instances: {stats.rejected_reasons}")
    return {"seconds": seconds, "per_study": per_study, "stored": stats.stored}


@contextmanager
def _receiver(job: dict[str, Any], layout: StorageLayout) -> Iterator[StoreReceiver | DcmtkStoreReceiver | None]:
    """The move destination of a C-MOVE job (None for C-GET, which stores on the client's association)."""
    if job["method"] == "c-get":
        yield None
        return
    config = ReceiverConfig(
        ae_title=PACSFLOW_AE,
        port=job["port"],
        allowed_calling_aes=(job["config"]["called_ae"],),
        backend="dcmtk" if job["method"] == "c-move-dcmtk" else "pynetdicom",
    )
    with open_receiver(config, layout) as receiver:
        yield receiver


def _stored_count(layout: StorageLayout, study_uid: str) -> int:
    study_dir = layout.root / study_uid
    return sum(len(layout.stored_sop_uids(study_uid, series.name)) for series in study_dir.iterdir())


def _reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark of this process (Linux >= 4.0), so each study has its own peak."""
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# -- orchestration ----------------------------------------------------------------------------------
def _median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda run: run.mb_per_s)[len(runs) // 2]


def _contenders(config: PacsConfig, studies: list[Study], ports: dict[str, int]) -> dict[str, Callable[[Path], Run]]:
    return {
        "dcmtk": lambda out: run_dcmtk(config, studies, ports[DCMTK_AE], out),
        "c-move": lambda out: run_pacsflow("c-move", config, studies, ports[PACSFLOW_AE], out),
        "c-get": lambda out: run_pacsflow("c-get", replace(config, retrieve_method="c-get"), studies, 0, out),
        "c-move-dcmtk": lambda out: run_pacsflow("c-move-dcmtk", config, studies, ports[PACSFLOW_AE], out),
    }


def compare_retrieval(
    config: PacsConfig, studies: list[Study], ports: dict[str, int], work: Path, rounds: int
) -> dict[str, list[Run]]:
    """Rounds of DCMTK and pacsflow's C-MOVE, C-GET and C-MOVE into the DCMTK backend, interleaved, each into a
    fresh directory."""
    contenders = _contenders(config, studies, ports)
    runs: dict[str, list[Run]] = {name: [] for name in contenders}
    for round_number in range(rounds):
        for name, contender in contenders.items():
            out = work / f"{name}-{round_number}"
            os.sync()  # no contender pays for the write-back of the one before
            run = contender(out)
            shutil.rmtree(out)
            runs[name].append(run)
            print(
                f"  round {round_number + 1} {name:<7} {run.mb_per_s:7.1f} MB/s {run.instances_per_s:7.1f} inst/s "
                f"peak RSS {run.peak_rss / 2**20:6.1f} MB",
                flush=True,
            )
    return runs


def measure_large_object(config: PacsConfig, ports: dict[str, int], work: Path) -> dict[str, Run]:
    """Each contender once on the study of one 210 MB instance: peak RSS must stay that of small instances."""
    runs = {}
    for name, contender in _contenders(config, [large_object_study()], ports).items():
        os.sync()
        runs[name] = contender(work / f"large-{name}")
        shutil.rmtree(work / f"large-{name}")
        print(
            f"  large object {name:<12} {runs[name].mb_per_s:7.1f} MB/s peak RSS {runs[name].peak_rss / 2**20:6.1f} MB",
            flush=True,
        )
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accessions", type=int, default=1000, help="ANs resolved by each contender")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved retrieval rounds (median)")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pacsflow-bench-net",
        help="cache of generated files and of Orthanc's storage (reused between runs)",
    )
    parser.add_argument("--no-record", action="store_true", help="do not write bench/results.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    for tool in ("findscu", "movescu", "storescp"):
        dcmtk_program(tool)  # DCMTK's by absolute path (a venv's pynetdicom shadows storescp), or a clear error
    big, small = ensure_data(args.data / f"data-v{DATA_VERSION}", args.accessions)
    studies = retrieval_studies()
    ports = {PACSFLOW_AE: free_port(), DCMTK_AE: free_port()}
    destinations = {ae: ("127.0.0.1", port) for ae, port in ports.items()}
    with (
        orthanc(args.data / f"orthanc-v{DATA_VERSION}", move_destinations=destinations) as pacs,
        tempfile.TemporaryDirectory(prefix="pacsflow-bench-net-", dir=args.data) as temp,
    ):
        ensure_loaded(pacs, big + small)
        config = replace(pacs.config, calling_ae="PACSFLOW")
        resolved = _resolution(config, args.accessions)
        retrieval = compare_retrieval(config, studies, ports, Path(temp), args.repeat)
        large = measure_large_object(config, ports, Path(temp))
    entries = _entries(resolved, retrieval, large, args)
    if not args.no_record:
        for name, entry in entries.items():
            record(name, **entry)
    _print_table(entries)
    return 0


def _resolution(config: PacsConfig, count: int) -> dict[str, float]:
    ans = [accession(number) for number in range(count)]
    expected = {an: _study_uid(2, number) for number, an in enumerate(ans)}
    pacsflow, wrong = resolve_pacsflow(config, ans, expected)
    findscu = resolve_findscu(config, ans, expected)
    print(f"  resolve_an: pacsflow {pacsflow:.0f} AN/s, findscu per AN {findscu:.0f} AN/s", flush=True)
    if wrong:
        # Recorded, not fatal. pynetdicom 3.0.4 can hand a C-FIND's pending match to its idle reactor thread
        # (pynetdicom#875); pacsflow puts such a message back (core/dicom/transport.py), so a miss is a regression.
        print(f"  WARNING: pacsflow missed {len(wrong)} of {count} ANs: {wrong[:3]}", flush=True)
    return {"pacsflow": pacsflow, "findscu": findscu, "missed": len(wrong)}


def _entries(
    resolved: dict[str, float], retrieval: dict[str, list[Run]], large: dict[str, Run], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    dcmtk = _median_run(retrieval["dcmtk"])
    common = {
        "cores": os.cpu_count(),
        "instances": dcmtk.files,
        "megabytes": round(dcmtk.bytes / 1e6, 1),
        "rounds": args.repeat,
        "reference_tool": "DCMTK movescu + storescp (+B, -pdu 131072), TCP_NODELAY=1",
        "reference_instances_per_s": round(dcmtk.instances_per_s, 1),
        "reference_peak_rss_mb": round(dcmtk.peak_rss / 2**20, 1),
        "target_ratio": 0.6,
    }
    entries = {
        "resolve_an": {
            "unit": "AN/s",
            "pacsflow": round(resolved["pacsflow"], 1),
            "reference": round(resolved["findscu"], 1),
            "accessions": args.accessions,
            "reference_tool": "findscu once per AN, TCP_NODELAY=1",
            "pacsflow_missed_accessions": resolved["missed"],
            "target_an_per_s": 200,
            "target_ratio": 6,
        }
    }
    for name, method in (
        ("retrieve_cmove", "c-move"),
        ("retrieve_cget", "c-get"),
        ("retrieve_cmove_dcmtk", "c-move-dcmtk"),
    ):
        run = _median_run(retrieval[method])
        entries[name] = {
            "unit": "MB/s",
            "pacsflow": round(run.mb_per_s, 1),
            "reference": round(dcmtk.mb_per_s, 1),
            "instances_per_s": round(run.instances_per_s, 1),
            "peak_rss_mb": round(run.peak_rss / 2**20, 1),
            "peak_rss_mb_per_study": {
                f"{study['completed']} instances": study["peak_rss_mb"] for study in run.detail["per_study"]
            },
            "peak_rss_mb_one_large_instance": round(large[method].peak_rss / 2**20, 1),
            "reference_peak_rss_mb_one_large_instance": round(large["dcmtk"].peak_rss / 2**20, 1),
            "large_instance_mb": round(large[method].bytes / 1e6, 1),
            "all_rounds_mb_per_s": [round(r.mb_per_s, 1) for r in retrieval[method]],
            "reference_all_rounds_mb_per_s": [round(r.mb_per_s, 1) for r in retrieval["dcmtk"]],
            **common,
        }
    return entries


def _print_table(entries: dict[str, dict[str, Any]]) -> None:
    print(
        f"\n{'name':<22}{'unit':<7}{'pacsflow':>10}{'reference':>11}{'ratio':>7}{'inst/s':>9}{'ref inst/s':>11}"
        f"{'peak RSS MB':>13}{'ref RSS MB':>12}"
    )
    for name, entry in entries.items():
        ratio = entry["pacsflow"] / entry["reference"]
        print(
            f"{name:<22}{entry['unit']:<7}{entry['pacsflow']:>10}{entry['reference']:>11}{ratio:>7.2f}"
            f"{entry.get('instances_per_s', ''):>9}{entry.get('reference_instances_per_s', ''):>11}"
            f"{entry.get('peak_rss_mb', ''):>13}{entry.get('reference_peak_rss_mb', ''):>12}"
        )


if __name__ == "__main__":
    sys.exit(main())
