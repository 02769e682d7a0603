"""Runs ``open_receiver`` for the hostile-peer tests in a child process: prints ``port N``, stops on SIGTERM, then
prints its stats and peak RSS (its own and its reaped children's, storescp) as one JSON line."""

from __future__ import annotations

import json
import resource
import signal
import sys
import threading
from pathlib import Path

from pacsflow.core.dicom.config import ReceiverConfig, TlsConfig
from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.storage import StorageLayout


def _own_peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    settings = json.loads(sys.argv[1])
    tls = settings.pop("tls", None)
    for name in ("allowed_calling_aes", "allowed_addresses", "transfer_syntaxes"):
        settings[name] = tuple(settings[name])
    config = ReceiverConfig(**settings, tls=TlsConfig(**tls) if tls else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with open_receiver(config, StorageLayout(Path(sys.argv[2]))) as receiver:
        print(f"port {receiver.port}", flush=True)
        stop.wait()
    # Its own high-water mark from /proc: getrusage's carries over exec from the process that started it (the
    # test runner, hundreds of MB). Children (storescp): the largest reaped one.
    peak_kb = max(_own_peak_kb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(
        json.dumps(
            {
                "stored": receiver.stats.stored,
                "rejected_reasons": receiver.stats.rejected_reasons,
                "peak_rss_mb": round(peak_kb / 1024, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
