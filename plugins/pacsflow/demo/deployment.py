"""A real Airflow 3 deployment on loopback: ``api-server``, ``scheduler`` and ``dag-processor`` as separate
processes sharing one environment (one JWT secret, one execution API URL), driven through the REST API the UI
uses. ``make demo`` runs the demo extraction through it (LocalExecutor, SQLite, the README's ``pacs`` pool),
and the tests run scheduled, backfill and failing runs through it; the Celery tests add a broker and workers.

    with local_deployment(workdir, data_root=data_root, pool_slots=4, extra_env=connections) as airflow:
        airflow.wait_for_dag("pacsflow__demo")
        run_id = airflow.trigger("pacsflow__demo", data_interval=(start, end))
        state = airflow.wait_for_run("pacsflow__demo", run_id, timeout=600)

Every service listens on 127.0.0.1 on a free port and runs in its own process group, stopped when its context
closes.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from pacsflow.demo.environment import airflow_environment
from pacsflow.demo.sandbox import free_port
from pacsflow.deployment import DATA_ROOT_ENV, SERVICES, init_steps

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
# The topology's programs (``pacsflow.deployment``), natively: this virtual environment's.
PROGRAMS = {"airflow": AIRFLOW, "python": sys.executable, "pacsflow": str(Path(sys.executable).with_name("pacsflow"))}
STARTUP_SECONDS = 120.0
STOP_SECONDS = 20.0
FINISHED_STATES = frozenset({"success", "failed"})
API_USER = "pacsflow-test"
UNAVAILABLE_PAUSES_SECONDS = (1.0, 2.0, 4.0, 8.0)  # a 503 of the API is asked again after these


@dataclass(frozen=True)
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def tail(self, lines: int) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def service(
    name: str, command: list[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Iterator[Service]:
    """A process in its own session (so its children are stopped with it), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = dict(env or os.environ)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=cwd, start_new_session=True
        )
    try:
        yield Service(name, process, log_path, tuple(command), environment)
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the whole group (workers, forked task runners), SIGKILL what is still there after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure no child of the group outlives it.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        break
    process.wait()


