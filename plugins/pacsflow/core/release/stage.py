"""The research release: the run's retrieved series, de-identified into a separate release root.

    <release_root>/dicom/<StudyUID>/<SeriesUID>/<SOPUID>.dcm   de-identified files (keyed new UIDs)
    <release_root>/metadata/                                    Parquet of the released files' headers only

Instances that may show identifiers in their pixels are held back and reported. Each series of the run gets
one row in ``pacsflow_release_series`` (released / held back / failed counts and reasons). The profile and
its options: :mod:`pacsflow.core.release.profile`; settings: :class:`ReleaseSettings`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, delete, insert, select
from sqlalchemy.engine import Engine

from pacsflow.core.audit import Stage, utcnow
from pacsflow.core.export import ExportReport, export_instances
from pacsflow.core.pipeline import RunContext, retrieved_files, stage_attempt
from pacsflow.core.privacy import make_private_dir
from pacsflow.core.release.keys import ReleaseKeys, project_secret
from pacsflow.core.release.runner import FileOutcome, FileResult, ReleaseJob, release_files
from pacsflow.core.release.settings import ReleaseSettings, ReleaseSettingsError
from pacsflow.core.storage import StorageLayout

__all__ = [
    "ReleaseReport",
    "ReleaseSettings",
    "ReleaseSettingsError",
    "release_run",
    "release_series",
    "release_series_rows",
]

log = logging.getLogger(__name__)

# Kept apart from the core audit tables (own MetaData, created on first use) so the release stays optional.
release_metadata = MetaData()
release_series = Table(
    "pacsflow_release_series",
    release_metadata,
    Column("run_key", String(250), primary_key=True),
    Column("study_uid", String(64), primary_key=True),  # the source UIDs (the audit database is internal)
    Column("series_uid", String(64), primary_key=True),
    Column("project", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # released | partial | held_back | failed
    Column("released", Integer, nullable=False),
    Column("held_back", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("reasons", Text),  # "ultrasound: 2; burned-in annotation: 1"; never a value from a file
    Column("released_study_uid", String(64)),
    Column("released_series_uid", String(64)),
    Column("updated_at", DateTime(timezone=True)),
)


@dataclass
class _SeriesTally:
    released: int = 0
    held_back: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    released_study_uid: str | None = None
    released_series_uid: str | None = None

    def add(self, result: FileResult) -> None:
        setattr(self, result.outcome.value, getattr(self, result.outcome.value) + 1)
        if result.reason:
            self.reasons[result.reason] += 1
        if result.outcome is FileOutcome.RELEASED:
            self.released_study_uid, self.released_series_uid = result.released_study_uid, result.released_series_uid

    @property
    def status(self) -> str:
        if self.released and not (self.held_back or self.failed):
            return "released"
        if self.released:
            return "partial"
        return "held_back" if self.held_back else "failed"


@dataclass
class ReleaseReport:
    released: int = 0
    held_back: int = 0
    failed: int = 0
    series: Counter[str] = field(default_factory=Counter)  # series by status
    reasons: Counter[str] = field(default_factory=Counter)  # held back / failed instances by reason
    metadata: ExportReport | None = None

    def counts(self) -> dict[str, Any]:
        return {
            "released": self.released,
            "held_back": self.held_back,
            "failed": self.failed,
            "series": dict(self.series),
            "reasons": dict(self.reasons),
            "metadata_instances": self.metadata.instances if self.metadata else 0,
        }


def release_run(
    ctx: RunContext,
    layout: StorageLayout,
    settings: ReleaseSettings,
    *,
    release_root: Path,
    key_dir: Path,
    run_id: str,
    secret: str | bytes | None = None,
    workers: int | None = None,
) -> ReleaseReport:
    """Release the run's retrieved series into ``release_root`` and record one audit row per series.
    Re-running gives byte-identical files (everything is keyed, nothing random or timed)."""
    if settings.project is None:
        raise ReleaseSettingsError(
            "release.project is not set: it names the pseudonym key (an extraction definition uses its id)"
        )
    with stage_attempt(ctx, Stage.RELEASE) as counts:
        report = _release(
            ctx,
            layout,
            settings,
            project=settings.project,
            release_root=release_root,
            key_dir=key_dir,
            run_id=run_id,
            secret=secret,
            workers=workers,
        )
        counts.update(report.counts())
    log.info(
        "release: %d instances released, %d held back, %d failed; series %s; reasons %s",
        report.released,
        report.held_back,
        report.failed,
        dict(report.series),
        dict(report.reasons),
    )
    return report


def _release(
    ctx: RunContext,
    layout: StorageLayout,
    settings: ReleaseSettings,
    *,
    project: str,
    release_root: Path,
    key_dir: Path,
    run_id: str,
    secret: str | bytes | None,
    workers: int | None,
) -> ReleaseReport:
    job = ReleaseJob(settings, project_secret(project, key_dir, secret), make_private_dir(release_root) / "dicom")
    tallies: dict[tuple[str, str], _SeriesTally] = {}
    report = ReleaseReport()
    for result in release_files(retrieved_files(ctx, layout), job, workers=workers):
        tallies.setdefault((result.study_uid, result.series_uid), _SeriesTally()).add(result)
        setattr(report, result.outcome.value, getattr(report, result.outcome.value) + 1)
        if result.reason:
            report.reasons[result.reason] += 1
    for tally in tallies.values():
        report.series[tally.status] += 1
    _record(ctx.store.engine, ctx.run_key, project, tallies)
    # The Airflow run id names the data interval (real dates): the release gets a keyed label instead.
    release_label = "release-" + ReleaseKeys(job.secret).identifier("run", run_id).lower()
    report.metadata = export_instances(
        _released_files(StorageLayout(job.out_root), tallies.values()), release_root / "metadata", release_label
    )
    return report


def _released_files(layout: StorageLayout, tallies: Iterable[_SeriesTally]) -> Iterator[Path]:
    for tally in tallies:
        if tally.released_study_uid and tally.released_series_uid:
            study, series = tally.released_study_uid, tally.released_series_uid
            for sop_uid in sorted(layout.stored_sop_uids(study, series)):
                yield layout.instance_path(study, series, sop_uid)


def _record(engine: Engine, run_key: str, project: str, tallies: dict[tuple[str, str], _SeriesTally]) -> None:
    """Replace the run's release rows (a re-run of the release supersedes the previous one)."""
    release_metadata.create_all(engine)
    now = utcnow()
    rows = [
        {
            "run_key": run_key,
            "study_uid": study_uid,
            "series_uid": series_uid,
            "project": project,
            "status": tally.status,
            "released": tally.released,
            "held_back": tally.held_back,
            "failed": tally.failed,
            "reasons": "; ".join(f"{r}: {n}" for r, n in sorted(tally.reasons.items())) or None,
            "released_study_uid": tally.released_study_uid,
            "released_series_uid": tally.released_series_uid,
            "updated_at": now,
        }
        for (study_uid, series_uid), tally in sorted(tallies.items())
    ]
    with engine.begin() as conn:
        conn.execute(delete(release_series).where(release_series.c.run_key == run_key))
        if rows:
            conn.execute(insert(release_series), rows)


def release_series_rows(engine: Engine, run_key: str) -> list[dict[str, Any]]:
    """The run's release rows (for reviewers and tests)."""
    release_metadata.create_all(engine)
    with engine.connect() as conn:
        query = select(release_series).where(release_series.c.run_key == run_key).order_by(release_series.c.series_uid)
        return [dict(row) for row in conn.execute(query).mappings()]
