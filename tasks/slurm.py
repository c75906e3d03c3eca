"""Launch a stage as a Slurm job: the same contract as tasks/launch.run_job, on a cluster.

    sbatch --parsable SCRIPT          the script: #SBATCH shape, setup lines, then
      srun --ntasks-per-node=1        one torchrun per node, c10d rendezvous on the first node,
        torchrun --nnodes=$SLURM_NNODES --rdzv_id=$SLURM_JOB_ID ...  -m stages.<stage> --spec URI
    poll `scontrol show job -o`       stream the job's output file into the log meanwhile

- exit 0 -> done; the bad-input marker or exit 2 -> StageBadInput (not retried); any other end
  (failed, node lost, preempted, requeued, out of memory) -> StageJobError, which the task retries;
  the stage resumes from its `_resume/` state. Jobs are submitted with --no-requeue so that
  retries have one owner, the task, with its backoff and its count.
- `launch.timeout_s` counts from the moment the job runs (time in the queue is the cluster's, not
  the stage's): then scancel, and wait until squeue no longer lists the job.
- Anything that ends the caller while the job is alive (the flow run cancelled, a signal, an
  exception) cancels it: the poll loop's `finally`, and an atexit hook for an interpreter exit.
- One writer per output: the job name is `{pipeline}-{stage}-{key}`. A job still running under that
  name (an earlier attempt, another run of the same config) is waited for, not cancelled: it is
  doing the same work, and cancelling it would make two live runs cancel each other's jobs in turn.
  If its output is complete afterwards, nothing is submitted. `--dependency=singleton` closes the
  window between that check and the submission: Slurm never runs two jobs of one name and user.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import math
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from stages.common.runtime import BAD_INPUT_MARKER, LAUNCHED_AT_ENV
from tasks.config import PipelineConfig, SlurmConfig
from tasks.launch import PROJECT_ROOT, StageBadInput, StageJobError, StageTimeout

POLL_S = 0.5
# States after which the job will not run again (it was submitted with --no-requeue).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"}
REQUEUED = {"REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"}

_live_jobs: set[str] = set()  # submitted here and not yet ended: cancelled if the interpreter exits


@atexit.register
def _cancel_live_jobs() -> None:
    for job_id in list(_live_jobs):
        subprocess.run(["scancel", job_id], capture_output=True)


def slurm_command(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, **kw)


def job_info(job_id: str) -> dict[str, str] | None:
    """`scontrol show job -o` as a dict (JobState, ExitCode, Reason, NodeList...); None once unknown."""
    proc = slurm_command(["scontrol", "show", "job", "-o", job_id])
    if proc.returncode != 0 or "JobId=" not in proc.stdout:
        return None
    return dict(field.split("=", 1) for field in proc.stdout.split() if "=" in field)


def running_jobs_named(name: str) -> list[str]:
    """Ids of this user's jobs called `name` that are pending or running."""
    proc = slurm_command(["squeue", "--me", "-h", "-n", name, "-o", "%i"])
    if proc.returncode != 0:
        raise StageJobError(f"squeue failed: {proc.stderr.strip()}", None, [])
    return proc.stdout.split()


def cancel(job_id: str, wait_s: float = 60.0) -> None:
    """scancel, then wait until squeue no longer lists the job (its processes are gone)."""
    slurm_command(["scancel", job_id])
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        listed = slurm_command(["squeue", "-h", "-j", job_id, "-o", "%i"])
        if listed.returncode != 0 or not listed.stdout.strip():
            break
        time.sleep(POLL_S)
    _live_jobs.discard(job_id)


def nproc_per_node(shape: SlurmConfig, default: int) -> int:
    return shape.nproc_per_node or shape.gpus_per_node or default


def time_limit(shape: SlurmConfig, timeout_s: float) -> str:
    # Slurm's own limit, so that a job whose worker died still ends: a minute past our timeout.
    return shape.time_limit or str(math.ceil(timeout_s / 60) + 1)


