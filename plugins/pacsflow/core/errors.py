"""Errors no retry can fix, and how any error is described in the audit without patient data."""

from __future__ import annotations

import errno
from typing import Any


class ConfigurationError(ValueError):
    """A setting, definition or template is unusable; the message names what to change. Never retried."""


def describe_error(error: BaseException) -> str:
    """A one-line reason for the audit. pacsflow's own exceptions are written to carry no identifiers, so
    their text is kept; for others (drivers, libraries) only the type and errno, whose text may quote data."""
    if type(error).__module__.startswith("pacsflow."):
        return str(error).splitlines()[0][:500] if str(error) else type(error).__name__
    original = getattr(error, "orig", None)  # SQLAlchemy wraps the driver's exception
    name = type(error).__name__ + (f" ({type(original).__name__})" if original is not None else "")
    if isinstance(error, OSError) and error.errno:
        name += f" [{errno.errorcode.get(error.errno, error.errno)}]"
    return f"{name}: see the task log"


def validation_problems(error: Any) -> str:
    """A pydantic ValidationError as one line naming each key and its problem (values are not repeated)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or '(top)'}: {item['msg'].removeprefix('Value error, ')}"
        for item in error.errors()
    )
