"""Benchmark of the de-identified release (entry ``release_deid`` in ``bench/results.json``).

Compares the release stage's file work (``pacsflow.core.release.runner.release_files``: read, hold-back
check, keyed PS3.15 profile, atomic write; worker processes) with the naive loop of the chosen library over
the same files (one process: ``dcmread``, dicognito ``Anonymizer.anonymize``, ``save_as``), on the synthetic CT
files of ``bench_export`` (265 elements with sequences, private groups and Latin-1 names). Then the peak RSS
of the release at growing file counts (``--memory-scan``).

    PYTHONPATH=plugins python -m bench.bench_release                       # 1,000 files + memory at 2k, 10k
    PYTHONPATH=plugins python -m bench.bench_release --files 2000 --memory-scan 10000 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pydicom
from dicognito.anonymizer import Anonymizer
from pacsflow.core.release.runner import FileOutcome, ReleaseJob, release_files
from pacsflow.core.release.settings import ReleaseSettings

from bench.bench_export import PeakRss, ensure_cohort, timed
from bench.results import record

SECRET = b"bench-release-secret-0123456789ab"
TARGET_RATIO = 2


def naive_release(paths: list[Path], out: Path) -> int:
    """The reference: the chosen library's own loop in one process, nothing else."""
    out.mkdir(parents=True, exist_ok=True)
    anonymizer = Anonymizer(seed="bench")
    for path in paths:
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        ds.save_as(out / path.name, enforce_file_format=True)
    return len(paths)


def pacsflow_release(paths: list[Path], out: Path, workers: int | None) -> int:
    job = ReleaseJob(ReleaseSettings(), SECRET, out)
    results = list(release_files(paths, job, workers=workers))
    failed = [r for r in results if r.outcome is not FileOutcome.RELEASED]
    if failed:
        raise RuntimeError(f"{len(failed)} files not released: {failed[:3]}")
    return len(results)


def compare_rates(paths: list[Path], work: Path, workers: int | None, repeat: int) -> dict[str, float]:
    """Median rate of each contender over ``repeat`` interleaved rounds, each into a fresh directory."""
    for path in paths:
        path.read_bytes()  # warm page cache for both
    rates: dict[str, list[float]] = {"naive": [], "pacsflow": []}
    for round_ in range(repeat):
        for name, round_rates in rates.items():
            out = work / f"{name}-{round_}"
            run = (
                partial(naive_release, paths, out)
                if name == "naive"
                else partial(pacsflow_release, paths, out, workers)
            )
            seconds, _ = timed(run)
            round_rates.append(len(paths) / seconds)
            shutil.rmtree(out, ignore_errors=True)
    return {name: statistics.median(values) for name, values in rates.items()}


_RELEASE_IN_CHILD = """
import sys
from pathlib import Path
from pacsflow.core.release.runner import FileOutcome, ReleaseJob, release_files
from pacsflow.core.release.settings import ReleaseSettings
root, count, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
files = (root / f"{index:07d}.dcm" for index in range(count))  # streamed, never a list
job = ReleaseJob(ReleaseSettings(), sys.argv[4].encode(), out)
released = sum(r.outcome is FileOutcome.RELEASED for r in release_files(files, job))
assert released == count, released
"""


def release_peak_rss(cohort: Path, count: int, work: Path) -> tuple[float, int, int]:
    out = work / f"memory-{count}"
    started = time.perf_counter()
    child = psutil.Popen(
        [sys.executable, "-c", _RELEASE_IN_CHILD, str(cohort), str(count), str(out), SECRET.decode()],
        env=os.environ.copy(),
    )
    with PeakRss(child.pid) as peak:
        returncode = child.wait()
    seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    if returncode:
        raise RuntimeError(f"release of {count} files failed (exit {returncode})")
    return seconds, peak.peak_parent, peak.peak_total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000, help="files for the rate comparison")
    parser.add_argument("--pixels", type=int, default=64, help="rows = columns of the synthetic images")
    parser.add_argument("--workers", type=int, default=None, help="release worker processes (default: cores)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the rate comparison (median)")
    parser.add_argument(
        "--memory-scan",
        nargs="+",
        type=int,
        default=[2_000, 10_000],
        metavar="N",
        help="file counts of the peak-RSS scan (default: 2000 10000)",
    )
    parser.add_argument("--no-memory-scan", action="store_true", help="only the rate comparison")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pacsflow-bench-ct",
        help="cache of generated files (shared with bench_export)",
    )
    parser.add_argument("--no-record", action="store_true", help="do not write bench/results.json")
    args = parser.parse_args(argv)
    cohort = args.data / f"ct-{args.pixels}px"
    with tempfile.TemporaryDirectory(prefix="pacsflow-bench-release-") as temp:
        entry = _rate(cohort, args, Path(temp))
        if not args.no_memory_scan:
            entry |= _memory_scan(cohort, args, Path(temp))
    if not args.no_record:
        record("release_deid", "files/s", **entry)
    return 0


def _rate(cohort: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    paths = ensure_cohort(cohort, args.files, args.pixels)
    load_before = os.getloadavg()[0]
    rates = compare_rates(paths, work, args.workers, args.repeat)
    ratio = rates["pacsflow"] / rates["naive"]
    print(
        f"release_deid: {args.files} CT files, {paths[0].stat().st_size} bytes, {os.cpu_count()} cores, "
        f"median of {args.repeat}, load average {load_before:.2f}"
    )
    print(f"  {'naive dicognito loop (1 process)':<40} {rates['naive']:>8.0f} files/s")
    print(f"  {'pacsflow release_files':<40} {rates['pacsflow']:>8.0f} files/s   {ratio:.2f}x (target {TARGET_RATIO}x)")
    return {
        "pacsflow": round(rates["pacsflow"], 1),
        "reference": round(rates["naive"], 1),
        "target_ratio": TARGET_RATIO,
        "files": args.files,
        "file_bytes": paths[0].stat().st_size,
        "cores": os.cpu_count(),
        "repeat": args.repeat,
        "load_average_before": round(load_before, 2),
    }


def _memory_scan(cohort: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    counts = sorted(args.memory_scan)
    ensure_cohort(cohort, counts[-1], args.pixels)
    print(f"release peak memory ({os.cpu_count()} cores, {args.pixels}x{args.pixels} CT files)")
    print(f"  {'files':>10} {'files/s':>9} {'parent RSS MB':>14} {'parent+workers RSS MB':>22}")
    parent_mb, total_mb = {}, {}
    for count in counts:
        seconds, parent, total = release_peak_rss(cohort, count, work)
        parent_mb[str(count)], total_mb[str(count)] = round(parent / 2**20, 1), round(total / 2**20, 1)
        print(f"  {count:>10} {count / seconds:>9.0f} {parent_mb[str(count)]:>14.1f} {total_mb[str(count)]:>22.1f}")
    return {
        "peak_rss_mb_parent": parent_mb,
        "peak_rss_mb_with_workers": total_mb,
        "peak_rss_growth": round(total_mb[str(counts[-1])] / total_mb[str(counts[0])], 3),
    }


if __name__ == "__main__":
    sys.exit(main())
