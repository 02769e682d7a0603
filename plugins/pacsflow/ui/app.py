"""The audit review pages: a FastAPI app the api-server mounts under ``plugin.URL_PREFIX``.

Every route needs an Airflow login (the api-server's own JWT, from the ``Authorization`` header or the UI's
session cookie) and every route about a run checks, through Airflow's auth manager, that the user may read
that DAG's runs: plugin routes are not protected by Airflow on their own, so this module does it explicitly.
The runs list shows only DAGs the user may read. Pages name ANs by their keyed reference only; a clear AN
typed into the search box travels in a POST body (never a URL, so never an access log), is hashed with the
deployment key on the server and is not echoed back.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates

from pacsflow.core.audit import AuditStore, Outcome, SeriesStatus
from pacsflow.core.db import make_engine
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.settings import data_root
from pacsflow.core.storage import run_token
from pacsflow.ui import charts
from pacsflow.ui.preview import NoPreview, preview_png
from pacsflow.ui.review import (
    PAGE_SIZES,
    RUN_STATES,
    AccessionFilter,
    AuditReview,
    Page,
    RunFilter,
    RunRow,
    SeriesRef,
    layout_of,
    series_ref,
)

HERE = Path(__file__).resolve().parent
CONFIG_SECTION = "pacsflow"
DEFAULT_AUDIT_CONN_ID = "pacsflow_audit"
PRIVATE_HEADERS = {
    "Cache-Control": "private, no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

templates = Jinja2Templates(directory=HERE / "templates")


# -- authorization (Airflow's auth manager) -----------------------------------------------------------------
def _user_dependency() -> Any:
    from airflow.api_fastapi.core_api.security import get_user

    return Depends(get_user)


def _run_access() -> Any:
    """The core API's own check: may this user read runs of the DAG named in the path (403 otherwise)?"""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return Depends(requires_access_dag("GET", DagAccessEntity.RUN))


def readable_dag_ids(user: Any, dag_ids: list[str]) -> list[str]:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    manager = get_auth_manager()
    return [
        dag_id
        for dag_id in dag_ids
        if manager.is_authorized_dag(
            method="GET",
            access_entity=DagAccessEntity.RUN,
            details=DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id)),
            user=user,
        )
    ]


# -- the audit database -------------------------------------------------------------------------------------
def audit_conn_id() -> str:
    from airflow.configuration import conf

    return conf.get(CONFIG_SECTION, "audit_conn_id", fallback=DEFAULT_AUDIT_CONN_ID)


def review_of(request: Request) -> AuditReview:
    """The app's read model over the audit database of the ``pacsflow_audit`` connection (created on first use)."""
    review = getattr(request.app.state, "review", None)
    if review is None:
        from airflow.exceptions import AirflowNotFoundException
        from airflow.models.connection import Connection

        from pacsflow.hooks.database import connection_url

        conn_id = audit_conn_id()
        try:
            url = connection_url(Connection.get_connection_from_secrets(conn_id))
        except (AirflowNotFoundException, ValueError) as error:
            raise HTTPException(
                503,
                f"the audit database is not configured: connection {conn_id!r} "
                f"([{CONFIG_SECTION}] audit_conn_id): {error}",
            ) from None
        review = AuditReview(AuditStore(make_engine(url)))
        request.app.state.review = review
    return review


ReviewDep = Annotated[AuditReview, Depends(review_of)]


def deployment_key() -> Pseudonymizer | None:
    """The deployment key the references were made with: ``$PACSFLOW_LOG_KEY``, else the key file the operators
    keep in the data root (``$PACSFLOW_DATA_ROOT``, which the api-server shares with the workers)."""
    from pacsflow.operators.base import KEY_FILE

    return Pseudonymizer.existing(data_root() / KEY_FILE)


def run_or_404(review: AuditReview, dag_id: str, run_id: str, *, with_counts: bool = False) -> RunRow:
    run = review.run(dag_id, run_id, with_counts=with_counts)
    if run is None:
        raise HTTPException(404, "this DAG run has no pacsflow audit (not a pacsflow extraction, or not started)")
    return run


