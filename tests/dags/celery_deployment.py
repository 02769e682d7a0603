"""A real Airflow 3 deployment on loopback, the production way and with the topology of docker-compose.yaml:
PostgreSQL metadata database, Redis broker, CeleryExecutor, and the services of ``pacsflow.deployment``
(``api-server``, ``scheduler``, ``dag-processor``, ``triggerer``, N ``celery worker`` replicas and the
pacsflow receiver service) as separate processes, each started with the command the topology names and
given every environment variable it lists (one JWT secret, one execution API URL, one data root).

    with redis_server(tmp / "redis") as broker, postgres_database(server_url, "airflow") as db_url, \\
            celery_deployment(tmp / "airflow", metadata_url=db_url, broker_url=broker, data_root=tmp / "data",
                              receiver=ReceiverConfig(port=free_port()), extra_env=connections) as airflow:
        airflow.wait_for_dag("my_dag")
        run_id = airflow.trigger("my_dag", conf={...})
        state = airflow.wait_for_run("my_dag", run_id, timeout=300)

Every service listens on 127.0.0.1 on a free port and runs in its own process group, which is terminated
when its context closes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.demo.environment import airflow_environment
from pacsflow.deployment import DATA_ROOT_ENV, SERVICES, ServiceSpec, init_steps
from pacsflow.demo.sandbox import free_port

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
PROGRAMS = {"airflow": AIRFLOW, "python": sys.executable, "pacsflow": str(Path(sys.executable).with_name("pacsflow"))}
REDIS_SERVER = "/usr/bin/redis-server"
STARTUP_SECONDS = 90.0
STOP_SECONDS = 20.0
FINISHED_STATES = frozenset({"success", "failed"})
API_USER = "pacsflow-test"


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
def service(name: str, command: list[str], log_path: Path, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[Service]:
    """A process in its own session (so its children are stopped with it), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(env or os.environ),
                                   cwd=cwd, start_new_session=True)
    try:
        yield Service(name, process, log_path, tuple(command), dict(env or os.environ))
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
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
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
                raise RuntimeError(f"{svc.name} exited (code {svc.process.returncode}) while waiting for {what}:\n"
                                   f"{svc.tail(60)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throw-away Redis (no persistence) on a free loopback port; yields the broker URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(workdir)]
    with service("redis", command, workdir / "redis.log", cwd=workdir) as redis:
        wait_until(lambda: _answers_ping(port), "redis", 30, (redis,))
        yield f"redis://127.0.0.1:{port}/0"


def _answers_ping(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def _postgres_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        raise FileNotFoundError("PostgreSQL is not installed: run `make test` (it installs the Debian packages)")
    return candidates[-1].parent


@contextmanager
def postgres_server(workdir: Path) -> Iterator[str]:
    """A private PostgreSQL server (no fsync) on a free loopback port, with an empty database ``pacsflow``;
    yields its URL and removes ``workdir`` afterwards."""
    bindir = _postgres_bin()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(workdir, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = workdir / "data"
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, stdout=subprocess.DEVNULL)
    options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l",
                    str(workdir / "server.log"), "start"], check=True, stdout=subprocess.DEVNULL)
    try:
        subprocess.run([*as_postgres, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "postgres", "pacsflow"], check=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/pacsflow"
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def postgres_database(server_url: str, name: str) -> Iterator[str]:
    """A fresh database ``name`` on the server of ``server_url`` (dropped afterwards); yields its URL."""
    if not name.replace("_", "").isalnum():
        raise ValueError("database names are letters, digits and underscores")
    admin = create_engine(make_url(server_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:  # FORCE: celery and Airflow keep pooled connections until they exit
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class CeleryDeployment:
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
        done = subprocess.run(native_command(command), env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:3])} failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def airflow(self, *args: str) -> str:
        return self.run("airflow", *args)

    def receiver_answers(self) -> bool:
        """The receiver's container health check: ``pacsflow echo`` in the receiver's environment."""
        done = subprocess.run(native_command(("pacsflow", "echo")), env=self.env, capture_output=True)
        return done.returncode == 0

    def service_logs(self, prefix: str) -> dict[str, str]:
        return {svc.name: svc.log_path.read_text(errors="replace") for svc in self.services
                if svc.name.startswith(prefix) and svc.log_path.exists()}

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """A call to the REST API as the admin user of the simple auth manager."""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token()}"}
        return self._call(method, path, body, headers)

    def token(self) -> str:
        if self._token is None:
            answer = self._call("POST", "/auth/token", {"username": API_USER, "password": self.password},
                                {"Content-Type": "application/json"})
            self._token = answer["access_token"]
        return self._token

    def _call(self, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{method} {path}: HTTP {error.code} {error.read()[:500]!r}") from None

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

    def trigger(self, dag_id: str, conf: Mapping[str, Any]) -> str:
        run = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": dict(conf)})
        return run["dag_run_id"]

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
                retrying = sorted(f"{ti['task_id']}[{ti['map_index']}]" for ti in self.task_instances(dag_id, run_id)
                                  if ti["state"] == "up_for_retry")
                if retrying:
                    raise RuntimeError(f"tasks failed and wait for a retry: {', '.join(retrying)}")
            return None
        try:
            return wait_until(finished, f"run {run_id}", timeout, tuple(self.services))
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}\n{self.logs()}") from None

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")[
            "task_instances"]

    # -- diagnostics ----------------------------------------------------------------------------------------
    def logs(self, lines: int = 40) -> str:
        """The tail of every process log and of every task log: what a failing test prints."""
        parts = [f"===== {svc.name} (exit code {svc.process.poll()}) =====\n{svc.tail(lines)}"
                 for svc in self.services]
        for task_log in sorted((self.home / "logs").rglob("*.log")):
            tail = "\n".join(task_log.read_text(errors="replace").splitlines()[-lines:])
            parts.append(f"===== task log {task_log.relative_to(self.home)} =====\n{tail}")
        return "\n".join(parts)