def sbatch_script(program: list[str], *, job_name: str, shape: SlurmConfig, nproc: int, python: str,
                  output: str, timeout_s: float) -> str:
    """The batch script: `srun` starts one torchrun per node; torchrun starts `program` per rank."""
    options = [f"--job-name={job_name}", f"--output={output}", f"--nodes={shape.nodes}", "--ntasks-per-node=1",
               f"--time={time_limit(shape, timeout_s)}", "--no-requeue", "--dependency=singleton",
               f"--chdir={PROJECT_ROOT}"]
    for flag, value in [("gpus-per-node", shape.gpus_per_node or None), ("cpus-per-task", shape.cpus_per_task),
                        ("mem", shape.mem), ("partition", shape.partition), ("account", shape.account),
                        ("qos", shape.qos)]:
        if value is not None:
            options.append(f"--{flag}={value}")
    options += shape.sbatch_options
    port = shape.rdzv_port or "$((20000 + SLURM_JOB_ID % 20000))"
    threads = f"export OMP_NUM_THREADS={max(1, shape.cpus_per_task // nproc)}" if shape.cpus_per_task else ""
    # Node names need not resolve (the emulated cluster's do not): rendezvous on the node's address.
    per_node = (f'echo "torchrun on node $SLURMD_NODENAME (task $SLURM_PROCID of $SLURM_NTASKS)"; '
                f'exec {shlex.quote(python)} -m torch.distributed.run --nnodes="$SLURM_NNODES" '
                f'--nproc_per_node={nproc} --rdzv_backend=c10d --rdzv_endpoint="$ALIGNFLOW_RDZV_ENDPOINT" '
                f'--rdzv_id="$SLURM_JOB_ID" --max-restarts=0 {shlex.join(program)}')
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {opt}" for opt in options),
        "set -eo pipefail",
        *shape.setup,
        threads,
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'head_addr=$(scontrol show node -o "$head_node" | tr " " "\\n" | sed -n "s/^NodeAddr=//p")',
        f'export ALIGNFLOW_RDZV_ENDPOINT="${{head_addr:-$head_node}}:{port}"',
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(per_node)}",
        "",
    ])


