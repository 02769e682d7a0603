"""Stage 5b: the de-identified research release of the run's retrieved series (see pacsflow.core.release)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context, Variable
from airflow.sdk.exceptions import AirflowFailException

from pacsflow.core.release import ReleaseSettings, ReleaseSettingsError, release_run
from pacsflow.operators.base import PacsflowOperator

RELEASE_DIR = "release"
KEY_DIR = "keys"
SECRET_VARIABLE = "pacsflow_release_key_{project}"


class ReleaseOperator(PacsflowOperator):
    """De-identifies the run's retrieved series into ``<data_root>/release/<project>`` (files and Parquet) and
    records per series what was released or held back. The project's pseudonym secret comes from the Airflow
    variable ``pacsflow_release_key_<project>`` (a secrets backend serves it), else
    ``$PACSFLOW_RELEASE_KEY_<PROJECT>``, else a key file in ``<data_root>/keys`` created on first use."""

    template_fields = (*PacsflowOperator.template_fields, "release")

    def __init__(self, *, release: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = release or {}

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            settings = ReleaseSettings.from_mapping(self.release)
        except ReleaseSettingsError as error:
            raise AirflowFailException(str(error)) from None
        if not settings.enabled:
            self.log.info("release disabled for this extraction (release.enabled = false)")
            return {"enabled": False}
        secret = Variable.get(SECRET_VARIABLE.format(project=settings.project), default=None)
        release_root = self.root / RELEASE_DIR / settings.project
        with self.run_context(context) as ctx:
            report = release_run(ctx, self.layout(), settings, release_root=release_root,
                                 key_dir=self.root / KEY_DIR, run_id=context["run_id"], secret=secret)
        return {**report.counts(), "path": str(release_root)}
