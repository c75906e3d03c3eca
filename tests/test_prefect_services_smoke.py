"""End-to-end proof of tests/prefect_services.py: nightly cron deployment + retry from the UI.

A toy project (written into tmp_path, nothing from the repo) is deployed with prefect.yaml to a
real server with a process worker. Its second task fails once (a marker file injects the fault);
the run FAILS, the UI's Retry request brings the *same* flow run to COMPLETED, and the first
task, whose result is persisted, is not run again (Cached).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prefect_services as ps  # noqa: E402

FLOW_NAME = "toy-nightly"
DEPLOYMENT = "nightly"
POOL = "toy-pool"
CRON, TZ = "0 2 * * *", "Europe/Berlin"

TASKS_SRC = '''
import json
import os
import sys
from pathlib import Path

from prefect import task
from prefect.runtime import flow_run


def _record(name, **extra):
    state = Path(os.environ["TOY_STATE_DIR"])  # comes from the deployment's job_variables env
    line = {"flow_run_id": str(flow_run.id), "pid": os.getpid(), "prefix": sys.prefix,
            "cwd": os.getcwd(), "deploy_env": os.environ.get("TOY_DEPLOY_ENV"),
            "run_env": os.environ.get("TOY_RUN_ENV"), **extra}
    with open(state / name, "a") as f:
        f.write(json.dumps(line) + "\\n")
    return state


@task(persist_result=True)  # persisted => on a retry of the same flow run it comes back Cached
def launch(stage: str) -> str:
    _record("launch.log", stage=stage)
    return f"{stage}-output"


@task
def flaky(upstream: str) -> str:
    state = _record("flaky.log")
    marker = state / "fail_once.marker"
    if marker.exists():
        marker.unlink()
        raise RuntimeError("injected failure (marker file)")
    return upstream + "-done"
'''

FLOW_SRC = '''
from prefect import flow

from toy_tasks.steps import flaky, launch  # sibling package: importable from the pulled working dir


@flow(name="toy-nightly")
def toy_nightly(stage: str = "sft") -> str:
    return flaky(launch(stage))
'''


def _write_toy(root: Path, state_dir: Path) -> Path:
    (root / "toy_tasks").mkdir(parents=True)
    (root / "toy_flows").mkdir()
    (root / "toy_tasks" / "__init__.py").write_text("")
    (root / "toy_tasks" / "steps.py").write_text(textwrap.dedent(TASKS_SRC))
    (root / "toy_flows" / "nightly.py").write_text(textwrap.dedent(FLOW_SRC))
    spec = {
        "name": "toy",
        "prefect-version": "3.8.8",
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}],
        "deployments": [
            {
                "name": DEPLOYMENT,
                "entrypoint": "toy_flows/nightly.py:toy_nightly",
                "parameters": {"stage": "sft"},
                "work_pool": {
                    "name": POOL,
                    "job_variables": {
                        "env": {"TOY_STATE_DIR": str(state_dir), "TOY_DEPLOY_ENV": "from-deployment"}
                    },
                },
                "schedules": [{"cron": CRON, "timezone": TZ, "active": True}],
            }
        ],
    }
    path = root / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _lines(path: Path, flow_run_id: str) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r["flow_run_id"] == flow_run_id]


def test_nightly_deployment_fails_then_ui_retry_completes_same_run(tmp_path: Path) -> None:
    toy, state = tmp_path / "toy", tmp_path / "state"
    state.mkdir()
    prefect_yaml = _write_toy(toy, state)
    timings: dict[str, float] = {}
    t_all = t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        timings[name] = round(now - t, 2)
        t = now

    server = ps.PrefectServer(home=tmp_path / "prefect-home", cwd=tmp_path)
    worker = None
    try:
        lap("server_start")
        env = server.env
        ps.ensure_work_pool(env, POOL, cwd=toy)
        lap("work_pool_create")
        # start the worker while deploying (both spend ~2 s importing prefect)
        worker = ps.start_worker(env, POOL, cwd=toy, wait=False)
        ps.deploy(env, prefect_yaml, cwd=toy)
        lap("deploy")
        worker.wait_ready(timeout=60)
        lap("worker_ready_after_deploy")

        with server.client() as client:
            dep = client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT}")
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [(CRON, TZ, True)]
            assert dep.work_pool_name == POOL
            assert dep.job_variables["env"]["TOY_DEPLOY_ENV"] == "from-deployment"

            # the scheduler creates the cron's upcoming runs (02:00 Berlin, DST-aware)
            deadline = time.monotonic() + 30
            while not (upcoming := ps.list_flow_runs(server.api_url, deployment_id=str(dep.id), state_types=["SCHEDULED"])):
                assert time.monotonic() < deadline, "no scheduled runs for the cron deployment"
                time.sleep(0.25)
            lap("scheduled_runs_visible")
            print("scheduled:", [(r["expected_start_time"], r["state_name"]) for r in upcoming])
            for run in upcoming:
                assert run["auto_scheduled"] is True
                local = datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00")).astimezone(ZoneInfo(TZ))
                assert (local.hour, local.minute) == (2, 0), run["expected_start_time"]

            # a run of the deployment now (as `prefect deployment run` / the UI's Quick run)
            (state / "fail_once.marker").touch()
            fr = client.create_flow_run_from_deployment(dep.id, job_variables={"env": {"TOY_RUN_ENV": "from-run"}})
            run_id = str(fr.id)
        lap("create_run")

        failed = ps.wait_for_flow_run(server.api_url, run_id, {"FAILED"}, timeout=60)
        lap("run_to_failed")
        assert failed["run_count"] == 1
        assert not (state / "fail_once.marker").exists()

        ps.ui_retry(server.api_url, run_id)
        done = ps.wait_for_flow_run(server.api_url, run_id, {"COMPLETED"}, timeout=60)
        lap("ui_retry_to_completed")
        assert done["id"] == run_id  # the same flow run, not a new one
        assert done["deployment_id"] == str(dep.id)
        assert done["run_count"] == 2, done["run_count"]

        launches, flakies = _lines(state / "launch.log", run_id), _lines(state / "flaky.log", run_id)
        assert len(launches) == 1, launches  # the succeeded task was not redone on the retry
        assert len(flakies) == 2, flakies  # failed once, then passed
        for row in launches + flakies:
            assert row["prefix"] == sys.prefix  # the flow run used the worker's (this) venv
            assert Path(row["cwd"]).resolve() == toy.resolve()  # pull step set_working_directory
            assert (row["deploy_env"], row["run_env"]) == ("from-deployment", "from-run")  # env merged
        # task-run states reach the API through events (the server's task-run recorder), so
        # they can lag the flow run's own COMPLETED by a moment: poll
        deadline = time.monotonic() + 20
        while True:
            states = sorted((tr["name"], tr["state_name"]) for tr in ps.task_runs(server.api_url, run_id))
            if any(name.startswith("launch") and st == "Cached" for name, st in states):
                break
            assert time.monotonic() < deadline, f"launch never recorded as Cached: {states}"
            time.sleep(0.25)
        lap("checks")
    except BaseException:
        print("=== server log ===\n" + server.log_tail(80))
        if worker is not None:
            print(f"=== worker log ({worker.log_path}) ===\n" + worker.log_tail(150))
        raise
    finally:
        if worker is not None:
            worker.stop(grace=10)  # before the server: a worker whose server is gone takes ~8 s to quit
            lap("worker_stop")
        server.stop()
        lap("server_stop")
        timings["total"] = round(time.monotonic() - t_all, 2)
        print("timings (s):", json.dumps(timings))

    assert worker.proc.returncode == 0, worker.log_tail()  # exited on SIGTERM, not SIGKILLed
    try:
        os.killpg(worker.pid, 0)
        leftover = True
    except ProcessLookupError:
        leftover = False
    assert not leftover, "worker process group still has members"