class _OutputFollower:
    """Reads the lines a job appends to its output file (which appears once the job starts)."""

    def __init__(self, path: Path, log_line: Callable[[str], None], tail_lines: int):
        self.path, self.log_line = path, log_line
        self.offset, self.partial = 0, b""
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.bad_input = False

    def poll(self, final: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            self.offset += len(data)
            *lines, self.partial = (self.partial + data).split(b"\n")
            if final and self.partial:
                lines, self.partial = [*lines, self.partial], b""
            for raw in lines:
                line = raw.decode(errors="replace")
                self.tail.append(line + "\n")
                self.bad_input |= BAD_INPUT_MARKER in line
                self.log_line(line)


def _wait_for_same_name(job_name: str, log_line: Callable[[str], None], deadline: float) -> None:
    logged: list[str] = []
    while ids := running_jobs_named(job_name):
        if time.monotonic() > deadline:
            raise StageTimeout(f"Slurm job(s) {', '.join(ids)} named {job_name} still running after the timeout; "
                               "not submitting a second writer of the same output", None, [])
        if ids != logged:
            log_line(f"slurm: job {', '.join(ids)} named {job_name} (the same key) is still running: waiting for it")
            logged = ids
        time.sleep(5 * POLL_S)


def run_slurm_job(program: list[str], *, job_name: str, shape: SlurmConfig, nproc: int, python: str,
                  timeout_s: float, log_line: Callable[[str], None], env: dict[str, str],
                  output_ready: Callable[[], bool] | None = None, tail_lines: int = 80) -> None:
    """Submit `program` (run by torchrun on every rank) as a Slurm job and follow it to its end.

    Raises StageJobError / StageBadInput / StageTimeout as run_job does. `output_ready` tells
    whether the output is complete: checked after waiting for a same-name job, to not redo it.
    """
    if shutil.which("sbatch") is None:  # the worker is not on a machine of the cluster: retrying cannot help
        raise StageBadInput("launch.backend is slurm, but sbatch is not on this worker's PATH: run the worker "
                            "where sbatch works (a login node)", None, [])
    _wait_for_same_name(job_name, log_line, time.monotonic() + timeout_s)
    if output_ready is not None and output_ready():
        log_line(f"slurm: the job named {job_name} completed the output: nothing submitted")
        return
    job_dir = Path(shape.job_dir or PROJECT_ROOT / ".alignflow" / "slurm-jobs")
    job_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{job_name}-{uuid.uuid4().hex[:8]}"
    script = job_dir / f"{stem}.sbatch"
    script.write_text(sbatch_script(program, job_name=job_name, shape=shape, nproc=nproc, python=python,
                                    output=str(job_dir / f"{stem}-%j.out"), timeout_s=timeout_s))
    # The job inherits this environment (sbatch's --export=ALL); a worker that itself runs inside
    # an allocation must not hand that allocation's SLURM_* variables to the new job.
    sbatch_env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    sbatch_env[LAUNCHED_AT_ENV] = repr(time.time())  # start-up is measured from the submission
    submitted = slurm_command(["sbatch", "--parsable", str(script)], env=sbatch_env, cwd=PROJECT_ROOT)
    if submitted.returncode != 0:
        raise StageJobError(f"sbatch {script} failed: {submitted.stderr.strip()}", submitted.returncode,
                            [submitted.stderr])
    job_id = submitted.stdout.strip().split(";")[0]
    _live_jobs.add(job_id)
    log_line(f"slurm: submitted job {job_id} ({job_name}), script {script}")
    follower = _OutputFollower(job_dir / f"{stem}-{job_id}.out", log_line, tail_lines)
    state, info, deadline = "PENDING", None, None
    try:
        while True:
            follower.poll()
            info = job_info(job_id)
            if info is None:
                raise StageJobError(f"Slurm job {job_id} is no longer known to the controller", None,
                                    list(follower.tail))
            if info["JobState"] != state:
                state = info["JobState"]
                log_line(f"slurm: job {job_id} {state} (reason {info.get('Reason')}, nodes {info.get('NodeList')})")
            if state in ENDED:
                break
            if state in REQUEUED or int(info.get("Restarts", "0")) > 0:
                raise StageJobError(f"Slurm job {job_id} was requeued ({state}): retried by the task", None,
                                    list(follower.tail))
            if deadline is None and state not in ("PENDING", "CONFIGURING"):
                deadline = time.monotonic() + timeout_s
            if deadline is not None and time.monotonic() > deadline:
                cancel(job_id)
                follower.poll(final=True)
                raise StageTimeout(f"Slurm job {job_id} timed out after {timeout_s:.0f}s and was cancelled",
                                   None, list(follower.tail))
            time.sleep(POLL_S)
    finally:
        if job_id in _live_jobs and state not in ENDED:
            cancel(job_id)  # the caller is ending (cancelled, interrupted, failed): the job goes too
        _live_jobs.discard(job_id)
    follower.poll(final=True)
    code, _, sig = info.get("ExitCode", "0:0").partition(":")
    if state == "COMPLETED" and code == "0":
        return
    error = StageBadInput if follower.bad_input or code == "2" else StageJobError
    raise error(f"Slurm job {job_id} ended {state} with exit code {code} (signal {sig}): {script}",
                int(code), list(follower.tail))


def run_stage_job(stage: str, spec_uri: str, cfg: PipelineConfig, *, key: str, log_line: Callable[[str], None],
                  env: dict[str, str], output_ready: Callable[[], bool] | None = None) -> None:
    """A stage's job on Slurm, shaped by launch.slurm and launch.slurm_per_stage[stage]."""
    shape = cfg.launch.slurm_for(stage)
    run_slurm_job(["-m", f"stages.{stage}", "--spec", spec_uri], job_name=f"{cfg.pipeline}-{stage}-{key}",
                  shape=shape, nproc=nproc_per_node(shape, cfg.launch.nproc_per_node),
                  python=cfg.launch.stage_python.get(stage, cfg.launch.python) or sys.executable,
                  timeout_s=cfg.launch.timeout_s, log_line=log_line, env=env, output_ready=output_ready)
