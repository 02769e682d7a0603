"""Retrieving many small series: pacsflow's retrieval stage against DCMTK ``movescu`` per study (issue #10).

Entry ``retrieve_small_series`` in ``bench/results.json``, unit studies/s: a cohort of 300 studies of 3 series of
6 small CT instances each (16x16 pixels, so the per-series work dominates, not the bytes), in one Orthanc.

- pacsflow: the retrieval tasks of a run (``pipeline.retrieve_batch`` per batch of 50 studies, as the DAG maps
  them): series listing, C-MOVEs (one for the kept series of a study, then per series for what is missing;
  C-GETs with ``--retrieve-method c-get``), verification of each series (the listing's instance count for a
  series moved with its study, else an image-level C-FIND). ``--tasks`` of them run at once, each a process of
  its own as Airflow runs them, into one shared receiver (``receiver_mode: shared``): 4 by default, the ``pacs``
  pool of the README's settings. With more than one, a single task into the embedded receiver is measured too
  (``one_task``). The cohort and its resolution are stored before the clock starts.
- reference: DCMTK ``movescu`` once per study (STUDY level) into one ``storescp`` (``+B``, ``-pdu 131072``).

``ratio`` = pacsflow's studies/s over DCMTK's (target >= 0.8: per-series verification must not dominate). Both
must end with every instance on disk, or the benchmark is void. Orthanc and the DCMTK tools run with
``TCP_NODELAY=1``. Generated files and Orthanc's storage are cached under ``$TMPDIR/pacsflow-bench-small``.

    PYTHONPATH=plugins:. python -m bench.bench_small_series
    PYTHONPATH=plugins:. python -m bench.bench_small_series --studies 10 --repeat 1 --no-record
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import Any

import psutil
from pacsflow.core.audit import AuditStore, SeriesStatus
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig, ReceiverBackend, ReceiverConfig, ReceiverMode
from pacsflow.core.dicom.dcmtk import dcmtk_program
from pacsflow.core.dicom.receiver import receiver_for
from pacsflow.core.dicom.sharing import receiver_running
from pacsflow.core.pipeline import RunContext, extract_cohort, resolve_cohort, retrieve_batch
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.resolve import ResolutionSettings, Rule
from pacsflow.core.ris import RisExam
from pacsflow.core.series_rules import SeriesRules
from pacsflow.core.storage import StorageLayout
from pacsflow.demo.sandbox import SandboxPacs, free_port, orthanc

from bench.bench_network import (
    NODELAY_ENV,
    _orthanc_instances,
    _tree_size,
    _wait_for_port,
    _write_ct,
    movescu_study,
)
from bench.results import record

UID_ROOT = "1.2.826.0.1.3680043.8.498.79."
DATA_VERSION = "1"  # bump when the generated data changes: the cached Orthanc is rebuilt
SERIES_PER_STUDY, INSTANCES_PER_SERIES = 3, 6
PIXELS = 16
BATCH_SIZE = 50  # the DAG's default retrieval batch
PACSFLOW_AE, DCMTK_AE = "PACSFLOWRCV", "DCMTKRCV"
TARGET_RATIO = 0.8


def study_uid(study: int) -> str:
    return f"{UID_ROOT}{study}"


def accession(study: int) -> str:
    return f"SS{study:07d}"


def ensure_data(root: Path, studies: int) -> list[Path]:
    """The files of the first ``studies`` studies, generated once."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for study in range(studies):
        for series in range(1, SERIES_PER_STUDY + 1):
            for instance in range(INSTANCES_PER_SERIES):
                index = (study * SERIES_PER_STUDY + series - 1) * INSTANCES_PER_SERIES + instance
                name = f"{index:07d}.dcm"
                jobs.append((index, study_uid(study), f"{study_uid(study)}.{series}", accession(study), name))
    missing = [job for job in jobs if not (root / job[-1]).exists()]
    if missing:
        chunks = [missing[start : start + 200] for start in range(0, len(missing), 200)]
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_ct, repeat(str(root)), chunks, repeat(PIXELS)))
    return [root / job[-1] for job in jobs]


def ensure_loaded(pacs: SandboxPacs, files: list[Path]) -> None:
    if _orthanc_instances(pacs) < len(files):
        started = time.perf_counter()
        stored = pacs.load(files)
        print(f"  loaded {stored} instances into Orthanc in {time.perf_counter() - started:.0f} s", flush=True)
    if _orthanc_instances(pacs) < len(files):
        raise SystemExit("Orthanc does not hold every generated instance")


