"""The nightly alignment run.

    data_prep -> sft -> reward_model -> evaluate(sft)
              -> rounds of: generate(policy r) -> score -> update (rl.algorithm) = policy r+1
                 (method: dpo instead: dpo on the preference pairs = the policy)
              -> evaluate(policy) -> register the policy in MLflow -> promote it if it beats the champion
                 (the first champion must beat evaluate(sft))

Every stage is a retriable task that skips itself when its output already exists, so a
retry (from the Prefect UI or by hand) redoes only what failed and what follows it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.context import get_run_context

from flows.promote import promote_policy
from tasks.config import check_machines, load_config
from stages.common.role_datasets import check_local_datasets
from tasks import report
from tasks import tracking as mlf
from tasks.gc import record_run
from tasks.stage import StageResult, configured


@dataclasses.dataclass(frozen=True)
class Night:
    data: StageResult
    sft: StageResult
    reward_model: StageResult
    sft_eval: StageResult
    policy: StageResult
    policy_eval: StageResult
    stages: dict[str, StageResult]  # by label ("sft", "update[0]"...), in the order they ran


def chain(cfg, rounds: int, run: Callable[..., StageResult]) -> Night:
    """The stages and what each one reads. `run(stage, inputs, round_idx, label)` runs one stage
    (the flow's retriable task) or, for `alignflow status`, only looks it up in the store."""
    stages: dict[str, StageResult] = {}

    def step(stage: str, inputs: dict, round_idx: int | None = None, label: str = "") -> StageResult:
        stages[stage + label] = result = run(stage, inputs, round_idx, label)
        return result

    data = step("data_prep", {})
    sft = step("sft", {"data": data})
    reward_model = step("reward_model", {"data": data, "sft": sft})
    sft_eval = step("evaluate", {"policy": sft, "data": data, "reward_model": reward_model}, label="[sft]")

    policy = sft
    if cfg.method == "dpo":  # offline: the preference pairs, with SFT as the reference; no rounds
        policy = step("dpo", {"data": data, "sft": sft})
    # PPO's value model of round r: the reward model or SFT at first, then what update r-1 wrote.
    value = reward_model if cfg.rl.value_init == "reward_model" else sft
    for r in range(rounds):
        critic = {"value": value} if cfg.rl.trains_value_model else {}
        rollouts = step("generate", {"policy": policy, "data": data}, r, f"[{r}]")
        scored = step("score", {"rollouts": rollouts, "reference": sft, "reward_model": reward_model,
                                "data": data, **critic}, r, f"[{r}]")
        policy = step("update", {"policy": policy, "scored": scored, **critic}, r, f"[{r}]")
        value = policy  # update writes value/ next to checkpoint/

    policy_eval = step("evaluate", {"policy": policy, "data": data, "reward_model": reward_model},
                       label="[policy]")
    return Night(data, sft, reward_model, sft_eval, policy, policy_eval, stages)


@task(task_run_name="register-policy")
def register_policy(cfg, tracking: mlf.Tracking, policy: StageResult, lineage: dict[str, str]):
    return mlf.register_policy(cfg, tracking, policy.artifact, lineage)


@flow(name="alignment")
def alignment(config_path: str = "configs/tiny.yaml", rounds: int | None = None,
              debug: dict | None = None) -> dict:
    """`debug`: fault injection for tests, {stage label: {"fail_once_marker": URI}}."""
    started = time.time()
    logger = get_run_logger()
    cfg = load_config(config_path)
    check_machines(cfg)  # e.g. QLoRA on a machine without a GPU: refused before any job starts
    check_local_datasets(cfg.data)  # a bad local dataset fails here, before any job starts
    rounds = cfg.rl_rounds(rounds)
    flow_run = get_run_context().flow_run
    tracking = mlf.start_pipeline_run(cfg, str(flow_run.id), flow_run.name, rounds)
    with get_client(sync_client=True) as prefect:  # 1, then 2 after a Retry...: read now that the run is Running
        attempt = prefect.read_flow_run(flow_run.id).run_count
    stage = configured(cfg)
    debug = debug or {}
    results: list[StageResult] = []  # this attempt's stages, as they finish

    def run(name, inputs, round_idx=None, label=""):
        result = stage(name, cfg, inputs, tracking, round_idx=round_idx, label=label,
                       debug=debug.get(f"{name}{label}"))
        results.append(result)
        return result

    def attempt_figures() -> dict[str, float]:
        return {"wall_seconds": round(time.time() - started, 2),
                "stages_launched": sum(r.launched for r in results),
                "stages_skipped": sum(not r.launched for r in results),
                "stage_compute_seconds": round(sum(r.metrics.get("stage_seconds", 0.0) for r in results
                                                   if r.launched), 2)}

    try:
        night = chain(cfg, rounds, run)
        data, sft, reward_model, policy = night.data, night.sft, night.reward_model, night.policy
        sft_eval, policy_eval = night.sft_eval, night.policy_eval
        model_name, version = register_policy(cfg, tracking, policy, lineage={
            "pipeline": cfg.pipeline, "config_digest": cfg.digest(), "data_digest": data.artifact.digest,
            "policy_key": policy.artifact.manifest["key"], "sft_key": sft.artifact.manifest["key"],
            "reward_model_key": reward_model.artifact.manifest["key"], "rounds": str(rounds),
            "eval_accuracy": str(policy_eval.metrics["accuracy"]),
        })
        # The champion alias moves only if tonight's policy beats it on the same held-out set.
        promotion = promote_policy(cfg, tracking, version, policy=policy, data=data, reward_model=reward_model,
                                   sft_eval=sft_eval)
    except BaseException as err:
        mlf.log_attempt(tracking, attempt, attempt_figures(), error=f"{type(err).__name__}: {err}")
        mlf.end_run(tracking, tracking.parent_run_id, "FAILED")
        raise

    summary = {
        "pipeline": cfg.pipeline,
        "rounds": rounds,
        "sft_accuracy": sft_eval.metrics["accuracy"],
        "policy_accuracy": policy_eval.metrics["accuracy"],
        "eval_prompts": policy_eval.metrics["num_prompts"],
        "sft_mean_reward": sft_eval.metrics["mean_reward"],
        "policy_mean_reward": policy_eval.metrics["mean_reward"],
        "reward_model_eval_accuracy": reward_model.metrics["eval_accuracy"],
        "policy_checkpoint_uri": policy.uri + "/checkpoint",
        "mlflow_tracking_uri": tracking.uri,
        "mlflow_run_id": tracking.parent_run_id,
        "registered_model": model_name,
        "model_version": version,
        "promotion": promotion["decision"],
        "promotion_reason": promotion["reason"],
        "champion_version": promotion["champion_after"],
        # The night, over every attempt of this flow run (a UI Retry is one more attempt).
        **mlf.log_attempt(tracking, attempt, attempt_figures()),
    }
    mlf.log_metrics(tracking, tracking.parent_run_id,
                    {k: v for k, v in summary.items() if k.endswith(("accuracy", "reward"))})
    report.publish(tracking, night.stages, summary)  # a Prefect artifact and plots on the parent run
    mlf.end_run(tracking, tracking.parent_run_id, "FINISHED")
    record_run(cfg, str(flow_run.id), results)  # what `alignflow gc` keeps for the last runs
    logger.info("policy accuracy %.4f (sft %.4f) on %d held-out prompts; %s v%s",
                summary["policy_accuracy"], summary["sft_accuracy"], summary["eval_prompts"], model_name, version)
    return summary
