"""``python -m pacsflow.core.dicom``: pacsflow's C-STORE receiver as a standalone service.

For deployments with several workers, where the PACS knows a single move destination: run this once on a
host whose data root the workers share, and set ``receiver_mode: service`` in the dicom connection.
Stops cleanly on SIGTERM or SIGINT. With ``--stop-when-idle`` it is the host's shared receiver that retrieval
tasks start themselves (``receiver_mode: shared``): it stops once no task holds a lease on it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from pacsflow.core.dicom.config import ReceiverConfig, TlsConfig
from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.dicom.sharing import LEASE, idle
from pacsflow.core.storage import StorageLayout

log = logging.getLogger("pacsflow.receiver")
IDLE_CHECK_SECONDS = 2.0


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
    parser.add_argument("--stop-when-idle", action="store_true",
                        help="stop once no retrieval task holds a lease on <root>/" + LEASE)
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_ca):
        parser.error("--tls-cert and --tls-ca go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = ReceiverConfig(ae_title=args.ae_title, host=args.host, port=args.port,
                            allowed_calling_aes=tuple(args.allow_ae),
                            allowed_addresses=tuple(args.allow_address) or ReceiverConfig.allowed_addresses,
                            max_associations=args.max_associations, mode="service", backend=args.backend,
                            tls=TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
                            if args.tls_cert else None)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with open_receiver(config, StorageLayout(args.root)) as receiver:
        log.info("receiving as %s on %s:%d", config.ae_title, config.host, receiver.port)
        if args.stop_when_idle:
            _wait_until_idle(args.root / LEASE, stop)
        else:
            stop.wait()
        stats = receiver.stats
    log.info("stopped: %d stored (%d bytes), %d rejected %s", stats.stored, stats.bytes_stored, stats.rejected,
             stats.rejected_reasons)
    return 0


def _wait_until_idle(lease: Path, stop: threading.Event) -> None:
    """Until no task holds a lease. The exclusive lease stays held (until the process exits) so that a task
    arriving meanwhile waits for this receiver to stop, then starts a new one."""
    while not stop.wait(IDLE_CHECK_SECONDS):
        held = idle(lease)
        if held is not None:
            _keep_until_exit.append(held)
            log.info("no retrieval task needs the receiver any more: stopping")
            return


_keep_until_exit: list[object] = []


if __name__ == "__main__":
    raise SystemExit(main())
