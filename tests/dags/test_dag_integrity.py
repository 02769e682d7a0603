"""Every DAG of the shipped extraction definitions imports cleanly, fast and without work at parse time, and
follows the house rules: owner, tags, retries, timeouts, pools on PACS-facing tasks, a data-interval timetable."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from itertools import pairwise

import pytest
from airflow.dag_processing.dagbag import DagBag
from pacsflow.demo.environment import DEMO_DAG_ID, REPO_ROOT

PACS_FACING = {"resolve_accessions", "retrieve_batch"}
DEFINITIONS = sorted((REPO_ROOT / "include" / "extractions").glob("*.yaml"))


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=str(REPO_ROOT / "dags"))


def test_every_definition_becomes_a_dag(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {f"pacsflow__{path.stem}" for path in DEFINITIONS}
    assert DEMO_DAG_ID in dagbag.dag_ids


def test_dags_have_owner_tags_retries_and_timeouts(dagbag):
    for dag in dagbag.dags.values():
        assert "invalid-definition" not in dag.tags, dag.doc_md
        assert "pacsflow" in dag.tags and dag.doc_md, dag.dag_id
        assert dag.dagrun_timeout is not None, dag.dag_id
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", task.task_id
            assert task.execution_timeout is not None, task.task_id
            if task.task_id != "audit_summary":  # the summary only reads the store; a retry changes nothing
                assert task.retries >= 1, task.task_id
                assert task.retry_exponential_backoff, task.task_id


def test_scheduled_dags_have_a_data_interval_timetable(dagbag):
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables.interval import CronDataIntervalTimetable

    for dag in dagbag.dags.values():
        if dag.timetable.can_be_scheduled:
            assert isinstance(coerce_to_core_timetable(dag.timetable), CronDataIntervalTimetable), dag.dag_id


def test_pacs_facing_tasks_take_a_pacs_pool_slot(dagbag):
    pools = {task.task_id: task.pool for task in dagbag.dags[DEMO_DAG_ID].tasks}
    assert {task_id: pools[task_id] for task_id in PACS_FACING} == dict.fromkeys(PACS_FACING, "pacs")
    assert pools["ris_cohort"] == "default_pool"


def test_the_summary_is_the_only_leaf_and_waits_for_every_stage(dagbag):
    dag = dagbag.dags[DEMO_DAG_ID]
    order = ["ris_cohort", "resolve_accessions", "retrieve_batch", "export_metadata", "release", "audit_summary"]
    for upstream, downstream in pairwise(order):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    assert [task.task_id for task in dag.leaves] == ["audit_summary"]
    summary = dag.get_task("audit_summary")
    assert summary.trigger_rule == "all_done" and set(order[:-1]) <= summary.upstream_task_ids
    assert dag.get_task("export_metadata").trigger_rule == "all_done"


def test_the_metadata_export_emits_an_asset(dagbag):
    outlets = dagbag.dags[DEMO_DAG_ID].get_task("export_metadata").outlets
    assert [asset.name for asset in outlets] == ["pacsflow_metadata__demo"]


def test_a_broken_definition_is_named_and_leaves_the_others_importable(tmp_path, monkeypatch, caplog):
    for path in DEFINITIONS:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "broken.yaml").write_text(
        (tmp_path / "demo.yaml")
        .read_text()
        .replace("id: demo", "id: broken")
        .replace("batch_size: 10", "batch_size: -3")
    )
    monkeypatch.setenv("PACSFLOW_EXTRACTIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.ERROR, logger="pacsflow"):
        bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    problem = "broken.yaml: retrieval.batch_size: Input should be greater than or equal to 1"
    assert bag.import_errors == {} and problem in caplog.text
    assert bag.dags[DEMO_DAG_ID].tasks[0].task_id == "ris_cohort"  # the others are whole
    broken = bag.dags["pacsflow__broken"]
    assert "invalid-definition" in broken.tags and problem in broken.doc_md
    assert broken.timetable.can_be_scheduled is False and [t.task_id for t in broken.tasks] == ["invalid_definition"]


def test_parsing_the_dag_file_does_no_work(tmp_path):
    """Import in a fresh interpreter, with every connection pointing nowhere: it must neither connect nor create
    anything (the timeout only guards against a hang; parse speed is not asserted here)."""
    subprocess.run(
        [sys.executable, "-c", "import runpy; runpy.run_path('dags/pacsflow_extractions.py')"],
        cwd=REPO_ROOT,
        check=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "PACSFLOW_DATA_ROOT": str(tmp_path / "nowhere"),
            "AIRFLOW_HOME": str(tmp_path),
            "PYTHONPATH": ":".join(sys.path),
        },
    )
    assert not (tmp_path / "nowhere").exists()
