"""The one Prefect task every stage runs through.

    spec   = the stage's params, key and output place (tasks/spec.py)
    valid manifest there?  -> skip: nothing is launched (a rerun, a UI retry, a new run)
    else                   -> hold the output's lease (tasks/lease.py: one writer per key; waits while
                              another run writes it, then reuses what it wrote), write the spec, launch
                              the job, check the manifest it wrote

Retries with exponential backoff and jitter, except for bad input (exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from prefect import get_run_logger, task
from prefect.context import get_run_context
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from stages.common import store
from stages.common.runtime import summary_metrics
from tasks import lease, slurm, warm_jobs
from tasks import tracking as mlf
from tasks.config import PipelineConfig
from tasks.launch import (PROJECT_ROOT, Job, StageBadInput, job_env, run_job, start_cold, stop_orphan,
                          torchrun_command)
from tasks.spec import stage_spec


@dataclasses.dataclass(frozen=True)
class StageResult:
    artifact: store.Artifact
    launched: bool  # False when skipped through its manifest

    @property
    def uri(self) -> str:
        return self.artifact.uri

    @property
    def metrics(self) -> dict:
        return self.artifact.metrics


def find_valid_output(uri: str, storage_options: dict, hash_limit_bytes: int = 64 << 20) -> store.Artifact | None:
    """The artifact if its manifest is valid and its files match (hashes checked when small)."""
    art = store.try_read_artifact(uri, storage_options)
    if art is None:
        return None
    if sum(f["size"] for f in art.manifest["files"]) <= hash_limit_bytes:
        try:
            store.verify_files(art, storage_options)
        except store.ArtifactError:
            return None
    return art


def _retry_unless_bad_input(task, task_run, state) -> bool:
    try:
        state.result()
    except StageBadInput:
        return False
    except Exception:
        return True
    return True


@task(cache_policy=NO_CACHE, task_run_name="{stage}{label}")
def run_stage(stage: str, cfg: PipelineConfig, inputs: dict[str, StageResult], tracking: mlf.Tracking,
              round_idx: int | None = None, label: str = "", debug: dict | None = None) -> StageResult | State:
    logger = get_run_logger()
    spec = stage_spec(stage, cfg, {name: r.artifact for name, r in inputs.items()}, round_idx)
    key, output, params, opts = spec.key, spec.output, spec.params, spec.storage_options
    run_name = f"{stage}{label}"

    existing = find_valid_output(output, opts)
    if existing is None:
        writer, existing = _hold_lease(output, opts, cfg.launch.lease_ttl_s, run_name, logger)
    if existing is not None:
        logger.info("%s: skipped, %s already has a valid manifest", run_name, output)
        run_id = mlf.start_stage_run(tracking, run_name, stage, key, params, cached=True)
        mlf.log_metrics(tracking, run_id, summary_metrics(existing.metrics))
        mlf.end_run(tracking, run_id, "FINISHED")
        # The UI then tells reused stages from those that ran; the caller still gets the StageResult.
        return Completed(name="Skipped", message=f"output reused, nothing launched: {output}",
                         data=StageResult(existing, launched=False))

    with writer:
        store.remove_manifest(output, opts)  # an invalid (corrupted) output is produced again
        run_id = mlf.start_stage_run(tracking, run_name, stage, key, params, cached=False)
        spec = dataclasses.replace(spec, tracking={"uri": tracking.uri, "run_id": run_id}, debug=debug or {})
        spec_uri = store.join(output, store.SPEC)
        store.write_json(spec_uri, spec.to_json(), opts)
        python = cfg.launch.stage_python.get(stage, cfg.launch.python)
        cmd = torchrun_command(stage, spec_uri, cfg.launch.nproc_per_node, python)
        logger.info("%s: launching %s", run_name, " ".join(cmd))
        try:
            env = stage_job_env(cfg, python)
            if cfg.launch.backend == "slurm":  # a job elsewhere: a later attempt waits for it by its name
                slurm.run_stage_job(stage, spec_uri, cfg, key=key, log_line=logger.info, env=env,
                                    output_ready=lambda: find_valid_output(output, opts) is not None)
            else:
                run_job(cmd, timeout_s=cfg.launch.timeout_s, log_line=logger.info, env=env,
                        on_start=writer.set_job, start=warm_start(cfg, stage, spec_uri, python, logger))
            artifact = store.read_artifact(output, opts)
        except BaseException:
            mlf.end_run(tracking, run_id, "FAILED")
            raise
        mlf.end_run(tracking, run_id, "FINISHED")
        return StageResult(artifact, launched=True)


def stage_job_env(cfg: PipelineConfig, python: str | None) -> dict[str, str]:
    opts = cfg.storage_options()
    return job_env(cfg.launch.nproc_per_node, {"ALIGNFLOW_STORAGE_OPTIONS": json.dumps(opts)},  # endpoint, never keys
                   python=python)


def runs_warm(cfg: PipelineConfig, python: str | None) -> bool:
    """Whether a local job on `python` forks from the warm job server: the server runs this
    interpreter only (a stage on its own interpreter, vLLM's say, starts cold)."""
    return cfg.launch.warm_start and (not python or os.path.realpath(python) == os.path.realpath(sys.executable))


def prestart_job_server(cfg: PipelineConfig) -> bool:
    """Start the warm job server in the background now if this run will launch jobs from its first
    stage on (data_prep has no valid output), so that its imports overlap what the caller does next.
    A rerun with data_prep in the store starts it at its first launched job instead (or never)."""
    python = cfg.launch.stage_python.get("data_prep", cfg.launch.python)
    if cfg.launch.backend != "local" or not runs_warm(cfg, python):
        return False
    spec = stage_spec("data_prep", cfg, {}, None)
    if find_valid_output(spec.output, spec.storage_options) is not None:
        return False
    warm_jobs.start_server(sys.executable, stage_job_env(cfg, python), PROJECT_ROOT)
    return True


def warm_start(cfg: PipelineConfig, stage: str, spec_uri: str, python: str | None, logger):
    """How to start a local job forked from the warm job server, or None to start it cold (see
    runs_warm); a server that cannot start falls back to a cold start, with a warning."""
    if not runs_warm(cfg, python):
        return None

    def start(env: dict[str, str]) -> Job:
        try:
            return warm_jobs.start_job(f"stages.{stage}", ["--spec", spec_uri], cfg.launch.nproc_per_node,
                                       sys.executable, env, PROJECT_ROOT)
        except (RuntimeError, OSError) as err:
            logger.warning("%s: the warm job server is not available, starting the job cold: %s", stage, err)
            return start_cold(torchrun_command(stage, spec_uri, cfg.launch.nproc_per_node, python), env)

    return start


def _hold_lease(output: str, opts: dict, ttl_s: float, run_name: str,
                logger) -> tuple[lease.Lease, store.Artifact | None]:
    """The output's lease, held, or the output if the writer we waited for wrote it (lease released).

    Waits while a live writer holds it. Taking over from a gone holder first stops its job if that
    still runs on this host (its flow process was killed)."""
    def on_takeover(held: dict):
        job = held["owner"].get("job")
        if held["owner"]["host"] == lease.this_host() and job and stop_orphan(job["pid"], job["started"]):
            logger.warning("%s: stopped job %s of an earlier attempt", run_name, job["pid"])
        logger.info("%s: taking over the lease of %s (expired, or its process is gone)", run_name, held["owner"])

    def on_wait(held: dict):
        logger.info("%s: waiting for %s, which is writing %s", run_name, held["owner"], output)

    flow_run = getattr(get_run_context(), "task_run", None)
    writer = lease.acquire(output, opts, lease.owner(flow_run=str(flow_run.flow_run_id) if flow_run else ""),
                           ttl_s=ttl_s, on_wait=on_wait, on_takeover=on_takeover)
    try:  # written by the run we waited for, or by one that finished since our first look
        existing = find_valid_output(output, opts)
    except BaseException:
        writer.release()
        raise
    if existing is not None:
        writer.release()
    return writer, existing


def configured(cfg: PipelineConfig):
    """`run_stage` with the config's retry policy, called for its StageResult."""
    stage_task = run_stage.with_options(
        retries=cfg.launch.retries,
        retry_delay_seconds=(exponential_backoff(backoff_factor=cfg.launch.retry_delay_s)
                             if cfg.launch.retries and cfg.launch.retry_delay_s > 0 else 0),
        retry_jitter_factor=0.5,
        retry_condition_fn=_retry_unless_bad_input,
    )

    def run(*args, **kwargs) -> StageResult:
        # A skipped stage returns its Skipped state, which a plain call would hand back as is.
        return stage_task(*args, return_state=True, **kwargs).result()

    return run
