"""Airflow hooks: connections turned into pacsflow core configuration."""
