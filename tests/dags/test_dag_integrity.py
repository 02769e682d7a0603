"""Every DAG imports cleanly and follows the house rules: tags, retries, pools on PACS-facing tasks."""

from __future__ import annotations

import pytest

from airflow.dag_processing.dagbag import DagBag

from pacsflow.demo.environment import REPO_ROOT

PACS_FACING = {"resolve_accessions", "retrieve_batch"}


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=str(REPO_ROOT / "dags"))


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "pacsflow_extract" in dagbag.dag_ids


def test_dags_have_tags_and_retries(dagbag):
    for dag in dagbag.dags.values():
        assert dag.tags, dag.dag_id
        for task in dag.tasks:
            if task.task_id != "audit_summary":  # the summary only reads the store; a retry changes nothing
                assert task.retries >= 1, task.task_id
                assert task.retry_exponential_backoff, task.task_id


def test_pacs_facing_tasks_take_a_pacs_pool_slot(dagbag):
    dag = dagbag.dags["pacsflow_extract"]
    pools = {task.task_id: task.pool for task in dag.tasks}
    assert {task_id: pools[task_id] for task_id in PACS_FACING} == dict.fromkeys(PACS_FACING, "pacs")
    assert pools["ris_cohort"] == "default_pool"


def test_the_pipeline_order(dagbag):
    dag = dagbag.dags["pacsflow_extract"]
    order = ["ris_cohort", "resolve_accessions", "retrieve_batch", "export_metadata", "release", "audit_summary"]
    for upstream, downstream in zip(order, order[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids


def test_the_metadata_export_emits_an_asset(dagbag):
    outlets = dagbag.dags["pacsflow_extract"].get_task("export_metadata").outlets
    assert [asset.name for asset in outlets] == ["pacsflow_metadata"]
