"""Shared by the bench scripts: machine facts, threads, tables, results, and our stages as real jobs.

Our side of every comparison runs the way the pipeline runs it: a stage spec written to a
store, `torchrun -m stages.<name> --spec URI` launched through `tasks.launch.run_job`, the
stage's own figures read back from its manifest. Nothing here goes through Prefect or MLflow
(the specs carry no tracking), so what is timed is the job and the stage.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# --- machine and threads -----------------------------------------------------------------

try:
    LOADAVG_AT_START = Path("/proc/loadavg").read_text().split()[:3]
except OSError:
    LOADAVG_AT_START = None

def set_threads(threads: int) -> None:
    """Same thread count for every side: this process's torch, and every child's OMP."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def machine() -> dict:
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                                  if ln.startswith("model name")), "?")
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
        info["avx512"] = any(f.startswith("avx512f") for f in flags)
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["amx"] = "amx_tile" in flags
        info["mem_gib"] = round(int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                                         if ln.startswith("MemTotal"))) / 2**20, 1)
        info["loadavg_at_start"] = LOADAVG_AT_START
        info["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, StopIteration):
        pass
    try:
        import torch
        import transformers

        info["torch"], info["transformers"] = torch.__version__, transformers.__version__
    except ImportError:
        pass
    return info


# --- output ---------------------------------------------------------------------------------

def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return "n/a" if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = machine()
    print(f"\nmachine: {m.get('cpu_model')}, {m.get('cpus')} cpus, load average at start "
          f"{m.get('loadavg_at_start')}, at end {m.get('loadavg_at_end')}")
    path = RESULTS / f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": m, **payload}, indent=2, default=str))
    return path


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# --- our stages as real jobs -------------------------------------------------------------

def pipeline_config(overrides: dict | None = None, root: Path | None = None, pipeline: str | None = None):
    """configs/tiny.yaml with `overrides` deep-merged in, storage under `root`."""
    import yaml

    from tasks.config import parse_config

    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(data, overrides or {})
    if root is not None:
        data["storage"] = {"root": str(root)}
    if pipeline:
        data["pipeline"] = pipeline
    return parse_config(data, "bench")


class JobResult:
    def __init__(self, artifact, wall_s: float, log: list[str]):
        self.artifact, self.wall_s, self.log = artifact, wall_s, log

    @property
    def metrics(self) -> dict:
        return self.artifact.metrics

    @property
    def uri(self) -> str:
        return self.artifact.uri


def run_stage_job(stage: str, cfg, inputs: dict[str, "JobResult"], *, round_idx: int | None = None,
                  nproc: int = 1, threads: int = 1, wrap: list[str] | None = None, quiet: bool = True,
                  extra_env: dict | None = None) -> JobResult:
    """One stage as the pipeline's task launches it (minus Prefect/MLflow): key, spec, torchrun job
    (forked from the warm job server, as `launch.warm_start` does; cold under `wrap`, a profiler),
    manifest. Returns the artifact and the job's wall time (launch to exit)."""
    from stages.common import store
    from tasks import warm_jobs
    from tasks.launch import PROJECT_ROOT, job_env, run_job, torchrun_command
    from tasks.spec import stage_spec

    spec = stage_spec(stage, cfg, {name: r.artifact for name, r in inputs.items()}, round_idx)
    output = spec.output
    store.remove_manifest(output)
    spec_uri = store.join(output, store.SPEC)
    store.write_json(spec_uri, spec.to_json())
    cmd = (wrap or []) + torchrun_command(stage, spec_uri, nproc)
    env = job_env(nproc, {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(extra_env or {})})
    log: list[str] = []

    def log_line(line: str) -> None:
        log.append(line)
        if not quiet:
            print(f"    [{stage}] {line}", flush=True)

    started = time.perf_counter()
    start = None if wrap else (lambda env: warm_jobs.start_job(f"stages.{stage}", ["--spec", spec_uri], nproc,
                                                                sys.executable, env, PROJECT_ROOT))
    run_job(cmd, timeout_s=1800, log_line=log_line, env=env, start=start)
    wall = time.perf_counter() - started
    return JobResult(store.read_artifact(output), wall, log)


def engine_name(ranks: int, zero_stage: int) -> str:
    """What a training job of `ranks` trains with (stages/common/engine.py: make_engine)."""
    return "plain torch" if ranks == 1 else f"DeepSpeed ZeRO-{zero_stage}"


def fetch_checkpoint(job: JobResult, dest: Path, prefix: str = "checkpoint") -> Path:
    from stages.common import store

    return store.download_dir(job.artifact, prefix, dest)


def store_download(job: JobResult, relpath: str, dest: Path) -> Path:
    from stages.common import store

    return store.download(job.artifact, relpath, dest)


def train_clock():
    """A transformers TrainerCallback class whose `begin` and `end` are the perf_counter times at which
    train() begins and ends: the peers' loop time, without their set-up and saving."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        begin = end = None

        def on_train_begin(self, args, state, control, **kw):
            Clock.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            Clock.end = time.perf_counter()

    return Clock


def py_spy_command(out: Path, subprocesses: bool = False) -> list[str]:
    """The prefix that runs a command under py-spy (from this environment), sampling at 100 Hz into
    `out` in its raw format (see train_vs_trl.summarize_profile); `subprocesses` follows its children."""
    return ([str(Path(sys.executable).parent / "py-spy"), "record", "-o", str(out), "--format", "raw", "-r", "100"]
            + ["--subprocesses"] * subprocesses + ["--"])


def run_worker(script: Path, mode: str, args: dict, profile_to: Path | None = None) -> dict:
    """`python SCRIPT --_worker MODE --_args JSON` (a peer's side of a comparison, in its own process:
    its threads, imports and memory; `worker_main` there) with args["threads"] OpenMP threads, under
    py-spy when `profile_to`. Returns its JSON line, with process_wall_s."""
    cmd = [sys.executable, str(script), "--_worker", mode, "--_args", json.dumps(args)]
    if profile_to:
        cmd = py_spy_command(profile_to) + cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(args["threads"]), MKL_NUM_THREADS=str(args["threads"]),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning", DISABLE_MLFLOW_INTEGRATION="TRUE")
    started = time.perf_counter()
    out = run_subprocess_json(cmd, env=env)
    out["process_wall_s"] = time.perf_counter() - started
    return out


def worker_main(workers: dict) -> None:
    """The child's side of `run_worker`: runs workers[MODE](args), prints its result as the last line."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--_worker", required=True, choices=sorted(workers))
    parser.add_argument("--_args", required=True)
    args = parser.parse_args()
    print(json.dumps(workers[args._worker](json.loads(args._args))), flush=True)
    os._exit(0)  # skip the slow interpreter teardown (torch, datasets)


def run_subprocess_json(cmd: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    """Run a helper that prints one JSON line last; returns it."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in reversed(proc.stdout.strip().splitlines()):  # wrappers (py-spy) may print after it
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(cmd)} printed no JSON line:\n{proc.stdout[-3000:]}")