def wait_until(ready: Any, what: str, timeout: float, services: tuple[Service, ...] = ()) -> Any:
    """Poll ``ready()`` until it returns something truthy; fail early if one of ``services`` died."""
    deadline = time.monotonic() + timeout
    while True:
        result = ready()
        if result:
            return result
        for svc in services:
            if svc.process.poll() is not None:
                raise RuntimeError(
                    f"{svc.name} exited (code {svc.process.returncode}) while waiting for {what}:\n{svc.tail(60)}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def native_command(command: tuple[str, ...] | list[str]) -> list[str]:
    """A topology command with its program taken from this virtual environment."""
    program, *args = command
    return [PROGRAMS[program], *args]


@dataclass
class Deployment:
    home: Path
    env: dict[str, str]
    api_url: str
    password: str
    services: list[Service] = field(default_factory=list)
    _token: str | None = None

    # -- CLI and REST -----------------------------------------------------------------------------------
    def run(self, *command: str) -> str:
        """Run a topology command (``airflow ...``, ``pacsflow ...``) in the deployment's environment; its
        output, or an error with it."""
        done = subprocess.run(native_command(command), env=self.env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command[:3])} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def airflow(self, *args: str) -> str:
        return self.run("airflow", *args)

    def service_logs(self, prefix: str) -> dict[str, str]:
        return {
            svc.name: svc.log_path.read_text(errors="replace")
            for svc in self.services
            if svc.name.startswith(prefix) and svc.log_path.exists()
        }

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """A call to the REST API as the admin user of the simple auth manager."""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token()}"}
        return self._call(method, path, body, headers)

    def token(self) -> str:
        if self._token is None:
            answer = self._call(
                "POST",
                "/auth/token",
                {"username": API_USER, "password": self.password},
                {"Content-Type": "application/json"},
            )
            self._token = answer["access_token"]
        return self._token

    def _call(self, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
        """One API call; a 503 is asked again after a pause (on SQLite the api-server answers 503 "database is
        locked" while the scheduler writes, e.g. to a backfill created as a DAG is unpaused)."""
        data = None if body is None else json.dumps(body).encode()
        pauses = iter(UNAVAILABLE_PAUSES_SECONDS)
        while True:
            req = urllib.request.Request(self.api_url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=30) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as error:
                pause = next(pauses, None) if error.code == HTTPStatus.SERVICE_UNAVAILABLE else None
                if pause is None:
                    raise RuntimeError(f"{method} {path}: HTTP {error.code} {error.read()[:500]!r}") from None
            time.sleep(pause)

    # -- DAGs and runs --------------------------------------------------------------------------------------
    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        """Until the dag-processor has parsed and serialized the DAG."""

        def parsed() -> bool:
            try:
                self.request("GET", f"/api/v2/dags/{dag_id}/details")
                return True
            except RuntimeError:
                return False

        wait_until(parsed, f"DAG {dag_id} to be parsed", timeout, tuple(self.services))

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(
        self,
        dag_id: str,
        *,
        data_interval: tuple[datetime, datetime] | None = None,
        logical_date: datetime | None = None,
        conf: Mapping[str, Any] | None = None,
    ) -> str:
        """A manual run, as the UI's trigger form makes it: a logical date (default: the interval's end, or now)
        and, optionally, an explicit data interval."""
        body: dict[str, Any] = {"conf": dict(conf or {})}
        moment = logical_date or (data_interval[1] if data_interval else datetime.now().astimezone())
        body["logical_date"] = moment.isoformat()
        if data_interval:
            body["data_interval_start"], body["data_interval_end"] = (m.isoformat() for m in data_interval)
        return str(self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)["dag_run_id"])

    def backfill(self, dag_id: str, start: datetime, end: datetime, *, max_active_runs: int = 1) -> int:
        """A backfill over ``[start, end]`` as the UI creates it (``POST /api/v2/backfills``); its id."""
        body = {
            "dag_id": dag_id,
            "from_date": start.isoformat(),
            "to_date": end.isoformat(),
            "run_backwards": False,
            "dag_run_conf": {},
            "reprocess_behavior": "none",
            "max_active_runs": max_active_runs,
        }
        return int(self.request("POST", "/api/v2/backfills", body)["id"])

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return list(self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100&order_by=logical_date")["dag_runs"])

    def wait_for_runs(self, dag_id: str, count: int, timeout: float) -> list[dict[str, Any]]:
        """Until ``count`` runs of the DAG exist and all have finished; those runs, oldest first."""

        def finished() -> list[dict[str, Any]] | None:
            runs = self.runs(dag_id)
            if len(runs) >= count and all(run["state"] in FINISHED_STATES for run in runs):
                return runs
            return None

        try:
            return list(wait_until(finished, f"{count} runs of {dag_id}", timeout, tuple(self.services)))
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}\n{self.logs()}") from None

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float, *, fail_on_retry: bool = True) -> str:
        """The final state of the run (``success`` or ``failed``). With ``fail_on_retry``, a task waiting
        for a retry ends the wait at once: in a sandbox nothing is transient, and the DAG's retry delays
        would only postpone the failure by minutes."""

        def finished() -> str | None:
            state = self.run_state(dag_id, run_id)
            if state in FINISHED_STATES:
                return state
            if fail_on_retry:
                retrying = sorted(
                    f"{ti['task_id']}[{ti['map_index']}]"
                    for ti in self.task_instances(dag_id, run_id)
                    if ti["state"] == "up_for_retry"
                )
                if retrying:
                    raise RuntimeError(f"tasks failed and wait for a retry: {', '.join(retrying)}")
            return None

        try:
            return wait_until(finished, f"run {run_id}", timeout, tuple(self.services))
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}\n{self.logs()}") from None

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")["task_instances"]

    # -- diagnostics ----------------------------------------------------------------------------------------
    def logs(self, lines: int = 40) -> str:
        """The tail of every process log and of every task log: what a failing test prints."""
        parts = [f"===== {svc.name} (exit code {svc.process.poll()}) =====\n{svc.tail(lines)}" for svc in self.services]
        for task_log in sorted((self.home / "logs").rglob("*.log")):
            tail = "\n".join(task_log.read_text(errors="replace").splitlines()[-lines:])
            parts.append(f"===== task log {task_log.relative_to(self.home)} =====\n{tail}")
        return "\n".join(parts)


