"""`make services-up` / `make services-down` (scripts/services.sh) as a person runs them.

`down` with a nightly run in progress: the run is cancelled (the worker stops its jobs) and ends
Cancelled, never left Running; then the worker stops on SIGTERM. `down` with nothing running:
everything stops without SIGKILL.
`env` prints everything `up` set. The services get free ports and a folder under tmp_path.
"""

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import yaml

from tests.conftest import ROOT, small_config
from tests.prefect_services import create_flow_run, free_port, task_runs, wait_for_flow_run

SCRIPT = ROOT / "scripts" / "services.sh"


def _services(env: dict, *args: str, timeout: float = 300) -> str:
    done = subprocess.run([str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"services.sh {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _flow_run_state(prefect_home: Path, flow_run_id: str) -> tuple[str, str]:
    """The run's state as the stopped server left it in its SQLite database."""
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        [row] = db.execute("select state_type, state_name from flow_run where id = ?", (flow_run_id,)).fetchall()
    return row


def test_services_up_env_and_graceful_down(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    env |= {"ALIGNFLOW_SERVICES_DIR": str(tmp_path / "services"), "ALIGNFLOW_PREFECT_PORT": str(free_port()),
            "ALIGNFLOW_MLFLOW_PORT": str(free_port()), "ALIGNFLOW_S3_PORT": str(free_port())}
    services = tmp_path / "services"
    cfg_path = tmp_path / "config.yaml"  # its own store and tracking: the run need not reach S3 or MLflow
    cfg_path.write_text(yaml.safe_dump(small_config(tmp_path)))

    _services(env, "up")
    try:
        # `env` gives a shell everything `up` set: whatever the worker got on top of our environment.
        exported = dict(line.removeprefix("export ").split("=", 1)
                        for line in _services(env, "env").splitlines())
        worker_env = _environ(int((services / "worker.pid").read_text()))
        shell_own = {"PWD", "OLDPWD", "SHLVL", "_"}  # bash's bookkeeping, not set by `up`
        added = {k: v for k, v in worker_env.items() if env.get(k) != v and k not in shell_own}
        assert {"PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "ALIGNFLOW_STORAGE_ROOT"} <= added.keys()
        assert {k: exported.get(k) for k in added} == added
        assert exported["PREFECT_HOME"] == str(services / "prefect-home")

        api = exported["PREFECT_API_URL"]
        run = create_flow_run(api, "alignment/nightly", parameters={"config_path": str(cfg_path), "rounds": 1})
        wait_for_flow_run(api, run["id"], {"RUNNING"}, timeout=300)
        deadline = time.monotonic() + 300
        while not any(t["state_type"] == "RUNNING" for t in task_runs(api, run["id"])):  # a stage job is running
            assert time.monotonic() < deadline, "no stage started"
            time.sleep(0.5)
    finally:
        stopped = _services(env, "down")
    assert "cancelling flow run" in stopped and "worker stopped" in stopped, stopped
    assert _flow_run_state(services / "prefect-home", run["id"])[0] == "CANCELLED"

    _services(env, "up")
    stopped = _services(env, "down")  # nothing running: no SIGKILL for any of them
    assert stopped.split("\n")[:4] == ["worker stopped", "prefect stopped", "mlflow stopped", "moto stopped"], stopped
