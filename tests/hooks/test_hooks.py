"""Connections become core configuration; the ``dicom`` connection type is registered by the provider."""

from __future__ import annotations

import json

import pytest
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig, ReceiverConfigError, TlsConfig
from pacsflow.core.errors import ConfigurationError
from pacsflow.hooks.database import DatabaseHook
from pacsflow.hooks.dicom import DicomHook
from sqlalchemy import make_url, text


def set_connection(monkeypatch, conn_id: str, connection: dict) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(connection))


def test_dicom_connection_to_pacs_and_receiver_config(monkeypatch):
    set_connection(
        monkeypatch,
        "pacs_test",
        {
            "conn_type": "dicom",
            "host": "pacs.local",
            "port": 104,
            "login": "PACS_AE",
            "extra": {
                "calling_ae": "PF",
                "receiver_port": 4006,
                "allowed_calling_aes": "PACS_AE, OTHER",
                "extra__dicom__dimse_timeout": "600",
                "retrieve_method": "c-get",
                "result_cap": 200,
            },
        },
    )
    hook = DicomHook("pacs_test")
    assert hook.pacs_config() == PacsConfig(
        host="pacs.local",
        port=104,
        called_ae="PACS_AE",
        calling_ae="PF",
        dimse_timeout=600.0,
        retrieve_method="c-get",
        result_cap=200,
    )
    assert hook.receiver_config() == ReceiverConfig(port=4006, allowed_calling_aes=("PACS_AE", "OTHER"))


def test_every_receiver_setting_comes_from_the_connection(monkeypatch):
    set_connection(
        monkeypatch,
        "pacs_test",
        {
            "conn_type": "dicom",
            "host": "pacs.local",
            "port": 104,
            "login": "PACS_AE",
            "extra": {
                "receiver_host": "0.0.0.0",
                "receiver_allowed_addresses": "10.0.0.5, 10.0.0.6",
                "receiver_max_associations": 4,
                "receiver_tls_cert_file": "c.pem",
                "receiver_tls_key_file": "k.pem",
                "receiver_tls_ca_file": "ca.pem",
                "receiver_acse_timeout": 5,
                "receiver_dimse_timeout": "20",
                "receiver_network_timeout": 40,
                "receiver_max_pdu": 65536,
                "receiver_max_inflated_bytes": 1000,
                "receiver_transfer_syntaxes": ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"],
            },
        },
    )
    assert DicomHook("pacs_test").receiver_config() == ReceiverConfig(
        host="0.0.0.0",
        allowed_addresses=("10.0.0.5", "10.0.0.6"),
        max_associations=4,
        tls=TlsConfig(ca_file="ca.pem", cert_file="c.pem", key_file="k.pem"),
        acse_timeout=5.0,
        dimse_timeout=20.0,
        network_timeout=40.0,
        max_pdu=65536,
        max_inflated_bytes=1000,
        transfer_syntaxes=("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"),
    )


def test_a_remote_bind_with_the_loopback_allow_list_is_refused_naming_the_setting(monkeypatch):
    set_connection(
        monkeypatch,
        "pacs_test",
        {
            "conn_type": "dicom",
            "host": "pacs.local",
            "port": 104,
            "login": "PACS_AE",
            "extra": {"receiver_host": "0.0.0.0"},
        },
    )
    with pytest.raises(ReceiverConfigError, match="allowed_addresses"):
        DicomHook("pacs_test").receiver_config()


@pytest.mark.parametrize("backend", ["dcmtk", "pynetdicom"])
def test_the_receiver_backend_comes_from_the_connection(monkeypatch, backend):
    set_connection(
        monkeypatch,
        "pacs_test",
        {
            "conn_type": "dicom",
            "host": "pacs.local",
            "port": 104,
            "login": "PACS_AE",
            "extra": {"receiver_backend": backend},
        },
    )
    assert DicomHook("pacs_test").receiver_config().backend == backend


def test_an_unknown_receiver_backend_is_refused_with_the_choices(monkeypatch):
    set_connection(
        monkeypatch,
        "pacs_test",
        {
            "conn_type": "dicom",
            "host": "pacs.local",
            "port": 104,
            "login": "PACS_AE",
            "extra": {"receiver_backend": "storescp"},
        },
    )
    with pytest.raises(ValueError, match=r"pynetdicom.*dcmtk"):
        DicomHook("pacs_test").receiver_config()


def test_dicom_connection_without_ae_title_is_explained(monkeypatch):
    set_connection(monkeypatch, "pacs_bad", {"conn_type": "dicom", "host": "pacs.local", "port": 104})
    with pytest.raises(ValueError, match="login \\(the PACS AE title\\)"):
        DicomHook("pacs_bad").pacs_config()


def test_database_connection_from_url_or_fields(monkeypatch, tmp_path):
    set_connection(
        monkeypatch,
        "ris_url",
        {"conn_type": "generic", "extra": {"sqlalchemy_url": f"sqlite:///{tmp_path / 'ris.db'}"}},
    )
    engine = DatabaseHook("ris_url").get_conn()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()
    set_connection(
        monkeypatch,
        "ris_fields",
        {"conn_type": "postgres", "host": "db", "port": 5432, "login": "reader", "password": "s3cret", "schema": "ris"},
    )
    url = DatabaseHook("ris_fields").sqlalchemy_url()  # built by the postgres provider's hook
    assert (url.get_backend_name(), url.host, url.port, url.username, url.password, url.database) == (
        "postgresql",
        "db",
        5432,
        "reader",
        "s3cret",
        "ris",
    )
    for conn_type in ("ftp", "generic"):  # no provider; a type without any hook
        set_connection(monkeypatch, "ris_unknown", {"conn_type": conn_type, "host": "x"})
        with pytest.raises(ConfigurationError, match=r"'ris_unknown': set extra\.sqlalchemy_url.*SQL hook"):
            DatabaseHook("ris_unknown").sqlalchemy_url()


@pytest.mark.postgres
def test_a_postgres_connection_given_by_fields_reaches_the_database(monkeypatch, postgres_url):
    server = make_url(postgres_url)
    set_connection(
        monkeypatch,
        "ris_pg",
        {
            "conn_type": "postgres",
            "host": server.host,
            "port": server.port,
            "login": server.username,
            "password": server.password,
            "schema": server.database,
        },
    )
    engine = DatabaseHook("ris_pg").get_conn()
    try:
        assert engine.hide_parameters
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_database()")).scalar() == server.database
    finally:
        engine.dispose()


def test_the_provider_registers_the_dicom_connection_type():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "pacsflow" in manager.providers
    hook = manager.hooks["dicom"]
    assert hook is not None and hook.hook_class_name == "pacsflow.hooks.dicom.DicomHook"
    assert "extra__dicom__receiver_port" in manager.connection_form_widgets
    assert "host" not in manager.field_behaviours["dicom"]["hidden_fields"]
