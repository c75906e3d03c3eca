"""How the night went, where people look, without reading logs.

    Prefect  a markdown artifact on the flow run: every stage (launched or skipped, its compute
             time, key and MLflow run), SFT against tonight's policy, the promotion decision
    MLflow   two plots on the pipeline's parent run: plots/rounds.png (reward, KL and accuracy
             over the rounds) and plots/losses.png (the SFT and reward-model loss curves)
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from tasks import tracking as mlf
from tasks.stage import StageResult


def stage_rows(tracking: mlf.Tracking, stages: dict[str, StageResult]) -> list[dict]:
    """A row per stage of the night, in the order they ran."""
    rows = []
    for label, result in stages.items():
        key = result.artifact.manifest["key"]
        rows.append({"stage": label, "launched": result.launched, "key": key, "uri": result.uri,
                     "seconds": result.metrics.get("stage_seconds"), "run_id": mlf.find_stage_run(tracking, key)})
    return rows


def markdown(tracking: mlf.Tracking, summary: dict, rows: list[dict]) -> str:
    def run(run_id: str | None) -> str:
        return "-" if run_id is None else mlf.ui_link(tracking.uri, f"`{run_id[:8]}`",
                                                       f"experiments/{tracking.experiment_id}/runs/{run_id}")

    launched = sum(r["launched"] for r in rows)
    lines = [f"# Night report: `{summary['pipeline']}`, {launched} stages launched, {len(rows) - launched} skipped",
             "", "| stage | this run | compute (s) | key | MLflow run |", "|---|---|---|---|---|"]
    for r in rows:
        done = "launched" if r["launched"] else "skipped (output in the store)"
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['stage']} | {done} | {seconds} | `{r['key']}` | {run(r['run_id'])} |")
    s = summary
    trained = "DPO" if "dpo" in {r["stage"] for r in rows} else f"{s['rounds']} rounds of RL"
    lines += ["", f"## SFT against tonight's policy ({trained})",
              f"Held-out set of {s['eval_prompts']} prompts, greedy decoding.", "",
              "| model | accuracy | mean reward |", "|---|---|---|",
              f"| SFT | {s['sft_accuracy']:.4f} | {s['sft_mean_reward']:.4f} |",
              f"| policy | {s['policy_accuracy']:.4f} | {s['policy_mean_reward']:.4f} |",
              "", f"## Promotion of `{s['registered_model']}` v{s['model_version']}: **{s['promotion'].upper()}**",
              "", s["promotion_reason"], "", "Champion now: " + (f"v{s['champion_version']}." if s["champion_version"] else "none."),
              "", f"MLflow: `{tracking.uri}`, pipeline run {run(tracking.parent_run_id)}."]
    return "\n".join(lines)


def _training_run(tracking: mlf.Tracking, key: str) -> str | None:
    """The MLflow run of the job that produced `key`, in this night or an earlier one."""
    found = mlf.client(tracking.uri).search_runs(
        [tracking.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`alignflow.key` = '{key}' and tags.`alignflow.cached` = 'false' "
                      "and attributes.status = 'FINISHED'")
    return found[0].info.run_id if found else None


def round_series(stages: dict[str, StageResult]) -> dict[str, tuple[list[int], list[float]]]:
    """(x, y) per curve. x is the policy: 0 is SFT, r is what update[r-1] wrote; round r samples policy r."""
    rounds = sorted(int(m.group(1)) for label in stages if (m := re.fullmatch(r"update\[(\d+)\]", label)))
    return {
        "reward_mean": (rounds, [stages[f"score[{r}]"].metrics["reward_mean"] for r in rounds]),
        "kl": ([r + 1 for r in rounds], [stages[f"update[{r}]"].metrics.get("kl", float("nan")) for r in rounds]),
        "sampled_accuracy": (rounds, [stages[f"score[{r}]"].metrics["verifier_accuracy"] for r in rounds]),
        "heldout_accuracy": ([0, max(len(rounds), 1)], [stages["evaluate[sft]"].metrics["accuracy"],
                                               stages["evaluate[policy]"].metrics["accuracy"]]),
    }


def loss_curves(tracking: mlf.Tracking, stages: dict[str, StageResult]) -> dict[str, tuple[list[int], list[float]]]:
    """The `loss` curve of the jobs that trained SFT and the reward model (tonight or on an earlier night)."""
    c, curves = mlf.client(tracking.uri), {}
    for label in ("sft", "reward_model"):
        run_id = _training_run(tracking, stages[label].artifact.manifest["key"])
        history = sorted(c.get_metric_history(run_id, "loss"), key=lambda m: m.step) if run_id else []
        curves[label] = ([m.step for m in history], [m.value for m in history])
    return curves


def _figure(panels: list[tuple[str, str, list[tuple[str, tuple[list, list]]]]], path: Path) -> None:
    """One row of panels (title, x label, [(legend, (x, y))]) saved as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    fig = Figure(figsize=(4.3 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, xlabel, lines) in zip(axes[0], panels):
        for legend, (x, y) in lines:
            ax.plot(x, y, "o-" if len(x) < 30 else "-", label=legend)
        ax.set(title=title, xlabel=xlabel)
        if len(lines) > 1:
            ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def publish(tracking: mlf.Tracking, stages: dict[str, StageResult], summary: dict) -> str:
    """The markdown artifact and the two plots; returns the markdown."""
    text = markdown(tracking, summary, stage_rows(tracking, stages))
    key = re.sub(r"[^a-z0-9]+", "-", f"night-{summary['pipeline']}".lower()).strip("-")[:100]
    create_markdown_artifact(markdown=text, key=key, description=f"{summary['pipeline']}: the night's stages, SFT vs policy, promotion")
    rounds, losses = round_series(stages), loss_curves(tracking, stages)
    with tempfile.TemporaryDirectory() as tmp:
        _figure([("mean reward of the round's samples", "round r (samples of policy r)",
                  [("reward", rounds["reward_mean"])]),
                 ("KL to the reference in the update", "policy r (after r updates)", [("kl", rounds["kl"])]),
                 ("accuracy", "policy r (0 = SFT)", [("samples, training prompts", rounds["sampled_accuracy"]),
                                                     ("held-out, greedy", rounds["heldout_accuracy"])])],
                Path(tmp) / "rounds.png")
        _figure([(f"{label} loss", "step", [(label, curve)]) for label, curve in losses.items()],
                Path(tmp) / "losses.png")
        mlf.client(tracking.uri).log_artifacts(tracking.parent_run_id, tmp, artifact_path="plots")
    return text
