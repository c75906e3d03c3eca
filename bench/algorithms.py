"""Benchmark: the tiny pipeline once per RL algorithm, on this machine, one after the other.

    .venv/bin/python bench/algorithms.py                        # configs/{ppo,grpo,...}.yaml, all their rounds
    .venv/bin/python bench/algorithms.py --small --rounds 1     # a quick check on the tests' small config
    .venv/bin/python bench/algorithms.py --algorithms grpo,ppo --rounds 4

Each algorithm runs `flows.alignment.alignment` on its config (ppo with the reward model's
reward; grpo, dr_grpo, rloo, reinforce_pp and grpo_lora, GRPO training a LoRA adapter, with the
verifier's) against one shared store:
data_prep, sft, reward_model and evaluate[sft] have the same keys in every config, so they run
once (a warm-up flow with 0 rounds, before any algorithm is timed) and every algorithm starts
from the same SFT policy and reward model. Round 0's rollouts are the same too (same policy, same
sampling): the first algorithm generates them, the others find them in the store.

Prints a markdown table (held-out accuracy with greedy decoding, against SFT's, and wall time)
and writes the rows as JSON to bench/results/algorithms-<time>.json. Wall time is the flow's, so
it includes process start-up and any stage found in the store; `rl_compute_s` sums the stages'
own compute seconds of every round (from their manifests, whoever ran them). Results are
bit-identical only at the same thread count.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import write_results  # noqa: E402

ALGORITHMS = ["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "grpo_lora", "dpo"]  # dpo: no RL rounds
# What the small config takes from the tests (sizes), not from the algorithm's config.
SIZE_KEYS = {"rounds", "prompts_per_round", "samples_per_prompt", "max_new_tokens", "epochs", "minibatch_size", "lr"}


def bench_config(algorithm: str, small: bool, workdir: Path) -> dict:
    """configs/<algorithm>.yaml (or the tests' small config with its algorithm settings),
    with storage and tracking moved into the bench's work directory."""
    cfg = yaml.safe_load((REPO / "configs" / f"{algorithm}.yaml").read_text())
    if small:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import small_config

        base = small_config(workdir)
        base["rl"].update({k: v for k, v in cfg.get("rl", {}).items() if k not in SIZE_KEYS})
        base.update({k: cfg[k] for k in ("method", "dpo") if k in cfg})
        if "lora" in cfg["model"]:  # grpo_lora: the adapter on the small model
            base["model"]["lora"] = cfg["model"]["lora"]
        if base["rl"].get("overlong_buffer", 0) >= base["rl"]["max_new_tokens"]:
            base["rl"]["overlong_buffer"] = 0
        # The small SFT policy is rarely right, so dynamic sampling would drop every group of the
        # verifier's 0/1 rewards and skip the update: keep them, so every algorithm's update runs.
        base["rl"]["drop_equal_reward_groups"] = False
        cfg = base
    cfg["storage"] = {"root": str(workdir / "store")}
    cfg["tracking"] = {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "bench-algorithms",
                       "registered_model": f"{cfg['pipeline']}-bench-policy"}
    return cfg


def rl_compute_seconds(summary: dict, rounds: int) -> float:
    """Sum of stage_seconds of every round's generate/score/update, walking back from the policy
    (for DPO, of its one dpo stage)."""
    from stages.common import store

    total, uri = 0.0, summary["policy_checkpoint_uri"].removesuffix("/checkpoint")
    if rounds == 0:
        return round(store.read_artifact(uri).metrics.get("stage_seconds", 0.0), 2)
    for _ in range(rounds):
        update = store.read_artifact(uri)
        scored = store.read_artifact(update.manifest["inputs"]["scored"]["uri"])
        rollouts = store.read_artifact(scored.manifest["inputs"]["rollouts"]["uri"])
        total += sum(a.metrics.get("stage_seconds", 0.0) for a in (update, scored, rollouts))
        uri = update.manifest["inputs"]["policy"]["uri"]
    return round(total, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated, in run order")
    parser.add_argument("--rounds", type=int, default=None, help="RL rounds (default: each config's rl.rounds)")
    parser.add_argument("--small", action="store_true", help="the tests' small config (seconds per stage)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="store, MLflow DB and Prefect home (default: a new temporary directory)")
    args = parser.parse_args()
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = set(algorithms) - set(ALGORITHMS)
    if unknown:
        parser.error(f"unknown algorithms {sorted(unknown)}; choose from {ALGORITHMS}")

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="alignflow-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Our own Prefect home: the embedded server's database is not shared with anyone else's runs.
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.alignment import alignment
    from tasks.config import load_config

    paths = {}
    for algorithm in algorithms:
        path = workdir / "configs" / f"{algorithm}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(bench_config(algorithm, args.small, workdir), sort_keys=False))
        load_config(path)  # every config valid before anything runs
        paths[algorithm] = path

    print(f"bench: {algorithms} in {workdir} ({'small' if args.small else 'tiny'} config)", flush=True)
    started = time.time()
    # data_prep, sft, reward_model, evaluate[sft]: the same keys in every config (an RL one with 0 rounds,
    # so that a DPO config's dpo stage is not run here)
    warmup_path = workdir / "configs" / "warmup.yaml"
    warmup_path.write_text(yaml.safe_dump(bench_config("grpo", args.small, workdir), sort_keys=False))
    warmup = alignment(config_path=str(warmup_path), rounds=0)
    shared_s = time.time() - started

    rows = []
    for algorithm in algorithms:
        cfg = load_config(paths[algorithm])
        rounds = cfg.rl_rounds(args.rounds)
        t0 = time.time()
        summary = alignment(config_path=str(paths[algorithm]), rounds=rounds)
        wall = time.time() - t0
        rows.append({
            "algorithm": algorithm, "advantage": cfg.rl.advantage if rounds else "-",
            "reward": cfg.rl.reward if rounds else "preference pairs", "rounds": rounds,
            "sft_accuracy": summary["sft_accuracy"], "policy_accuracy": summary["policy_accuracy"],
            "delta": summary["policy_accuracy"] - summary["sft_accuracy"], "eval_prompts": summary["eval_prompts"],
            "wall_s": round(wall, 1), "rl_compute_s": rl_compute_seconds(summary, rounds),
            "stages_launched": summary["stages_launched"], "config_digest": cfg.digest(),
            "rl": cfg.rl.model_dump(mode="json"), "policy_checkpoint_uri": summary["policy_checkpoint_uri"],
        })
        print(f"bench: {algorithm} done in {wall:.0f}s: accuracy {summary['policy_accuracy']:.4f} "
              f"(sft {summary['sft_accuracy']:.4f})", flush=True)

    print(f"\nHeld-out accuracy, greedy decoding, {warmup['eval_prompts']} prompts; SFT and reward model shared "
          f"({shared_s:.0f}s, not counted below)\n")
    print("| algorithm | reward | rounds | SFT acc | policy acc | delta | wall (s) | RL compute (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['reward']} | {r['rounds']} | {r['sft_accuracy']:.3f} | "
              f"{r['policy_accuracy']:.3f} | {r['delta']:+.3f} | {r['wall_s']:.0f} | {r['rl_compute_s']:.0f} |")

    out = write_results("algorithms", {"config": "small" if args.small else "tiny", "workdir": str(workdir),
                                       "shared_stages_s": round(shared_s, 1), "rows": rows})
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
