"""Scale: a 10,000-AN demo hospital through the distributed deployment vs the library in one process.

*pacsflow*: the deployment of docker-compose.yaml run natively (``tests/dags/celery_deployment.py``: PostgreSQL
metadata and audit databases, Redis, api-server, scheduler, dag-processor, triggerer, two Celery workers,
the standalone receiver service, ``pacs`` pool of 4), one triggered DAG run, timed from the trigger to the
run's end. *reference*: ``pacsflow.core.pipeline.run_extraction`` in one process, with one receiver of the
same backend open for the whole run, timed from the RIS query to the settled audit. Same Orthanc, same
hospital, fresh data roots; both must match the ground truth exactly. Unit: studies/hour (higher is better),
target ratio >= 0.8. The RSS of every process of every service is sampled during the run; each size of
``--sizes`` is measured, the entry's rate is that of the largest, and ``peak_rss_growth`` compares the
largest size with the smallest (target <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import yaml
from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig
from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.pipeline import ExtractionSettings, RunContext, run_extraction
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.ris import load_template, query_cohort
from pacsflow.core.settings import ExtractionDefinition
from pacsflow.core.storage import StorageLayout
from pacsflow.demo.environment import DEMO_DAG_ID, DEMO_DEFINITION, REPO_ROOT, connection_environment
from pacsflow.demo.hospital import Hospital, build_hospital, expected_instances, expected_outcomes, load_ground_truth
from pacsflow.demo.sandbox import free_port, orthanc
from sqlalchemy import create_engine

from bench.results import record
from tests.dags.celery_deployment import celery_deployment, postgres_database, postgres_server, redis_server

DAG_ID = DEMO_DAG_ID
MB = 1024 * 1024
SAMPLE_SECONDS = 0.5


def definition(batch_size: int) -> ExtractionDefinition:
    """The demo definition with the benchmark's batch size (the library and the DAG use the same)."""
    body = yaml.safe_load(DEMO_DEFINITION.read_text())
    body["retrieval"]["batch_size"] = batch_size
    return ExtractionDefinition.model_validate(body)


def definitions_dir(demo: ExtractionDefinition, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_DEFINITION.name).write_text(yaml.safe_dump(demo.model_dump(mode="json")))
    return folder


