"""The registry side of a promotion: the `champion` alias, the decision's record, the checkpoints."""

from __future__ import annotations

import dataclasses
import os
import posixpath
import tempfile
from pathlib import Path

from stages.common import adapters, store
from tasks import tracking as mlf
from tasks.config import PipelineConfig

from .lock import RegistryLock
from .rule import ChampionChanged, Decision, PromotionError, decide

CHAMPION = "champion"
CHECKPOINT = "checkpoint"


def champion_version(client, name: str) -> str | None:
    """The version the `champion` alias points at (str: SQLite gives int, a server gives str)."""
    v = (client.get_registered_model(name).aliases or {}).get(CHAMPION)
    return None if v is None else str(v)


def latest_version(client, name: str) -> str:
    versions = [int(mv.version) for mv in client.search_model_versions(f"name = '{name}'")]
    if not versions:
        raise PromotionError(f"registered model {name!r} has no versions to promote")
    return str(max(versions))


def record_decision(client, name: str, decision: Decision, eval_data_digest: str, extra_tags: dict | None = None):
    for k, v in {**decision.tags(eval_data_digest), **(extra_tags or {})}.items():
        client.set_model_version_tag(name, decision.candidate_version, k, str(v)[:5000])


def promote_version(client, name: str, version: str, candidate_score: float | None,
                    champion_scores: dict[str, float], *, margin: float, min_score: float,
                    metric: str = "accuracy", eval_data_digest: str = "", extra_tags: dict[str, str] | None = None,
                    sft_score: float | None = None, lock_timeout_s: float = 600.0, stale_lock_s: float = 120.0,
                    poll_s: float = 0.25) -> Decision:
    """Under the lock: re-read the champion, decide (`sft_score`: the candidate's SFT model, which a first
    champion must beat), move the alias if accepted, tag the candidate. A champion without a score in
    `champion_scores` raises ChampionChanged, changing nothing."""
    version = str(version)
    with RegistryLock(client, name, timeout_s=lock_timeout_s, stale_after_s=stale_lock_s, poll_s=poll_s,
                      purpose=f"promote v{version}") as lock:
        champ = champion_version(client, name)
        if champ is not None and champ != version and champ not in champion_scores:
            raise ChampionChanged(champ)
        decision = decide(candidate_score, None if champ is None else champion_scores.get(champ),
                          margin=margin, min_score=min_score, candidate_version=version, champion_version=champ,
                          metric=metric, sft_score=sft_score)
        if champ == version:  # a rerun of an earlier promotion: keep its record
            return decision
        if decision.accepted:
            lock.verify()
            client.set_registered_model_alias(name, CHAMPION, version)
            decision = dataclasses.replace(decision, changed=True)
        # The alias first, then the record: the alias is the truth if we die in between.
        record_decision(client, name, decision, eval_data_digest, extra_tags)
        if decision.changed and champ is not None:
            client.set_model_version_tag(name, champ, "superseded_by", version)
    return decision


def checkpoint_uri(mv) -> str:
    """Where a version's checkpoint is in the store: its tag (versions the pipeline registered as MLflow
    models), else its source (a version registered by the checkpoint's URI)."""
    return (mv.tags or {}).get(mlf.CHECKPOINT_URI_TAG) or mv.source


def checkpoint_artifact(source: str, storage_options: dict | None = None, digest: str | None = None) -> store.Artifact:
    """The pipeline artifact whose `checkpoint/` is at `source` (a version's checkpoint_uri; whose manifest digest
    is `digest`, if given); store.ArtifactError naming the file if a file is missing or of the wrong size."""
    src = source.rstrip("/")
    if posixpath.basename(src) != CHECKPOINT:
        raise store.ArtifactError(f"{source}: not a pipeline checkpoint (expected <artifact uri>/{CHECKPOINT})")
    art = store.read_artifact(src[: -len(CHECKPOINT) - 1], storage_options)
    if not art.files_under(CHECKPOINT):
        raise store.ArtifactError(f"{source}: the manifest lists no files under {CHECKPOINT}/")
    if digest is not None and art.digest != digest:
        raise store.ArtifactError(f"{source}: not the expected policy (manifest digest {art.digest[:12]}, "
                                  f"expected {digest[:12]})")
    return art


def champion_checkpoint(tracking_uri: str, name: str, dst: str | os.PathLike,
                        storage_options: dict | None = None, alias: str = CHAMPION) -> Path:
    """`models:/<name>@champion` as a `from_pretrained` directory in `dst`: hash-checked from the store
    (s3:// endpoint: $MLFLOW_S3_ENDPOINT_URL, unless `storage_options`), else MLflow's download. A LoRA
    policy comes merged with the base(s) its adapter names: full weights, loadable without peft."""
    mv = mlf.client(tracking_uri).get_model_version_by_alias(name, alias)
    source = checkpoint_uri(mv)
    if storage_options is None:
        storage_options = store.storage_options(source, os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    try:
        art = checkpoint_artifact(source, storage_options)
    except store.ArtifactError:  # no manifest beside it: not one of ours
        import mlflow.artifacts
        # The resolved source, not `models:/...`: that would resolve through the default registry URI.
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst),
                                                        tracking_uri=tracking_uri))
    if not any(e.path == f"{CHECKPOINT}/{adapters.ADAPTER_CONFIG}" for e in art.files_under(CHECKPOINT)):
        return store.download_dir(art, CHECKPOINT, dst, storage_options)
    with tempfile.TemporaryDirectory(prefix="alignflow-champion-") as tmp:  # LoRA: merged with its base(s)
        adapter = store.download_dir(art, CHECKPOINT, tmp, storage_options)
        checkpoint = adapters.resolve(adapter, adapters.store_fetcher(Path(tmp) / "bases", storage_options))
        return adapters.merged_dir(checkpoint, Path(dst) / CHECKPOINT)


def start_promotion_run(cfg: PipelineConfig, run_name: str, *, parent_run_id: str | None = None,
                        flow_run_id: str | None = None) -> mlf.Tracking:
    """The MLflow run of a promotion: under the pipeline run, or one that a retry of the flow run continues."""
    tags = {"alignflow.kind": "promotion", "alignflow.stage": "promote", "alignflow.pipeline": cfg.pipeline,
            "alignflow.config_digest": cfg.digest()}
    if parent_run_id:
        return mlf.get_or_create_run(cfg, run_name, {**tags, "mlflow.parentRunId": parent_run_id})
    return mlf.get_or_create_run(cfg, run_name, {**tags, "prefect.flow_run_id": str(flow_run_id)},
                                 resume_by=("prefect.flow_run_id", "alignflow.kind"))
