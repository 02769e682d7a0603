"""Keyed pseudonyms for patient identifiers, so logs and errors can refer to an AN without revealing it;
secret key files written so that a crash never leaves a partial key behind."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

KEY_ENV = "PACSFLOW_LOG_KEY"
MIN_KEY_BYTES = 16
KEY_BYTES = 32
PRIVATE_UMASK = 0o077  # files 0600, directories 0700: patient data is for the service account only
# A DICOM UID (or a longer dotted number) anywhere in a log message.
_UID_IN_TEXT = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+){3,}(?![0-9.])")


class Pseudonymizer:
    """HMAC-SHA256 of an identifier under a secret key, shortened for log lines (``an:3f9a...``)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the pseudonym key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def ref(self, identifier: str, kind: str = "an") -> str:
        digest = hmac.new(self._key, identifier.encode("utf-8"), hashlib.sha256).hexdigest()
        return f"{kind}:{digest[:16]}"

    @classmethod
    def from_environment(cls, key_file: Path) -> Pseudonymizer:
        """Key from ``$PACSFLOW_LOG_KEY``, else from ``key_file`` (created with mode 0600 on first use)."""
        env_key = os.environ.get(KEY_ENV)
        if env_key:
            return cls(env_key.encode("utf-8"))
        return cls(load_or_create_key(key_file))

    @classmethod
    def existing(cls, key_file: Path | None) -> Pseudonymizer | None:
        """The deployment's key if there is one (``$PACSFLOW_LOG_KEY`` or ``key_file``); never creates a key, so
        a reader (the audit pages) cannot silently hash with a key the extraction did not use."""
        env_key = os.environ.get(KEY_ENV)
        if env_key:
            return cls(env_key.encode("utf-8"))
        if key_file is None:
            return None
        try:
            return cls(_read_key(key_file))
        except FileNotFoundError:
            return None


def load_or_create_key(path: Path) -> bytes:
    """The secret in ``path``; on first use a new random one, written atomically with mode 0600: a temp file
    in the same directory is written and fsynced, then hard-linked to ``path`` (which fails if another
    process got there first: its key wins), so ``path`` never exists incomplete."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(KEY_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        with suppress(FileExistsError):  # another process got there first: its key wins
            os.link(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"key file {path} holds fewer than {MIN_KEY_BYTES} bytes: restore it from a backup "
            "(pseudonyms depend on it) or delete it to start a new key"
        )
    return key


def use_private_umask() -> int:
    """Make every file this process creates from now on 0600 and every directory 0700 (entry points call it:
    operators, the receiver service). Returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by the owner only; an existing directory is tightened to 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


# Loggers whose records can quote UIDs of received or queried instances (pydicom warns with the value).
LIBRARY_LOGGERS = ("pynetdicom", "pydicom", "py.warnings")  # py.warnings: warnings Airflow captures


class UidRedactingFilter(logging.Filter):
    """Replaces every UID in a log record by a keyed reference (``uid:3f9a...``): libraries such as
    pynetdicom put SOP Instance UIDs into their warnings. Install it on a handler or a library's logger."""

    def __init__(self, pseudonymizer: Pseudonymizer) -> None:
        super().__init__()
        self.pseudonymizer = pseudonymizer

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _UID_IN_TEXT.sub(lambda match: self.pseudonymizer.ref(match.group(0), "uid"), message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_REDACTING = UidRedactingFilter(Pseudonymizer(secrets.token_bytes(KEY_BYTES)))  # one per process


def redact_uids_in_library_logs(pseudonymizer: Pseudonymizer | None = None) -> None:
    """Install the process's :class:`UidRedactingFilter` on the loggers of :data:`LIBRARY_LOGGERS` (once) and
    make ``pseudonymizer`` its key (the last caller's key wins; until one is given, a key of this process:
    references then correlate within its log only)."""
    if pseudonymizer is not None:
        _REDACTING.pseudonymizer = pseudonymizer
    # A logger's filters do not apply to its children (pynetdicom logs as pynetdicom.<module>): each one.
    names = [
        name
        for name in list(logging.root.manager.loggerDict)
        if any(name == lib or name.startswith(lib + ".") for lib in LIBRARY_LOGGERS)
    ]
    for name in {*LIBRARY_LOGGERS, *names}:
        logger = logging.getLogger(name)
        if _REDACTING not in logger.filters:
            logger.addFilter(_REDACTING)


class DatabaseError(RuntimeError):
    """A database error whose driver message was withheld (it may quote patient data)."""


@contextmanager
def database_errors_withheld() -> Iterator[None]:
    """Re-raise a SQLAlchemy database error without its text: PostgreSQL's DETAIL quotes key values (ANs,
    UIDs) even when the engine hides bound parameters. The error class and SQLSTATE stay for diagnosis."""
    from sqlalchemy.exc import DBAPIError

    try:
        yield
    except DBAPIError as error:
        original = error.orig
        code = getattr(original, "pgcode", None) or getattr(original, "sqlite_errorname", None) or ""
        raise DatabaseError(
            f"database error {type(original).__name__} {code}".rstrip()
            + "; its details are withheld because they may quote patient data"
        ) from None
