"""The run page of the audit UI for a 10,000-AN run, served by a real api-server, vs ``pacsflow summary``.

*pacsflow*: ``GET /pacsflow-audit/dags/<dag>/runs/<run>`` as a logged-in user (JWT from the simple auth
manager) against ``airflow api-server`` on loopback: time to first byte and full load (the whole HTML, which
inlines its SVG charts and holds the first 50 ANs and 50 series), median of ``--repeat`` requests after one
warm-up; with Chromium installed also the browser's navigation time to the load event. *reference*: the same
run's summary computed by the CLI, ``pacsflow summary --audit-url URL --run-key KEY`` (wall clock, Python
start-up included: what an auditor pays today). Target: the page fully loaded well under a second.

The audit database is synthetic but written through the audit store's own tables and settled by
``AuditStore.settle_outcomes``: 10,000 ANs, ~15% not found, ~80% resolved with one study of 2-4 series
(scouts dropped, a few partial or failed), 20 retrieval batches, every stage attempt recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from pacsflow.core.audit import AuditStore, accessions, series, stage_attempts, studies
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.demo.environment import airflow_environment
from pacsflow.demo.sandbox import free_port
from sqlalchemy import insert

from bench.results import record
from tests.helpers import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS

DAG_ID = "pacsflow__bench"
RUN_ID = "scheduled__2026-11-30T00:00:00+00:00"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
STARTUP_SECONDS = 120
UID_ROOT = "1.2.826.0.1.3680043.10.9999."


def fill_audit(store: AuditStore, accessions_count: int, key: Pseudonymizer) -> None:
    rng = random.Random(11)
    run_key = f"{DAG_ID}/{RUN_ID}"
    start = datetime(2026, 11, 30, 1, tzinfo=UTC)
    store.start_run(
        run_key,
        dag_id=DAG_ID,
        run_id=RUN_ID,
        params={},
        interval=(start - timedelta(days=7), start),
        run_type="scheduled",
        triggered_by=None,
    )
    an_rows, study_rows, series_rows = [], [], []
    for index in range(accessions_count):
        number = f"B{index:08d}"
        draw = rng.random()
        resolution = "not_found" if draw < 0.15 else "resolved"
        rule = rng.choice(["accession_number"] * 8 + ["normalized_accession", "ris_study_uid", "patient_date"])
        an_rows.append(
            {
                "run_key": run_key,
                "accession_number": number,
                "an_ref": key.ref(number),
                "modality": rng.choice(["CT", "MG"]),
                "exam_datetime": start.replace(tzinfo=None),
                "occurrences": 1,
                "resolution": resolution,
                "resolved_by": rule if resolution == "resolved" else None,
                "rules_tried": ["accession_number"],
            }
        )
        if resolution != "resolved":
            continue
        study_uid = f"{UID_ROOT}1.{index}"
        study_rows.append(
            {
                "run_key": run_key,
                "accession_number": number,
                "study_uid": study_uid,
                "batch": index * 20 // accessions_count,
                "listed": True,
            }
        )
        for number_in_study in range(rng.randint(2, 4)):
            dropped = number_in_study == 0 and rng.random() < 0.5
            fate = rng.random()
            expected = rng.randint(50, 400)
            received = expected if fate > 0.03 else (expected // 2 if fate > 0.01 else 0)
            status = (
                "dropped" if dropped else ("complete" if received == expected else "partial" if received else "failed")
            )
            series_rows.append(
                {
                    "run_key": run_key,
                    "study_uid": study_uid,
                    "series_uid": f"{UID_ROOT}2.{index}.{number_in_study}",
                    "accession_number": number,
                    "modality": "CT",
                    "description": "SCOUT" if dropped else "AXIAL 1.0",
                    "body_part": "CHEST",
                    "pacs_instance_count": expected,
                    "drop_reason": "description" if dropped else None,
                    "status": status,
                    "expected": None if dropped else expected,
                    "received": None if dropped else received,
                    "fetched": None if dropped else received,
                    "bytes": None if dropped else received * 525_000,
                    "seconds": {"retrieve": 1.0},
                }
            )
    with store.transaction() as conn:
        for table, rows in ((accessions, an_rows), (studies, study_rows), (series, series_rows)):
            for chunk in range(0, len(rows), 2000):
                conn.execute(insert(table), rows[chunk : chunk + 2000])
        moment = start
        attempts = [
            {
                "run_key": run_key,
                "stage": "cohort",
                "started_at": moment,
                "state": "success",
                "finished_at": moment + timedelta(seconds=4),
                "counts": {"accessions": accessions_count},
            },
            {
                "run_key": run_key,
                "stage": "resolve",
                "started_at": moment + timedelta(seconds=5),
                "state": "success",
                "finished_at": moment + timedelta(minutes=20),
                "counts": {"resolved": len(study_rows)},
            },
        ]
        moment += timedelta(minutes=20)
        for batch in range(20):
            seconds = rng.randint(600, 900)
            attempts.append(
                {
                    "run_key": run_key,
                    "stage": "retrieve",
                    "batch": batch,
                    "started_at": moment,
                    "finished_at": moment + timedelta(seconds=seconds),
                    "state": "success",
                    "counts": {"instances_fetched": 40_000, "bytes_fetched": 40_000 * 525_000},
                }
            )
            moment += timedelta(seconds=seconds)
        attempts.append(
            {
                "run_key": run_key,
                "stage": "export",
                "started_at": moment,
                "state": "success",
                "finished_at": moment + timedelta(minutes=2),
                "counts": {},
            }
        )
        conn.execute(
            insert(stage_attempts), [{"batch": None, "try_number": 1, "error": None, **row} for row in attempts]
        )
    store.settle_outcomes(run_key)
    store.finish_run(run_key)


def measure_page(url: str, token: str, repeat: int) -> tuple[float, float, int]:
    """Median time to first byte and to the last byte of the page, and its size."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    firsts, fulls, size = [], [], 0
    for attempt in range(repeat + 1):
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read(1)
            first = time.perf_counter() - started
            size = 1 + len(response.read())
            full = time.perf_counter() - started
            assert response.status == 200
        if attempt:  # the first request opens the audit database: a warm-up
            firsts.append(first)
            fulls.append(full)
    return statistics.median(firsts), statistics.median(fulls), size


