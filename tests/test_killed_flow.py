"""A flow process SIGKILLed in the middle of a stage: its torchrun job does not run on as an orphan
that writes to the store, and the UI's Retry completes the run.

Real `prefect server` and process worker (tests/prefect_services.py); the flow process and the
job are found through the stage's lease in the store, which names both.
"""

import json
import os
import signal
import time

import psutil
import yaml

from stages.common import store
from tasks import lease
from tests.conftest import ROOT, small_config
from tests.prefect_services import (PrefectServer, create_flow_run, deploy, read_flow_run, start_worker, ui_retry,
                                    wait_for_flow_run)


def wait_for_running_job(stage_dir, timeout: float = 600) -> dict:
    """The lease of a stage output whose job has started (the owner names its pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in stage_dir.glob(f"*/{lease.LEASE}"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced
            if "job" in record["owner"]:
                return {**record, "output": "file://" + str(path.parent)}
        time.sleep(0.2)
    raise TimeoutError(f"no job started under {stage_dir}")


def wait_until_crash_reported(api_url: str, flow_run_id: str, infrastructure: psutil.Process) -> None:
    """The runner reports the crash at once; the worker again when the infrastructure process has
    ended (accepted unless the run is already in a final state). A Retry sent before the worker's
    report is overwritten by it: wait for the process to end and for the worker to have had its say."""
    psutil.wait_procs([infrastructure], timeout=120)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = read_flow_run(api_url, flow_run_id)["state"]
        if state["type"] == "CRASHED" and "infrastructure exited" in (state.get("message") or ""):
            return
        time.sleep(0.5)
    assert read_flow_run(api_url, flow_run_id)["state"]["type"] == "CRASHED"


def test_killed_flow_process_leaves_no_writing_orphan_and_retry_completes(tmp_path):
    data = small_config(tmp_path, **{"launch.retries": 0})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    sft_dir = tmp_path / "store" / "test-arith" / "sft"

    with PrefectServer() as server:
        env = {**server.env, "ALIGNFLOW_HOME": str(ROOT)}
        deploy(env, ROOT / "deployments" / "prefect.yaml", cwd=ROOT)
        with start_worker(env, "alignflow-local", cwd=ROOT):
            run = create_flow_run(server.api_url, "alignment/nightly",
                                  parameters={"config_path": str(cfg_path), "rounds": 0})
            held = wait_for_running_job(sft_dir)
            flow_process, job = held["owner"]["pid"], psutil.Process(held["owner"]["job"]["pid"])
            job_tree = [job, *job.children(recursive=True)]
            infrastructure = psutil.Process(flow_process).parent()  # the worker's child
            os.kill(flow_process, signal.SIGKILL)

            _, alive = psutil.wait_procs(job_tree, timeout=60)
            assert not alive, f"the job outlived its flow process: {alive}"  # SIGTERM on parent death
            assert not (sft_dir / held["output"].rsplit("/", 1)[1] / store.MANIFEST).exists()  # never finished
            wait_until_crash_reported(server.api_url, run["id"], infrastructure)

            ui_retry(server.api_url, run["id"])
            done = wait_for_flow_run(server.api_url, run["id"], {"COMPLETED"}, timeout=900)
    assert done["run_count"] >= 2
    sft = store.read_artifact(held["output"])
    store.verify_files(sft)  # one writer's files, whole
    assert not list((tmp_path / "store").glob(f"test-arith/*/*/{lease.LEASE}"))  # every lease released
