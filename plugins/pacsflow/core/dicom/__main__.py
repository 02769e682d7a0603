"""``python -m pacsflow.core.dicom``: pacsflow's C-STORE receiver as a standalone service.

For deployments with several workers, where the PACS knows a single move destination: run this once on a
host whose data root the workers share, and set ``receiver_embedded: false`` in the dicom connection.
Stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from pacsflow.core.dicom.config import ReceiverConfig, ReceiverConfigError, TlsConfig
from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.storage import StorageLayout

log = logging.getLogger("pacsflow.receiver")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pacsflow.core.dicom", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="DICOM root: <root>/<Study>/<Series>/<SOP>.dcm")
    parser.add_argument("--ae-title", default="PACSFLOW")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=11113)
    parser.add_argument("--allow-ae", action="append", default=[], help="calling AE title allowed (repeat)")
    parser.add_argument("--allow-address", action="append", default=[], help="peer address allowed (repeat)")
    defaults = ReceiverConfig()
    parser.add_argument("--max-associations", type=int, default=defaults.max_associations,
                        help="associations at once; more are answered busy (default: %(default)s)")
    parser.add_argument("--acse-timeout", type=float, default=defaults.acse_timeout,
                        help="seconds a connection has to present its association (default: %(default)s)")
    parser.add_argument("--dimse-timeout", type=float, default=defaults.dimse_timeout,
                        help="seconds to wait for a DIMSE message (default: %(default)s)")
    parser.add_argument("--network-timeout", type=float, default=defaults.network_timeout,
                        help="seconds any read or write may block (default: %(default)s)")
    parser.add_argument("--max-pdu", type=int, default=defaults.max_pdu,
                        help="maximum PDU advertised and accepted, bytes (default: %(default)s; dcmtk: <= 131072)")
    parser.add_argument("--transfer-syntax", action="append", default=[],
                        help="accept this transfer syntax UID (repeat; default: every one but Deflated)")
    parser.add_argument("--max-inflated-bytes", type=int, default=defaults.max_inflated_bytes,
                        help="with Deflated accepted: largest inflated data set (default: %(default)s)")
    parser.add_argument("--backend", choices=["pynetdicom", "dcmtk"], default="pynetdicom",
                        help="dcmtk: DCMTK storescp per association (faster; no TLS)")
    parser.add_argument("--tls-cert", help="serve DICOM over TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    parser.add_argument("--tls-ca", help="CA bundle that client certificates must chain to (required with --tls-cert)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_ca):
        parser.error("--tls-cert and --tls-ca go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = ReceiverConfig(ae_title=args.ae_title, host=args.host, port=args.port,
                                allowed_calling_aes=tuple(args.allow_ae),
                                allowed_addresses=tuple(args.allow_address) or ReceiverConfig.allowed_addresses,
                                max_associations=args.max_associations, embedded=False, backend=args.backend,
                                tls=TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
                                if args.tls_cert else None,
                                acse_timeout=args.acse_timeout, dimse_timeout=args.dimse_timeout,
                                network_timeout=args.network_timeout, max_pdu=args.max_pdu,
                                transfer_syntaxes=tuple(args.transfer_syntax) or ReceiverConfig.transfer_syntaxes,
                                max_inflated_bytes=args.max_inflated_bytes)
    except ReceiverConfigError as error:
        log.error("cannot start the receiver: %s", error)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with open_receiver(config, StorageLayout(args.root)) as receiver:
        log.info("receiving as %s on %s:%d", config.ae_title, config.host, receiver.port)
        stop.wait()
        stats = receiver.stats
    log.info("stopped: %d stored (%d bytes), %d rejected %s", stats.stored, stats.bytes_stored, stats.rejected,
             stats.rejected_reasons)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
