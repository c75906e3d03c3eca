"""Promotion: a better policy becomes `champion` in the MLflow registry, a worse one never does.

    evaluate[candidate vN], evaluate[champion vM]  the evaluate stage on this config's held-out set
    registry-gate  under the lock: re-read the champion, decide, move the alias, tag the candidate
    then the promotion's MLflow run and a Prefect markdown artifact record the comparison
"""

from __future__ import annotations

import re

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from stages.common import store
from tasks import promotion as pr
from tasks import tracking as mlf
from tasks.config import PipelineConfig, load_config
from tasks.promotion import report
from tasks.stage import StageResult, configured

MAX_CHAMPION_CHANGES = 5

# promote_version (the decision under the lock) as a task run of its own; ChampionChanged propagates.
registry_gate = task(pr.promote_version, name="registry-gate", task_run_name="registry-gate[v{version}]",
                     cache_policy=NO_CACHE)


def evaluate_version(cfg: PipelineConfig, run: mlf.Tracking, version: str, role: str, *, data: StageResult,
                     reward_model: StageResult, policy: StageResult | None = None) -> StageResult:
    """Evaluate a version as "candidate" (which must be `policy`, if given) or "champion"; a bad
    checkpoint raises CandidateInvalid or ChampionUnavailable, naming the version and the file."""
    opts = cfg.storage_options()
    source = pr.checkpoint_uri(mlf.client(run.uri).get_model_version(cfg.tracking.registered_model, version))

    def checked(check, *args):
        try:
            return check(*args)
        except store.ArtifactError as err:
            error = pr.CandidateInvalid if role == "candidate" else pr.ChampionUnavailable
            raise error(f"{role} v{version} checkpoint is missing or invalid: {err}") from err

    art = checked(pr.checkpoint_artifact, source, opts, None if policy is None else policy.artifact.digest)
    inputs = {"policy": StageResult(art, launched=False), "data": data, "reward_model": reward_model}
    try:
        result = configured(cfg)("evaluate", cfg, inputs, run, label=f"[{role} v{version}]")
    except Exception:
        checked(store.verify_files, art, opts, pr.CHECKPOINT)  # the checkpoint's fault rather than the job's?
        raise
    # A reused evaluation did not hash the candidate's bytes this time, and the alias may serve them.
    if role == "candidate" and not result.launched:
        checked(store.verify_files, art, opts, pr.CHECKPOINT)
    return result


def _score(evaluation: StageResult | None, metric: str) -> float | None:
    return None if evaluation is None else float(evaluation.metrics[metric])


def _gate(cfg: PipelineConfig, run: mlf.Tracking, version: str, candidate: StageResult,
          champions: dict[str, StageResult], data: StageResult, reward_model: StageResult,
          sft_eval: StageResult | None) -> pr.Decision:
    """Evaluate the champion (into `champions`) and gate; if the champion changed meanwhile, again."""
    client, name, p = mlf.client(run.uri), cfg.tracking.registered_model, cfg.promote
    champion = pr.champion_version(client, name)
    for _ in range(MAX_CHAMPION_CHANGES):
        if champion is not None and champion != version and champion not in champions:
            champions[champion] = evaluate_version(cfg, run, champion, "champion", data=data, reward_model=reward_model)
        try:
            return registry_gate(client, name, version, _score(candidate, p.metric),
                                 {v: _score(r, p.metric) for v, r in champions.items()}, margin=p.margin,
                                 min_score=p.min_score, metric=p.metric, eval_data_digest=data.artifact.digest,
                                 extra_tags={"promotion_run_id": run.parent_run_id},
                                 sft_score=_score(sft_eval, p.metric))
        except pr.ChampionChanged as changed:  # promoted meanwhile: evaluate the new champion, gate again
            champion = changed.version
    raise pr.PromotionError(f"the champion of {name} changed {MAX_CHAMPION_CHANGES} times during this promotion")


