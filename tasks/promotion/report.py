"""What a promotion reports: the flow's summary (the promotion run's tags too), a markdown comparison.
`evals` maps "candidate", "champion" and "sft" (the candidate's SFT model) to their evaluate StageResult, or None."""

from __future__ import annotations

from tasks import tracking as mlf
from tasks.config import PipelineConfig

from .registry import champion_version, checkpoint_uri
from .rule import NONE, Decision


def summary(client, cfg: PipelineConfig, run: mlf.Tracking, decision: Decision, eval_data_digest: str,
            evals: dict, error: str | None = None) -> dict:
    """The flow's summary; the promotion run gets it as `promotion.*` tags and the scores as metrics."""
    name, candidate_eval = cfg.tracking.registered_model, evals["candidate"]
    s = {
        "registered_model": name,
        "candidate_version": decision.candidate_version,
        "decision": "accepted" if decision.accepted else "rejected",
        "reason": decision.reason,
        "metric": cfg.promote.metric,
        "candidate_score": decision.candidate_score,
        "champion_version": decision.champion_version,
        "champion_score": decision.champion_score,
        "sft_score": None if evals.get("sft") is None else evals["sft"].metrics[cfg.promote.metric],
        "champion_after": champion_version(client, name),
        "alias_moved": decision.changed,
        "eval_data_digest": eval_data_digest,
        "eval_prompts": candidate_eval.metrics.get("num_prompts") if candidate_eval else None,
        "mlflow_tracking_uri": run.uri,
        "mlflow_experiment_id": run.experiment_id,
        "mlflow_run_id": run.parent_run_id,
        **{f"{role}_eval_run_id": None if ev is None else mlf.find_stage_run(run, ev.artifact.manifest["key"])
           for role, ev in evals.items() if role != "sft"},  # the SFT evaluation ran under the pipeline run
        "error": error,
    }
    keys = ("decision", "reason", "registered_model", "candidate_version", "champion_after", "eval_data_digest")
    tags = {f"promotion.{k}": s[k] for k in keys} | {"promotion.champion_before": s["champion_version"]}
    mlf.set_tags(run, run.parent_run_id, {k: v or NONE for k, v in tags.items()})
    mlf.log_metrics(run, run.parent_run_id, {k: s[k] for k in ("candidate_score", "champion_score")})
    return s


def markdown(client, cfg: PipelineConfig, s: dict, evals: dict) -> str:
    """The comparison table, a row per role from the summary, and the facts behind it."""
    uri, name, exp = s["mlflow_tracking_uri"], s["registered_model"], s["mlflow_experiment_id"]

    def link(text: str, path: str) -> str:
        return mlf.ui_link(uri, text, path)

    def version(v: str | None) -> str:
        return "-" if v is None else link(f"v{v}", f"models/{name}/versions/{v}")

    def run(r: str | None) -> str:
        return "-" if r is None else link(f"`{r}`", f"experiments/{exp}/runs/{r}")

    lines = [f"# Promotion of `{name}` {version(s['candidate_version'])}: **{s['decision'].upper()}**", "",
             s["reason"], "", f"| | version | {s['metric']} | evaluation | MLflow run | checkpoint |",
             "|---|---|---|---|---|---|"]
    for role, label in (("candidate", "candidate"), ("champion", "champion (before)")):
        v, score, ev = s[f"{role}_version"], s[f"{role}_score"], evals.get(role)
        cells = [label, version(v), "-" if score is None else f"{score:.4f}",
                 "-" if ev is None else "evaluated now" if ev.launched else "reused from the store",
                 run(s[f"{role}_eval_run_id"]),
                 "-" if v is None else f"`{checkpoint_uri(client.get_model_version(name, v))}`"]
        lines.append(f"| {' | '.join(cells)} |")
    p = cfg.promote
    return "\n".join(lines + [
        "", f"- rule: candidate > champion + margin ({p.margin}) and candidate >= min_score ({p.min_score}); "
            "the first champion must beat its SFT model by the margin instead",
        f"- SFT model: {'-' if s['sft_score'] is None else format(s['sft_score'], '.4f')}",
        f"- held-out set: {s['eval_prompts'] or '?'} prompts, greedy decoding, eval data digest "
        f"`{s['eval_data_digest'] or '?'}`",
        f"- champion after: {version(s['champion_after'])}",
        f"- MLflow: `{uri}`, experiment `{exp}`, promotion run {run(s['mlflow_run_id'])}",
        *([f"- error: `{s['error']}`"] if s["error"] else [])])