# -- contenders ---------------------------------------------------------------------------------------
def run_pacsflow(
    config: PacsConfig, studies: int, port: int, out: Path, backend: ReceiverBackend, *, tasks: int
) -> float:
    """Seconds for the retrieval tasks of a run over the cohort (resolved before the clock starts): ``tasks`` at
    once, each a process of its own as Airflow runs them, sharing one receiver (``receiver_mode: shared``, the
    default); a single task uses the embedded receiver."""
    layout = StorageLayout(out / "dicom")
    audit_url = f"sqlite:///{out / 'audit.sqlite'}"
    mode: ReceiverMode = "embedded" if tasks == 1 else "shared"
    receiver = ReceiverConfig(ae_title=PACSFLOW_AE, port=port, backend=backend, mode=mode)
    with AuditStore.connect(audit_url) as store:
        ctx = _context(store)
        extract_cohort(ctx, lambda: [RisExam(accession_number=accession(s)) for s in range(studies)], BATCH_SIZE)
        batches = resolve_cohort(
            ctx, partial(PacsClient, config), ResolutionSettings(rules=(Rule.ACCESSION_NUMBER,)), BATCH_SIZE
        )
    task = partial(_retrieval_task, config, receiver, layout, audit_url)
    started = time.perf_counter()
    if tasks == 1:
        for batch in batches:
            task(batch)
    else:
        with ProcessPoolExecutor(max_workers=tasks, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(task, batches))
    seconds = time.perf_counter() - started
    _await_receiver_stop(layout.root)
    with AuditStore.connect(audit_url) as store:
        series = store.series_rows(_context(store).run_key, kept=True)
    incomplete = sum(row["status"] != SeriesStatus.COMPLETE for row in series)
    if len(series) != studies * SERIES_PER_STUDY or incomplete:
        raise SystemExit(f"pacsflow: {len(series)} series listed, {incomplete} not complete: the benchmark is void")
    _verify("pacsflow", layout.root, "*/*/*.dcm", studies)
    return seconds


def _await_receiver_stop(root: Path, seconds: float = 60.0) -> None:
    """The shared receiver stops by itself once no task holds a lease; wait for it before the round's files go."""
    deadline = time.monotonic() + seconds
    while receiver_running(root):
        if time.monotonic() > deadline:
            raise SystemExit("the shared receiver did not stop after the last task")
        time.sleep(0.1)


def _context(store: AuditStore) -> RunContext:
    return RunContext(store, "bench/small-series", Pseudonymizer(b"bench-small-series-key"))


def _retrieval_task(
    config: PacsConfig, receiver: ReceiverConfig, layout: StorageLayout, audit_url: str, batch: int
) -> None:
    """What one mapped ``retrieve_batch`` task does, with its own audit connection."""
    with AuditStore.connect(audit_url) as store:
        retrieve_batch(
            _context(store),
            batch,
            partial(PacsClient, config),
            rules=SeriesRules.parse({}),  # keep every series
            layout=layout,
            destination_ae=PACSFLOW_AE,
            receiver=receiver_for(receiver, layout),
        )


def run_dcmtk(config: PacsConfig, studies: int, port: int, out: Path) -> float:
    """Seconds for ``movescu`` once per study into one ``storescp``."""
    out.mkdir(parents=True)
    receiver = psutil.Popen(
        [dcmtk_program("storescp"), "-q", "-aet", DCMTK_AE, "-pdu", "131072", "+B", "-od", str(out), str(port)],
        env=NODELAY_ENV,
    )
    try:
        _wait_for_port(port, receiver)
        started = time.perf_counter()
        for study in range(studies):
            movescu_study(config, study_uid(study), destination_ae=DCMTK_AE)
        seconds = time.perf_counter() - started
    finally:
        receiver.terminate()
        receiver.wait(timeout=20)
    _verify("dcmtk", out, "*", studies)
    return seconds


def _verify(name: str, root: Path, pattern: str, studies: int) -> None:
    files, _ = _tree_size(root, pattern)
    expected = studies * SERIES_PER_STUDY * INSTANCES_PER_SERIES
    if files != expected:
        raise SystemExit(f"{name}: {files} instances on disk, {expected} expected: the benchmark is void")


