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

from pacsflow.core.dicom.config import ReceiverConfig, TlsConfig
from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.privacy import use_private_umask
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
    parser.add_argument("--max-associations", type=int, default=10)
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
    use_private_umask()  # received instances, staging files and directories: the service account only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = ReceiverConfig(ae_title=args.ae_title, host=args.host, port=args.port,
                            allowed_calling_aes=tuple(args.allow_ae),
                            allowed_addresses=tuple(args.allow_address) or ReceiverConfig.allowed_addresses,
                            max_associations=args.max_associations, embedded=False, backend=args.backend,
                            tls=TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
                            if args.tls_cert else None)
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
