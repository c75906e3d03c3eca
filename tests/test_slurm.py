"""Stages as Slurm jobs on a real 2-node cluster (two slurmd on loopback, scripts/slurm_cluster.sh).

One storage root and tracking store for the module, so data_prep runs once and later tests skip
it. The ranks' node and world are read from the processes themselves (/proc environ), not from
what the launcher says it did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from prefect import flow

from stages.common import store
from tasks import tracking as mlf
from tasks.config import SlurmConfig, load_config
from tasks.launch import StageBadInput, StageJobError, StageTimeout, job_env
from tasks.slurm import job_info, run_slurm_job
from tasks.stage import configured, find_valid_output
from tests.conftest import ROOT, small_config

pytestmark = pytest.mark.usefixtures("slurm_cluster")
SFT_TWO_NODES = {"nodes": 2, "nproc_per_node": 1}


@flow(name="slurm-prefix")
def prefix(config_path: str, sft_debug: dict | None = None) -> dict:
    """data_prep -> sft through the real stage task."""
    cfg = load_config(config_path)
    tracking = mlf.start_pipeline_run(cfg, "slurm-prefix", "prefix", 0)
    stage = configured(cfg)
    data = stage("data_prep", cfg, {}, tracking)
    return {"data_prep": data, "sft": stage("sft", cfg, {"data": data}, tracking, debug=sft_debug)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm-store")


def write_config(root: Path, name: str, **overrides) -> Path:
    """The tests' small config on backend slurm; job scripts and output files under root/jobs."""
    launch = {"backend": "slurm", "nproc_per_node": 2, "timeout_s": 300, "retries": 1, "retry_delay_s": 0.5,
              "slurm": {"job_dir": str(root / "jobs")}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(small_config(root, launch=launch, **overrides)))
    return path


def job_scripts(root: Path, job_name_part: str = "") -> list[Path]:
    """The job scripts submitted so far (one per sbatch) whose job name contains `job_name_part`."""
    return sorted(p for p in (root / "jobs").glob("*.sbatch") if job_name_part in p.name)


def squeue(name_part: str = "") -> list[tuple[str, str, str]]:
    """(job id, name, state) of the jobs Slurm still lists."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True, check=True).stdout
    return [tuple(line.split()) for line in out.splitlines() if name_part in line]


def slurm_processes() -> list[dict]:
    """Processes started by a Slurm job step, with the environment they were started with."""
    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if "SLURM_JOB_ID" in env and "SLURMD_NODENAME" in env:
            found.append({"pid": p.pid, **{k: env.get(k) for k in ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURMD_NODENAME",
                                                                  "RANK", "WORLD_SIZE")}})
    return found


class RankSampler(threading.Thread):
    """Records (job name, node, RANK, WORLD_SIZE) of every stage rank seen while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: set[tuple] = set()
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.seen |= {(p["SLURM_JOB_NAME"], p["SLURMD_NODENAME"], p["RANK"], p["WORLD_SIZE"])
                          for p in slurm_processes() if p["RANK"] is not None}
            time.sleep(0.2)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


