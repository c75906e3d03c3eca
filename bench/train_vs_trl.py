"""Benchmark: training throughput against TRL, same model, data, batch, sequence length and threads.

    bench/setup_bench_env.sh                                  # once: .venv-bench with TRL + the project
    .venv-bench/bin/python bench/train_vs_trl.py              # full size (configs/tiny.yaml sizes)
    .venv-bench/bin/python bench/train_vs_trl.py --small      # smoke test, ~2 minutes
    .venv-bench/bin/python bench/train_vs_trl.py --profile    # + py-spy profiles of both SFT sides

Two comparisons, each at every layout of `--layouts` (RANKSxTHREADS; the total thread count
is the same for both sides, TRL always runs 1 process with all of them):

SFT    our `sft` stage as a real job (spec -> `torchrun -m stages.sft` through
       tasks.launch.run_job, DeepSpeed ZeRO from the config, fp32) against TRL's SFTTrainer
       (plain torch on CPU) on the tiny Llama (build_tiny_model, the data_prep tokenizer), the
       same sft.parquet from our data_prep job, pre-tokenized the same way (BOS + prompt +
       response + EOS, loss on the response only), the same batch size, steps, lr schedule
       shape, AdamW betas and clipping. Throughput = non-pad tokens / s of the training loop
       (both sides count attention_mask.sum(), prompt tokens included); the job's and the TRL
       process's wall times (start-up, imports, model build, saving) are shown beside it.

GRPO   one RL round from the SFT checkpoint: our `generate` + `score` + `update` jobs against
       TRL's GRPOTrainer with transformers generation, on the same prompts (the round's
       seeded draw), samples per prompt, max_new_tokens, temperature, minibatch, epochs
       (TRL's num_iterations), lr, clip and KL coefficient (k3 KL to the SFT reference,
       loss_type="grpo" = our seq_mean_token_mean). Ours keeps all groups
       (rl.drop_equal_reward_groups=false) so both train on the same number of samples.
       Throughput = sampled completion tokens / s of the whole round (generation, scoring,
       optimisation); also the optimisation phase alone (trained completion tokens / s).

TRL's trainers default to gradient checkpointing (recomputing activations in the backward
pass, ~20% more compute); it is turned off here, as ours does not checkpoint
(`--trl-gradient-checkpointing` keeps TRL's default).

Differences that are the peers' design, not the benchmark's: TRL recomputes the behaviour
logprobs with an extra forward pass (we take them from generation); our `score` also runs the
reward model (kept in reward_info); ours are three processes (each loads models and data from
the store), TRL's one.

Prints markdown tables with the ratios (ours / TRL: > 1 means we are faster) and writes JSON to
bench/results/train_vs_trl-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FULL = {"num_sft": 20000, "sft_steps": 600, "sft_batch": 64, "rm_steps": 20, "prompts": 256, "samples": 8,
        "minibatch": 256, "epochs": 2}
SMALL = {"num_sft": 2000, "sft_steps": 30, "sft_batch": 64, "rm_steps": 5, "prompts": 32, "samples": 8,
         "minibatch": 64, "epochs": 2}


# --- TRL side (run in a child process: its own threads, imports and memory) ------------------

def trl_sft_worker(a: dict) -> dict:
    t_process = time.perf_counter()
    C.set_threads(a["threads"])
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from stages.common.models import build_tiny_model, encode_prompts, encode_responses, load_tokenizer
    from stages.common.sections import TinyModelConfig

    t_imports = time.perf_counter() - t_process
    table = pq.read_table(a["sft_parquet"]).to_pylist()
    tokenizer = load_tokenizer(a["tokenizer"])
    model = build_tiny_model(TinyModelConfig(**a["tiny"]), tokenizer, seed=a["seed"])
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in table])
    responses = encode_responses(tokenizer, [r["response"] for r in table])
    dataset = Dataset.from_dict({
        "input_ids": [p + r for p, r in zip(prompts, responses)],
        "completion_mask": [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)],
    })

    class Clock(TrainerCallback):
        begin = end = None

        def on_train_begin(self, args, state, control, **kw):
            Clock.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            Clock.end = time.perf_counter()

    args = SFTConfig(
        output_dir=a["out"], per_device_train_batch_size=a["batch"], max_steps=a["steps"],
        learning_rate=a["lr"], lr_scheduler_type="linear", warmup_steps=a["warmup"], weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=a["log_every"], save_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=0, seed=a["seed"], completion_only_loss=True,
        max_length=None, disable_tqdm=True, bf16=False, fp16=False,
        gradient_checkpointing=a["gradient_checkpointing"],
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Clock()])
    out = trainer.train()
    train_s = Clock.end - Clock.begin
    tokens = int(trainer._total_train_tokens)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_seconds": train_s, "tokens": tokens, "tokens_per_s": tokens / train_s,
            "loss": logged[-1] if logged else out.training_loss, "mean_loss": out.training_loss, "imports_s": t_imports, "threads": torch.get_num_threads(),
            "num_params": sum(p.numel() for p in model.parameters())}


def trl_grpo_worker(a: dict) -> dict:
    t_process = time.perf_counter()
    C.set_threads(a["threads"])
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
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

    class Clock(TrainerCallback):
        begin = end = None

        def on_train_begin(self, args, state, control, **kw):
            Clock.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            Clock.end = time.perf_counter()

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
            "imports_s": t_imports, "trainer_build_s": build_s, "threads": torch.get_num_threads()}


def run_worker(mode: str, args: dict, profile_to: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--_worker", mode, "--_args", json.dumps(args)]
    if profile_to:
        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-o", str(profile_to), "--format", "raw",
               "-r", "100", "--"] + cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(args["threads"]), MKL_NUM_THREADS=str(args["threads"]),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning", DISABLE_MLFLOW_INTEGRATION="TRUE")
    started = time.perf_counter()
    out = C.run_subprocess_json(cmd, env=env)
    out["process_wall_s"] = time.perf_counter() - started
    return out


# --- our side -------------------------------------------------------------------------------

def py_spy_wrap(path: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "py-spy"), "record", "-o", str(path), "--format", "raw", "-r", "100",
            "--subprocesses", "--"]


def summarize_profile(path: Path, top: int = 25) -> list[tuple[str, float]]:
    """Share of samples in which each function appears (inclusive), from py-spy's raw format."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        total += n
        for fn in {f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")"
                   for f in stack.split(";") if " (" in f}:
            counts[fn] = counts.get(fn, 0) + n
    return [(fn, c / total) for fn, c in sorted(counts.items(), key=lambda kv: -kv[1])[:top]] if total else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="smoke-test sizes")
    parser.add_argument("--layouts", default=None,
                        help="our RANKSxTHREADS layouts, comma-separated (default: 1xT and, when T>=2, 2x(T/2))")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="total threads per side")
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--skip-grpo", action="store_true")
    parser.add_argument("--skip-sft", action="store_true")
    parser.add_argument("--drop-equal-groups", action="store_true",
                        help="our default dynamic sampling (fewer samples trained than TRL)")
    parser.add_argument("--profile", action="store_true", help="py-spy both SFT sides (first layout)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL's own default (recomputes activations: ~20%% more compute); off by default, as ours")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_args", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        out = {"trl_sft": trl_sft_worker, "trl_grpo": trl_grpo_worker}[args._worker](json.loads(args._args))
        print(json.dumps(out), flush=True)
        sys.stdout.flush()
        os._exit(0)  # skip the slow interpreter teardown (torch, datasets)

    try:
        import trl
    except ImportError:
        sys.exit("TRL is not installed in this environment: run bench/setup_bench_env.sh, then "
                 ".venv-bench/bin/python bench/train_vs_trl.py")

    size = dict(SMALL if args.small else FULL)
    if args.sft_steps:
        size["sft_steps"] = args.sft_steps
    T = args.threads
    layouts = args.layouts.split(",") if args.layouts else [f"1x{T}"] + ([f"2x{T // 2}"] if T >= 2 else [])
    for lay in layouts:
        r, t = map(int, lay.split("x"))
        if r * t != T:
            sys.exit(f"layout {lay}: {r}x{t} != --threads {T}: both sides must use the same thread count")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-trl-"))
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    print(f"# train_vs_trl: TRL {trl.__version__}, {T} threads per side, layouts {layouts}, work dir {workdir}")

    overrides = {
        "data": {"synthetic": {"num_sft": size["num_sft"]}},
        "sft": {"steps": size["sft_steps"], "batch_size": size["sft_batch"]},
        "reward_model": {"steps": size["rm_steps"]},
        "generate": {"backend": "hf"},
        "rl": {"prompts_per_round": size["prompts"], "samples_per_prompt": size["samples"],
               "minibatch_size": size["minibatch"], "epochs": size["epochs"],
               "drop_equal_reward_groups": bool(args.drop_equal_groups)},
    }
    cfg = C.pipeline_config(overrides, workdir / "store", "bench-data")
    c = cfg.model_dump(mode="json")
    # One pipeline name per layout: same params -> same key, and a layout must not overwrite another's output.
    layout_cfg = {lay: C.pipeline_config(overrides, workdir / "store", f"bench-{lay}") for lay in layouts}
    data = C.run_stage_job("data_prep", cfg, {}, nproc=1, threads=T)
    data_dir = workdir / "data"
    sft_parquet = C.store_download(data, "sft.parquet", data_dir)
    rl_parquet = C.store_download(data, "rl_prompts.parquet", data_dir)
    tok_dir = C.fetch_checkpoint(data, data_dir, "tokenizer")

    sft_rows, grpo_rows, profiles = [], [], {}
    sft_jobs: dict[str, C.JobResult] = {}
    for i, lay in enumerate(layouts):
        ranks, threads = map(int, lay.split("x"))
        profile = args.profile and i == 0
        if not args.skip_sft or not args.skip_grpo:
            wrap = py_spy_wrap(C.RESULTS / "pyspy-sft-ours.txt") if profile and not args.skip_sft else None
            job = C.run_stage_job("sft", layout_cfg[lay], {"data": data}, nproc=ranks, threads=threads, wrap=wrap)
            sft_jobs[lay] = job
            m = job.metrics
            sft_rows.append({"side": f"alignflow sft ({ranks} rank{'s' * (ranks > 1)} x {threads} thr, "
                                     f"ZeRO-{c['engine']['zero_stage']})",
                             "steps": size["sft_steps"], "batch": size["sft_batch"],
                             "tokens": round(m["tokens_per_s"] * m["train_seconds"]),
                             "train_s": m["train_seconds"], "tokens/s": m["tokens_per_s"],
                             "process_wall_s": job.wall_s, "final_loss": m["loss"]})
            print(f"  ours sft {lay}: {m['tokens_per_s']:.0f} tok/s, loop {m['train_seconds']:.1f}s, "
                  f"job {job.wall_s:.1f}s", flush=True)
    trl_sft = None
    if not args.skip_sft:
        trl_sft = run_worker("trl_sft", {
            "threads": T, "sft_parquet": str(sft_parquet), "tokenizer": str(tok_dir), "tiny": c["model"]["tiny"],
            "seed": cfg.seed, "batch": size["sft_batch"], "steps": size["sft_steps"], "lr": c["sft"]["lr"],
            "warmup": c["sft"]["warmup_steps"], "log_every": c["sft"]["log_every"], "out": str(workdir / "trl-sft"),
            "gradient_checkpointing": args.trl_gradient_checkpointing,
        }, profile_to=C.RESULTS / "pyspy-sft-trl.txt" if args.profile else None)
        sft_rows.append({"side": f"TRL SFTTrainer (1 process x {T} thr, plain torch{', grad ckpt' if args.trl_gradient_checkpointing else ''})", "steps": size["sft_steps"],
                         "batch": size["sft_batch"], "tokens": trl_sft["tokens"], "train_s": trl_sft["train_seconds"],
                         "tokens/s": trl_sft["tokens_per_s"], "process_wall_s": trl_sft["process_wall_s"],
                         "final_loss": trl_sft["loss"]})
        for row in sft_rows[:-1]:
            row["ratio vs TRL (tok/s)"] = C.ratio(row["tokens/s"], trl_sft["tokens_per_s"])
            row["ratio vs TRL (wall)"] = C.ratio(trl_sft["process_wall_s"], row["process_wall_s"])
        print(f"  TRL sft: {trl_sft['tokens_per_s']:.0f} tok/s, loop {trl_sft['train_seconds']:.1f}s, "
              f"process {trl_sft['process_wall_s']:.1f}s", flush=True)
        if args.profile:
            for side in ("ours", "trl"):
                p = C.RESULTS / f"pyspy-sft-{side}.txt"
                if p.exists():
                    profiles[side] = summarize_profile(p)

    trl_grpo = None
    if not args.skip_grpo:
        first = sft_jobs[layouts[0]]
        reward_model = C.run_stage_job("reward_model", layout_cfg[layouts[0]], {"data": data, "sft": first}, nproc=1, threads=T)
        ckpt = C.fetch_checkpoint(first, workdir / "sft-ckpt")
        rl = c["rl"]
        for lay in layouts:
            ranks, threads = map(int, lay.split("x"))
            sft = first  # every layout starts from the same policy: the first layout's SFT
            lcfg = layout_cfg[lay]
            jobs = {}
            jobs["generate"] = C.run_stage_job("generate", lcfg, {"policy": sft, "data": data}, round_idx=0,
                                               nproc=ranks, threads=threads)
            jobs["score"] = C.run_stage_job("score", lcfg, {"rollouts": jobs["generate"], "reference": sft,
                                                           "reward_model": reward_model, "data": data},
                                            round_idx=0, nproc=ranks, threads=threads)
            jobs["update"] = C.run_stage_job("update", lcfg, {"policy": sft, "scored": jobs["score"]}, round_idx=0,
                                             nproc=ranks, threads=threads)
            g = jobs["generate"].metrics
            tokens = round(g["num_samples"] * g["mean_response_tokens"])
            compute = sum(j.metrics["stage_seconds"] for j in jobs.values())
            wall = sum(j.wall_s for j in jobs.values())
            u = jobs["update"].metrics
            grpo_rows.append({
                "side": f"alignflow generate+score+update ({ranks}x{threads})",
                "samples": g["num_samples"], "completion_tokens": tokens,
                "generate_s": jobs["generate"].metrics["stage_seconds"],
                "score_s": jobs["score"].metrics["stage_seconds"],
                "update_s": u["stage_seconds"],
                "optimize_loop_s": (tokens * c["rl"]["epochs"] * u["samples_used"] / g["num_samples"]) / u["tokens_per_s"],
                "round_compute_s": compute, "round_wall_s": wall,
                "tok/s (compute)": tokens / compute, "tok/s (wall)": tokens / wall,
                "optimize tok/s": u["tokens_per_s"], "optimizer_steps": u["optimizer_steps"],
            })
            print(f"  ours grpo {lay}: compute {compute:.1f}s, jobs {wall:.1f}s "
                  f"(gen {jobs['generate'].wall_s:.1f}, score {jobs['score'].wall_s:.1f}, "
                  f"update {jobs['update'].wall_s:.1f})", flush=True)
        trl_grpo = run_worker("trl_grpo", {
            "threads": T, "checkpoint": str(ckpt), "rl_prompts": str(rl_parquet), "prompts": rl["prompts_per_round"],
            "samples": rl["samples_per_prompt"], "minibatch": rl["minibatch_size"], "epochs": rl["epochs"],
            "lr": rl["lr"], "kl_coef": rl["kl_coef"], "clip_eps": rl["clip_eps"], "temperature": rl["temperature"],
            "max_new_tokens": rl["max_new_tokens"], "seed": cfg.seed, "round": 0, "out": str(workdir / "trl-grpo"),
            "gradient_checkpointing": args.trl_gradient_checkpointing,
        })
        grpo_rows.append({
            "side": f"TRL GRPOTrainer, transformers generate (1x{T}{', grad ckpt' if args.trl_gradient_checkpointing else ''})",
            "samples": rl["prompts_per_round"] * rl["samples_per_prompt"],
            "completion_tokens": trl_grpo["completion_tokens"],
            "generate_s": trl_grpo["generate_score_seconds"], "score_s": None, "update_s": None,
            "optimize_loop_s": trl_grpo["optimize_seconds"], "round_compute_s": trl_grpo["train_seconds"],
            "round_wall_s": trl_grpo["process_wall_s"],
            "tok/s (compute)": trl_grpo["round_tokens_per_s"],
            "tok/s (wall)": trl_grpo["completion_tokens"] / trl_grpo["process_wall_s"],
            "optimize tok/s": trl_grpo["optimize_tokens_per_s"], "optimizer_steps": trl_grpo["optimizer_steps"],
        })
        for row in grpo_rows[:-1]:
            for k in ("tok/s (compute)", "tok/s (wall)", "optimize tok/s"):
                row[f"ratio {k}"] = C.ratio(row[k], grpo_rows[-1][k])
        print(f"  TRL grpo: train {trl_grpo['train_seconds']:.1f}s (generate+score "
              f"{trl_grpo['generate_score_seconds']:.1f}s), process {trl_grpo['process_wall_s']:.1f}s", flush=True)

    print()
    if sft_rows and trl_sft:
        print("## SFT throughput (tokens/s of the training loop; ratio > 1: alignflow faster)\n")
        print(C.markdown_table(sft_rows))
        print()
    if grpo_rows:
        print("## GRPO round (sampled completion tokens / s; ratio > 1: alignflow faster)\n")
        print("Ours: *_s are the stages' own seconds (manifest stage_seconds: load, compute, save), round_wall_s "
              "the three jobs' process walls; optimize_loop_s the update's training loop. TRL: generate_s is "
              "its _generate_and_score_completions (generation + old/ref logprobs + reward), optimize_loop_s "
              "the rest of train(), round_compute_s train(), round_wall_s the whole process.\n")
        print(C.markdown_table(grpo_rows))
        print()
    if profiles:
        for side, top in profiles.items():
            print(f"## py-spy, SFT {side}: share of samples per function (inclusive), top {len(top)}\n")
            print(C.markdown_table([{"function": f, "share": f"{s:.1%}"} for f, s in top]))
            print()
    path = C.write_results("train_vs_trl", {
        "trl_version": trl.__version__, "threads": T, "layouts": layouts, "sizes": size,
        "sft": sft_rows, "grpo": grpo_rows, "trl_sft_raw": trl_sft, "trl_grpo_raw": trl_grpo,
        "profiles": {k: [{"function": f, "share": s} for f, s in v] for k, v in profiles.items()},
    })
    print(f"results: {path}")


if __name__ == "__main__":
    main()