def base_environment(
    home: Path, *, api_port: int, password_file: Path, data_root: Path, extra: Mapping[str, str]
) -> dict[str, str]:
    """What every process of any deployment shares: the Airflow home, API and auth settings, the data root and
    the log key, then ``extra`` (connections, executor settings)."""
    api_url = f"http://127.0.0.1:{api_port}"
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
    env.update(airflow_environment(home))
    env.update(
        {
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{API_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__BASE_URL": api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            DATA_ROOT_ENV: str(data_root),
            "PACSFLOW_LOG_KEY": os.environ.get("PACSFLOW_LOG_KEY") or secrets.token_urlsafe(32),
        }
    )
    env.update(extra)
    return env


@dataclass(frozen=True)
class Process:
    """One process to start: its name, the topology command and its environment."""

    name: str
    command: tuple[str, ...]
    env: Mapping[str, str]


@contextmanager
def deployment(
    workdir: Path, *, env_for: Any, processes_for: Any, pool_slots: int, ready: Any = None
) -> Iterator[Deployment]:
    """Run the topology's init steps (``pacsflow.deployment.init_steps``), start the processes and wait until
    the API serves (and ``ready(deployment)``, if given). ``env_for(home, api_port, password_file)`` gives the
    shared environment, ``processes_for(env)`` the processes."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    password_file = workdir / "passwords.json"
    password_file.write_text(json.dumps({API_USER: password}))
    password_file.chmod(0o600)
    api_port = free_port()
    env = env_for(home, api_port, password_file)
    airflow = Deployment(home=home, env=env, api_url=f"http://127.0.0.1:{api_port}", password=password)
    for step in init_steps(pool_slots=pool_slots):
        airflow.run(*step)
    with ExitStack() as stack:
        for process in processes_for(env):
            airflow.services.append(
                stack.enter_context(
                    service(
                        process.name,
                        native_command(process.command),
                        workdir / f"{process.name}.log",
                        process.env,
                        cwd=home,
                    )
                )
            )
        try:
            wait_until(lambda: api_healthy(airflow.api_url), "the api-server", STARTUP_SECONDS, tuple(airflow.services))
            if ready is not None:
                wait_until(lambda: ready(airflow), "the deployment", STARTUP_SECONDS, tuple(airflow.services))
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}\n{airflow.logs()}") from None
        yield airflow


LOCAL_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor")


@contextmanager
def local_deployment(
    workdir: Path, *, data_root: Path, pool_slots: int = 4, extra_env: Mapping[str, str] | None = None
) -> Iterator[Deployment]:
    """The README's single-host deployment: the topology's api-server, scheduler and dag-processor with the
    LocalExecutor on a SQLite metadata database (tasks run in the scheduler's workers; the retrieval tasks
    start the shared receiver themselves)."""

    def env_for(home: Path, api_port: int, password_file: Path) -> dict[str, str]:
        extra = {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "8", **(extra_env or {})}
        return base_environment(home, api_port=api_port, password_file=password_file, data_root=data_root, extra=extra)

    def processes_for(env: dict[str, str]) -> list[Process]:
        return [Process(spec.name, spec.command, env) for spec in SERVICES if spec.name in LOCAL_SERVICES]

    with deployment(workdir, env_for=env_for, processes_for=processes_for, pool_slots=pool_slots) as airflow:
        yield airflow


def api_healthy(api_url: str) -> bool:
    """The api-server answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url}/api/v2/monitor/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
