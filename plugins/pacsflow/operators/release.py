"""Stage 5b: the de-identified research release of the run's retrieved series (see pacsflow.core.release)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context, Variable

from pacsflow.core.release.settings import ReleaseSettings
from pacsflow.operators.base import PacsflowOperator

RELEASE_DIR = "release"
KEY_DIR = "keys"
SECRET_VARIABLE = "pacsflow_release_key_{project}"


class ReleaseOperator(PacsflowOperator):
    """De-identifies the run's retrieved series into ``<data_root>/release/<project>`` (files and Parquet) and
    records per series what was released or held back. The project's pseudonym secret comes from the Airflow
    variable ``pacsflow_release_key_<project>`` (a secrets backend serves it), else
    ``$PACSFLOW_RELEASE_KEY_<PROJECT>``, else a key file in ``<data_root>/keys`` created on first use."""

    def __init__(self, *, release: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = release

    def run_stage(self, context: Context) -> dict[str, Any]:
        settings = ReleaseSettings.parse(self.release)
        if not settings.enabled or settings.project is None:
            self.log.info("release disabled for this extraction (release.enabled = false)")
            return {"enabled": False}
        from pacsflow.core.release.stage import release_run  # the profile's libraries: not at DAG parse time

        secret = Variable.get(SECRET_VARIABLE.format(project=settings.project), default=None)
        release_root = self.root / RELEASE_DIR / settings.project
        with self.run_context(context) as ctx:
            report = release_run(
                ctx,
                self.layout(),
                settings,
                release_root=release_root,
                key_dir=self.root / KEY_DIR,
                run_id=context["run_id"],
                secret=secret,
            )
        return {**report.counts(), "path": str(release_root)}
