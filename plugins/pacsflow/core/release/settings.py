"""What a research team chooses for its release: the options of the DICOM PS3.15 Basic Application Level
Confidentiality Profile that pacsflow implements, the private tags it may keep, and the project whose key
makes the pseudonyms."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pacsflow.core.errors import ConfigurationError, validation_problems

_PRIVATE_TAG = re.compile(r"([0-9A-Fa-f]{4}),xx([0-9A-Fa-f]{2}),(.+)")


class ReleaseSettingsError(ConfigurationError):
    """The release settings are unusable; the message names the setting."""


class PrivateTag(BaseModel):
    """One allow-listed private element: its odd group, its element offset in the block, its creator."""

    model_config = ConfigDict(frozen=True)

    group: int
    element: int  # the low byte: 0x00-0xFF within the creator's block
    creator: str

    @classmethod
    def parse(cls, text: str) -> PrivateTag:
        """``"0029,xx10,SIEMENS CSA HEADER"``: group, element offset in the block, private creator."""
        match = _PRIVATE_TAG.fullmatch(text.strip())
        if not match:
            raise ValueError(f"private tag {text!r} must look like '0029,xx10,CREATOR NAME'")
        group = int(match[1], 16)
        if group % 2 == 0:
            raise ValueError(f"private tag {text!r}: a private group is odd")
        return cls(group=group, element=int(match[2], 16), creator=match[3].strip())


class ReleaseSettings(BaseModel):
    """Options of the release (the DAG's ``release`` param). Unknown keys are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    project: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="names the pseudonym key: same project, same pseudonyms; others "
        "unlinkable (default: the extraction's id)",
    )
    retain_longitudinal_dates: bool = Field(
        default=True,
        description="shift every date of a patient by one keyed offset (intervals kept); "
        "off: dates replaced by a dummy date",
    )
    retain_device_identity: bool = Field(default=False, description="keep StationName, DeviceSerialNumber, ...")
    clean_descriptors: bool = Field(
        default=True,
        description="keep study/series descriptions and protocol names, with identifiers removed; off: remove them",
    )
    allow_ultrasound: bool = Field(
        default=False, description="release ultrasound (held back by default: burned-in text)"
    )
    private_tag_allowlist: tuple[PrivateTag, ...] = ()

    @field_validator("private_tag_allowlist", mode="before")
    @classmethod
    def _parse_private_tags(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(PrivateTag.parse(item) if isinstance(item, str) else item for item in value)
        return value

    @classmethod
    def parse(cls, config: Mapping[str, Any] | None) -> ReleaseSettings:
        """Validate plain configuration; a :class:`ReleaseSettingsError` names each key at fault."""
        try:
            return cls.model_validate(dict(config or {}))
        except ValidationError as error:
            raise ReleaseSettingsError(f"release: {validation_problems(error)}") from None