def _promote(cfg: PipelineConfig, run: mlf.Tracking, version: str, policy: StageResult | None = None,
             data: StageResult | None = None, reward_model: StageResult | None = None,
             sft_eval: StageResult | None = None) -> dict:
    """Evaluate, gate, report. The promotion run ends FINISHED, or FAILED with the error raised.
    `sft_eval`: the evaluation of the SFT model the candidate was trained from (a first champion beats it)."""
    client, name, metric = mlf.client(run.uri), cfg.tracking.registered_model, cfg.promote.metric
    candidate, champions, error = None, {}, None
    try:
        if data is None:  # the standalone flow: the candidate never picks its own exam
            stage = configured(cfg)
            data = stage("data_prep", cfg, {}, run)
            sft = stage("sft", cfg, {"data": data}, run)
            reward_model = stage("reward_model", cfg, {"data": data, "sft": sft}, run)
            # A version trained from this config's SFT model (its lineage says so) must beat it to be the first champion.
            if client.get_model_version(name, version).tags.get("sft_digest") == sft.artifact.digest:
                sft_eval = stage("evaluate", cfg, {"policy": sft, "data": data, "reward_model": reward_model}, run,
                                 label="[sft]")
        try:
            candidate = evaluate_version(cfg, run, version, "candidate", data=data, reward_model=reward_model,
                                         policy=policy)
            decision = _gate(cfg, run, version, candidate, champions, data, reward_model, sft_eval)
        except (pr.CandidateInvalid, pr.ChampionUnavailable) as err:  # rejected before the gate: nothing moves
            error, champion = err, pr.champion_version(client, name)
            decision = pr.Decision(False, str(err), version, _score(candidate, metric), champion,
                                   _score(champions.get(champion), metric))
            pr.record_decision(client, name, decision, data.artifact.digest, {"promotion_run_id": run.parent_run_id})
        evals = {"candidate": candidate, "champion": champions.get(decision.champion_version), "sft": sft_eval}
        summary = report.summary(client, cfg, run, decision, data.artifact.digest, evals, str(error) if error else None)
        create_markdown_artifact(markdown=report.markdown(client, cfg, summary, evals),
                                 key=re.sub(r"[^a-z0-9]+", "-", f"promotion-{name}".lower()).strip("-")[:100],
                                 description=f"{name} v{version}: {summary['decision']}")
        if error is not None:
            raise error
    except BaseException:
        mlf.end_run(run, run.parent_run_id, "FAILED")
        raise
    mlf.end_run(run, run.parent_run_id, "FINISHED")
    get_run_logger().info("%s v%s %s: %s; champion is v%s", name, version, summary["decision"], decision.reason,
                          summary["champion_after"])
    return summary


def promote_policy(cfg: PipelineConfig, tracking: mlf.Tracking, version: str, *, policy: StageResult,
                   data: StageResult, reward_model: StageResult, sft_eval: StageResult | None = None) -> dict:
    """The nightly flow's last step: gate the policy it registered as `version`, under its pipeline run
    (`sft_eval`: its SFT model's evaluation on the same held-out set, which a first champion must beat)."""
    run = pr.start_promotion_run(cfg, f"promote[v{version}]", parent_run_id=tracking.parent_run_id)
    return _promote(cfg, run, str(version), policy, data, reward_model, sft_eval)


@flow(name="promote")
def promote(config_path: str = "configs/tiny.yaml", candidate_version: str | None = None) -> dict:
    """Gate a registered version (default: the latest) on this config's held-out set and reward model."""
    cfg = load_config(config_path)
    client, name = mlf.client(cfg.tracking_uri()), cfg.tracking.registered_model
    version = str(candidate_version) if candidate_version is not None else pr.latest_version(client, name)
    client.get_model_version(name, version)  # fails early, naming the version, if it does not exist
    flow_run = get_run_context().flow_run
    run = pr.start_promotion_run(cfg, f"promote[v{version}]-{flow_run.name}", flow_run_id=str(flow_run.id))
    return _promote(cfg, run, version)
