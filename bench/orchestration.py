"""Benchmark: what orchestration costs. The tiny pipeline's wall time against its stages' compute.

    .venv/bin/python bench/orchestration.py                 # configs/tiny.yaml, 2 RL rounds (~5 min)
    .venv/bin/python bench/orchestration.py --rounds 8      # the full nightly config (~10+ min)
    .venv/bin/python bench/orchestration.py --small         # smoke test: the tests' small config, 1 round
    .venv/bin/python bench/orchestration.py --skip-pipeline --slurm   # per-job overhead, local against Slurm
        (a cluster: `scripts/slurm_cluster.sh up; eval "$(scripts/slurm_cluster.sh env)"`, or a real one)

1. `python -m flows.cli run CONFIG --rounds R` (= `alignflow run`) in a fresh storage root and
   MLflow DB in a temp dir; wall time of the whole command (Prefect's embedded server start
   included) and the flow's own `wall_seconds` against `stage_compute_seconds` (the sum of the
   stages' `stage_seconds`: what each job measured from its spec read to its manifest). Per
   stage: job seconds (its `_SPEC.json` written just before launch -> its `_MANIFEST.json`
   written just before exit) and stage seconds from the manifest.
2. The same command again: every stage found in the store, nothing launched.
3. The per-job overhead, broken down by a probe job launched exactly as a stage is
   (tasks.launch.run_job + torchrun_command's flags + job_env), timing each phase from the
   moment the parent starts the process: torchrun + interpreter start, `import torch`, gloo
   init, the store's imports (pyarrow, fsspec), `import transformers` + build the tiny Llama,
   `import deepspeed`, `deepspeed.initialize`, and process exit (torchrun teardown).
4. With --slurm, the same probe as a Slurm job (tasks.slurm.run_slurm_job: sbatch, srun, torchrun
   with c10d rendezvous, 1 node x the same ranks), interleaved with the local runs; the first
   phase then also holds sbatch, scheduling and srun, the last the poll that sees the job end.

Prints markdown tables and writes JSON to bench/results/orchestration-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


# --- the probe: runs as a torchrun worker ---------------------------------------------------

def probe() -> None:
    t0 = float(os.environ["BENCH_T0"])
    marks = [("started (torchrun + interpreter)", time.time())]
    import torch  # noqa: F401

    marks.append(("import torch", time.time()))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    marks.append(("gloo process group", time.time()))
    from stages.common import rollouts, store  # noqa: F401  pyarrow, fsspec

    marks.append(("import store (pyarrow, fsspec)", time.time()))
    from stages.common.models import build_tiny_model, train_char_tokenizer

    tok = train_char_tokenizer(["0123456789+="])
    model = build_tiny_model(C.pipeline_config().model.tiny, tok, seed=0)
    marks.append(("import transformers + build model", time.time()))
    import deepspeed  # noqa: F401

    marks.append(("import deepspeed", time.time()))
    from stages.common.engine import make_engine
    from stages.common.sections import EngineConfig

    make_engine(model, EngineConfig(zero_stage=2, dtype="fp32"), lr=1e-3, micro_batch=32)
    marks.append((f"make_engine ({C.engine_name(world, 2)})", time.time()))
    if os.environ.get("RANK", "0") == "0":
        Path(os.environ["BENCH_PROBE_OUT"]).write_text(json.dumps({"t0": t0, "marks": marks}))
    sys.stdout.flush()
    os._exit(0)  # as runtime.main does


def probe_once(backend: str, nproc: int, threads: int) -> dict:
    """One probe job through the stage launcher of `backend`; its phases in seconds."""
    from tasks.config import SlurmConfig
    from tasks.launch import job_env, run_job
    from tasks.slurm import run_slurm_job

    (C.REPO / ".alignflow").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=C.REPO / ".alignflow") as tmp:  # the job's nodes must see it
        out = Path(tmp) / "probe.json"
        program = [str(Path(__file__).resolve()), "--_probe"]
        t0 = time.time()
        env = job_env(nproc, {"BENCH_T0": str(t0), "BENCH_PROBE_OUT": str(out), "OMP_NUM_THREADS": str(threads)})
        if backend == "slurm":
            run_slurm_job(program, job_name=f"bench-probe-{Path(tmp).name}", shape=SlurmConfig(job_dir=tmp),
                          nproc=nproc, python=sys.executable, timeout_s=600, log_line=lambda line: None, env=env)
        else:
            run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                     "--max-restarts=0", *program], timeout_s=600, log_line=lambda line: None, env=env)
        t_end = time.time()
        data = json.loads(out.read_text())
    phases, prev = {}, t0
    for name, t in data["marks"]:
        phases[name] = t - prev
        prev = t
    phases["exit (teardown, torchrun)"] = t_end - prev
    phases["total"] = t_end - t0
    return phases


def job_overhead(nproc: int, threads: int, repeats: int, backends: list[str]) -> dict[str, list[dict]]:
    """`repeats` probe runs per backend, interleaved so that both see the same machine load."""
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for _ in range(repeats):
        for backend in backends:
            runs[backend].append(probe_once(backend, nproc, threads))
    return runs


# --- the pipeline ---------------------------------------------------------------------------

def run_pipeline(config: Path, rounds: int | None, workdir: Path, label: str) -> dict:
    summary = workdir / f"summary-{label}.json"
    cmd = [sys.executable, "-m", "flows.cli", "run", str(config), "--summary-out", str(summary)]
    if rounds is not None:
        cmd += ["--rounds", str(rounds)]
    env = dict(os.environ, ALIGNFLOW_STORAGE_ROOT=str(workdir / "store"),
               MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", PREFECT_HOME=str(workdir / "prefect"))
    log = workdir / f"log-{label}.txt"
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=C.REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline failed ({proc.returncode}); log: {log}\n" + log.read_text()[-3000:])
    return {"command_wall_s": wall, "summary": json.loads(summary.read_text()), "log": str(log)}


def core_seconds(stage: str, metrics: dict) -> float | None:
    """The stage's own timed core (training loop / generation), where its metrics carry it."""
    if "train_seconds" in metrics:
        return metrics["train_seconds"]
    if "generate_seconds" in metrics:
        return metrics["generate_seconds"]
    return None  # update, score, evaluate: no timed core in the manifest