def wait_until(predicate, what: str, timeout: float = 240.0, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert proc is None or proc.poll() is None, f"the flow process ended before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_flow_process(config: Path, log: Path) -> subprocess.Popen:
    """The prefix flow in a process of its own, on this test's Prefect API (as a worker runs a flow run)."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))
    code = f"from tests.test_slurm import prefix; prefix({str(config)!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


# --- the pipeline ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_runs(root, prefect_harness):
    """The tiny pipeline, 1 round, on Slurm (sft on 2 nodes x 1 rank, the rest 1 node x 2), twice."""
    from flows.alignment import alignment

    config = write_config(root, "pipeline", **{"launch.slurm_per_stage": {"sft": SFT_TWO_NODES}})
    with RankSampler() as ranks:
        first = alignment(config_path=str(config), rounds=1)
    scripts_after_first = job_scripts(root)
    second = alignment(config_path=str(config), rounds=1)
    return {"config": config, "first": first, "second": second, "ranks": ranks.seen,
            "scripts_after_first": scripts_after_first}


def test_sft_runs_on_two_nodes_in_one_world(pipeline_runs, root):
    cfg = load_config(pipeline_runs["config"])
    sft_ranks = {(node, rank, world) for name, node, rank, world in pipeline_runs["ranks"] if "-sft-" in name}
    # one rank under each slurmd, one world of 2 (c10d numbers the nodes in the order they join)
    assert sorted((rank, world) for _, rank, world in sft_ranks) == [("0", "2"), ("1", "2")], sft_ranks
    assert {node for node, _, _ in sft_ranks} == {"n1", "n2"}, sft_ranks
    # the other stages kept the default shape: one node, two ranks
    update_ranks = {(node, rank, world) for name, node, rank, world in pipeline_runs["ranks"] if "-update-" in name}
    assert {n for n, _, _ in update_ranks} == {"n1"} and {r for _, r, _ in update_ranks} == {"0", "1"}
    [sft_script] = job_scripts(root, f"{cfg.pipeline}-sft-")
    assert "#SBATCH --nodes=2" in sft_script.read_text()
    [out] = sft_script.parent.glob(sft_script.stem + "-*.out")
    log = out.read_text()
    assert "torchrun on node n1" in log and "torchrun on node n2" in log
    sft_dir = next((root / "store" / cfg.pipeline / "sft").iterdir())
    art = find_valid_output("file://" + str(sft_dir), {})  # manifest valid, every file's hash matches
    assert art is not None and art.manifest["stage"] == "sft"


def test_pipeline_end_to_end_and_rerun_launches_no_job(pipeline_runs, root):
    first, second = pipeline_runs["first"], pipeline_runs["second"]
    assert first["stages_launched"] == len(pipeline_runs["scripts_after_first"]) == 8  # one Slurm job per stage
    assert 0 <= first["policy_accuracy"] <= 1 and first["model_version"]
    assert second["stages_launched"] == 0 and second["stages_skipped"] == 8
    assert job_scripts(root) == pipeline_runs["scripts_after_first"]  # nothing submitted the second time
    assert squeue() == []


# --- faults --------------------------------------------------------------------------------------------

HANG = textwrap.dedent("""
    import os, time
    print(f"rank {os.environ['RANK']} up", flush=True)
    time.sleep(600)
""")


def test_timeout_cancels_the_job_and_nothing_is_left(tmp_path):
    program = tmp_path / "hang.py"
    program.write_text(HANG)
    lines: list[str] = []
    name = f"timeout-{tmp_path.name}"
    with pytest.raises(StageTimeout, match="timed out after 3s and was cancelled") as err:
        run_slurm_job([str(program)], job_name=name, shape=SlurmConfig(nodes=2, job_dir=str(tmp_path)), nproc=1,
                      python=sys.executable, timeout_s=3, log_line=lines.append, env=job_env(1))
    job_id = lines[0].split("submitted job ")[1].split()[0]
    assert job_info(job_id)["JobState"] == "CANCELLED"
    assert squeue(name) == []
    assert not [p for p in slurm_processes() if p["SLURM_JOB_ID"] == job_id], "a process of the job outlived it"
    assert "torchrun on node n2" in "".join(err.value.tail)  # the job's output was followed until the end


def test_node_marked_down_fails_the_job_as_retryable(tmp_path):
    """Slurm itself declares n2 lost (NODE_FAIL): a StageJobError, which the task retries."""
    program = tmp_path / "hang.py"
    program.write_text(HANG)
    lines: list[str] = []

    def lose_n2_once_running():
        wait_until(lambda: sum(line.endswith(" up") for line in lines) == 2, "both ranks")
        subprocess.run(["scontrol", "update", "nodename=n2", "state=down", "reason=test-lost-node"], check=True)

    threading.Thread(target=lose_n2_once_running, daemon=True).start()
    with pytest.raises(StageJobError, match="ended NODE_FAIL") as err:
        run_slurm_job([str(program)], job_name=f"lost-{tmp_path.name}", shape=SlurmConfig(nodes=2, job_dir=str(tmp_path)),
                      nproc=1, python=sys.executable, timeout_s=120, log_line=lines.append, env=job_env(1))
    assert not isinstance(err.value, StageBadInput)
    assert squeue(f"lost-{tmp_path.name}") == []
    # the node comes back by itself (ReturnToService=2: its slurmd is alive and registers again)
    wait_until(lambda: "n2" in subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], capture_output=True,
                                              text=True).stdout, "n2 idle again", timeout=60)


def test_bad_input_is_not_retried(root, prefect_harness):
    config = write_config(root, "nan", **{"sft.steps": 12})
    sft_jobs = f"{load_config(config).pipeline}-sft-"
    before = job_scripts(root, sft_jobs)
    with pytest.raises(StageBadInput, match=r"sft: loss is nan at step 5"):
        prefix(str(config), sft_debug={"nan_loss_at_step": 5})
    assert len(job_scripts(root, sft_jobs)) == len(before) + 1  # one Slurm job: exit 2 is not retried


def test_killed_node_is_retried_and_resumes(root, prefect_harness):
    config = write_config(root, "killed", **{"sft.steps": 40, "sft.save_every": 10, "sft.log_every": 5,
                                             "launch.slurm_per_stage": {"sft": SFT_TWO_NODES}})
    cfg = load_config(config)
    killed: list[int] = []

    def kill_node_n2_once_saved():
        def saved():
            return list((root / "store" / cfg.pipeline / "sft").glob("*/_resume/latest.json"))
        marker = wait_until(saved, "the first resume point")[0]
        sft_key = marker.parent.parent.name
        for p in slurm_processes():  # node n2 dies: its torchrun and rank, no grace
            if p["SLURMD_NODENAME"] == "n2" and p["SLURM_JOB_NAME"].endswith(f"-sft-{sft_key}"):
                os.kill(p["pid"], signal.SIGKILL)
                killed.append(p["pid"])

    killer = threading.Thread(target=kill_node_n2_once_saved, daemon=True)
    killer.start()
    result = prefix(str(config))
    killer.join()
    assert killed, "no process of node n2 was found to kill"
    key = result["sft"].artifact.manifest["key"]
    scripts = job_scripts(root, f"-sft-{key}")
    assert len(scripts) == 2, "the failed job is retried as a new Slurm job"
    logs = [next(s.parent.glob(s.stem + "-*.out")).read_text() for s in sorted(scripts, key=os.path.getmtime)]
    assert "resumed from step" not in logs[0] and "resumed from step" in logs[1], logs[1][-2000:]
    assert "sft step 5/40" not in logs[1]  # did not start over
    assert find_valid_output(result["sft"].uri, {}) is not None


def test_cancelled_flow_run_cancels_its_job(root, prefect_harness, tmp_path):
    config = write_config(root, "cancel", **{"sft.steps": 5000})
    pipeline = load_config(config).pipeline
    proc = start_flow_process(config, tmp_path / "flow.log")
    try:
        running = wait_until(lambda: [j for j in squeue(f"{pipeline}-sft-") if j[2] == "RUNNING"],
                             "the sft job to run", proc=proc)
        job_id = running[0][0]
        proc.send_signal(signal.SIGTERM)  # what Prefect's worker does to a flow run cancelled in the UI
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert job_info(job_id)["JobState"] == "CANCELLED", (tmp_path / "flow.log").read_text()[-3000:]
    assert squeue(f"{pipeline}-sft-") == []
    assert not [p for p in slurm_processes() if p["SLURM_JOB_ID"] == job_id]


def test_second_run_after_a_killed_flow_process_waits_for_its_job_no_second_writer(root, prefect_harness, tmp_path,
                                                                                   caplog):
    """The flow process dies while its Slurm job runs (its login-node session ends): the job runs on.
    A second run takes over the dead process's lease at once, then finds the job by its name and waits
    for it instead of submitting another. (While the first process lives, its lease alone makes the
    second run wait: tests/test_lease.py.)"""
    config = write_config(root, "twice", **{"sft.steps": 150})
    pipeline = load_config(config).pipeline
    first = start_flow_process(config, tmp_path / "first.log")
    most_at_once = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            most_at_once.append(len(squeue(f"{pipeline}-sft-")))
            time.sleep(0.2)

    try:
        wait_until(lambda: [j for j in squeue(f"{pipeline}-sft-") if j[2] == "RUNNING"], "the first sft job",
                   proc=first)
        os.killpg(first.pid, signal.SIGKILL)  # no scancel from it: SIGKILL runs no handler
        first.wait()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        second = prefix(str(config))  # the same config again while the dead run's job still runs
    finally:
        watching.set()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert max(most_at_once) == 1  # never two jobs for the output
    assert "taking over the lease" in caplog.text
    assert "(the same key) is still running: waiting for it" in caplog.text
    assert "completed the output: nothing submitted" in caplog.text
    key = second["sft"].artifact.manifest["key"]
    assert len(job_scripts(root, f"{pipeline}-sft-{key}")) == 1  # the second run submitted nothing
    assert find_valid_output(second["sft"].uri, {}) is not None