# -- rendering helpers --------------------------------------------------------------------------------------
def link(request: Request, name: str, query: dict[str, Any] | None = None, **path: Any) -> str:
    url = request.url_for(name, **{k: str(v) for k, v in path.items()}).path
    kept = {k: v for k, v in (query or {}).items() if v not in (None, "")}
    return f"{url}?{urlencode(kept)}" if kept else url


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    response = templates.TemplateResponse(
        request, template, {"link": lambda *a, **k: link(request, *a, **k), **context}, status_code=status_code
    )
    response.headers.update(PRIVATE_HEADERS)
    return response


MISSING = "\N{EN DASH}"  # what a page shows for a value that is not there


def _moment(value: datetime | None) -> str:
    if value is None:
        return MISSING
    return value.strftime("%Y-%m-%d %H:%M") + ("" if value.tzinfo is None or value.utcoffset() else " UTC")


def _duration(value: timedelta | None) -> str:
    if value is None:
        return MISSING
    seconds = int(value.total_seconds())
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s"


templates.env.filters.update(
    moment=_moment,
    duration=_duration,
    day=lambda value: value.strftime("%Y-%m-%d") if value else MISSING,
    mb=lambda size: f"{(size or 0) / 1e6:,.1f}",
    num=lambda n: MISSING if n is None else f"{n:,}" if isinstance(n, int) else f"{n:,.1f}",
)


