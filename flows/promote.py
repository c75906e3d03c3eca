"""Promotion: a better policy becomes `champion` in the MLflow registry, a worse one never does.

    candidate (a registered version; source = <artifact uri>/checkpoint, checked against its manifest)
      -> evaluate[candidate vN]   } the evaluate stage through run_stage: the same held-out set and
      -> evaluate[champion vM]    } reward model (this config's data_prep / reward_model), the same
                                    greedy decoding. Keys hash the policy's manifest digest, so an
                                    evaluation that exists (last night's champion) is reused.
      -> registry-gate            under the promotion lock: re-read the champion (evaluate it first
                                  if it changed meanwhile), decide, move the alias, tag the candidate
      -> an MLflow run holding both evaluations, a Prefect markdown artifact with the comparison

Two entry points:
- `promote(config_path, candidate_version=None)`: a flow, for any registered version (default:
  the latest). Its held-out set is the config's: the candidate never picks its own exam.
- `promote_policy(cfg, tracking, version, policy=..., data=..., reward_model=...)`: the last step of
  the nightly flow, with the candidate's StageResults (no stage is rerun).

A missing or corrupted candidate checkpoint is rejected (tags say why), the champion is left
alone, and CandidateInvalid is raised: the run fails loudly.
"""

from __future__ import annotations

import re

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from stages.common import store
from tasks.config import PipelineConfig, load_config
from tasks import promotion as pr
from tasks import tracking as mlf
from tasks.stage import StageResult, configured

MAX_CHAMPION_CHANGES = 5


@task(name="registry-gate", task_run_name="registry-gate[v{version}]", cache_policy=NO_CACHE)
def registry_gate(tracking_uri: str, name: str, version: str, candidate_score: float,
                  champion_scores: dict[str, float], margin: float, min_score: float, metric: str,
                  eval_data_digest: str, extra_tags: dict[str, str]) -> pr.Decision | str:
    """The decision under the lock; returns the new champion's version instead if it is unevaluated."""
    logger = get_run_logger()
    try:
        decision = pr.promote_version(mlf.client(tracking_uri), name, version, candidate_score, champion_scores,
                                      margin=margin, min_score=min_score, metric=metric,
                                      eval_data_digest=eval_data_digest, extra_tags=extra_tags)
    except pr.ChampionChanged as changed:
        logger.info("%s: evaluating it, then deciding again", changed)
        return changed.version
    logger.info("%s v%s: %s (%s)", name, version, "ACCEPTED" if decision.accepted else "rejected", decision.reason)
    return decision


def _evaluate(stage, cfg: PipelineConfig, run: mlf.Tracking, art: store.Artifact, data: StageResult,
              reward_model: StageResult, label: str) -> StageResult:
    return stage("evaluate", cfg, {"policy": StageResult(art, launched=False), "data": data,
                                   "reward_model": reward_model}, run, label=label)


def _evaluate_candidate(stage, cfg, run, source: str, version: str, policy: StageResult | None,
                        data: StageResult, reward_model: StageResult) -> StageResult:
    opts = cfg.storage_options()
    try:
        art = pr.checkpoint_artifact(source, opts)  # manifest and every file's size, now
        if policy is not None and art.digest != policy.artifact.digest:
            raise store.ArtifactError(f"{source}: not the candidate policy {policy.uri} (manifest digests differ)")
    except store.ArtifactError as err:
        raise pr.CandidateInvalid(f"candidate v{version} checkpoint is missing or invalid: {err}") from None
    try:
        result = _evaluate(stage, cfg, run, art, data, reward_model, f"[candidate v{version}]")
    except Exception as failure:
        try:
            pr.verify_checkpoint(art, opts)
        except store.ArtifactError as err:
            raise pr.CandidateInvalid(f"candidate v{version} checkpoint is corrupted: {err}") from failure
        raise
    if not result.launched:  # a reused evaluation: the stage did not hash-check the checkpoint this time
        try:
            pr.verify_checkpoint(art, opts)
        except store.ArtifactError as err:
            raise pr.CandidateInvalid(f"candidate v{version} checkpoint is corrupted: {err}") from None
    return result


def _evaluate_champion(stage, cfg, run, client, name: str, version: str, data: StageResult,
                       reward_model: StageResult) -> StageResult:
    opts = cfg.storage_options()
    source = client.get_model_version(name, version).source
    try:
        art = pr.checkpoint_artifact(source, opts)
    except store.ArtifactError as err:
        raise pr.ChampionUnavailable(f"champion v{version} cannot be evaluated: {err}") from None
    try:
        return _evaluate(stage, cfg, run, art, data, reward_model, f"[champion v{version}]")
    except Exception as failure:
        try:
            pr.verify_checkpoint(art, opts)
        except store.ArtifactError as err:
            raise pr.ChampionUnavailable(f"champion v{version} cannot be evaluated: {err}") from failure
        raise


