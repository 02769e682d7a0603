"""Keyed pseudonyms for patient identifiers, so logs and errors can refer to an AN without revealing it."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_ENV = "PACSFLOW_LOG_KEY"


class Pseudonymizer:
    """HMAC-SHA256 of an identifier under a secret key, shortened for log lines (``an:3f9a...``)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key

    def ref(self, identifier: str, kind: str = "an") -> str:
        digest = hmac.new(self._key, identifier.encode("utf-8"), hashlib.sha256).hexdigest()
        return f"{kind}:{digest[:16]}"

    @classmethod
    def from_environment(cls, key_file: Path) -> "Pseudonymizer":
        """Key from ``$PACSFLOW_LOG_KEY``, else from ``key_file`` (created with mode 0600 on first use)."""
        env_key = os.environ.get(KEY_ENV)
        if env_key:
            return cls(env_key.encode("utf-8"))
        key_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls(key_file.read_bytes())
        with os.fdopen(fd, "wb") as handle:
            key = secrets.token_bytes(32)
            handle.write(key)
        return cls(key)

    @classmethod
    def existing(cls, key_file: Path | None) -> "Pseudonymizer | None":
        """The deployment's key if there is one (``$PACSFLOW_LOG_KEY`` or ``key_file``); never creates a key, so
        a reader (the audit pages) cannot silently hash with a key the extraction did not use."""
        env_key = os.environ.get(KEY_ENV)
        if env_key:
            return cls(env_key.encode("utf-8"))
        if key_file is None:
            return None
        try:
            return cls(key_file.read_bytes())
        except FileNotFoundError:
            return None
