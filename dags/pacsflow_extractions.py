"""Research cohort extractions: one DAG ``pacsflow__<id>`` per definition in ``include/extractions/``.

Thin by design: reading the definitions and building airflow operators is all that happens at parse time
(the words "airflow" and "dag" in this file are what the dag-processor's safe mode looks for). Stages:
RIS cohort -> AN -> StudyInstanceUID -> series filter -> C-MOVE -> Parquet -> audit summary.
"""

from __future__ import annotations

from pathlib import Path

from pacsflow.dag_factory import extraction_dags

globals().update(extraction_dags(Path(__file__).resolve().parent.parent / "include"))
