"""The ``dicom`` connection: a PACS to query and retrieve from, and the receiver it sends to."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig, TlsConfig


class DicomHook(BaseHook):
    """Reads a ``dicom`` connection: host/port/login are the PACS address and called AE title; the extra
    holds the calling AE, the receiver (move destination) and timeouts. Example as an environment variable::

        AIRFLOW_CONN_PACSFLOW_PACS='{"conn_type": "dicom", "host": "pacs.local", "port": 104,
          "login": "PACS_AE", "extra": {"calling_ae": "PACSFLOW", "receiver_port": 11113}}'
    """

    conn_name_attr = "dicom_conn_id"
    default_conn_name = "pacsflow_pacs"
    conn_type = "dicom"
    hook_name = "DICOM (PACS)"

    def __init__(self, dicom_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.dicom_conn_id = dicom_conn_id
        self._extra: dict[str, Any] | None = None
        self._connection: Any = None

    def _conn(self) -> Any:
        if self._connection is None:
            self._connection = self.get_connection(self.dicom_conn_id)
            self._extra = dict(self._connection.extra_dejson)
        return self._connection

    def _option(self, name: str, default: Any = None) -> Any:
        self._conn()
        assert self._extra is not None
        # The UI stores conn-fields either plainly or with Airflow's "extra__<type>__" prefix.
        value = self._extra.get(name, self._extra.get(f"extra__dicom__{name}"))
        return default if value in (None, "") else value

    def pacs_config(self) -> PacsConfig:
        conn = self._conn()
        if not conn.host or not conn.port or not conn.login:
            raise ValueError(f"connection {self.dicom_conn_id!r} needs host, port and login (the PACS AE title)")
        tls_ca = self._option("tls_ca_file")
        cap = self._option("result_cap")
        return PacsConfig(
            host=conn.host,
            port=int(conn.port),
            called_ae=conn.login,
            calling_ae=self._option("calling_ae", "PACSFLOW"),
            acse_timeout=float(self._option("acse_timeout", 30)),
            dimse_timeout=float(self._option("dimse_timeout", 300)),
            network_timeout=float(self._option("network_timeout", 300)),
            max_pdu=int(self._option("max_pdu", 0)),
            retrieve_method=self._option("retrieve_method", "c-move"),
            result_cap=int(cap) if cap is not None else None,
            tls=TlsConfig(tls_ca, self._option("tls_cert_file"), self._option("tls_key_file")) if tls_ca else None,
        )

    def receiver_config(self) -> ReceiverConfig:
        """The receiver's settings: ``receiver_*`` keys of the extra (and ``allowed_calling_aes``); each one left
        out keeps ``ReceiverConfig``'s default. Raises ``ReceiverConfigError`` naming a setting that cannot work."""
        defaults = ReceiverConfig()
        tls_cert = self._option("receiver_tls_cert_file")
        return ReceiverConfig(
            ae_title=self._option("receiver_ae", defaults.ae_title),
            host=self._option("receiver_host", defaults.host),
            port=int(self._option("receiver_port", defaults.port)),
            allowed_calling_aes=self._list("allowed_calling_aes", ()),
            allowed_addresses=self._list("receiver_allowed_addresses", defaults.allowed_addresses),
            max_associations=int(self._option("receiver_max_associations", defaults.max_associations)),
            mode=self._option("receiver_mode", defaults.mode),
            tls=TlsConfig(self._option("receiver_tls_ca_file"), tls_cert, self._option("receiver_tls_key_file"))
            if tls_cert
            else None,
            backend=self._option("receiver_backend", defaults.backend),
            acse_timeout=float(self._option("receiver_acse_timeout", defaults.acse_timeout)),
            dimse_timeout=float(self._option("receiver_dimse_timeout", defaults.dimse_timeout)),
            network_timeout=float(self._option("receiver_network_timeout", defaults.network_timeout)),
            max_pdu=int(self._option("receiver_max_pdu", defaults.max_pdu)),
            transfer_syntaxes=self._list("receiver_transfer_syntaxes", defaults.transfer_syntaxes),
            max_inflated_bytes=int(self._option("receiver_max_inflated_bytes", defaults.max_inflated_bytes)),
        )

    def _list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A list option: a JSON list or a comma-separated string."""
        value = self._option(name)
        if value is None:
            return default
        items = value.split(",") if isinstance(value, str) else value
        return tuple(str(item).strip() for item in items if str(item).strip())

    def get_conn(self) -> PacsClient:
        """A client for the PACS; use it as a context manager so the association is released."""
        return PacsClient(self.pacs_config())

    def test_connection(self) -> tuple[bool, str]:
        try:
            with self.get_conn() as client:
                client.echo()
        except Exception as error:  # the UI shows the message; it names no patient data
            return False, str(error)
        return True, "C-ECHO succeeded"
