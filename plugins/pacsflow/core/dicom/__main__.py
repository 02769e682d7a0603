"""``python -m pacsflow.core.dicom``: pacsflow's C-STORE receiver as a standalone service.

For deployments with several workers, where the PACS knows a single move destination: run this once on a
host whose data root the workers share, and set ``receiver_mode: service`` in the dicom connection.
Every option defaults to an environment variable (``PACSFLOW_RECEIVER_*``, ``PACSFLOW_DATA_ROOT``), so a
container or a unit file configures it without a command line. Stops cleanly on SIGTERM or SIGINT. With
``--stop-when-idle`` it is the host's shared receiver that retrieval tasks start themselves
(``receiver_mode: shared``): it stops once no task holds a lease on it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from pacsflow.core.dicom.config import ReceiverConfig, ReceiverConfigError, TlsConfig
from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.dicom.sharing import LEASE, idle
from pacsflow.core.privacy import use_private_umask
from pacsflow.core.storage import StorageLayout

log = logging.getLogger("pacsflow.receiver")
IDLE_CHECK_SECONDS = 2.0
SIGNAL_CHECK_SECONDS = 0.5  # the longest a stop signal can wait for the main thread (see _stop_on_signals)

BACKENDS = ("pynetdicom", "dcmtk")


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _default_root() -> Path | None:
    data_root = os.environ.get("PACSFLOW_DATA_ROOT")
    return Path(data_root) / "dicom" if data_root else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m pacsflow.core.dicom", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=_default_root(),
        help="DICOM root: <root>/<Study>/<Series>/<SOP>.dcm (default: $PACSFLOW_DATA_ROOT/dicom)",
    )
    parser.add_argument(
        "--ae-title",
        default=env("PACSFLOW_RECEIVER_AE_TITLE", "PACSFLOW"),
        help="(default: $PACSFLOW_RECEIVER_AE_TITLE or PACSFLOW)",
    )
    parser.add_argument(
        "--host",
        default=env("PACSFLOW_RECEIVER_HOST", "127.0.0.1"),
        help="interface to bind (default: $PACSFLOW_RECEIVER_HOST or loopback only)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env("PACSFLOW_RECEIVER_PORT", "11113")),
        help="(default: $PACSFLOW_RECEIVER_PORT or 11113)",
    )
    parser.add_argument(
        "--allow-ae",
        action="append",
        default=None,
        help="calling AE title allowed (repeat; default: $PACSFLOW_RECEIVER_ALLOWED_AES, comma-separated)",
    )
    parser.add_argument(
        "--allow-address",
        action="append",
        default=None,
        help="peer address or host name allowed, names resolved at start-up (repeat; default: "
        "$PACSFLOW_RECEIVER_ALLOWED_ADDRESSES, comma-separated, else loopback only)",
    )
    parser.add_argument(
        "--max-associations",
        type=int,
        default=int(env("PACSFLOW_RECEIVER_MAX_ASSOCIATIONS", "10")),
        help="associations at once; more are answered busy (default: $PACSFLOW_RECEIVER_MAX_ASSOCIATIONS or 10)",
    )
    defaults = ReceiverConfig()
    parser.add_argument(
        "--acse-timeout",
        type=float,
        default=defaults.acse_timeout,
        help="seconds a connection has to present its association (default: %(default)s)",
    )
    parser.add_argument(
        "--dimse-timeout",
        type=float,
        default=defaults.dimse_timeout,
        help="seconds to wait for a DIMSE message (default: %(default)s)",
    )
    parser.add_argument(
        "--network-timeout",
        type=float,
        default=defaults.network_timeout,
        help="seconds any read or write may block (default: %(default)s)",
    )
    parser.add_argument(
        "--max-pdu",
        type=int,
        default=defaults.max_pdu,
        help="maximum PDU advertised and accepted, bytes (default: %(default)s; dcmtk: <= 131072)",
    )
    parser.add_argument(
        "--transfer-syntax",
        action="append",
        default=[],
        help="accept this transfer syntax UID (repeat; default: every one but Deflated)",
    )
    parser.add_argument(
        "--max-inflated-bytes",
        type=int,
        default=defaults.max_inflated_bytes,
        help="with Deflated accepted: largest inflated data set (default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=env("PACSFLOW_RECEIVER_BACKEND", "pynetdicom"),
        help="dcmtk: DCMTK storescp per association (faster; no TLS) "
        "(default: $PACSFLOW_RECEIVER_BACKEND or pynetdicom)",
    )
    parser.add_argument("--tls-cert", help="serve DICOM over TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    parser.add_argument("--tls-ca", help="CA bundle that client certificates must chain to (required with --tls-cert)")
    parser.add_argument(
        "--stop-when-idle", action="store_true", help="stop once no retrieval task holds a lease on <root>/" + LEASE
    )
    args = parser.parse_args(argv)
    if args.root is None:
        parser.error("no DICOM root: give --root or set PACSFLOW_DATA_ROOT")
    if args.backend not in BACKENDS:
        parser.error(f"PACSFLOW_RECEIVER_BACKEND must be one of {', '.join(BACKENDS)}")
    if bool(args.tls_cert) != bool(args.tls_ca):
        parser.error("--tls-cert and --tls-ca go together")
    args.allow_ae = args.allow_ae if args.allow_ae is not None else _env_list("PACSFLOW_RECEIVER_ALLOWED_AES")
    names = args.allow_address if args.allow_address is not None else _env_list("PACSFLOW_RECEIVER_ALLOWED_ADDRESSES")
    try:
        args.allow_address = resolve_addresses(names)
    except OSError as error:
        parser.error(f"--allow-address / PACSFLOW_RECEIVER_ALLOWED_ADDRESSES: {error}")
    return args


def resolve_addresses(names: list[str]) -> tuple[str, ...]:
    """IP addresses of ``names`` (addresses stay as they are); a peer is then compared by address."""
    addresses: list[str] = []
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except socket.gaierror as error:
            raise OSError(f"cannot resolve {name!r} ({error.strerror})") from None
        addresses.extend(str(info[4][0]) for info in infos)
    return tuple(dict.fromkeys(addresses))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_private_umask()  # received instances, staging files and directories: the service account only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = ReceiverConfig(
            ae_title=args.ae_title,
            host=args.host,
            port=args.port,
            allowed_calling_aes=tuple(args.allow_ae),
            allowed_addresses=args.allow_address or ReceiverConfig.allowed_addresses,
            max_associations=args.max_associations,
            mode="service",
            backend=args.backend,
            tls=TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
            if args.tls_cert
            else None,
            acse_timeout=args.acse_timeout,
            dimse_timeout=args.dimse_timeout,
            network_timeout=args.network_timeout,
            max_pdu=args.max_pdu,
            transfer_syntaxes=tuple(args.transfer_syntax) or ReceiverConfig.transfer_syntaxes,
            max_inflated_bytes=args.max_inflated_bytes,
        )
    except ReceiverConfigError as error:
        log.error("cannot start the receiver: %s", error)
        return 2
    stop = _stop_on_signals()
    with open_receiver(config, StorageLayout(args.root)) as receiver:
        log.info("receiving as %s on %s:%d (%s backend)", config.ae_title, config.host, receiver.port, config.backend)
        if args.stop_when_idle:
            _wait_until_idle(args.root / LEASE, stop)
        else:
            while not stop.wait(SIGNAL_CHECK_SECONDS):
                pass
        stats = receiver.stats
    log.info(
        "stopped: %d stored (%d bytes), %d rejected %s",
        stats.stored,
        stats.bytes_stored,
        stats.rejected,
        stats.rejected_reasons,
    )
    return 0


def _stop_on_signals() -> threading.Event:
    """An event set on SIGTERM or SIGINT.

    The kernel may deliver the signal to any thread; Python runs its handler in the main thread only when that
    thread next runs bytecode, so the main thread waits in slices (``SIGNAL_CHECK_SECONDS``), never for good.
    The handler only starts a thread that sets the event: it may run inside the event's own lock (a wait slice
    ending), where calling set() itself would deadlock."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=stop.set, name="pacsflow-stop", daemon=True).start())
    return stop


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
