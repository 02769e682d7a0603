"""The audit store's migrations: a database of the previous release, with data in it, upgrades in place through
``pacsflow db upgrade`` and loses nothing; new databases are created at head; two tasks starting together on an
old database migrate it once. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pacsflow.cli import main
from pacsflow.core.audit import VERSION_TABLE, AuditStore, metadata, runs, stage_attempts
from pacsflow.core.audit.migrate import PREVIOUS_RELEASE, alembic_config, current_revision, head_revision
from pacsflow.core.db import make_engine
from pacsflow.core.errors import ConfigurationError
from sqlalchemy import MetaData, inspect, select, text

PREVIOUS_RELEASE_MODULE = Path(__file__).with_name("data") / "audit_430716e.py.txt"
# What a summary of the previous release counted. Not compared: ``reconciled`` and ``unfinished``, which the
# current rules derive from stage attempts and reason names the previous release did not record.
COUNTED = ("run_key", "cohort", "outcomes", "reasons", "series", "instances", "bytes")
OLD_TABLES = ("pacsflow_runs", "pacsflow_accessions", "pacsflow_studies", "pacsflow_series")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def audit_url(request, tmp_path) -> Iterator[str]:
    """An empty database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.sqlite'}"
        return
    from tests.dags.celery_deployment import postgres_database

    with postgres_database(request.getfixturevalue("postgres_url"), f"audit_{tmp_path.name[-12:]}") as url:
        yield url


@cache
def previous_release() -> ModuleType:
    """The previous release's audit module, imported from its text."""
    name = "pacsflow_audit_430716e"
    module = sys.modules[name] = ModuleType(name)  # registered first: its dataclasses look their module up
    exec(compile(PREVIOUS_RELEASE_MODULE.read_text(), str(PREVIOUS_RELEASE_MODULE), "exec"), module.__dict__)
    return module


def fill_with_previous_release(url: str) -> dict[str, Any]:
    """Two runs written by the previous release's own store: a finished one with every outcome, and one cut
    short after its cohort. Returns its summaries."""
    old = previous_release()
    store = old.AuditStore(make_engine(url))
    t0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    try:
        store.start_run(
            "pacsflow_extract/scheduled__1",
            dag_id="pacsflow_extract",
            run_id="scheduled__1",
            params={"modalities": ["CT", "MR"], "batch_size": 2},
            interval=(t0 - timedelta(days=1), t0),
            run_type="scheduled",
            triggered_by="timetable",
        )
        store.replace_cohort("pacsflow_extract/scheduled__1", [_cohort_row(an) for an in ("A1", "A2", "A3", "A4")])
        store.start_run(
            "pacsflow_extract/manual__2",
            dag_id="pacsflow_extract",
            run_id="manual__2",
            params={},
            interval=(t0, t0 + timedelta(days=1)),
            run_type="manual",
            triggered_by="alice",
        )
        store.replace_cohort("pacsflow_extract/manual__2", [_cohort_row("B1")])
        resolved = {"A1": ["1.2.3.1"], "A3": ["1.2.3.3"]}
        for an in ("A1", "A2", "A3"):
            store.record_resolution(
                "pacsflow_extract/scheduled__1",
                an,
                resolution="resolved" if an in resolved else "not_found",
                resolved_by="accession_number" if an in resolved else None,
                detail=None if an in resolved else "no study with this AN",
                rules_tried=["accession_number", "patient_date_modality"],
                study_uids=resolved.get(an, []),
                batch_of=lambda _uid, an=an: 0 if an == "A1" else 1,
            )
        store.record_stage("pacsflow_extract/scheduled__1", "resolve", t0, {"resolved": 2, "not_found": 1})
        listings = {
            "A1": ("1.2.3.1", [("1.2.3.1.1", "CT", None), ("1.2.3.1.2", "CT", None), ("1.2.3.1.3", "SR", "modality")]),
            "A3": ("1.2.3.3", [("1.2.3.3.1", "MR", None)]),
        }
        for an, (study_uid, series_list) in listings.items():
            store.record_series_listing(
                "pacsflow_extract/scheduled__1",
                an,
                study_uid,
                [
                    {
                        "series_uid": uid,
                        "modality": modality,
                        "description": f"{modality} séries",  # non-ASCII survives
                        "body_part": "CHEST",
                        "pacs_instance_count": 12,
                        "drop_reason": drop,
                        "status": "dropped" if drop else "pending",
                    }
                    for uid, modality, drop in series_list
                ],
            )
        for uid in ("1.2.3.1.1", "1.2.3.1.2"):
            store.update_series(
                "pacsflow_extract/scheduled__1",
                "1.2.3.1",
                uid,
                status="complete",
                expected=12,
                received=12,
                fetched=12,
                bytes=12 * 525_312,
                seconds={"find": 0.2, "move": 3.5},
            )
        store.update_series(
            "pacsflow_extract/scheduled__1",
            "1.2.3.3",
            "1.2.3.3.1",
            status="partial",
            expected=12,
            received=9,
            fetched=9,
            bytes=9 * 525_312,
            error="C-MOVE ended with 3 failed sub-operations",
        )
        store.record_stage("pacsflow_extract/scheduled__1", "retrieve[0]", t0, {"series_complete": 2})
        store.record_stage("pacsflow_extract/scheduled__1", "retrieve[1]", t0, {"series_partial": 1})
        store.settle_outcomes("pacsflow_extract/scheduled__1")
        store.finish_run("pacsflow_extract/scheduled__1")
        return {
            key: store.summary(key).as_dict() for key in ("pacsflow_extract/scheduled__1", "pacsflow_extract/manual__2")
        }
    finally:
        store.close()


