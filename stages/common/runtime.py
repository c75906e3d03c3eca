"""What every stage job shares: its spec, ranks, inputs, outputs, metrics and exit codes.

A stage is `python -m stages.<name> --spec URI` under torchrun. It reads only its spec,
downloads its inputs (hash-checked), uploads its outputs, and rank 0 writes the manifest
last. Exit codes: 0 done; 2 bad input/config or a deterministic failure (not retried);
anything else is retried by the task.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from . import store

P = TypeVar("P", bound=BaseModel)

EXIT_OK = 0
EXIT_BAD_INPUT = 2
# torchrun turns any worker failure into exit 1, so the stage also prints this marker.
BAD_INPUT_MARKER = "ALIGNFLOW_BAD_INPUT"


class BadInput(Exception):
    """Deterministic failure (bad config, missing column, empty data, divergence): exit 2."""


@dataclass
class StageSpec:
    stage: str
    key: str
    pipeline: str
    inputs: dict[str, str]  # name -> artifact URI
    output: str
    params: dict  # the stage's params model (stages/common/params.py), as JSON
    code_version: str
    storage_options: dict = field(default_factory=dict)
    tracking: dict = field(default_factory=dict)  # {"uri": ..., "run_id": ...}
    # Fault injection for tests: {"fail_once_marker": URI} fails the job while the marker exists.
    debug: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "StageSpec":
        return cls(**data)


class StageContext(Generic[P]):
    """Ranks, inputs, outputs and tracking for one stage job; `params` is the stage's typed model."""

    def __init__(self, spec: StageSpec, params: P, workdir: Path):
        self.spec = spec
        self.params = params
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.workdir = workdir  # downloaded inputs, outputs before upload; removed when the job ends
        self._files: list[store.FileEntry] = []
        self._artifacts: dict[str, store.Artifact] = {}
        self._metric_buffer: list[tuple[str, float, int]] = []
        self._mlflow: Any = None  # MlflowClient, made on the first flush
        self.device = self._init_distributed()
        self.ready_at = time.time()
        self.first_step_at: float | None = None

    def first_step(self) -> None:
        """The stage's compute begins (its first training step, its first batch to generate or score):
        what start-up costs is measured up to here (`startup_metrics`)."""
        if self.first_step_at is None:
            self.first_step_at = time.time()

    # --- distributed -------------------------------------------------------------------
    def _init_distributed(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            device = torch.device("cuda", self.local_rank)
        else:
            device = torch.device("cpu")
        if self.world_size > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return [sum(col) for col in zip(*self.all_gather(list(values)))]

    def shard(self, n: int) -> range:
        """This rank's contiguous slice of n items (the same split on every rank)."""
        per = math.ceil(n / self.world_size)
        return range(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    # --- inputs -----------------------------------------------------------------------
    def input(self, name: str) -> store.Artifact:
        if name not in self._artifacts:
            if name not in self.spec.inputs:
                raise BadInput(f"stage {self.spec.stage}: spec has no input named {name!r}")
            self._artifacts[name] = store.read_artifact(self.spec.inputs[name], self.spec.storage_options)
        return self._artifacts[name]

    def fetch(self, name: str, relpath: str) -> Path:
        return store.download(self.input(name), relpath, self.workdir / "in" / name, self.spec.storage_options)

    def fetch_dir(self, name: str, prefix: str) -> Path:
        return store.download_dir(self.input(name), prefix, self.workdir / "in" / name, self.spec.storage_options)

    # --- outputs ----------------------------------------------------------------------
    def out_path(self, relpath: str) -> Path:
        """A local path to write an output file to, before `save`."""
        p = self.workdir / "out" / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def save(self, relpath: str) -> None:
        """Upload a file written at `out_path(relpath)`; any rank may save its own files."""
        self._files.append(store.upload(self.out_path(relpath), self.spec.output, relpath, self.spec.storage_options))

    def save_dir(self, prefix: str) -> None:
        self._files += store.upload_dir(self.out_path(prefix), self.spec.output, prefix, self.spec.storage_options)

    # --- tracking ---------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Buffered; rank 0 only (other ranks reduce first)."""
        if not self.is_main or not self.spec.tracking.get("run_id"):
            return
        self._metric_buffer += [(k, float(v), step) for k, v in metrics.items()]
        if len(self._metric_buffer) >= 200:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        if not self._metric_buffer:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if self._mlflow is None:
            self._mlflow = MlflowClient(self.spec.tracking["uri"])
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, s) for k, v, s in self._metric_buffer if math.isfinite(v)]
        for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
            self._mlflow.log_batch(self.spec.tracking["run_id"], metrics=metrics[i : i + 900])
        self._metric_buffer.clear()

    # --- completion -------------------------------------------------------------------
    def commit(self, metrics: dict) -> None:
        """Gather every rank's files; rank 0 writes the manifest last."""
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise BadInput(f"stage {self.spec.stage}: metric {k} is {v}; no manifest written")
        files = [f for part in self.all_gather(self._files) for f in part]
        if self.is_main:
            self.log_metrics(summary_metrics(metrics))
            self.flush_metrics()
            inputs = {n: {"uri": a.uri, "digest": a.digest} for n, a in self._artifacts.items()}
            for name, uri in self.spec.inputs.items():
                inputs.setdefault(name, {"uri": uri, "digest": store.read_artifact(uri, self.spec.storage_options).digest})
            store.write_manifest(
                self.spec.output,
                stage=self.spec.stage,
                key=self.spec.key,
                inputs=inputs,
                files=files,
                params=self.spec.params,
                code=self.spec.code_version,
                metrics=metrics,
                storage_options=self.spec.storage_options,
            )
            # The output is complete: resume state of killed attempts is no longer needed.
            fs, base = store.filesystem(self.spec.output, self.spec.storage_options)
            if fs.exists(f"{base}/_resume"):
                fs.rm(f"{base}/_resume", recursive=True)
        self.barrier()


