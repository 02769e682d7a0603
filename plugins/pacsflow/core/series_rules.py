"""Which series of a resolved study the cohort keeps, and why each other one is dropped.

PACS queries cannot select an exam type, so filtering happens here, on the series-level C-FIND answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import re2
from pacsflow.core.errors import ConfigurationError


class DropReason(StrEnum):
    MODALITY = "modality"
    DESCRIPTION = "description"
    BODY_PART = "body_part"
    INSTANCE_COUNT = "instance_count"


_RULE_KEYS = frozenset(
    {"include_modalities", "exclude_modalities", "include_descriptions", "exclude_descriptions",
     "include_body_parts", "min_instances"}
)


class SeriesRulesError(ConfigurationError):
    """The series rules configuration is malformed; the message names the key to fix."""


@dataclass(frozen=True)
class SeriesRules:
    include_modalities: frozenset[str] = frozenset()  # empty: any modality
    exclude_modalities: frozenset[str] = frozenset()
    include_descriptions: tuple[Any, ...] = ()  # compiled RE2 patterns; empty: any description
    exclude_descriptions: tuple[Any, ...] = ()
    include_body_parts: frozenset[str] = frozenset()  # empty: any body part
    min_instances: int = 1

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> "SeriesRules":
        """Build rules from plain configuration (a DAG param or a JSON file); patterns are case-insensitive."""
        unknown = set(config) - _RULE_KEYS
        if unknown:
            raise SeriesRulesError(f"unknown series rule keys {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
        min_instances = config.get("min_instances", 1)
        if not isinstance(min_instances, int) or min_instances < 0:
            raise SeriesRulesError("min_instances must be a whole number >= 0")
        return cls(
            include_modalities=_upper_set(config, "include_modalities"),
            exclude_modalities=_upper_set(config, "exclude_modalities"),
            include_descriptions=_patterns(config, "include_descriptions"),
            exclude_descriptions=_patterns(config, "exclude_descriptions"),
            include_body_parts=_upper_set(config, "include_body_parts"),
            min_instances=min_instances,
        )

    def drop_reason(self, series: Mapping[str, Any]) -> DropReason | None:
        """Why ``series`` (a series-level C-FIND match) is dropped, or None when it is kept."""
        modality = (series.get("Modality") or "").upper()
        if (self.include_modalities and modality not in self.include_modalities) or modality in self.exclude_modalities:
            return DropReason.MODALITY
        description = series.get("SeriesDescription") or ""
        if self.include_descriptions and not any(p.search(description) for p in self.include_descriptions):
            return DropReason.DESCRIPTION
        if any(p.search(description) for p in self.exclude_descriptions):
            return DropReason.DESCRIPTION
        body_part = (series.get("BodyPartExamined") or "").upper()
        if self.include_body_parts and body_part not in self.include_body_parts:
            return DropReason.BODY_PART
        count = series.get("NumberOfSeriesRelatedInstances")
        if isinstance(count, int) and count < self.min_instances:
            return DropReason.INSTANCE_COUNT
        return None


def _upper_set(config: Mapping[str, Any], key: str) -> frozenset[str]:
    return frozenset(value.upper() for value in _strings(config, key))


def _patterns(config: Mapping[str, Any], key: str) -> tuple[Any, ...]:
    """Case-insensitive patterns compiled by RE2, whose matching time is linear in the text: a pattern such as
    ``^(a+)+$`` cannot stall a retrieval task on a long SeriesDescription (backtracking engines can). RE2 has
    no look-around or back-references; such a pattern is refused here, when the definition is loaded."""
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    compiled = []
    for pattern in _strings(config, key):
        try:
            compiled.append(re2.compile(pattern, options))
        except re2.error as error:
            detail = error.args[0].decode() if error.args and isinstance(error.args[0], bytes) else error
            raise SeriesRulesError(f"{key}: invalid regular expression {pattern!r}: {detail}") from None
    return tuple(compiled)


def _strings(config: Mapping[str, Any], key: str) -> Iterable[str]:
    values = config.get(key) or []
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise SeriesRulesError(f"{key} must be a list of strings")
    return values
