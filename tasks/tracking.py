"""MLflow: one parent run per pipeline run, one nested run per stage, the policy registry.

The parent run is tagged with the Prefect flow-run id, so a retry of the same flow run
(the UI's Retry button) continues in the same MLflow run. Stage jobs log their own
metrics into the nested run the task opened for them.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from stages.common import adapters, store
from tasks.config import PipelineConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment_id: str
    parent_run_id: str


def client(uri: str):
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _SQLITE_READY:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    # The first touch of a new SQLite store runs MLflow's migrations; two runs started at once on
    # a fresh machine would both migrate it, and one crashes. Serialise the first touch.
    path = uri[len("sqlite:///"):]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)  # the tracking store, created or migrated
        c.search_registered_models(max_results=1)  # the registry's store on the same file
    _SQLITE_READY.add(uri)
    return c


_SQLITE_READY: set[str] = set()  # SQLite stores this process has opened (so migrated)


def _flatten(prefix: str, obj) -> dict[str, str]:
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out |= _flatten(f"{prefix}.{k}" if prefix else k, v)
        return out
    return {prefix: str(obj)[:6000]}


def _log_params(c, run_id: str, params: dict) -> None:
    """Nested params as dotted keys, in batches under MLflow's per-request limit."""
    from mlflow.entities import Param

    flat = [Param(k, v) for k, v in _flatten("", params).items()]
    for i in range(0, len(flat), 90):
        c.log_batch(run_id, params=flat[i : i + 90])


# MLflow 3's UI opens an experiment by this tag's kind; untagged, it guesses the GenAI view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's "Model training"


def experiment_id(c, name: str) -> str:
    """The experiment's id, created if needed; a run that started at the same moment may create it first."""
    from mlflow.exceptions import MlflowException

    for _ in range(2):
        if (exp := c.get_experiment_by_name(name)) is not None:
            return exp.experiment_id
        try:
            return c.create_experiment(name, artifact_location=_artifact_location(c), tags=EXPERIMENT_KIND)
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
    raise RuntimeError(f"MLflow experiment {name!r} could not be read or created")


def _artifact_location(c) -> str | None:
    """A SQLite store's artifacts beside its file (MLflow's default is ./mlruns in the working directory)."""
    uri = c.tracking_uri
    if not uri.startswith("sqlite:///"):
        return None  # a server's own artifact root
    return Path(uri[len("sqlite:///"):]).resolve().parent.joinpath("mlartifacts").as_uri()


def get_or_create_run(cfg: PipelineConfig, run_name: str, tags: dict[str, str], resume_by: tuple[str, ...] = (),
                      params: dict | None = None) -> Tracking:
    """The run whose tags `resume_by` (keys of `tags`) match, set RUNNING again: a retry of the same
    Prefect flow run continues its MLflow run. Else a new run with `tags`, logging `params`."""
    uri = cfg.tracking_uri()
    c = client(uri)
    exp_id = experiment_id(c, cfg.tracking.experiment)
    if resume_by:
        query = " and ".join(f"tags.`{k}` = '{tags[k]}'" for k in resume_by)
        found = c.search_runs([exp_id], filter_string=query, max_results=1)
        if found:
            c.update_run(found[0].info.run_id, status="RUNNING")
            return Tracking(uri, exp_id, found[0].info.run_id)
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    if params:
        _log_params(c, run.info.run_id, params)
    return Tracking(uri, exp_id, run.info.run_id)


def start_pipeline_run(cfg: PipelineConfig, flow_run_id: str, flow_run_name: str, rounds: int) -> Tracking:
    config = cfg.model_dump(mode="json", exclude={"storage", "tracking"})
    return get_or_create_run(cfg, f"{cfg.pipeline}-{flow_run_name}", {
        "prefect.flow_run_id": flow_run_id, "alignflow.pipeline": cfg.pipeline, "alignflow.config_digest": cfg.digest(),
    }, resume_by=("prefect.flow_run_id",), params={**config, "rounds": rounds})


def start_stage_run(tracking: Tracking, name: str, stage: str, key: str, params: dict, cached: bool) -> str:
    c = client(tracking.uri)
    run = c.create_run(tracking.experiment_id, run_name=name, tags={
        "mlflow.parentRunId": tracking.parent_run_id, "alignflow.stage": stage, "alignflow.key": key,
        "alignflow.cached": str(cached).lower(),
    })
    _log_params(c, run.info.run_id, params)
    return run.info.run_id


