"""Airflow operators: each builds its hooks inside ``execute`` and calls one stage of ``pacsflow.core.pipeline``."""