# -- memory ------------------------------------------------------------------------------------------------------
class RssSampler:
    """Peak RSS per named process tree (the process and all its descendants: Celery's pool, task runners,
    storescp children), sampled every ``SAMPLE_SECONDS`` in a thread: both the peak of the tree's sum and the
    peak of its largest single process."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.peak_tree: dict[str, int] = dict.fromkeys(roots, 0)
        self.peak_process: dict[str, int] = dict.fromkeys(roots, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.roots.items():
                sizes = _tree_rss(pid)
                if sizes:
                    self.peak_tree[name] = max(self.peak_tree[name], sum(sizes))
                    self.peak_process[name] = max(self.peak_process[name], *sizes)
            self._stop.wait(SAMPLE_SECONDS)

    def report(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "tree_mb": round(self.peak_tree[name] / MB, 1),
                "largest_process_mb": round(self.peak_process[name] / MB, 1),
            }
            for name in self.roots
        }


def _tree_rss(pid: int) -> list[int]:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    sizes = []
    for process in processes:
        try:
            sizes.append(process.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return sizes


# -- the ground truth --------------------------------------------------------------------------------------------
def check_against_truth(truth: dict, data_root: Path, audit_url: str, run_key: str) -> int:
    """The number of studies on disk, once everything matches the ground truth exactly."""
    files = list((data_root / "dicom").glob("*/*/*.dcm"))
    on_disk = {(p.parent.parent.name, p.parent.name, p.stem) for p in files}
    if on_disk != expected_instances(truth) or len(files) != len({p.stem for p in files}):
        raise SystemExit(f"{run_key}: the instances on disk differ from the ground truth")
    with AuditStore.connect(audit_url) as store:
        outcomes = {an: row["outcome"] for an, row in store.accession_outcomes(run_key).items()}
        reconciled = store.summary(run_key).reconciled
    if outcomes != expected_outcomes(truth) or not reconciled:
        raise SystemExit(f"{run_key}: the audit does not match the ground truth")
    return len({study for study, _, _ in on_disk})


# -- reference: the library in one process --------------------------------------------------------------------------
def _library_run(
    hospital: Hospital,
    pacs: PacsConfig,
    receiver: ReceiverConfig,
    demo: ExtractionDefinition,
    *,
    data_root: Path,
    audit_url: str,
    elapsed: Any,
) -> None:
    started = time.perf_counter()
    layout = StorageLayout(data_root / "dicom")
    settings = ExtractionSettings(
        resolution=demo.resolution,
        rules=demo.series_rules,
        layout=layout,
        destination_ae=receiver.ae_title,
        batch_size=demo.retrieval.batch_size,
        metadata_dir=data_root / "metadata",
    )
    ris = create_engine(hospital.ris_url)
    sql = load_template(demo.cohort.sql_template, REPO_ROOT / "include" / "sql")
    start, end = (value.replace(tzinfo=None) for value in hospital.interval)
    exams = query_cohort(ris, sql, interval_start=start, interval_end=end, params=demo.cohort.params)
    with open_receiver(receiver, layout), AuditStore.connect(audit_url) as store:
        ctx = RunContext(
            store=store,
            run_key="bench/library",
            pseudonymizer=Pseudonymizer.from_environment(data_root / ".pacsflow-key"),
        )
        run_extraction(ctx, exams, partial(PacsClient, pacs), settings)
    ris.dispose()
    elapsed.value = time.perf_counter() - started


def run_library(
    hospital: Hospital,
    pacs: PacsConfig,
    receiver: ReceiverConfig,
    demo: ExtractionDefinition,
    *,
    work: Path,
    truth: dict,
) -> dict[str, Any]:
    data_root = work / "library"
    data_root.mkdir(parents=True)
    audit_url = f"sqlite:///{data_root / 'audit.sqlite'}"
    context = multiprocessing.get_context("spawn")
    elapsed = context.Value("d", 0.0)
    process = context.Process(
        target=_library_run,
        args=(hospital, pacs, replace(receiver, mode="embedded"), demo),
        kwargs={"data_root": data_root, "audit_url": audit_url, "elapsed": elapsed},
    )
    load_before = os.getloadavg()[0]
    process.start()
    with RssSampler({"library": process.pid}) as sampler:
        process.join()
    if process.exitcode != 0:
        raise SystemExit(f"the library run failed (exit code {process.exitcode})")
    studies = check_against_truth(truth, data_root, audit_url, "bench/library")
    shutil.rmtree(data_root, ignore_errors=True)
    return {
        "seconds": round(elapsed.value, 1),
        "studies": studies,
        "studies_per_hour": round(studies / elapsed.value * 3600),
        "peak_rss": sampler.report(),
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }


# -- pacsflow: the distributed deployment --------------------------------------------------------------------------
def run_deployment(
    hospital: Hospital,
    pacs: PacsConfig,
    receiver: ReceiverConfig,
    demo: ExtractionDefinition,
    *,
    work: Path,
    truth: dict,
    server_url: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    suffix = secrets.token_hex(4)
    data_root = work / "deployment"
    with (
        postgres_database(server_url, f"airflow_{suffix}") as metadata_url,
        postgres_database(server_url, f"audit_{suffix}") as audit_url,
        redis_server(work / "redis") as broker_url,
    ):
        connections = {
            **connection_environment(ris_url=hospital.ris_url, audit_url=audit_url, pacs=pacs, receiver=receiver),
            "PACSFLOW_EXTRACTIONS_DIR": str(definitions_dir(demo, work / "extractions")),
        }
        with celery_deployment(
            work / "airflow",
            metadata_url=metadata_url,
            broker_url=broker_url,
            data_root=data_root,
            receiver=receiver,
            pacs_pool_slots=args.pool,
            workers=args.workers,
            worker_concurrency=args.worker_concurrency,
            extra_env=connections,
        ) as airflow:
            airflow.wait_for_dag(DAG_ID)
            airflow.unpause(DAG_ID)
            roots = {svc.name: svc.process.pid for svc in airflow.services}
            load_before = os.getloadavg()[0]
            with RssSampler(roots) as sampler:
                started = time.perf_counter()
                run_id = airflow.trigger(DAG_ID, data_interval=hospital.interval)
                state = airflow.wait_for_run(DAG_ID, run_id, args.timeout)
                elapsed = time.perf_counter() - started
            if state != "success":
                raise SystemExit(f"the DAG run ended {state}:\n{airflow.logs()}")
            tasks = len(airflow.task_instances(DAG_ID, run_id))
            load = [load_before, os.getloadavg()[0]]
        studies = check_against_truth(truth, data_root, audit_url, f"{DAG_ID}/{run_id}")
    shutil.rmtree(data_root, ignore_errors=True)
    return {
        "seconds": round(elapsed, 1),
        "studies": studies,
        "studies_per_hour": round(studies / elapsed * 3600),
        "task_instances": tasks,
        "peak_rss": sampler.report(),
        "load_average_1min": load,
    }


# -- one size -----------------------------------------------------------------------------------------------------
@contextmanager
def loaded_pacs(hospital: Hospital, receiver: ReceiverConfig, work: Path) -> Iterator[PacsConfig]:
    with orthanc(work / "orthanc", move_destinations={receiver.ae_title: (receiver.host, receiver.port)}) as pacs:
        started = time.perf_counter()
        files = sorted(hospital.dicom_dir.rglob("*.dcm"))
        loaded = pacs.load(files)
        if loaded != len(files):
            raise SystemExit(f"Orthanc stored {loaded} of {len(files)} instances")
        print(f"  Orthanc loaded with {loaded} instances in {time.perf_counter() - started:.0f} s", flush=True)
        shutil.rmtree(hospital.dicom_dir)
        yield replace(pacs.config, calling_ae="PACSFLOW")


def measure(accessions: int, work: Path, server_url: str, args: argparse.Namespace) -> dict[str, Any]:
    work.mkdir(parents=True)
    started = time.perf_counter()
    hospital = build_hospital(work / "hospital", accessions=accessions, seed=args.seed)
    truth = load_ground_truth(hospital.ground_truth_path)
    instances = len(expected_instances(truth))
    print(
        f"  hospital: {hospital.files_written} instances in the PACS, {instances} to retrieve "
        f"(built in {time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    if accessions >= 10_000 and hospital.files_written < 60_000:
        raise SystemExit(f"a 10,000-AN hospital must hold >= 60,000 instances, not {hospital.files_written}")
    receiver = ReceiverConfig(
        ae_title="PACSFLOW", port=free_port(), allowed_calling_aes=("ORTHANC",), mode="service", backend=args.backend
    )
    demo = definition(args.batch_size)
    with loaded_pacs(hospital, receiver, work) as pacs:
        library = run_library(hospital, pacs, receiver, demo, work=work, truth=truth)
        print(f"  library     {library['seconds']:8.1f} s  {library['studies_per_hour']:8d} studies/h", flush=True)
        deployment = run_deployment(
            hospital, pacs, receiver, demo, work=work, truth=truth, server_url=server_url, args=args
        )
        print(
            f"  deployment  {deployment['seconds']:8.1f} s  {deployment['studies_per_hour']:8d} studies/h", flush=True
        )
    return {
        "accessions": accessions,
        "pacs_instances": hospital.files_written,
        "retrieved_instances": instances,
        "library": library,
        "deployment": deployment,
    }


def rss_growth(small: dict[str, Any], large: dict[str, Any]) -> dict[str, float]:
    growth = {}
    for contender in ("library", "deployment"):
        for name, peaks in large[contender]["peak_rss"].items():
            before = small[contender]["peak_rss"].get(name, {}).get("tree_mb")
            if before:
                growth[name] = round(peaks["tree_mb"] / before, 2)
    return growth


def record_entry(sizes: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    largest = sizes[-1]
    growth = rss_growth(sizes[0], largest) if len(sizes) > 1 else {}
    return record(
        "scale_10k",
        "studies/hour",
        largest["deployment"]["studies_per_hour"],
        largest["library"]["studies_per_hour"],
        accessions=largest["accessions"],
        target_ratio_at_least=0.8,
        peak_rss_growth=growth,
        target_peak_rss_growth_at_most=1.5,
        workers=args.workers,
        worker_concurrency=args.worker_concurrency,
        pacs_pool=args.pool,
        batch_size=args.batch_size,
        receiver_backend=args.backend,
        sizes=sizes,
        measured_on=time.strftime("%Y-%m-%d"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="ANs per measured hospital, comma-separated")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-concurrency", type=int, default=3)
    parser.add_argument("--pool", type=int, default=4, help="slots of the pacs pool")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--backend", choices=("pynetdicom", "dcmtk"), default="dcmtk")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds one DAG run may take")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    sizes = sorted(int(size) for size in args.sizes.split(","))

    work = Path(tempfile.mkdtemp(prefix="pacsflow-bench-scale-"))
    measured: list[dict[str, Any]] = []
    try:
        with postgres_server(Path(tempfile.mkdtemp(prefix="pacsflow-bench-pg-"))) as server_url:
            for accessions in sizes:
                print(f"== scale_10k: {accessions} ANs", flush=True)
                measured.append(measure(accessions, work / str(accessions), server_url, args))
                if not args.no_record:  # what is measured so far is kept, even if a larger size fails
                    entry = record_entry(measured, args)
                    print(f"  recorded: ratio {entry['ratio']} at {accessions} ANs", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(measured, indent=2))


if __name__ == "__main__":
    main()
