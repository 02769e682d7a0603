"""The per-project release key and everything derived from it: patient pseudonyms, UIDs, date offsets.

HMAC-SHA256 under a key derived per purpose from the project's secret: stable across runs and backfills
of a project, unlinkable across projects (different secrets), irreversible without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pacsflow.core.privacy import MIN_KEY_BYTES, load_or_create_key

KEY_ENV_PREFIX = "PACSFLOW_RELEASE_KEY_"
# Dates move back by 62 to 730 days, whole days, so times of day (and weekdays modulo 7) are kept.
MIN_SHIFT_DAYS, MAX_SHIFT_DAYS = 62, 730
UID_ROOT = "2.25."  # UUID-derived UIDs (PS3.5 B.2): no organisation root needed, at most 44 characters


def key_env_var(project: str) -> str:
    return KEY_ENV_PREFIX + project.upper().replace("-", "_")


def key_file(key_dir: Path, project: str) -> Path:
    return key_dir / f"release-{project}.key"


def project_secret(project: str, key_dir: Path, secret: str | bytes | None = None) -> bytes:
    """The project's secret: ``secret`` (from a secrets backend), else ``$PACSFLOW_RELEASE_KEY_<PROJECT>``,
    else the key file ``<key_dir>/release-<project>.key`` (created atomically, 0600, on first use)."""
    value = secret if secret else os.environ.get(key_env_var(project))
    if value:
        raw = value.encode("utf-8") if isinstance(value, str) else value
        if len(raw) < MIN_KEY_BYTES:
            raise ValueError(f"the release key of project {project!r} must be at least {MIN_KEY_BYTES} bytes")
        return raw
    return load_or_create_key(key_file(key_dir, project))


@dataclass(frozen=True)
class ReleaseKeys:
    """Keyed replacements for one project."""

    secret: bytes

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def patient_pseudonym(self, patient_id: str) -> str:
        """``PF`` and 14 hex digits: fits PatientID (LO) and PatientName (PN)."""
        return "PF" + self._digest("patient", patient_id).hex()[:14].upper()

    def identifier(self, kind: str, value: str) -> str:
        """A 16-character pseudonym for an ID (AN, StudyID, ...): fits SH."""
        return self._digest(f"id:{kind}", value).hex()[:16].upper()

    def uid(self, value: str) -> str:
        return UID_ROOT + str(int.from_bytes(self._digest("uid", value)[:16], "big"))

    def date_shift(self, patient_id: str) -> timedelta:
        span = MAX_SHIFT_DAYS - MIN_SHIFT_DAYS + 1
        days = MIN_SHIFT_DAYS + int.from_bytes(self._digest("date", patient_id)[:8], "big") % span
        return -timedelta(days=days)