def _eval_run_id(client, run: mlf.Tracking, result: StageResult | None) -> str | None:
    if result is None:
        return None
    found = client.search_runs([run.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.mlflow.parentRunId = '{run.parent_run_id}' and "
                                             f"tags.`alignflow.key` = '{result.artifact.manifest['key']}'")
    return found[0].info.run_id if found else None


def _artifact_key(name: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"promotion-{name}".lower())).strip("-")[:100]


def _report(cfg: PipelineConfig, run: mlf.Tracking, client, name: str, decision: pr.Decision, eval_digest: str,
            candidate_eval: StageResult | None, champion_eval: StageResult | None, error: str | None) -> dict:
    """Summary dict, the Prefect markdown artifact, and the MLflow promotion run's tags and metrics."""
    metric = cfg.promote.metric
    uri = run.uri
    cand_run, champ_run = _eval_run_id(client, run, candidate_eval), _eval_run_id(client, run, champion_eval)
    after = pr.champion_version(client, name)
    status = "ACCEPTED" if decision.accepted else "REJECTED"
    summary = {
        "registered_model": name,
        "candidate_version": decision.candidate_version,
        "decision": "accepted" if decision.accepted else "rejected",
        "reason": decision.reason,
        "metric": metric,
        "candidate_score": decision.candidate_score,
        "champion_version": decision.champion_version,
        "champion_score": decision.champion_score,
        "champion_after": after,
        "alias_moved": decision.changed,
        "eval_data_digest": eval_digest,
        "eval_prompts": (candidate_eval.metrics.get("num_prompts") if candidate_eval else None),
        "mlflow_tracking_uri": uri,
        "mlflow_experiment_id": run.experiment_id,
        "mlflow_run_id": run.parent_run_id,
        "candidate_eval_run_id": cand_run,
        "champion_eval_run_id": champ_run,
        "error": error,
    }

    def score(x):
        return "-" if x is None else f"{x:.4f}"

    def ckpt(version):
        return f"`{client.get_model_version(name, version).source}`" if version is not None else "-"

    def launched(res):
        return "-" if res is None else ("evaluated now" if res.launched else "reused from the store")

    md = "\n".join([
        f"# Promotion of `{name}` {pr.version_link(uri, name, decision.candidate_version)}: **{status}**",
        "",
        decision.reason,
        "",
        f"| | version | {metric} | evaluation | MLflow run | checkpoint |",
        "|---|---|---|---|---|---|",
        f"| candidate | {pr.version_link(uri, name, decision.candidate_version)} | {score(decision.candidate_score)} "
        f"| {launched(candidate_eval)} | {pr.run_link(uri, run.experiment_id, cand_run)} "
        f"| {ckpt(decision.candidate_version)} |",
        f"| champion (before) | {pr.version_link(uri, name, decision.champion_version)} "
        f"| {score(decision.champion_score)} | {launched(champion_eval)} "
        f"| {pr.run_link(uri, run.experiment_id, champ_run)} | {ckpt(decision.champion_version)} |",
        "",
        f"- rule: candidate > champion + margin ({cfg.promote.margin}) and candidate >= min_score "
        f"({cfg.promote.min_score}); the first version needs min_score only",
        f"- held-out set: {summary['eval_prompts'] or '?'} prompts, greedy decoding, eval data digest "
        f"`{eval_digest or '?'}`",
        f"- champion after: {pr.version_link(uri, name, after)}",
        f"- MLflow: `{uri}`, experiment `{run.experiment_id}`, promotion run "
        f"{pr.run_link(uri, run.experiment_id, run.parent_run_id)}",
        *([f"- error: `{error}`"] if error else []),
    ])
    create_markdown_artifact(markdown=md, key=_artifact_key(name),
                             description=f"{name} v{decision.candidate_version}: {summary['decision']}")

    from mlflow.entities import RunTag

    client.log_batch(run.parent_run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in {
        "promotion.decision": summary["decision"], "promotion.reason": decision.reason,
        "promotion.registered_model": name, "promotion.candidate_version": decision.candidate_version,
        "promotion.champion_before": decision.champion_version or pr.NONE,
        "promotion.champion_after": after or pr.NONE, "promotion.eval_data_digest": eval_digest or pr.NONE,
    }.items()])
    mlf.log_metrics(run, run.parent_run_id, {k: v for k, v in (("candidate_score", decision.candidate_score),
                                                                  ("champion_score", decision.champion_score))
                                             if v is not None})
    return summary


