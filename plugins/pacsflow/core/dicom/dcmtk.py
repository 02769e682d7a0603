"""DCMTK's programs, run by a verified absolute path, never by whatever ``PATH`` finds first.

pynetdicom installs console scripts of its own (``storescp``, ``findscu``, ``movescu``...) into the virtual
environment's ``bin``, which comes first on ``PATH`` once the environment is activated: DCMTK's option syntax
then reaches pynetdicom's program (``storescp: error: argument port: invalid int value: '+B'``) and nothing is
received. DCMTK's programs are taken from Debian's location (``/usr/bin``) or from the directory named by
``PACSFLOW_DCMTK_BIN``, and each is checked to be DCMTK's (its ``--version`` starts with ``$dcmtk:``).
"""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path

from pacsflow.core.errors import ConfigurationError

DCMTK_BIN_ENV = "PACSFLOW_DCMTK_BIN"
DEBIAN_DCMTK_BIN = "/usr/bin"
_VERSION_SECONDS = 10.0


class DcmtkNotFound(ConfigurationError):
    """DCMTK's program is not where pacsflow looks, or the program there is not DCMTK's."""


def dcmtk_program(name: str) -> str:
    """The absolute path of DCMTK's program ``name`` (``storescp``...), checked to be DCMTK's."""
    directory = os.environ.get(DCMTK_BIN_ENV) or DEBIAN_DCMTK_BIN
    if not Path(directory).is_absolute():
        raise DcmtkNotFound(f"{DCMTK_BIN_ENV} must be an absolute directory, not {directory!r}")
    path = Path(directory) / name
    where = f"set {DCMTK_BIN_ENV} to the directory holding DCMTK's programs (now {directory})"
    if not os.access(path, os.X_OK) or not path.is_file():
        raise DcmtkNotFound(
            f"DCMTK's {name} is not at {path}: install the Debian package dcmtk "
            f"(scripts/install-system-deps.sh), or {where}"
        )
    stat = path.stat()
    if not _is_dcmtk(str(path), name, stat.st_mtime_ns, stat.st_ino):
        raise DcmtkNotFound(
            f"{path} is not DCMTK's {name} (its --version does not name DCMTK; pynetdicom installs a {name} of "
            f"its own): install the Debian package dcmtk, or {where}"
        )
    return str(path)


@cache
def _is_dcmtk(path: str, name: str, mtime_ns: int, inode: int) -> bool:
    """DCMTK's programs print ``$dcmtk: <name> v<version> <date> $`` first on ``--version`` (cached per file
    version: one run per process and program)."""
    try:
        done = subprocess.run(
            [path, "--version"], check=False, capture_output=True, text=True, errors="replace", timeout=_VERSION_SECONDS
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.stdout.startswith(f"$dcmtk: {name} v")
