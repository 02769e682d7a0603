"""Which series of a resolved study the cohort keeps, and why each other one is dropped.

PACS queries cannot select an exam type, so filtering happens here, on the series-level C-FIND answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import re2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from pacsflow.core.errors import ConfigurationError, validation_problems


class DropReason(StrEnum):
    MODALITY = "modality"
    DESCRIPTION = "description"
    BODY_PART = "body_part"
    INSTANCE_COUNT = "instance_count"


class SeriesRulesError(ConfigurationError):
    """The series rules configuration is malformed; the message names the key to fix."""


class SeriesRules(BaseModel):
    """What a cohort keeps of a study's series. Modalities and body parts compare case-insensitively;
    description patterns are case-insensitive RE2 expressions, compiled when the rules are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    include_modalities: tuple[StrictStr, ...] = ()  # empty: any modality
    exclude_modalities: tuple[StrictStr, ...] = ()
    include_descriptions: tuple[StrictStr, ...] = ()  # empty: any description
    exclude_descriptions: tuple[StrictStr, ...] = ()
    include_body_parts: tuple[StrictStr, ...] = ()  # empty: any body part
    min_instances: StrictInt = Field(default=1, ge=0)
    _included: tuple[Any, ...] = PrivateAttr(())
    _excluded: tuple[Any, ...] = PrivateAttr(())

    @field_validator(
        "include_modalities",
        "exclude_modalities",
        "include_descriptions",
        "exclude_descriptions",
        "include_body_parts",
        mode="before",
    )
    @classmethod
    def _a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            # a ValueError is what pydantic reports as a validation error naming the key (a TypeError escapes)
            raise ValueError("must be a list of strings, not one text")  # noqa: TRY004
        return value

    @field_validator("include_modalities", "exclude_modalities", "include_body_parts")
    @classmethod
    def _upper(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(value.upper() for value in values)

    @field_validator("include_descriptions", "exclude_descriptions")
    @classmethod
    def _compiles(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        _compiled(patterns)
        return patterns

    def model_post_init(self, context: Any) -> None:
        self._included = _compiled(self.include_descriptions)
        self._excluded = _compiled(self.exclude_descriptions)

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> SeriesRules:
        """Validate plain configuration; a :class:`SeriesRulesError` names each key at fault."""
        try:
            return cls.model_validate(config)
        except ValidationError as error:
            raise SeriesRulesError(f"series_rules: {validation_problems(error)}") from None

    def drop_reason(self, series: Mapping[str, Any]) -> DropReason | None:
        """Why ``series`` (a series-level C-FIND match) is dropped, or None when it is kept."""
        modality = (series.get("Modality") or "").upper()
        if (self.include_modalities and modality not in self.include_modalities) or modality in self.exclude_modalities:
            return DropReason.MODALITY
        description = series.get("SeriesDescription") or ""
        if self._included and not any(p.search(description) for p in self._included):
            return DropReason.DESCRIPTION
        if any(p.search(description) for p in self._excluded):
            return DropReason.DESCRIPTION
        body_part = (series.get("BodyPartExamined") or "").upper()
        if self.include_body_parts and body_part not in self.include_body_parts:
            return DropReason.BODY_PART
        count = series.get("NumberOfSeriesRelatedInstances")
        if isinstance(count, int) and count < self.min_instances:
            return DropReason.INSTANCE_COUNT
        return None


def _compiled(patterns: tuple[str, ...]) -> tuple[Any, ...]:
    """Case-insensitive patterns compiled by RE2, whose matching time is linear in the text: a pattern such as
    ``^(a+)+$`` cannot stall a retrieval task on a long SeriesDescription (backtracking engines can). RE2 has
    no look-around or back-references; such a pattern is refused here, when the definition is loaded."""
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re2.compile(pattern, options))
        except re2.error as error:
            detail = error.args[0].decode() if error.args and isinstance(error.args[0], bytes) else error
            raise ValueError(f"invalid regular expression {pattern!r}: {detail}") from None
    return tuple(compiled)