STARTUP_PHASES = {"first_step_s": "startup_s", "process_s": "startup_process_s", "setup_s": "startup_setup_s",
                  "load_s": "startup_load_s"}
TRAINING_STAGES = ("sft", "reward_model", "dpo", "update")


def startup_table(stages: list[dict]) -> list[dict]:
    """Median launch -> first step per phase, over the jobs that train and over those that do not."""
    out = []
    for what, group in (("training jobs", [r for r in stages if r["stage"].split("[")[0] in TRAINING_STAGES]),
                        ("other jobs", [r for r in stages if r["stage"].split("[")[0] not in TRAINING_STAGES]),
                        ("all jobs", stages)):
        group = [r for r in group if r["first_step_s"] is not None]
        if group:
            out.append({"jobs": f"{what} ({len(group)})",
                        **{f"median {k}": statistics.median(r[k] for r in group) for k in STARTUP_PHASES}})
    return out


def stage_table(store_root: Path) -> list[dict]:
    rows = []
    for manifest in sorted(store_root.rglob("_MANIFEST.json")):
        spec = manifest.parent / "_SPEC.json"
        m = json.loads(manifest.read_text())
        sp = json.loads(spec.read_text()) if spec.exists() else {}
        params = sp.get("params", {})
        label = m["stage"] + (f"[{params['round']}]" if params.get("round") is not None else "")
        if m["stage"] == "evaluate":
            label += "[sft]" if "/sft/" in sp.get("inputs", {}).get("policy", "") else "[policy]"
        job_s = manifest.stat().st_mtime - spec.stat().st_mtime if spec.exists() else None
        metrics = m["metrics"]
        stage_s = metrics.get("stage_seconds")
        rows.append({"stage": label, "started": spec.stat().st_mtime if spec.exists() else 0,
                     "job_s (spec->manifest)": job_s, "stage_s": stage_s,
                     "core_s": core_seconds(m["stage"], metrics),
                     "overhead_s": job_s - stage_s if job_s is not None and stage_s is not None else None,
                     # launch -> first step, by phase (stages/common/runtime.startup_metrics)
                     **{name: metrics.get(key) for name, key in STARTUP_PHASES.items()}})
    rows.sort(key=lambda r: r["started"])
    for r in rows:
        del r["started"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml")
    parser.add_argument("--rounds", type=int, default=2, help="RL rounds (the config's own: --rounds -1)")
    parser.add_argument("--small", action="store_true", help="the tests' small config, 1 round")
    parser.add_argument("--probe-repeats", type=int, default=3)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--slurm", action="store_true", help="also run the probe as a Slurm job (needs SLURM_CONF "
                        "or a cluster's sbatch)")
    parser.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._probe:
        probe()
        return

    import yaml

    workdir = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    config = C.REPO / args.config
    rounds = None if args.rounds < 0 else args.rounds
    if args.small:
        sys.path.insert(0, str(C.REPO / "tests"))
        from conftest import small_config

        cfg = small_config(workdir)
        cfg.pop("storage", None)
        cfg.pop("tracking", None)
        config = workdir / "small.yaml"
        config.write_text(yaml.safe_dump(cfg))
        rounds = 1
    cfg = yaml.safe_load(config.read_text())
    nproc = cfg.get("launch", {}).get("nproc_per_node", 2)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    print(f"# orchestration: {config.name}, rounds {rounds if rounds is not None else 'from config'}, "
          f"{nproc} ranks per job, work dir {workdir}", flush=True)

    result: dict = {"config": str(config), "rounds": rounds, "nproc_per_node": nproc}
    if not args.skip_pipeline:
        first = run_pipeline(config, rounds, workdir, "fresh")
        s = first["summary"]
        print(f"  fresh run: {first['command_wall_s']:.1f}s command, flow {s['wall_seconds']:.1f}s, "
              f"stage compute {s['stage_compute_seconds']:.1f}s, {s['stages_launched']} jobs", flush=True)
        stages = stage_table(workdir / "store")
        again = run_pipeline(config, rounds, workdir, "cached")
        s2 = again["summary"]
        print(f"  cached rerun: {again['command_wall_s']:.1f}s command, flow {s2['wall_seconds']:.1f}s, "
              f"{s2['stages_launched']} launched, {s2['stages_skipped']} skipped", flush=True)
        jobs_s = sum(r["job_s (spec->manifest)"] or 0 for r in stages)
        totals = [
            {"what": "fresh run: whole command (Prefect server start, flow, exit)", "seconds": first["command_wall_s"]},
            {"what": "fresh run: flow wall_seconds", "seconds": s["wall_seconds"]},
            {"what": "  sum of job seconds (spec written -> manifest written)", "seconds": jobs_s},
            {"what": "  sum of stage_compute_seconds (inside the jobs)", "seconds": s["stage_compute_seconds"]},
            {"what": "  job start/exit overhead (jobs - compute)", "seconds": jobs_s - s["stage_compute_seconds"]},
            {"what": "  flow outside the jobs (Prefect, MLflow, keys, skip checks, register)",
             "seconds": s["wall_seconds"] - jobs_s},
            {"what": "cached rerun: whole command", "seconds": again["command_wall_s"]},
            {"what": "cached rerun: flow wall_seconds", "seconds": s2["wall_seconds"]},
        ]
        for t in totals:
            t["share of fresh flow"] = f"{t['seconds'] / s['wall_seconds']:.1%}"
        totals.append({"what": "ratio: flow wall / stage compute",
                       "seconds": s["wall_seconds"] / max(s["stage_compute_seconds"], 1e-9)})
        totals.append({"what": "ratio: cached rerun / fresh (command)",
                       "seconds": again["command_wall_s"] / first["command_wall_s"]})
        result.update(fresh=first, cached=again, stages=stages, totals=totals, startup=startup_table(stages))

    backends = ["local", "slurm"] if args.slurm else ["local"]
    by_backend = job_overhead(nproc, threads, args.probe_repeats, backends)
    result["probe"] = {}
    for backend, runs in by_backend.items():
        phases = [{"phase": k, "median_s": statistics.median(r[k] for r in runs),
                   "min_s": min(r[k] for r in runs), "max_s": max(r[k] for r in runs)} for k in runs[0]]
        result["probe"][backend] = {"nproc": nproc, "threads": threads, "runs": runs, "phases": phases}
    if args.slurm:
        local, slurm = (statistics.median(r["total"] for r in by_backend[b]) for b in ("local", "slurm"))
        result["slurm_vs_local"] = [
            {"what": "local job (torchrun --standalone), median total", "seconds": local},
            {"what": "Slurm job (sbatch, srun, torchrun c10d), median total", "seconds": slurm},
            {"what": "Slurm's overhead per job (difference)", "seconds": slurm - local},
            {"what": "  of which before the probe's first line (sbatch, scheduling, srun, rendezvous)",
             "seconds": statistics.median(r["started (torchrun + interpreter)"] for r in by_backend["slurm"])
             - statistics.median(r["started (torchrun + interpreter)"] for r in by_backend["local"])},
        ]

    print()
    if "totals" in result:
        print("## Pipeline wall time against stage compute\n")
        print(C.markdown_table(result["totals"], ["what", "seconds", "share of fresh flow"]))
        print("\n## Per stage (fresh run)\n")
        print(C.markdown_table(result["stages"]))
        print("\n## Launch to first step, median over the fresh run's jobs, by phase\n")
        print("process: launcher, interpreter, imports; setup: spec, process group; load: inputs, tokenizer, "
              "models, engine\n")
        print(C.markdown_table(result["startup"]))
        print()
    for backend, probe_result in result["probe"].items():
        print(f"## Per-job overhead, probe job on {backend} (torchrun --nproc_per_node {nproc}, {threads} thread(s) "
              f"each, {args.probe_repeats} runs)\n")
        print(C.markdown_table(probe_result["phases"]))
        print()
    if args.slurm:
        print("## Slurm against local, per job (same probe, runs interleaved)\n")
        print(C.markdown_table(result["slurm_vs_local"]))
    path = C.write_results("orchestration", result)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
