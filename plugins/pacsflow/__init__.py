"""pacsflow: research cohort extraction from hospital PACS.

``pacsflow.core`` knows nothing of Airflow; ``pacsflow.hooks`` and ``pacsflow.operators`` are the thin
Airflow layer on top of it.
"""

__version__ = "0.1.0"