# -- orchestration ----------------------------------------------------------------------------------
def compare(
    contenders: dict[str, Callable[[Path], float]], studies: int, work: Path, *, rounds: int
) -> dict[str, list[float]]:
    """Interleaved rounds of the contenders, each into a fresh directory; studies/s per round.

    Every round's files stay until the last round is done: on ext4 without a journal (this machine's root file
    system), the inode allocator skips, one by one, every inode freed in the last minute, so a round that
    followed the deletion of the one before paid for it in kernel time (``recently_deleted``, seen with perf)."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for number in range(rounds):
        for name, run in contenders.items():
            out = work / f"{name}-{number}"
            out.mkdir()
            os.sync()  # no contender pays for the write-back of the one before
            seconds = run(out)
            rates[name].append(studies / seconds)
            print(f"  round {number + 1} {name:<18} {studies / seconds:8.1f} studies/s ({seconds:.1f} s)", flush=True)
    return rates


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=300, help="studies in the cohort (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (median; default: %(default)s)")
    parser.add_argument(
        "--backend",
        choices=("pynetdicom", "dcmtk"),
        default="dcmtk",
        help="pacsflow's receiver backend (default: %(default)s, the compose deployment's and the README's choice "
        "for many small series)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pacsflow-bench-small",
        help="cache of generated files and of Orthanc's storage (reused between runs)",
    )
    parser.add_argument(
        "--retrieve-method",
        choices=("c-move", "c-get"),
        default="c-move",
        help="pacsflow's retrieve method (c-get: the PACS stores back on pacsflow's own association)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=4,
        help="retrieval tasks at once, as the pacs pool of the README's settings allows (default: %(default)s); "
        "with more than one, a single task is measured too",
    )
    parser.add_argument("--no-record", action="store_true", help="do not write bench/results.json")
    args = parser.parse_args(argv)
    for tool in ("storescp", "movescu"):
        dcmtk_program(tool)  # DCMTK's by absolute path (a venv's pynetdicom shadows storescp), or a clear error
    files = ensure_data(args.data / f"data-v{DATA_VERSION}", args.studies)
    ports = {PACSFLOW_AE: free_port(), DCMTK_AE: free_port()}
    destinations = {ae: ("127.0.0.1", port) for ae, port in ports.items()}
    with (
        orthanc(args.data / f"orthanc-v{DATA_VERSION}", move_destinations=destinations) as pacs,
        tempfile.TemporaryDirectory(prefix="pacsflow-bench-small-", dir=args.data) as temp,
    ):
        ensure_loaded(pacs, files)
        config = replace(pacs.config, calling_ae="PACSFLOW", retrieve_method=args.retrieve_method)
        pacsflow = partial(run_pacsflow, config, args.studies, ports[PACSFLOW_AE], backend=args.backend)
        contenders = {"pacsflow": lambda out: pacsflow(out, tasks=args.tasks)}
        if args.tasks > 1:
            contenders["pacsflow_one_task"] = lambda out: pacsflow(out, tasks=1)
        contenders["dcmtk"] = lambda out: run_dcmtk(config, args.studies, ports[DCMTK_AE], out / "received")
        rates = compare(contenders, args.studies, Path(temp), rounds=args.repeat)
    entry = _entry(rates, args)
    if not args.no_record:
        record("retrieve_small_series", **entry)
    print(
        f"\nretrieve_small_series: pacsflow {entry['pacsflow']} studies/s, DCMTK {entry['reference']} studies/s, "
        f"ratio {entry['pacsflow'] / entry['reference']:.2f} (target >= {TARGET_RATIO})"
    )
    return 0


def _one_task(rates: dict[str, list[float]]) -> dict[str, Any]:
    if "pacsflow_one_task" not in rates:
        return {}
    return {
        "one_task": round(_median(rates["pacsflow_one_task"]), 1),
        "one_task_all_rounds": [round(rate, 1) for rate in rates["pacsflow_one_task"]],
    }


def _entry(rates: dict[str, list[float]], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "unit": "studies/s",
        "pacsflow": round(_median(rates["pacsflow"]), 1),
        "reference": round(_median(rates["dcmtk"]), 1),
        "studies": args.studies,
        "series_per_study": SERIES_PER_STUDY,
        "instances_per_series": INSTANCES_PER_SERIES,
        "pixels": PIXELS,
        "batch_size": BATCH_SIZE,
        "tasks": args.tasks,
        "receiver_backend": args.backend,
        "retrieve_method": args.retrieve_method,
        "rounds": args.repeat,
        "all_rounds": [round(rate, 1) for rate in rates["pacsflow"]],
        **_one_task(rates),
        "reference_all_rounds": [round(rate, 1) for rate in rates["dcmtk"]],
        "reference_tool": "DCMTK movescu per study + storescp (+B, -pdu 131072), TCP_NODELAY=1",
        "cores": os.cpu_count(),
        "target_ratio": TARGET_RATIO,
    }


if __name__ == "__main__":
    sys.exit(main())