def summary_metrics(metrics: dict) -> dict[str, float]:
    """A stage's result metrics as MLflow logs them: under names of their own (`summary/loss`), so that
    no curve logged during training (`loss` at its steps) gets a point that is not one of its steps."""
    return {f"summary/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


# Set by tasks/launch.run_job when it starts the job (time.time()): start-up is measured from there.
LAUNCHED_AT_ENV = "ALIGNFLOW_LAUNCHED_AT"


def startup_metrics(ctx: StageContext, main_at: float) -> dict[str, float]:
    """Launch to the first step, by phase: `process` (launcher, interpreter, the stage's imports; the
    warm job server saves most of it), `setup` (spec, process group), `load` (inputs, tokenizer,
    models, engine)."""
    if ctx.first_step_at is None:
        return {}
    phases = {"startup_setup_s": ctx.ready_at - main_at, "startup_load_s": ctx.first_step_at - ctx.ready_at}
    launched = os.environ.get(LAUNCHED_AT_ENV)
    if launched:
        phases |= {"startup_process_s": main_at - float(launched), "startup_s": ctx.first_step_at - float(launched)}
    return {k: round(v, 3) for k, v in phases.items()}


def log(msg: str) -> None:
    rank = os.environ.get("RANK", "0")
    stamp = dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp} rank{rank}] {msg}", flush=True)


def _maybe_inject_fault(spec: StageSpec) -> None:
    """Rank 0 fails the job once while the marker exists, removing it first: had another rank raised
    as well, the launcher could stop rank 0 before the removal, and every retry would fail again."""
    marker = spec.debug.get("fail_once_marker")
    if not marker or int(os.environ.get("RANK", 0)) != 0:
        return
    fs, path = store.filesystem(marker, spec.storage_options)
    if fs.exists(path):
        fs.rm(path)
        raise RuntimeError(f"injected fault (marker {marker})")


def job_workdir(spec: StageSpec, rank: int) -> Path:
    """This rank's scratch folder, the same for every attempt at the key, so that an attempt
    removes what a SIGKILLed one left ($ALIGNFLOW_WORK_DIR, else the system temp folder)."""
    base = Path(os.environ.get("ALIGNFLOW_WORK_DIR") or tempfile.gettempdir()) / "alignflow-jobs"
    path = base / f"{spec.pipeline}-{spec.stage}-{spec.key}-r{rank}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # the task's timeout or torchrun stopping: clean up on the way out


def main(run: Callable[[StageContext[P]], dict], params_model: type[P]) -> None:
    """Entry point of every stage module: `main(run, XParams)` under `if __name__ == "__main__"`."""
    main_at = time.time()
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="URI of the stage spec JSON")
    args = parser.parse_args()
    try:
        raw = store.read_json(args.spec, json.loads(os.environ.get("ALIGNFLOW_STORAGE_OPTIONS", "{}")))
        spec = StageSpec.from_json(raw)
        params = params_model.model_validate(spec.params)
    except (FileNotFoundError, ValueError, TypeError, ValidationError) as err:  # missing or malformed: rerunning won't help
        print(f"{BAD_INPUT_MARKER}: cannot read stage spec {args.spec}: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    # Anything else (the store unreachable, say) propagates: exit 1, and the task retries.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    workdir = job_workdir(spec, int(os.environ.get("RANK", 0)))
    try:
        _maybe_inject_fault(spec)
        ctx = StageContext(spec, params, workdir)
        started = time.time()
        metrics = run(ctx)
        metrics["stage_seconds"] = round(time.time() - started, 3)
        metrics |= startup_metrics(ctx, main_at)
        ctx.commit(metrics)
        if ctx.is_main:
            log(f"{spec.stage} done: {json.dumps(metrics, default=str)[:500]}")
    except (BadInput, store.ArtifactError) as err:
        print(f"{BAD_INPUT_MARKER}: {spec.stage}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # Done and committed: skip the interpreter's slow teardown of torch/transformers/gloo. A rank forked
    # by the warm job server returns instead: its launcher collects the return, then the fork's own
    # exit skips the teardown as well.
    sys.stdout.flush()
    sys.stderr.flush()
    if not os.environ.get("ALIGNFLOW_FORKED_RANK"):
        os._exit(EXIT_OK)