def find_stage_run(tracking: Tracking, key: str) -> str | None:
    """The id of the latest stage run under `tracking`'s parent run for the output `key`."""
    found = client(tracking.uri).search_runs(
        [tracking.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.mlflow.parentRunId = '{tracking.parent_run_id}' and tags.`alignflow.key` = '{key}'")
    return found[0].info.run_id if found else None


def ui_link(uri: str, text: str, path: str) -> str:
    """A markdown link into the MLflow UI when the tracking URI is a server's, else the text."""
    return f"[{text}]({uri.rstrip('/')}/#/{path})" if uri.startswith(("http://", "https://")) else text


def set_tags(tracking: Tracking, run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    client(tracking.uri).log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_metrics(tracking: Tracking, run_id: str, metrics: dict) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    if batch:
        client(tracking.uri).log_batch(run_id, metrics=batch)


def log_attempt(tracking: Tracking, attempt: int, figures: dict[str, float], error: str | None = None) -> dict:
    """Log one attempt of the pipeline on its parent run; return the night's totals over every attempt so far.

    A UI Retry continues the same parent run, so the run keeps the night: `attempt_<figure>` at
    step=attempt, the running totals under the figure's own name at the same step, and a failed
    attempt as `attempt_failed` = 1 with its error in the tag `alignflow.attempt_<n>.error`.
    """
    import time

    from mlflow.entities import Metric, RunTag

    c, run_id = client(tracking.uri), tracking.parent_run_id
    figures = {**figures, "failed": int(error is not None)}
    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(f"attempt_{k}", float(v), now, attempt) for k, v in figures.items()],
                tags=[RunTag(f"alignflow.attempt_{attempt}.error", error[:5000])] if error else [])
    totals = {}
    for name, value in figures.items():  # the latest value at each attempt (one logged twice counts once)
        history = sorted(c.get_metric_history(run_id, f"attempt_{name}"), key=lambda m: m.timestamp)
        per_attempt = {m.step: m.value for m in history}
        total = round(sum(per_attempt.values()), 2)
        totals["failed_attempts" if name == "failed" else name] = int(total) if isinstance(value, int) else total
    totals["attempts"] = len(per_attempt)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, attempt) for k, v in totals.items()])
    return totals


def end_run(tracking: Tracking, run_id: str, status: str) -> None:
    client(tracking.uri).set_terminated(run_id, status=status)


CHECKPOINT_URI_TAG = "checkpoint_uri"  # a version's checkpoint in the store: promotion and gc read it


def register_policy(cfg: PipelineConfig, tracking: Tracking, policy: store.Artifact, lineage: dict[str, str]):
    """Register the policy as an MLflow model (stages/common/serving.py: its checkpoint and manifest copied
    into MLflow's artifact store, so `models:/` loads and serves on its own), tagged with its store URI and
    lineage; idempotent per checkpoint URI."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from stages.common import serving

    c = client(tracking.uri)
    name = cfg.tracking.registered_model
    try:
        c.create_registered_model(name, tags={"alignflow.pipeline": cfg.pipeline})
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    checkpoint = store.join(policy.uri, "checkpoint")
    for mv in c.search_model_versions(f"name = '{name}'"):
        if (mv.tags or {}).get(CHECKPOINT_URI_TAG) == checkpoint:
            return name, str(mv.version)
    tags = {**artifact_lineage(policy, cfg.storage_options()), **lineage, CHECKPOINT_URI_TAG: checkpoint}
    model = c.create_logged_model(tracking.experiment_id, name="policy", source_run_id=tracking.parent_run_id,
                                  tags={CHECKPOINT_URI_TAG: checkpoint})
    try:
        with tempfile.TemporaryDirectory(prefix="alignflow-register-") as tmp:
            model_dir = serving.save_model(policy, f"{tmp}/model", cfg.storage_options())
            c.log_model_artifacts(model.model_id, str(model_dir))
    except BaseException:
        c.finalize_logged_model(model.model_id, "FAILED")  # no version points at it; a rerun logs another
        raise
    c.finalize_logged_model(model.model_id, "READY")
    # The artifact location, not `models:/<id>`: a SQLite registry resolves that through the global tracking URI.
    mv = c.create_model_version(name, source=model.artifact_location, run_id=tracking.parent_run_id, tags=tags,
                                model_id=model.model_id)
    return name, str(mv.version)


def artifact_lineage(policy: store.Artifact, storage_options: dict | None = None) -> dict[str, str]:
    """A policy's lineage from its manifests' inputs: the keys of every stage it descends from (in
    round order), and the URI and digest of its parents (data, SFT, reward model)."""
    tags = {"policy_uri": policy.uri, "policy_digest": policy.digest}
    rnd = (policy.manifest.get("params") or {}).get("round")
    found = {policy.manifest["stage"]: [(-1 if rnd is None else rnd, policy.manifest["key"], policy.uri,
                                         policy.digest)]}
    seen, todo = {policy.uri}, [policy.manifest]
    while todo:
        manifest = todo.pop()
        for ref in manifest.get("inputs", {}).values():
            if ref["uri"] in seen:
                continue
            seen.add(ref["uri"])
            try:
                parent = store.read_json(store.join(ref["uri"], store.MANIFEST), storage_options)
            except Exception:  # lineage is best effort: registration never fails on it
                continue
            rnd = (parent.get("params") or {}).get("round")
            found.setdefault(parent["stage"], []).append((-1 if rnd is None else rnd, parent["key"], ref["uri"],
                                                          ref["digest"]))
            todo.append(parent)
    for stage, entries in found.items():
        entries.sort()
        tags[f"lineage.{stage}"] = ",".join(key for _, key, _, _ in entries)
    for stage, prefix in (("data_prep", "data"), ("sft", "sft"), ("reward_model", "reward_model")):
        if len(found.get(stage, [])) == 1:
            _, _, uri, digest = found[stage][0]
            tags[f"{prefix}_uri"], tags[f"{prefix}_digest"] = uri, digest
    base_file = f"checkpoint/{adapters.BASE_FILE}"
    if any(f["path"] == base_file for f in policy.manifest["files"]):  # a LoRA policy: the base it needs
        base = store.read_json(store.join(policy.uri, base_file), storage_options)
        tags["adapter_base_uri"], tags["adapter_base_digest"] = base["uri"], base["digest"]
    return tags
