"""Settings of a PACS peer and of pacsflow's own receiver, independent of where they come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

RetrieveMethod = Literal["c-move", "c-get"]
# pynetdicom: pure Python, TLS. dcmtk: DCMTK storescp per association (faster; Linux, no TLS).
ReceiverBackend = Literal["pynetdicom", "dcmtk"]
# shared: the host's receiver, started by the first retrieval task that needs it and stopped when none does;
# embedded: inside the task (one retrieval task at a time per data root); service: started by the operator.
ReceiverMode = Literal["shared", "embedded", "service"]


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True)
class PacsConfig:
    """How to reach one PACS as a query/retrieve SCU."""

    host: str
    port: int
    called_ae: str
    calling_ae: str = "PACSFLOW"
    # Slow-starting PACS are normal (minutes before the first C-STORE of a C-MOVE): generous defaults.
    acse_timeout: float = 30.0
    dimse_timeout: float = 300.0
    network_timeout: float = 300.0
    max_pdu: int = 0
    retrieve_method: RetrieveMethod = "c-move"
    # A PACS caps C-FIND results; a response with exactly this many matches is reported as capped.
    result_cap: int | None = None
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class ReceiverConfig:
    """pacsflow's C-STORE SCP, the move destination the PACS knows by ``ae_title``."""

    ae_title: str = "PACSFLOW"
    host: str = "127.0.0.1"
    port: int = 11113
    # Empty tuples mean "accept any"; production deployments should list the PACS.
    allowed_calling_aes: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ("127.0.0.1", "::1")
    max_associations: int = 10
    mode: ReceiverMode = "shared"
    tls: TlsConfig | None = field(default=None)
    backend: ReceiverBackend = "pynetdicom"

    def __post_init__(self) -> None:
        if self.backend not in get_args(ReceiverBackend):
            raise ValueError(f"unknown receiver backend {self.backend!r}: use one of {get_args(ReceiverBackend)}")
        if self.mode not in get_args(ReceiverMode):
            raise ValueError(f"unknown receiver_mode {self.mode!r}: use one of {get_args(ReceiverMode)}")