def deployment_environment(home: Path, *, metadata_url: str, broker_url: str, api_port: int, password_file: Path,
                           worker_concurrency: int, data_root: Path, receiver: ReceiverConfig,
                           extra: Mapping[str, str]) -> dict[str, str]:
    """The one environment every process of the deployment shares."""
    api_url = f"http://127.0.0.1:{api_port}"
    result_backend = "db+" + make_url(metadata_url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
    env.update(airflow_environment(home))
    env.update({
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
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
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(worker_concurrency),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        # Only the runs we trigger: no scheduled (cron) run of a freshly unpaused DAG.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        DATA_ROOT_ENV: str(data_root),
        "PACSFLOW_LOG_KEY": os.environ.get("PACSFLOW_LOG_KEY") or secrets.token_urlsafe(32),
        **receiver_environment(receiver),
    })
    env.update(extra)
    return env


def receiver_environment(receiver: ReceiverConfig) -> dict[str, str]:
    """The receiver service's settings as the ``PACSFLOW_RECEIVER_*`` variables it reads."""
    return {
        "PACSFLOW_RECEIVER_AE_TITLE": receiver.ae_title,
        "PACSFLOW_RECEIVER_HOST": receiver.host,
        "PACSFLOW_RECEIVER_PORT": str(receiver.port),
        "PACSFLOW_RECEIVER_BACKEND": receiver.backend,
        "PACSFLOW_RECEIVER_ALLOWED_AES": ",".join(receiver.allowed_calling_aes),
        "PACSFLOW_RECEIVER_ALLOWED_ADDRESSES": ",".join(receiver.allowed_addresses),
        "PACSFLOW_RECEIVER_MAX_ASSOCIATIONS": str(receiver.max_associations),
    }


def native_command(command: tuple[str, ...]) -> list[str]:
    """A topology command with its program taken from this virtualenv."""
    program, *args = command
    return [PROGRAMS[program], *args]


def checked_environment(spec: ServiceSpec, env: Mapping[str, str]) -> dict[str, str]:
    """``env``, once every variable the topology says ``spec`` reads is set: a service never silently runs on a
    default the containers would not have."""
    missing = sorted(name for name in spec.environment if not env.get(name))
    if missing:
        raise ValueError(f"{spec.name}: the topology needs {', '.join(missing)}")
    return dict(env)


@contextmanager
def celery_deployment(workdir: Path, *, metadata_url: str, broker_url: str, data_root: Path,
                      receiver: ReceiverConfig, pacs_pool_slots: int = 4, workers: int = 1,
                      worker_concurrency: int = 2, extra_env: Mapping[str, str] | None = None
                      ) -> Iterator[CeleryDeployment]:
    """Run the topology's init steps, start every service of ``pacsflow.deployment.SERVICES`` (``workers``
    replicas of the scalable one) and wait until the api-server serves and the receiver answers C-ECHO."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    password_file = workdir / "passwords.json"
    password_file.write_text(json.dumps({API_USER: password}))
    password_file.chmod(0o600)
    api_port = free_port()
    env = deployment_environment(home, metadata_url=metadata_url, broker_url=broker_url, api_port=api_port,
                                 password_file=password_file, worker_concurrency=worker_concurrency,
                                 data_root=data_root, receiver=receiver, extra=extra_env or {})
    deployment = CeleryDeployment(home=home, env=env, api_url=f"http://127.0.0.1:{api_port}", password=password)
    for step in init_steps(pool_slots=pacs_pool_slots):
        deployment.run(*step)
    with ExitStack() as stack:
        for spec in SERVICES:
            for replica in range(1, (workers if spec.scalable else 1) + 1):
                name = f"{spec.name}-{replica}" if spec.scalable else spec.name
                # each worker on this host serves its task logs on a port of its own
                replica_env = {**env, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}
                deployment.services.append(stack.enter_context(service(
                    name, native_command(spec.command), workdir / f"{name}.log",
                    checked_environment(spec, replica_env), cwd=home)))
        try:
            wait_until(lambda: _healthy(deployment.api_url), "the api-server", STARTUP_SECONDS,
                       tuple(deployment.services))
            wait_until(lambda: deployment.receiver_answers(), "the receiver service", STARTUP_SECONDS,
                       tuple(deployment.services))
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}\n{deployment.logs()}") from None
        yield deployment


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/api/v2/monitor/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