def measure_browser(base: str, path: str, token: str, repeat: int) -> float | None:
    """Median navigation time to the load event in headless Chromium, or None without Chromium."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="pacsflow-bench-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.get(base + "/pacsflow-audit/static/audit.css")
        driver.add_cookie({"name": "_token", "value": token, "path": "/"})
        times = []
        for attempt in range(repeat + 1):
            driver.get(base + path)
            timing = driver.execute_script(
                "const t = performance.getEntriesByType('navigation')[0];return t.loadEventEnd - t.startTime;"
            )
            if attempt:
                times.append(timing / 1000)
        return statistics.median(times)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def measure_cli(audit_url: str, repeat: int) -> float:
    command = [
        str(Path(sys.executable).with_name("pacsflow")),
        "summary",
        "--audit-url",
        audit_url,
        "--run-key",
        f"{DAG_ID}/{RUN_ID}",
    ]
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def api_server(work: Path, audit_url: str) -> tuple[subprocess.Popen[bytes], str, str]:
    home = work / "airflow"
    home.mkdir()
    password = secrets.token_urlsafe(12)
    (work / "passwords.json").write_text(json.dumps({"bench": password}))
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
    env.update(airflow_environment(home))
    env.update(
        {
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "bench:viewer",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(work / "passwords.json"),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW_CONN_PACSFLOW_AUDIT": json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": audit_url}}),
        }
    )
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    log = (work / "api-server.log").open("wb")
    process = subprocess.Popen(
        [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=home,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the api-server exited; see {work / 'api-server.log'}")
        try:
            body = json.dumps({"username": "bench", "password": password}).encode()
            token_request = urllib.request.Request(
                base + "/auth/token", data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(token_request, timeout=5) as response:
                return process, base, json.loads(response.read())["access_token"]
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the api-server did not answer in time") from None
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--accessions", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pacsflow-bench-audit-page-"))
    data_root = work / "data"
    audit_url = f"sqlite:///{data_root / 'audit.sqlite'}"
    key = Pseudonymizer(secrets.token_bytes(32))
    print(f"filling a {args.accessions:,}-AN audit ...", flush=True)
    with AuditStore.connect(audit_url) as store:
        fill_audit(store, args.accessions, key)
        summary = store.summary(f"{DAG_ID}/{RUN_ID}")
    assert summary.reconciled and summary.cohort == args.accessions
    process, base, token = api_server(work, audit_url)
    try:
        path = f"/pacsflow-audit/dags/{DAG_ID}/runs/{quote(RUN_ID, safe='')}"
        ttfb, full, size = measure_page(base + path, token, args.repeat)
        browser = measure_browser(base, path, token, min(args.repeat, 5))
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
    cli = measure_cli(audit_url, min(args.repeat, 5))
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'audit_page':<16} ttfb {ttfb * 1000:7.1f} ms   full load {full * 1000:7.1f} ms ({size / 1024:.0f} KiB)"
        + (f"   browser load {browser * 1000:7.1f} ms" if browser is not None else "")
        + f"   pacsflow summary (CLI) {cli * 1000:7.1f} ms"
    )
    if not args.no_record:
        record(
            "audit_page",
            "s to load the run page (lower is better)",
            round(full, 4),
            round(cli, 4),
            accessions=args.accessions,
            ttfb_s=round(ttfb, 4),
            full_load_s=round(full, 4),
            browser_load_s=round(browser, 4) if browser is not None else None,
            page_kib=round(size / 1024),
            reference_what="pacsflow summary CLI, wall clock",
            target_s_at_most=1.0,
        )


if __name__ == "__main__":
    main()
