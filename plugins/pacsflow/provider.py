"""Provider metadata: installing pacsflow as a distribution registers the ``dicom`` connection type in the UI."""

from __future__ import annotations

from typing import Any

import pacsflow


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "pacsflow",
        "name": "pacsflow",
        "description": "Research cohort extraction from hospital PACS (DICOM C-FIND / C-MOVE / C-GET).",
        "versions": [pacsflow.__version__],
        "connection-types": [
            {
                "connection-type": "dicom",
                "hook-class-name": "pacsflow.hooks.dicom.DicomHook",
                "hook-name": "DICOM (PACS)",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "password"],
                    "relabeling": {"host": "PACS host", "port": "PACS port", "login": "Called AE title (PACS)"},
                    "placeholders": {"host": "pacs.hospital.local", "port": "104", "login": "PACS_AE"},
                },
                "conn-fields": {
                    "calling_ae": {
                        "label": "Calling AE title (pacsflow)",
                        "schema": {"type": ["string", "null"], "default": "PACSFLOW", "maxLength": 16},
                    },
                    "retrieve_method": {
                        "label": "Retrieve with",
                        "schema": {"type": ["string", "null"], "enum": ["c-move", "c-get"], "default": "c-move"},
                    },
                    "receiver_ae": {
                        "label": "Receiver AE title (move destination known to the PACS)",
                        "schema": {"type": ["string", "null"], "default": "PACSFLOW", "maxLength": 16},
                    },
                    "receiver_host": {
                        "label": "Receiver bind address",
                        "schema": {"type": ["string", "null"], "default": "127.0.0.1"},
                    },
                    "receiver_port": {
                        "label": "Receiver port",
                        "schema": {"type": ["integer", "null"], "default": 11113},
                    },
                    "receiver_mode": {
                        "label": "Receiver: shared (started by tasks, one per host), embedded "
                        "(inside one task at a time), service (run by you)",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["shared", "embedded", "service"],
                            "default": "shared",
                        },
                    },
                    "receiver_backend": {
                        "label": "Receiver backend (dcmtk: DCMTK storescp, faster, no TLS)",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["pynetdicom", "dcmtk"],
                            "default": "pynetdicom",
                        },
                    },
                    "allowed_calling_aes": {
                        "label": "AE titles allowed to send to the receiver (comma separated)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "receiver_allowed_addresses": {
                        "label": "Addresses allowed to connect to the receiver (comma separated; default loopback)",
                        "schema": {"type": ["string", "null"], "default": "127.0.0.1,::1"},
                    },
                    "receiver_max_associations": {
                        "label": "Receiver: associations at once (more are answered busy)",
                        "schema": {"type": ["integer", "null"], "default": 10},
                    },
                    "receiver_tls_cert_file": {
                        "label": "Receiver TLS certificate (enables TLS; pynetdicom backend)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "receiver_tls_key_file": {"label": "Receiver TLS key", "schema": {"type": ["string", "null"]}},
                    "receiver_tls_ca_file": {
                        "label": "Receiver TLS CA (client certificates must chain to it)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "receiver_acse_timeout": {
                        "label": "Receiver: seconds for a connection to present its association",
                        "schema": {"type": ["number", "null"], "default": 30},
                    },
                    "receiver_dimse_timeout": {
                        "label": "Receiver DIMSE timeout (s)",
                        "schema": {"type": ["number", "null"], "default": 60},
                    },
                    "receiver_network_timeout": {
                        "label": "Receiver network timeout (s), every read and write",
                        "schema": {"type": ["number", "null"], "default": 60},
                    },
                    "receiver_max_pdu": {
                        "label": "Receiver maximum PDU (bytes; DCMTK backend at most 131072)",
                        "schema": {
                            "type": ["integer", "null"],
                            "default": 1048576,
                            "minimum": 4096,
                            "maximum": 16777216,
                        },
                    },
                    "receiver_transfer_syntaxes": {
                        "label": "Receiver transfer syntax UIDs (comma separated; default all but Deflated)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "receiver_max_inflated_bytes": {
                        "label": "Receiver: largest Deflated data set once inflated",
                        "schema": {"type": ["integer", "null"], "default": 4294967296},
                    },
                    "result_cap": {"label": "PACS C-FIND result cap", "schema": {"type": ["integer", "null"]}},
                    "dimse_timeout": {
                        "label": "DIMSE timeout (s)",
                        "schema": {"type": ["number", "null"], "default": 300},
                    },
                    "acse_timeout": {
                        "label": "ACSE timeout (s)",
                        "schema": {"type": ["number", "null"], "default": 30},
                    },
                    "network_timeout": {
                        "label": "Network timeout (s)",
                        "schema": {"type": ["number", "null"], "default": 300},
                    },
                    "tls_ca_file": {"label": "TLS CA file (enables TLS)", "schema": {"type": ["string", "null"]}},
                    "tls_cert_file": {"label": "TLS client certificate", "schema": {"type": ["string", "null"]}},
                    "tls_key_file": {"label": "TLS client key", "schema": {"type": ["string", "null"]}},
                },
            }
        ],
    }
