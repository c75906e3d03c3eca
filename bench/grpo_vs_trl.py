"""The GRPO half of bench/train_vs_trl.py: one RL round, our `generate` + `score` + `update` stage
jobs against TRL's GRPOTrainer (transformers generation), in the settings of SETTINGS.

Run it through train_vs_trl.py, which makes the data and the tiny SFT policy:

    .venv-bench/bin/python bench/train_vs_trl.py --skip-sft --grpo-settings 25m --threads 1

Run as a script, this module is TRL's child process (`--_worker trl_grpo --_args JSON`).

Settings (`--grpo-settings`, default both):
  tiny  the config's model (configs/tiny.yaml: 1.05M params), the SFT comparison's policy, the
        round of configs/tiny.yaml: 256 prompts x 8 samples, 6 new tokens (the answers are 3
        digits + EOS, so most samples are 4 tokens), minibatch 256.
  25m   a ~25M-param tiny Llama (hidden 512, 8 layers, 8 heads, intermediate 1376, the same char
        tokenizer), its own short SFT job (30 steps: a starting point, not a good policy) that
        both sides start from, 32 prompts x 8 samples, exactly 64 new tokens (a minimum of 64 on
        both sides: ours rl.min_new_tokens, TRL generation_kwargs={"min_new_tokens": 64}),
        minibatch 64. Per token the model does ~25x the work of the tiny one, so the per-job
        and per-step overheads weigh less.
Both: 2 epochs (TRL's num_iterations), the config's lr, clip, k3 KL coefficient, temperature;
every group kept (rl.drop_equal_reward_groups=false) so both train on every sample. With the
minimum, our behaviour logprobs are those of what was sampled from (EOS masked), so update's
first ratio is not 1 (ratio_dev_first in ours_raw); TRL recomputes them unmasked. The work is the same.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


@dataclass(frozen=True)
class Setting:
    prompts: int
    samples: int
    minibatch: int
    epochs: int = 2
    max_new_tokens: int | None = None  # None: the config's rl.max_new_tokens
    min_new_tokens: int = 0  # both sides: no EOS before this many new tokens
    # Config sections of its own model and SFT policy (model, sft, reward_model), merged into the
    # benchmark's; None: it starts from the SFT comparison's policy.
    own_policy: dict | None = None


MODEL_25M = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 1376,
             "max_position_embeddings": 128}  # prompt (<= 8 tokens) + 64 new ones
SETTINGS = {
    "tiny": Setting(prompts=256, samples=8, minibatch=256),
    # The reward model is not the reward (the verifier is): a few steps, only for score to load it.
    "25m": Setting(prompts=32, samples=8, minibatch=64, max_new_tokens=64, min_new_tokens=64,
                   own_policy={"model": {"tiny": MODEL_25M}, "sft": {"steps": 30, "warmup_steps": 5},
                               "reward_model": {"steps": 5}}),
}
SMALL_SETTINGS = {  # --small: the same models, a smaller round
    "tiny": Setting(prompts=32, samples=8, minibatch=64),
    "25m": Setting(prompts=8, samples=8, minibatch=32, epochs=1, max_new_tokens=16, min_new_tokens=16,
                   own_policy={"model": {"tiny": MODEL_25M}, "sft": {"steps": 5, "warmup_steps": 1},
                               "reward_model": {"steps": 2}}),
}


# --- TRL side (the child process) -----------------------------------------------------------

def trl_grpo_worker(a: dict) -> dict:
    t_process = time.perf_counter()
    C.set_threads(a["threads"])
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from stages.common.verifier import VERIFIERS
    from stages.generate import round_prompts

    t_imports = time.perf_counter() - t_process
    rows = round_prompts(pq.read_table(a["rl_prompts"]).to_pylist(), a["prompts"], a["seed"], a["round"])
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    verify = VERIFIERS["exact"]

    def exact_match(completions, answer, **kw):
        return [float(verify(c, ans)) for c, ans in zip(completions, answer)]

    class Timed(GRPOTrainer):
        gen_s, completion_tokens = 0.0, 0

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            Timed.gen_s += time.perf_counter() - t
            Timed.completion_tokens += int(out["completion_mask"].sum())
            return out

    Clock = C.train_clock()

    n_samples = a["prompts"] * a["samples"]
    steps = a["epochs"] * n_samples // a["minibatch"]
    args = GRPOConfig(
        output_dir=a["out"], per_device_train_batch_size=a["minibatch"], gradient_accumulation_steps=1,
        num_generations=a["samples"], generation_batch_size=n_samples, num_iterations=a["epochs"], max_steps=steps,
        learning_rate=a["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, beta=a["kl_coef"], epsilon=a["clip_eps"], loss_type="grpo",
        scale_rewards="group", temperature=a["temperature"], top_p=1.0, top_k=0,
        max_completion_length=a["max_new_tokens"], use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, seed=a["seed"], disable_tqdm=True, bf16=False, fp16=False, log_completions=False,
        gradient_checkpointing=a["gradient_checkpointing"],
        # Into transformers' GenerationConfig (TRL's transformers path): no EOS before the minimum.
        generation_kwargs={"min_new_tokens": a["min_new_tokens"]} if a["min_new_tokens"] else None,
    )
    t_build = time.perf_counter()
    trainer = Timed(model=a["checkpoint"], reward_funcs=exact_match, args=args, train_dataset=dataset,
                    callbacks=[Clock()])
    build_s = time.perf_counter() - t_build
    trainer.train()
    train_s = Clock.end - Clock.begin
    opt_s = train_s - Timed.gen_s
    return {"train_seconds": train_s, "generate_score_seconds": Timed.gen_s, "optimize_seconds": opt_s,
            "completion_tokens": Timed.completion_tokens, "optimizer_steps": steps,
            "round_tokens_per_s": Timed.completion_tokens / train_s,
            "optimize_tokens_per_s": Timed.completion_tokens * a["epochs"] / opt_s,
            "imports_s": t_imports, "trainer_build_s": build_s, "threads": torch.get_num_threads(),
            "num_params": sum(p.numel() for p in trainer.model.parameters())}


# --- one setting, both sides ----------------------------------------------------------------

def setting_overrides(base: dict, s: Setting, drop_equal_groups: bool) -> dict:
    """train_vs_trl's config overrides with this setting's model, SFT and round."""
    rl = {"prompts_per_round": s.prompts, "samples_per_prompt": s.samples, "minibatch_size": s.minibatch,
          "epochs": s.epochs, "drop_equal_reward_groups": drop_equal_groups}
    if s.max_new_tokens is not None:
        rl["max_new_tokens"] = s.max_new_tokens
    if s.min_new_tokens:
        rl["min_new_tokens"] = s.min_new_tokens
    out = {**base, "rl": {**base.get("rl", {}), **rl}, "generate": {"backend": "hf"}}
    for section, values in (s.own_policy or {}).items():
        out[section] = {**base.get(section, {}), **values}
    return out


def compare_setting(name: str, s: Setting, *, base_overrides: dict, layouts: list[str], threads: int,
                    workdir: Path, data: C.JobResult, policy: C.JobResult | None, drop_equal_groups: bool,
                    trl_gradient_checkpointing: bool) -> dict:
    """Our round at every layout, then TRL's, from the same SFT checkpoint. `policy`: the SFT job to
    start from (the tiny setting: the SFT comparison's); None: the setting's own SFT job, at layouts[0].
    Returns {"rows": table rows (TRL last, ratios ours / TRL), "trl": TRL's raw figures, ...}."""
    overrides = setting_overrides(base_overrides, s, drop_equal_groups)
    # One pipeline name per setting and layout: a layout must not overwrite another's output.
    cfgs = {lay: C.pipeline_config(overrides, workdir / "store", f"bench-grpo-{name}-{lay}") for lay in layouts}
    first = cfgs[layouts[0]]
    ranks0, threads0 = map(int, layouts[0].split("x"))
    if policy is None:
        policy = C.run_stage_job("sft", first, {"data": data}, nproc=ranks0, threads=threads0)
        print(f"  grpo {name}: sft {first.sft.steps} steps, {policy.metrics['num_params']:,} params, "
              f"job {policy.wall_s:.1f}s", flush=True)
    reward_model = C.run_stage_job("reward_model", first, {"data": data, "sft": policy}, nproc=1, threads=threads)
    ckpt = C.fetch_checkpoint(policy, workdir / f"grpo-{name}-policy")
    rl = first.rl

    rows, ours_raw = [], {}
    for lay in layouts:
        ranks, lay_threads = map(int, lay.split("x"))
        jobs = {}
        jobs["generate"] = C.run_stage_job("generate", cfgs[lay], {"policy": policy, "data": data}, round_idx=0,
                                           nproc=ranks, threads=lay_threads)
        jobs["score"] = C.run_stage_job("score", cfgs[lay], {"rollouts": jobs["generate"], "reference": policy,
                                                            "reward_model": reward_model, "data": data},
                                        round_idx=0, nproc=ranks, threads=lay_threads)
        jobs["update"] = C.run_stage_job("update", cfgs[lay], {"policy": policy, "scored": jobs["score"]},
                                         round_idx=0, nproc=ranks, threads=lay_threads)
        g, u = jobs["generate"].metrics, jobs["update"].metrics
        tokens = round(g["num_samples"] * g["mean_response_tokens"])
        compute = sum(j.metrics["stage_seconds"] for j in jobs.values())
        wall = sum(j.wall_s for j in jobs.values())
        rows.append({
            "side": f"alignflow generate+score+update ({ranks}x{lay_threads})",
            "samples": g["num_samples"], "completion_tokens": tokens,
            "generate_s": g["stage_seconds"], "score_s": jobs["score"].metrics["stage_seconds"],
            "update_s": u["stage_seconds"],
            "optimize_loop_s": (tokens * rl.epochs * u["samples_used"] / g["num_samples"]) / u["tokens_per_s"],
            "round_compute_s": compute, "round_wall_s": wall,
            "tok/s (compute)": tokens / compute, "tok/s (wall)": tokens / wall,
            "optimize tok/s": u["tokens_per_s"], "optimizer_steps": u["optimizer_steps"],
        })
        ours_raw[lay] = {stage: {**j.metrics, "job_wall_s": j.wall_s} for stage, j in jobs.items()}
        print(f"  ours grpo {name} {lay}: compute {compute:.1f}s, jobs {wall:.1f}s "
              f"(gen {jobs['generate'].wall_s:.1f}, score {jobs['score'].wall_s:.1f}, "
              f"update {jobs['update'].wall_s:.1f})", flush=True)

    trl = C.run_worker(Path(__file__), "trl_grpo", {
        "threads": threads, "checkpoint": str(ckpt),
        "rl_prompts": str(C.store_download(data, "rl_prompts.parquet", workdir / "data")),
        "prompts": rl.prompts_per_round, "samples": rl.samples_per_prompt, "minibatch": rl.minibatch_size,
        "epochs": rl.epochs, "lr": rl.lr, "kl_coef": rl.kl_coef, "clip_eps": rl.clip_eps,
        "temperature": rl.temperature, "max_new_tokens": rl.max_new_tokens, "min_new_tokens": rl.min_new_tokens,
        "seed": first.seed, "round": 0, "out": str(workdir / f"trl-grpo-{name}"),
        "gradient_checkpointing": trl_gradient_checkpointing,
    })
    ckpt_note = ", grad ckpt" if trl_gradient_checkpointing else ""
    rows.append({
        "side": f"TRL GRPOTrainer, transformers generate (1x{threads}{ckpt_note})",
        "samples": rl.prompts_per_round * rl.samples_per_prompt, "completion_tokens": trl["completion_tokens"],
        "generate_s": trl["generate_score_seconds"], "score_s": None, "update_s": None,
        "optimize_loop_s": trl["optimize_seconds"], "round_compute_s": trl["train_seconds"],
        "round_wall_s": trl["process_wall_s"],
        "tok/s (compute)": trl["round_tokens_per_s"], "tok/s (wall)": trl["completion_tokens"] / trl["process_wall_s"],
        "optimize tok/s": trl["optimize_tokens_per_s"], "optimizer_steps": trl["optimizer_steps"],
    })
    for row in rows[:-1]:
        for k in ("tok/s (compute)", "tok/s (wall)", "optimize tok/s"):
            row[f"ratio {k}"] = C.ratio(row[k], rows[-1][k])
    print(f"  TRL grpo {name}: train {trl['train_seconds']:.1f}s (generate+score "
          f"{trl['generate_score_seconds']:.1f}s), process {trl['process_wall_s']:.1f}s", flush=True)
    return {"setting": asdict(s), "num_params": trl["num_params"], "max_new_tokens": rl.max_new_tokens,
            "min_new_tokens": rl.min_new_tokens, "rows": rows, "trl_raw": trl, "ours_raw": ours_raw}


def print_setting(name: str, result: dict) -> None:
    s = result["setting"]
    print(f"## GRPO round, setting {name}: {result['num_params']:,} params, {s['prompts']} prompts x "
          f"{s['samples']} samples, max_new_tokens {result['max_new_tokens']} (min {result['min_new_tokens']}), "
          f"minibatch {s['minibatch']}, {s['epochs']} epochs (sampled completion tokens / s; ratio > 1: "
          "alignflow faster)\n")
    print(C.markdown_table(result["rows"]))
    print()


TABLE_NOTE = ("Ours: *_s are the stages' own seconds (manifest stage_seconds: load, compute, save), round_wall_s "
              "the three jobs' process walls; optimize_loop_s the update's training loop. TRL: generate_s is "
              "its _generate_and_score_completions (generation + old/ref logprobs + reward), optimize_loop_s "
              "the rest of train(), round_compute_s train(), round_wall_s the whole process.\n")


if __name__ == "__main__":
    C.worker_main({"trl_grpo": trl_grpo_worker})