# -- pages --------------------------------------------------------------------------------------------------
def create_app() -> FastAPI:  # noqa: PLR0915  the routes, nested so Airflow's API imports stay lazy
    app = FastAPI(title="pacsflow extraction audit", docs_url=None, redoc_url=None, openapi_url=None)
    pages = APIRouter(dependencies=[_user_dependency()])
    run_pages = APIRouter(dependencies=[_user_dependency(), _run_access()])

    @pages.get("/", include_in_schema=False)
    def index(request: Request) -> RedirectResponse:
        return RedirectResponse(link(request, "runs"), status_code=303)

    @pages.get("/static/audit.css", name="css")
    def css() -> Response:
        return Response(
            (HERE / "static" / "audit.css").read_bytes(),
            media_type="text/css",
            headers={"Cache-Control": "private, max-age=300"},
        )

    @pages.get("/runs", name="runs", response_class=HTMLResponse)
    def runs_page(
        request: Request,
        review: ReviewDep,
        *,
        user: Annotated[Any, _user_dependency()],
        dag_id: str | None = None,
        state: str | None = None,
        date_from: date | None = None,
        date_to: date | None = None,
        page: int = Query(1, ge=1),
        size: int = 50,
    ) -> HTMLResponse:
        readable = readable_dag_ids(user, review.dag_ids())
        filters = RunFilter(dag_id=dag_id or None, state=state or None, started_from=date_from, started_to=date_to)
        listing = review.runs(readable, filters, Page.of(page, size))
        query = {"dag_id": dag_id, "state": state, "date_from": date_from, "date_to": date_to, "size": size}
        return render(
            request,
            "runs.html",
            dag_ids=readable,
            filters=filters,
            listing=listing,
            query=query,
            states=RUN_STATES,
            page_sizes=PAGE_SIZES,
        )

    @run_pages.get("/dags/{dag_id}/runs/{run_id}", name="run", response_class=HTMLResponse)
    def run_page(
        request: Request,
        review: ReviewDep,
        *,
        dag_id: str,
        run_id: str,
        outcome: str | None = None,
        resolution: str | None = None,
        reason: str | None = None,
        page: int = Query(1, ge=1),
        size: int = 50,
        series_status: str | None = None,
        series_page: int = Query(1, ge=1),
    ) -> HTMLResponse:
        run = run_or_404(review, dag_id, run_id)
        summary = review.summary(run.run_key)
        rules = review.resolution_rules(run.run_key)
        drops = review.drop_reasons(run.run_key)
        stages = review.stages(run.run_key)
        key = deployment_key()
        an_filter = AccessionFilter(outcome=outcome or None, resolution=resolution or None, reason=reason or None)
        ans = review.accessions(run.run_key, an_filter, Page.of(page, size))
        kept_series = review.series_rows(run.run_key, series_status or None, Page.of(series_page, 50))
        for row in kept_series.rows:
            row["ref"] = series_ref(key, row.pop("study_uid"), row.pop("series_uid")) if key else None
        previous = review.previous_run_id(run)
        outcomes = {o.value: summary.outcomes.get(o.value, 0) for o in Outcome}
        return render(
            request,
            "run.html",
            run=run,
            summary=summary,
            outcomes=outcomes,
            rules=rules,
            drops=drops,
            stages=stages,
            ans=ans,
            an_filter=an_filter,
            kept_series=kept_series,
            previous=previous,
            series_status=series_status,
            searchable=key is not None,
            outcome_chart=charts.bar_chart(outcomes, title="Outcome of each AN"),
            rules_chart=charts.bar_chart(rules, title="Resolution (rule that matched, or class)"),
            series_chart=charts.bar_chart(summary.series, title="Series by status"),
            timeline_chart=charts.timeline(stages, title="Stage timeline"),
            query={
                "outcome": outcome,
                "resolution": resolution,
                "reason": reason,
                "size": size,
                "series_status": series_status,
            },
            series_statuses=[s.value for s in SeriesStatus],
            page_sizes=PAGE_SIZES,
        )

    @run_pages.post("/dags/{dag_id}/runs/{run_id}/search", name="search", response_class=HTMLResponse)
    def search(
        request: Request,
        review: ReviewDep,
        dag_id: str,
        run_id: str,
        accession_number: Annotated[str, Form(max_length=64)],
    ) -> Response:
        run = run_or_404(review, dag_id, run_id)
        key = deployment_key()
        if key is None:
            return render(
                request,
                "message.html",
                status_code=409,
                title="Search unavailable",
                message="No deployment key was found ($PACSFLOW_LOG_KEY, or the key file in "
                "$PACSFLOW_DATA_ROOT), so a clear AN cannot be matched to its reference.",
                run=run,
            )
        found = review.accession(run.run_key, key.ref(accession_number.strip()))
        if found is None:
            return render(
                request,
                "message.html",
                status_code=404,
                title="AN not in this run",
                message="No AN of this run's cohort matches the one you typed. Check the run (the "
                "cohort depends on the interval) or the spelling.",
                run=run,
            )
        return RedirectResponse(
            link(request, "accession", dag_id=dag_id, run_id=run_id, an_ref=found["an_ref"]), status_code=303
        )

    @run_pages.get("/dags/{dag_id}/runs/{run_id}/accessions/{an_ref}", name="accession", response_class=HTMLResponse)
    def accession_page(request: Request, review: ReviewDep, dag_id: str, run_id: str, an_ref: str) -> HTMLResponse:
        run = run_or_404(review, dag_id, run_id)
        row = review.accession(run.run_key, an_ref)
        if row is None:
            raise HTTPException(404, "no AN with this reference in this run")
        key = deployment_key()
        for item in row["series"]:
            item["ref"] = series_ref(key, item.pop("study_uid"), item.pop("series_uid")) if key else None
        return render(request, "accession.html", run=run, an=row)

    @run_pages.get("/dags/{dag_id}/runs/{run_id}/series/{ref}", name="series", response_class=HTMLResponse)
    def series_page(request: Request, review: ReviewDep, dag_id: str, run_id: str, ref: str) -> HTMLResponse:
        run, target = _series_target(review, dag_id, run_id, ref)
        detail = review.series_detail(run.run_key, target)
        if detail is None:
            raise HTTPException(404, "no series with this reference in this run")
        for uid in ("study_uid", "series_uid"):  # never into the page
            del detail[uid]
        preview_error = None
        if detail["drop_reason"] is not None and not detail["received"]:
            preview_error = "dropped by the series rules: not retrieved"
        else:
            try:
                _preview(target, detail["modality"])
            except NoPreview as error:
                preview_error = str(error)
        return render(request, "series.html", run=run, series=detail, ref=ref, preview_error=preview_error)

    @run_pages.get("/dags/{dag_id}/runs/{run_id}/series/{ref}/preview.png", name="preview")
    def preview(review: ReviewDep, dag_id: str, run_id: str, ref: str) -> Response:
        run, target = _series_target(review, dag_id, run_id, ref)
        detail = review.series_detail(run.run_key, target)
        try:
            png = _preview(target, detail["modality"] if detail else None)
        except NoPreview as error:
            raise HTTPException(404, f"no preview: {error}") from None
        return Response(png, media_type="image/png", headers=PRIVATE_HEADERS)

    @run_pages.get("/dags/{dag_id}/runs/{run_id}/audit.csv", name="csv")
    def download_csv(review: ReviewDep, dag_id: str, run_id: str) -> StreamingResponse:
        run = run_or_404(review, dag_id, run_id)

        def lines() -> Iterator[str]:
            buffer = io.StringIO()
            writer = None
            for exported in review.export_rows(run.run_key):
                row = _flat(exported)
                if writer is None:
                    writer = csv.DictWriter(buffer, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                if buffer.tell() > 65536:
                    yield buffer.getvalue()
                    buffer.seek(0), buffer.truncate()
            yield buffer.getvalue()

        return StreamingResponse(
            lines(),
            media_type="text/csv",
            headers={**PRIVATE_HEADERS, "Content-Disposition": f'attachment; filename="audit-{run_token(run_id)}.csv"'},
        )

    @run_pages.get("/dags/{dag_id}/runs/{run_id}/audit.parquet", name="parquet")
    def download_parquet(review: ReviewDep, dag_id: str, run_id: str) -> Response:
        import pyarrow as pa
        import pyarrow.parquet as pq

        run = run_or_404(review, dag_id, run_id)
        table = pa.Table.from_pylist([_flat(row) for row in review.export_rows(run.run_key)])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return Response(
            sink.getvalue().to_pybytes(),
            media_type="application/vnd.apache.parquet",
            headers={
                **PRIVATE_HEADERS,
                "Content-Disposition": f'attachment; filename="audit-{run_token(run_id)}.parquet"',
            },
        )

    @run_pages.get("/dags/{dag_id}/compare", name="compare", response_class=HTMLResponse)
    def compare_page(
        request: Request, review: ReviewDep, dag_id: str, a: str | None = None, b: str | None = None
    ) -> HTMLResponse:
        run_ids = review.run_ids(dag_id)
        if not run_ids:
            raise HTTPException(404, "no pacsflow run of this DAG")
        run_b = run_or_404(review, dag_id, b or run_ids[0], with_counts=True)
        run_a = run_or_404(review, dag_id, a or review.previous_run_id(run_b) or run_b.run_id, with_counts=True)
        return render(
            request,
            "compare.html",
            dag_id=dag_id,
            run_ids=run_ids,
            run_a=run_a,
            run_b=run_b,
            diff=review.compare(run_a.run_key, run_b.run_key),
        )

    app.include_router(pages)
    app.include_router(run_pages)
    return app


def _series_target(review: AuditReview, dag_id: str, run_id: str, ref: str) -> tuple[RunRow, SeriesRef]:
    run = run_or_404(review, dag_id, run_id)
    key = deployment_key()
    target = review.series_by_ref(run.run_key, key, ref) if key else None
    if target is None:
        raise HTTPException(404, "no series with this reference in this run")
    return run, target


def _preview(target: SeriesRef, modality: str | None) -> bytes:
    return preview_png(layout_of(data_root()).series_dir(target.study_uid, target.series_uid), modality)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}
