"""Extraction definitions: one validated YAML file per research project, the one place each setting is defined.

    definition = load_definition(Path("include/extractions/demo.yaml"))

A definition fixes what a project extracts (cohort template and its values, resolution, series rules) and how it
runs (schedule, retries, timeouts, pool, limits). The data interval of each run comes from the schedule (or from
the trigger form), never from a setting, so the runs of a backfill each extract their own interval.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pacsflow.core.errors import ConfigurationError, validation_problems
from pacsflow.core.release.settings import ReleaseSettings
from pacsflow.core.resolve import ResolutionSettings
from pacsflow.core.ris import RESERVED_PARAMS
from pacsflow.core.series_rules import SeriesRules

DEFINITIONS_ENV = "PACSFLOW_EXTRACTIONS_DIR"
DATA_ROOT_ENV = "PACSFLOW_DATA_ROOT"
DEFAULT_DATA_ROOT = "/var/lib/pacsflow"
CohortValue = str | int | float | bool | list[str] | list[int]


class DefinitionError(ConfigurationError):
    """A definition file is unusable; the message names the file, the key and the problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CohortSettings(_Model):
    sql_template: str = Field(pattern=r"^[A-Za-z0-9_-]+\.sql$", description="A file in include/sql")
    params: dict[str, CohortValue] = Field(
        default_factory=dict, description="Values bound by name to the template (lists: IN lists)"
    )
    max_size: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="A cohort larger than this fails the run (an interval typo, not a cohort)",
    )

    @field_validator("params")
    @classmethod
    def _names_of_our_own(cls, params: dict[str, CohortValue]) -> dict[str, CohortValue]:
        for name in params:
            if name in RESERVED_PARAMS:
                raise ValueError(f"{name!r} is bound by pacsflow from the run's data interval; choose another name")
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
                raise ValueError(f"parameter name {name!r} must be lower_snake_case")
        return params


class RetrievalSettings(_Model):
    batch_size: int = Field(default=50, ge=1, le=10_000, description="ANs per retrieval task")
    pool: str = Field(
        default="pacs", pattern=r"^[A-Za-z0-9_.-]+$", description="Airflow pool capping PACS associations"
    )


class ConnectionIds(_Model):
    ris: str = "pacsflow_ris"
    pacs: str = "pacsflow_pacs"
    audit: str = "pacsflow_audit"


class RunSettings(_Model):
    retries: int = Field(default=3, ge=0, le=20)
    retry_delay_seconds: float = Field(default=60, gt=0)
    max_retry_delay_seconds: float = Field(default=1800, gt=0)
    run_timeout_hours: float = Field(default=72, gt=0, description="A run still going after this is failed")
    task_timeout_hours: float = Field(default=12, gt=0, description="One task attempt still going after this is failed")
    alert_conn_id: str | None = Field(default=None, description="HTTP connection that receives a POST when a run fails")


class ExtractionDefinition(_Model):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_]{0,62}$")
    description: str = Field(min_length=1)
    owner: str = "pacsflow"
    schedule: str | None = Field(
        default=None, description="cron expression or preset (@daily, @weekly...); none: on demand"
    )
    start_date: datetime
    catchup: bool = False
    tags: tuple[str, ...] = ()
    cohort: CohortSettings
    resolution: ResolutionSettings = ResolutionSettings()
    series_rules: SeriesRules = SeriesRules()
    retrieval: RetrievalSettings = RetrievalSettings()
    release: ReleaseSettings = ReleaseSettings()  # on by default: researchers get the de-identified release
    connections: ConnectionIds = ConnectionIds()
    run: RunSettings = RunSettings()

    @property
    def dag_id(self) -> str:
        return f"pacsflow__{self.id}"

    @field_validator("start_date")
    @classmethod
    def _utc_when_naive(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from croniter import (
            croniter,  # installed with Airflow; the scheduler's own cron parser
        )

        presets = {"@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly"}
        if value not in presets and not croniter.is_valid(value):
            raise ValueError(f"{value!r} is neither a cron expression nor one of {sorted(presets)}")
        return value

    @property
    def release_settings(self) -> ReleaseSettings:
        """The release settings, the pseudonym project defaulting to this extraction's id."""
        return self.release.model_copy(update={"project": self.release.project or self.id})

    @property
    def retry_delay(self) -> timedelta:
        return timedelta(seconds=self.run.retry_delay_seconds)


def load_definition(path: Path) -> ExtractionDefinition:
    """Parse and validate one definition file; any problem is a :class:`DefinitionError` naming file and key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise DefinitionError(f"{path.name}: cannot read the definition: {error}") from None
    if not isinstance(raw, dict):
        raise DefinitionError(f"{path.name}: a definition is a YAML mapping of settings")
    try:
        definition = ExtractionDefinition.model_validate(raw)
    except ValidationError as error:
        raise DefinitionError(f"{path.name}: {validation_problems(error)}") from None
    if definition.id != path.stem:
        raise DefinitionError(f"{path.name}: id {definition.id!r} must equal the file name without .yaml")
    return definition


def definitions_dir(default: Path) -> Path:
    return Path(os.environ.get(DEFINITIONS_ENV) or default)


def data_root() -> Path:
    """Where DICOM files, metadata and the log key live: a deployment setting, never a run parameter."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)
