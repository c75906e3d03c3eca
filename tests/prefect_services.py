"""Real Prefect services for tests: an isolated server, process workers, deploys, UI-style retries.

Not a test module; pytest fixtures can be built on it. Everything runs as subprocesses of the
current interpreter's Prefect (``sys.executable -m prefect``), each in its own process group,
against a throwaway PREFECT_HOME with its own SQLite database, so nothing touches ~/.prefect or
a developer's server. Works offline.

    with PrefectServer() as server:
        deploy(server.env, toy_dir / "prefect.yaml", cwd=toy_dir)   # creates the work pool(s) first
        with start_worker(server.env, "toy-pool", cwd=toy_dir) as worker:
            run = create_flow_run(server.api_url, "toy-nightly/nightly")
            wait_for_flow_run(server.api_url, run["id"], {"FAILED"}, timeout=60)
            ui_retry(server.api_url, run["id"])
            wait_for_flow_run(server.api_url, run["id"], {"COMPLETED"}, timeout=60)
        # the worker is stopped before the server

Traps this module handles (Prefect 3.8.8):
- ``prefect worker start`` turns SIGTERM into a SIGINT to itself; if SIGINT was ignored when it
  started (anything launched from a non-interactive shell's ``cmd &``), it never stops. Children
  here are exec'd through a shim that resets SIGINT, and ``stop()`` sends SIGTERM to the group,
  waits ``grace`` s, then SIGKILLs the group. A process worker's flow-run processes share its
  process group, so they go too.
- Inherited ``PREFECT_*`` variables (PREFECT_API_URL, PREFECT_PROFILE, API keys...) are dropped
  from the child environment so a developer's profile cannot redirect the test.
- Work pools are created with the CLI, which stores the type's default base job template
  (a bare REST ``POST /work_pools/`` stores ``{}``; process workers then fall back to their
  built-in default, but the server/UI have no variables schema).
- Stop workers before the server: a worker whose server is gone needs ~8 s of API retries
  before it exits on SIGTERM (``stop()`` SIGKILLs it after ``grace`` anyway).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import httpx

__all__ = [
    "FAST_SETTINGS",
    "FlowRunWaitError",
    "ManagedProcess",
    "PrefectServer",
    "Worker",
    "create_flow_run",
    "deploy",
    "ensure_work_pool",
    "flow_run_logs",
    "free_port",
    "list_flow_runs",
    "prefect_cli",
    "read_flow_run",
    "start_worker",
    "tail",
    "task_runs",
    "ui_retry",
    "wait_for_flow_run",
]

TERMINAL_STATE_TYPES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})

# Settings that make a local server + worker react in about a second and never phone home.
# Server-side ones only matter in the server's env, client-side ones in workers'/flow runs' env;
# they are harmless elsewhere, so one dict goes everywhere.
FAST_SETTINGS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline: no telemetry calls
    "PREFECT_SERVER_UI_ENABLED": "false",  # no UI build/copy at start; the REST API is what the UI calls
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    # new/updated deployments get their scheduled runs within ~1 s (default 5 s; the full pass is 60 s)
    "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    "PREFECT_WORKER_QUERY_SECONDS": "1",  # worker polls for runs every 1 s (default 10 s)
    "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # same for `flow.serve()` runners (default 10 s)
    "PREFECT_CLI_PROMPT": "false",
    "PREFECT_CLI_COLORS": "false",
    "PREFECT_CLI_WRAP_LINES": "false",
    "PREFECT_LOGGING_COLORS": "false",
}

_LIVE: set["ManagedProcess"] = set()

# Exec shim: a process started from a non-interactive shell's background job (`cmd &`, CI
# scripts) inherits SIGINT *ignored*; `prefect worker start` then never stops on SIGTERM/SIGINT
# (it turns SIGTERM into a SIGINT to itself, which is ignored). Reset SIGINT to default, then exec.
_EXEC_WITH_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def _cleanup_at_exit() -> None:  # a test process that dies must not leave servers/workers behind
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.stop(grace=1.0)


atexit.register(_cleanup_at_exit)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller retries if it is taken before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: str | os.PathLike[str], lines: int = 60) -> str:
    """Last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def prefect_cli() -> list[str]:
    """The Prefect CLI of the running interpreter (so children use this venv, not PATH's)."""
    return [sys.executable, "-m", "prefect"]


