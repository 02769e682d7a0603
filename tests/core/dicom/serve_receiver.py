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
    peak_kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"stored": receiver.stats.stored, "rejected_reasons": receiver.stats.rejected_reasons,
                      "peak_rss_mb": round(peak_kb / 1024, 1)}), flush=True)


if __name__ == "__main__":
    main()
