"""The environment that points Airflow and pacsflow at one RIS, one PACS and one data root.

Used by ``make demo`` and by the end-to-end tests, so both run the DAG exactly the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig

if TYPE_CHECKING:
    from pacsflow.core.ris import RisExam
    from pacsflow.demo.hospital import Hospital

REPO_ROOT = Path(__file__).resolve().parents[3]
DEMO_DEFINITION = REPO_ROOT / "include" / "extractions" / "demo.yaml"
DEMO_DAG_ID = "pacsflow__demo"


def airflow_environment(airflow_home: Path) -> dict[str, str]:
    """A self-contained Airflow: SQLite metadata DB in ``airflow_home``, this repo's DAGs and plugins."""
    return {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }


def connection_environment(
    *, ris_url: str, audit_url: str, pacs: PacsConfig, receiver: ReceiverConfig
) -> dict[str, str]:
    """``AIRFLOW_CONN_*`` variables for the three connections the DAG uses."""
    dicom = {
        "conn_type": "dicom",
        "host": pacs.host,
        "port": pacs.port,
        "login": pacs.called_ae,
        "extra": {
            "calling_ae": pacs.calling_ae,
            "retrieve_method": pacs.retrieve_method,
            "receiver_ae": receiver.ae_title,
            "receiver_host": receiver.host,
            "receiver_port": receiver.port,
            "receiver_mode": receiver.mode,
            "allowed_calling_aes": ",".join(receiver.allowed_calling_aes),
            **({"result_cap": pacs.result_cap} if pacs.result_cap else {}),
        },
    }
    return {
        "AIRFLOW_CONN_PACSFLOW_RIS": json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": ris_url}}),
        "AIRFLOW_CONN_PACSFLOW_AUDIT": json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": audit_url}}),
        "AIRFLOW_CONN_PACSFLOW_PACS": json.dumps(dicom),
    }


def demo_cohort(hospital: Hospital) -> list[RisExam]:
    """The demo definition's cohort of ``hospital`` over its whole span, as the cohort stage reads it."""
    from sqlalchemy import create_engine

    from pacsflow.core.ris import load_template, query_cohort
    from pacsflow.core.settings import load_definition

    demo = load_definition(DEMO_DEFINITION)
    engine = create_engine(hospital.ris_url)
    start, end = (moment.replace(tzinfo=None) for moment in hospital.interval)
    try:
        exams = list(
            query_cohort(
                engine,
                load_template(demo.cohort.sql_template, REPO_ROOT / "include" / "sql"),
                interval_start=start,
                interval_end=end,
                params=demo.cohort.params,
            )
        )
    finally:
        engine.dispose()
    return sorted(exams, key=lambda exam: exam.accession_number)
