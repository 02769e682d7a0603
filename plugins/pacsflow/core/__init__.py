"""The Airflow-free core of pacsflow: DICOM networking, RIS queries, rules, storage, export, audit."""