def _clean_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key.startswith("PREFECT_"):
            del env[key]
    return env


class ManagedProcess:
    """A subprocess that owns its process group; its output goes to ``log_path``."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: Mapping[str, str],
        cwd: str | os.PathLike[str],
        log_path: str | os.PathLike[str],
        *,
        reset_sigint: bool = True,
    ) -> None:
        self.name = name
        self.args = list(args)
        popen_args = (
            [sys.executable, "-c", _EXEC_WITH_DEFAULT_SIGINT, *self.args] if reset_sigint else self.args
        )
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        self.proc = subprocess.Popen(
            popen_args,
            env=dict(env),
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own session => own process group, killable as one
        )
        self.pid = self.proc.pid
        _LIVE.add(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM the whole group, wait ``grace`` s, then SIGKILL it; reap. Idempotent."""
        try:
            if self.proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            # Always finish the group off: children (flow runs, uvicorn) may outlive the leader.
            self._signal_group(signal.SIGKILL)
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                return None
        finally:
            _LIVE.discard(self)
            with contextlib.suppress(Exception):
                self._log.close()

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited {self.proc.returncode}"
        return f"<{type(self).__name__} {self.name} pid={self.pid} {state} log={self.log_path}>"


class PrefectServer:
    """``prefect server start`` on a free port with its own PREFECT_HOME and SQLite database.

    ``api_url``: ``http://127.0.0.1:PORT/api``. ``env``: a complete environment for clients,
    workers and CLI commands (inherited env minus PREFECT_*, plus PREFECT_HOME, PREFECT_API_URL,
    FAST_SETTINGS and ``extra_env``). ``home``: the PREFECT_HOME (``server.log`` is in it unless
    ``log_dir`` is given). ``stop()`` kills the server's process group; stop workers first.
    A home made here (``home=None``) is deleted by ``stop()`` unless ``keep_home=True``.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        startup_timeout: float = 90.0,
        cwd: str | os.PathLike[str] | None = None,
        keep_home: bool = False,
        start: bool = True,
    ) -> None:
        self._own_home = home is None and not keep_home
        self.home = Path(tempfile.mkdtemp(prefix="prefect-home-") if home is None else home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(log_dir) if log_dir is not None else self.home
        self.log_path = self.log_dir / "server.log"
        self.extra_env = dict(extra_env or {})
        self.startup_timeout = startup_timeout
        self.cwd = Path(cwd) if cwd is not None else self.home
        self.port: int | None = None
        self.process: ManagedProcess | None = None
        self.startup_seconds: float | None = None
        if start:
            self.start()

    @property
    def api_url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def env(self) -> dict[str, str]:
        env = _clean_environ()
        env.update(FAST_SETTINGS)
        env.update(
            {
                "PREFECT_HOME": str(self.home),
                "PREFECT_PROFILES_PATH": str(self.home / "profiles.toml"),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
                "PREFECT_LOCAL_STORAGE_PATH": str(self.home / "storage"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.port is not None:
            env["PREFECT_API_URL"] = self.api_url
        env.update(self.extra_env)
        return env

    def start(self) -> "PrefectServer":
        if self.process is not None and self.process.alive():
            return self
        t0 = time.monotonic()
        last_error = ""
        for _attempt in range(3):  # a free port can be grabbed by someone else before we bind it
            self.port = free_port()
            args = prefect_cli() + ["server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
            self.process = ManagedProcess("prefect-server", args, self.env, self.cwd, self.log_path)
            try:
                self._wait_healthy(t0 + self.startup_timeout)
                self.startup_seconds = time.monotonic() - t0
                return self
            except _ServerExited as exc:
                last_error = str(exc)
                self.process.stop(grace=0.5)
                if "address already in use" not in last_error.lower():
                    break
            except BaseException:
                self.process.stop(grace=0.5)
                raise
        raise RuntimeError(f"Prefect server did not start:\n{last_error}")

    def _wait_healthy(self, deadline: float) -> None:
        assert self.process is not None
        url = f"{self.api_url}/health"
        with httpx.Client(timeout=2.0) as http:
            while True:
                if not self.process.alive():
                    raise _ServerExited(
                        f"server exited with {self.process.proc.returncode}; log {self.log_path}:\n"
                        + self.log_tail()
                    )
                try:
                    if http.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"Prefect server not healthy at {url} after {self.startup_timeout:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.2)

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A ``SyncPrefectClient`` bound to this server (usable from the test process)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            with get_client(sync_client=True) as client:
                yield client

    def stop(self, grace: float = 5.0) -> None:
        if self.process is not None:
            self.process.stop(grace=grace)
        if self._own_home:  # a temp home we made (logs in it go too; pass home= or keep_home=True to keep)
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ServerExited(RuntimeError):
    pass


class Worker(ManagedProcess):
    """A ``prefect worker start --type process`` subprocess; ``stop()`` before the server's."""

    def __init__(self, *args: Any, api_url: str, pool_name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.api_url = api_url
        self.pool_name = pool_name

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until the worker has registered with its pool (first heartbeat); return seconds."""
        t0 = time.monotonic()
        with httpx.Client(base_url=self.api_url, timeout=5.0) as http:
            while True:
                if not self.alive():
                    raise RuntimeError(
                        f"worker exited with {self.proc.returncode}; log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    r = http.post(f"/work_pools/{self.pool_name}/workers/filter", json={})
                    if r.status_code == 200 and any(w.get("status") == "ONLINE" for w in r.json()):
                        return time.monotonic() - t0
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(
                        f"worker for pool {self.pool_name!r} not online after {timeout:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.25)


def start_worker(
    env: Mapping[str, str],
    pool_name: str,
    cwd: str | os.PathLike[str],
    *,
    log_path: str | os.PathLike[str] | None = None,
    worker_name: str | None = None,
    extra_args: Iterable[str] = (),
    wait: bool = True,
    timeout: float = 60.0,
) -> Worker:
    """Start ``prefect worker start --pool NAME --type process`` in its own process group.

    Flow runs execute as ``sys.executable -m prefect.engine`` of *this* interpreter, with the
    worker's environment plus the deployment's/run's ``job_variables["env"]``, in a temp dir
    (or ``job_variables["working_dir"]``) until the deployment's pull steps change directory.
    Use as a context manager or call ``.stop()`` -- before stopping the server.
    """
    api_url = env.get("PREFECT_API_URL")
    if not api_url:
        raise ValueError("env has no PREFECT_API_URL (use PrefectServer.env)")
    if log_path is None:
        log_dir = Path(env.get("PREFECT_HOME") or tempfile.mkdtemp(prefix="prefect-worker-"))
        log_path = log_dir / f"worker-{pool_name}-{int(time.time() * 1000)}.log"
    args = prefect_cli() + ["worker", "start", "--pool", pool_name, "--type", "process"]
    if worker_name:
        args += ["--name", worker_name]
    args += list(extra_args)
    worker = Worker(f"worker:{pool_name}", args, env, cwd, log_path, api_url=api_url, pool_name=pool_name)
    if wait:
        try:
            worker.wait_ready(timeout)
        except BaseException:
            worker.stop(grace=0.5)
            raise
    return worker


def _run_cli(
    args: list[str], env: Mapping[str, str], cwd: str | os.PathLike[str], timeout: float
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        prefect_cli() + args,
        env=dict(env),
        cwd=str(cwd),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"`prefect {' '.join(args)}` failed with {res.returncode} (cwd {cwd}):\n"
            f"--- stdout ---\n{res.stdout[-4000:]}\n--- stderr ---\n{res.stderr[-4000:]}"
        )
    return res


def ensure_work_pool(
    env: Mapping[str, str],
    pool_name: str,
    pool_type: str = "process",
    *,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
) -> bool:
    """Create the work pool with the CLI (default base job template) unless it exists.

    Returns True if it was created.
    """
    api_url = env["PREFECT_API_URL"]
    r = httpx.get(f"{api_url}/work_pools/{pool_name}", timeout=10.0)
    if r.status_code == 200:
        return False
    if r.status_code != 404:
        r.raise_for_status()
    _run_cli(
        ["work-pool", "create", pool_name, "--type", pool_type],
        env,
        cwd or env.get("PREFECT_HOME") or tempfile.gettempdir(),
        timeout,
    )
    return True


def _work_pools_in(prefect_yaml: Path) -> list[tuple[str, str]]:
    import yaml  # PyYAML is a Prefect dependency

    data = yaml.safe_load(prefect_yaml.read_text()) or {}
    pools: dict[str, str] = {}
    for dep in data.get("deployments") or []:
        wp = (dep or {}).get("work_pool") or {}
        name = wp.get("name")
        if isinstance(name, str) and name and "{{" not in name:
            pools.setdefault(name, wp.get("type") or "process")
    return list(pools.items())


def deploy(
    env: Mapping[str, str],
    prefect_yaml_path: str | os.PathLike[str],
    cwd: str | os.PathLike[str],
    *,
    names: Iterable[str] = (),
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """``prefect --no-prompt deploy --all --prefect-file PATH`` in ``cwd`` (entrypoints are
    relative to ``cwd``, and the flow modules are imported there by this interpreter).

    Work pools named in the file are created first (``prefect work-pool create NAME --type T``,
    T from ``work_pool.type`` or ``process``). ``names``: deploy only these (``--name``) instead
    of ``--all``. Raises RuntimeError with the CLI output on failure.
    """
    path = Path(prefect_yaml_path).resolve()
    for pool_name, pool_type in _work_pools_in(path):
        ensure_work_pool(env, pool_name, pool_type, cwd=cwd)
    args = ["--no-prompt", "deploy", "--prefect-file", str(path)]
    names = list(names)
    if names:
        for n in names:
            args += ["--name", n]
    else:
        args.append("--all")
    return _run_cli(args, env, cwd, timeout)


# ---------------------------------------------------------------------------------------------
# REST helpers (plain httpx: what the UI does, no Prefect settings needed in the caller)


class _RetryUnavailable(httpx.HTTPTransport):
    """Retries 502/503 as Prefect's own client does: a server busy on its SQLite database under load
    answers 503 for a moment."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for delay in (1, 2, 4, 8):
            response = super().handle_request(request)
            if response.status_code not in (502, 503):
                return response
            response.close()
            time.sleep(delay)
        return super().handle_request(request)


def _api(api_url: str, timeout: float = 15.0) -> httpx.Client:
    return httpx.Client(base_url=api_url.rstrip("/"), timeout=timeout, transport=_RetryUnavailable())


def create_flow_run(
    api_url: str,
    deployment: str,
    *,
    parameters: Mapping[str, Any] | None = None,
    job_variables: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Create a run of ``deployment`` ("flow-name/deployment-name" or a deployment id), now.

    Same as ``prefect deployment run`` or the UI's "Quick run". Returns the flow run JSON.
    """
    with _api(api_url) as http:
        if "/" in deployment:
            flow_name, dep_name = deployment.split("/", 1)
            r = http.get(f"/deployments/name/{flow_name}/{dep_name}")
            r.raise_for_status()
            deployment_id = r.json()["id"]
        else:
            deployment_id = deployment
        body: dict[str, Any] = {
            "parameters": dict(parameters or {}),
            "state": {"type": "SCHEDULED", "name": "Scheduled"},
        }
        if job_variables:
            body["job_variables"] = dict(job_variables)
        if name:
            body["name"] = name
        r = http.post(f"/deployments/{deployment_id}/create_flow_run", json=body)
        r.raise_for_status()
        return r.json()


def read_flow_run(api_url: str, flow_run_id: str) -> dict[str, Any]:
    with _api(api_url) as http:
        r = http.get(f"/flow_runs/{flow_run_id}")
        r.raise_for_status()
        return r.json()


def list_flow_runs(
    api_url: str,
    *,
    deployment_id: str | None = None,
    state_types: Iterable[str] | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """Flow runs, soonest expected start first (e.g. a cron deployment's SCHEDULED runs)."""
    body: dict[str, Any] = {"sort": "EXPECTED_START_TIME_ASC", "limit": limit}
    if deployment_id:
        body["deployments"] = {"id": {"any_": [str(deployment_id)]}}
    if state_types:
        body["flow_runs"] = {"state": {"type": {"any_": [s.upper() for s in state_types]}}}
    with _api(api_url) as http:
        r = http.post("/flow_runs/filter", json=body)
        r.raise_for_status()
        return r.json()


def task_runs(api_url: str, flow_run_id: str) -> list[dict[str, Any]]:
    """Task runs of a flow run, oldest first."""
    body = {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "sort": "EXPECTED_START_TIME_ASC"}
    with _api(api_url) as http:
        r = http.post("/task_runs/filter", json=body)
        r.raise_for_status()
        return r.json()


def flow_run_logs(api_url: str, flow_run_id: str, limit: int = 200) -> str:
    """The flow run's logs as stored by the API, one line per record."""
    body = {"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "sort": "TIMESTAMP_ASC", "limit": limit}
    with contextlib.suppress(httpx.HTTPError), _api(api_url) as http:
        r = http.post("/logs/filter", json=body)
        r.raise_for_status()
        return "\n".join(f"{x['timestamp']} {logging.getLevelName(x['level'])} {x['name']}: {x['message']}" for x in r.json())
    return "(logs unavailable)"


def ui_retry(api_url: str, flow_run_id: str) -> dict[str, Any]:
    """Exactly what the UI's Retry button sends: force the run to SCHEDULED/AwaitingRetry.

    The same flow-run id runs again on a worker polling the deployment's pool; task runs with
    persisted results come back Cached. Raises if the API does not ACCEPT.
    """
    with _api(api_url) as http:
        r = http.post(
            f"/flow_runs/{flow_run_id}/set_state",
            json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True},
        )
        r.raise_for_status()
        result = r.json()
    if result.get("status") != "ACCEPT":
        raise RuntimeError(f"retry of flow run {flow_run_id} not accepted: {result}")
    return result


class FlowRunWaitError(AssertionError):
    """The flow run did not reach the wanted state (timed out or ended in another one)."""


def wait_for_flow_run(
    api_url: str,
    flow_run_id: str,
    states: Iterable[str] | str,
    timeout: float = 60.0,
    *,
    poll: float = 0.25,
    fail_fast: bool = True,
) -> dict[str, Any]:
    """Poll ``GET /flow_runs/{id}`` until its state type (or name) is one of ``states``.

    ``states``: state types ("COMPLETED", "FAILED", ...) or names ("AwaitingRetry"),
    case-insensitive. With ``fail_fast``, a terminal state not wanted raises at once.
    Returns the flow run JSON; raises FlowRunWaitError with the run's logs otherwise.
    """
    wanted = {states.upper()} if isinstance(states, str) else {s.upper() for s in states}
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    with _api(api_url) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                r = http.get(f"/flow_runs/{flow_run_id}")
                if r.status_code == 200:
                    last = r.json()
                    stype = (last.get("state_type") or "").upper()
                    sname = (last.get("state_name") or "").upper()
                    if stype in wanted or sname in wanted:
                        return last
                    if fail_fast and stype in TERMINAL_STATE_TYPES:
                        raise FlowRunWaitError(_describe(api_url, flow_run_id, last, wanted, "ended"))
            if time.monotonic() > deadline:
                raise FlowRunWaitError(_describe(api_url, flow_run_id, last, wanted, f"timeout {timeout:.0f} s"))
            time.sleep(poll)


def _describe(api_url: str, flow_run_id: str, run: dict[str, Any], wanted: set[str], why: str) -> str:
    state = run.get("state") or {}
    return (
        f"flow run {flow_run_id} ({why}): wanted {sorted(wanted)}, is "
        f"{run.get('state_type')}/{run.get('state_name')} {state.get('message') or ''}\n"
        f"--- flow run logs ---\n{flow_run_logs(api_url, flow_run_id)}"
    )
