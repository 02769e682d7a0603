"""The audit review pages inside the Airflow UI (an Airflow plugin: FastAPI app + external views)."""