def _promote(cfg: PipelineConfig, run: mlf.Tracking, version: str, policy: StageResult | None,
             data: StageResult, reward_model: StageResult) -> dict:
    logger = get_run_logger()
    client = mlf.client(run.uri)
    name, metric, digest = cfg.tracking.registered_model, cfg.promote.metric, data.artifact.digest
    stage = configured(cfg)
    extra = {"promotion_run_id": run.parent_run_id}
    candidate_eval = champion_eval = None
    evals: dict[str, StageResult] = {}
    champion = None
    try:
        try:
            source = client.get_model_version(name, version).source
            candidate_eval = _evaluate_candidate(stage, cfg, run, source, version, policy, data, reward_model)
            score = float(candidate_eval.metrics[metric])
            champion = pr.champion_version(client, name)
            for _ in range(MAX_CHAMPION_CHANGES):
                if champion is not None and champion != version and champion not in evals:
                    evals[champion] = _evaluate_champion(stage, cfg, run, client, name, champion, data, reward_model)
                outcome = registry_gate(run.uri, name, version, score,
                                        {v: float(r.metrics[metric]) for v, r in evals.items()},
                                        cfg.promote.margin, cfg.promote.min_score, metric, digest, extra)
                if isinstance(outcome, pr.Decision):
                    decision = outcome
                    break
                champion = outcome
            else:
                raise pr.PromotionError(f"the champion of {name} changed {MAX_CHAMPION_CHANGES} times during this "
                                        "promotion; giving up")
            champion_eval = evals.get(str(decision.champion_version))
        except (pr.CandidateInvalid, pr.ChampionUnavailable) as err:
            logger.error("%s v%s rejected: %s", name, version, err)
            champion = pr.champion_version(client, name)
            score = float(candidate_eval.metrics[metric]) if candidate_eval is not None else None
            champion_eval = evals.get(str(champion))
            decision = pr.Decision(False, str(err), version, score, champion,
                                   float(champion_eval.metrics[metric]) if champion_eval is not None else None)
            pr.record_decision(client, name, decision, digest, extra)
            _report(cfg, run, client, name, decision, digest, candidate_eval, champion_eval, error=str(err))
            raise
    except BaseException:
        mlf.end_run(run, run.parent_run_id, "FAILED")
        raise
    summary = _report(cfg, run, client, name, decision, digest, candidate_eval, champion_eval, error=None)
    mlf.end_run(run, run.parent_run_id, "FINISHED")
    logger.info("%s v%s %s: %s; champion is v%s", name, version, summary["decision"], decision.reason,
                summary["champion_after"])
    return summary


def promote_policy(cfg: PipelineConfig, tracking: mlf.Tracking, version: str, *, policy: StageResult,
                   data: StageResult, reward_model: StageResult) -> dict:
    """The nightly flow's last step: gate the policy it just registered as `version`.

    Its promotion run nests under the pipeline run; evaluations reuse the flow's (same keys).
    """
    run = pr.start_promotion_run(tracking.uri, cfg.tracking.experiment, pipeline=cfg.pipeline,
                                 config_digest=cfg.digest(), parent_run_id=tracking.parent_run_id,
                                 experiment_id=tracking.experiment_id, run_name=f"promote[v{version}]")
    return _promote(cfg, run, str(version), policy, data, reward_model)


@flow(name="promote")
def promote(config_path: str = "configs/tiny.yaml", candidate_version: str | None = None) -> dict:
    """Gate one registered version (default: the latest) against the current champion.

    The held-out set and reward model are this config's (data_prep -> sft -> reward_model, skipped
    when they are in the store, computed otherwise).
    """
    cfg = load_config(config_path)
    client = mlf.client(cfg.tracking_uri())
    name = cfg.tracking.registered_model
    version = str(candidate_version) if candidate_version is not None else pr.latest_version(client, name)
    client.get_model_version(name, version)  # fails early, naming the version, if it does not exist
    flow_run = get_run_context().flow_run
    run = pr.start_promotion_run(cfg.tracking_uri(), cfg.tracking.experiment, pipeline=cfg.pipeline,
                                 config_digest=cfg.digest(), flow_run_id=str(flow_run.id),
                                 run_name=f"promote[v{version}]-{flow_run.name}")
    stage = configured(cfg)
    try:
        data = stage("data_prep", cfg, {}, run)
        sft = stage("sft", cfg, {"data": data}, run)
        reward_model = stage("reward_model", cfg, {"data": data, "sft": sft}, run)
    except BaseException:
        mlf.end_run(run, run.parent_run_id, "FAILED")
        raise
    return _promote(cfg, run, version, None, data, reward_model)