def _cohort_row(an: str) -> dict[str, Any]:
    return {
        "accession_number": an,
        "an_ref": f"ref-{an}",
        "patient_id": f"P{an}",
        "ris_study_uid": None,
        "exam_datetime": datetime(2026, 11, 19, 10, 30),
        "modality": "CT",
        "occurrences": 2 if an == "A2" else 1,
    }


def table_rows(url: str, names: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """Every row of the tables ``names`` as the database has them, in primary key order."""
    engine = make_engine(url)
    try:
        reflected = MetaData()
        reflected.reflect(engine, only=list(names))
        with engine.connect() as conn:
            return {
                name: [
                    dict(row)
                    for row in conn.execute(
                        select(reflected.tables[name]).order_by(*reflected.tables[name].primary_key.columns)
                    ).mappings()
                ]
                for name in names
            }
    finally:
        engine.dispose()


def schema_differences(url: str) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match the current tables (nothing, if the
    migrations are right)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(
                compare_metadata(MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}), metadata)
            )
    finally:
        engine.dispose()


def revision_of(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return current_revision(conn)
    finally:
        engine.dispose()


def test_a_database_of_the_previous_release_upgrades_in_place_and_loses_nothing(audit_url, capsys):
    old_summaries = fill_with_previous_release(audit_url)
    before = table_rows(audit_url, (*OLD_TABLES, "pacsflow_stage_events"))
    assert revision_of(audit_url) is None  # the previous release had no migrations
    assert len(before["pacsflow_series"]) == 4 and len(before["pacsflow_stage_events"]) == 3

    assert main(["db", "upgrade", "--audit-url", audit_url]) == 0
    assert f"upgraded from schema revision of the previous release to {head_revision()}" in capsys.readouterr().out
    assert revision_of(audit_url) == head_revision()
    assert schema_differences(audit_url) == []

    after = table_rows(audit_url, OLD_TABLES)
    for name in OLD_TABLES:  # every row, every value
        assert after[name] == before[name], name
    with AuditStore.connect(audit_url) as store:
        attempts = store.attempts("pacsflow_extract/scheduled__1")
        for key, old in old_summaries.items():  # the same counts, outcomes and reasons
            new = store.summary(key).as_dict()
            old["outcomes"].pop("None", None)  # ANs not settled yet: the current summary does not count them
            assert {k: new[k] for k in COUNTED} == {k: old[k] for k in COUNTED}
    # Each stage event is now a successful attempt of its stage and batch, with its times and counts.
    assert [(a["stage"], a["batch"], a["state"]) for a in attempts] == [
        ("resolve", None, "success"),
        ("retrieve", 0, "success"),
        ("retrieve", 1, "success"),
    ]
    assert [a["counts"] for a in attempts] == [e["counts"] for e in before["pacsflow_stage_events"]]
    assert [(a["started_at"], a["finished_at"]) for a in attempts] == [
        (e["started_at"], e["finished_at"]) for e in before["pacsflow_stage_events"]
    ]

    # The summary command reads the upgraded run (the previous release recorded no cohort or export stage).
    assert main(["summary", "--audit-url", audit_url, "--run-key", "pacsflow_extract/scheduled__1", "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["cohort"] == 4 and printed["outcomes"] == old_summaries["pacsflow_extract/scheduled__1"]["outcomes"]
    assert printed["failed_stage"] == "cohort"

    assert main(["db", "upgrade", "--audit-url", audit_url]) == 0  # idempotent
    assert f"already at schema revision {head_revision()}" in capsys.readouterr().out


def test_a_new_database_is_created_at_head_and_init_audit_is_the_same_command(audit_url, capsys):
    assert main(["init-audit", "--audit-url", audit_url]) == 0
    assert f"created at schema revision {head_revision()}" in capsys.readouterr().out
    assert revision_of(audit_url) == head_revision()
    assert schema_differences(audit_url) == []


def test_the_migrations_from_an_empty_database_build_the_previous_release_then_the_current_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), PREVIOUS_RELEASE)
    with engine.connect() as conn:  # the first revision is exactly what the previous release created
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert compare_metadata(context, previous_release().metadata) == []
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    assert schema_differences(url) == []
    with engine.begin() as conn:  # and back: the downgrade restores the previous release's tables
        command.downgrade(alembic_config(conn), PREVIOUS_RELEASE)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert compare_metadata(context, previous_release().metadata) == []
    engine.dispose()


def test_run_types_recorded_as_enum_names_read_as_airflow_names_them(audit_url):
    engine = make_engine(audit_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0002")
            for key, run_type in [("a", "DagRunType.BACKFILL"), ("b", "manual"), ("c", None)]:
                conn.execute(runs.insert().values(run_key=key, run_type=run_type))
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")
        with engine.connect() as conn:
            found = dict(conn.execute(select(runs.c.run_key, runs.c.run_type)).all())
    finally:
        engine.dispose()
    assert found == {"a": "backfill", "b": "manual", "c": None}


def test_a_database_of_a_development_build_without_version_row_is_adopted(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    engine = make_engine(url)
    metadata.create_all(engine)  # what the store did on connect before migrations, after stage attempts came
    with engine.begin() as conn:
        conn.execute(runs.insert().values(run_key="d/r", dag_id="d", run_id="r"))
        conn.execute(
            stage_attempts.insert().values(run_key="d/r", stage="cohort", started_at=datetime.now(UTC), state="success")
        )
    engine.dispose()
    with AuditStore.connect(url) as store:
        assert [a["stage"] for a in store.attempts("d/r")] == ["cohort"]
    assert revision_of(url) == head_revision()
    assert schema_differences(url) == []


CONNECT_ON_GO = """
import sys, time
from pathlib import Path
from pacsflow.core.audit import AuditStore
url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
AuditStore.connect(url).close()
"""


def test_two_tasks_starting_together_on_an_old_database_migrate_it_once(audit_url, tmp_path):
    fill_with_previous_release(audit_url)
    before = table_rows(audit_url, (*OLD_TABLES, "pacsflow_stage_events"))
    go = tmp_path / "go"
    tasks = [
        subprocess.Popen(
            [sys.executable, "-c", CONNECT_ON_GO, audit_url, str(tmp_path / f"ready{n}"), str(go)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{n}").exists() for n in range(2)):  # both imported: start them together
        assert time.monotonic() < deadline, "the tasks did not start"
        assert all(task.poll() is None for task in tasks), [task.stderr.read() for task in tasks if task.stderr]
        time.sleep(0.05)
    go.touch()
    for task in tasks:
        _, stderr = task.communicate(timeout=300)
        assert task.returncode == 0, stderr

    assert revision_of(audit_url) == head_revision()
    assert schema_differences(audit_url) == []
    after = table_rows(audit_url, (*OLD_TABLES, "pacsflow_stage_attempts"))
    for name in OLD_TABLES:
        assert after[name] == before[name], name
    assert len(after["pacsflow_stage_attempts"]) == len(before["pacsflow_stage_events"])  # copied once
    engine = make_engine(audit_url)
    assert not inspect(engine).has_table("pacsflow_stage_events")
    engine.dispose()


def test_a_database_upgraded_by_a_newer_pacsflow_is_refused_with_what_to_do(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    AuditStore.connect(url).close()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(ConfigurationError, match="schema revision 9999, which this pacsflow does not know"):
        AuditStore.connect(url)
    assert main(["db", "upgrade", "--audit-url", url]) == 1
    assert "install that version on this worker too" in capsys.readouterr().err
    assert revision_of(url) == "9999"
