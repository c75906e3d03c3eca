"""Benchmark: training throughput against TRL, same model, data, batch, sequence length and threads.

    bench/setup_bench_env.sh                                  # once: .venv-bench with TRL + the project
    .venv-bench/bin/python bench/train_vs_trl.py              # full size (configs/tiny.yaml sizes)
    .venv-bench/bin/python bench/train_vs_trl.py --small      # smoke test, ~2 minutes
    .venv-bench/bin/python bench/train_vs_trl.py --profile    # + py-spy profiles of both SFT sides
    .venv-bench/bin/python bench/train_vs_trl.py --skip-sft --grpo-settings 25m   # only the 25M GRPO round

Two comparisons, each at every layout of `--layouts` (RANKSxTHREADS; the total thread count
is the same for both sides, TRL always runs 1 process with all of them):

SFT    our `sft` stage as a real job (spec -> `torchrun -m stages.sft` through
       tasks.launch.run_job; DeepSpeed ZeRO from the config over several ranks, plain torch in one
       process, fp32) against TRL's SFTTrainer
       (plain torch on CPU) on the tiny Llama (build_tiny_model, the data_prep tokenizer), the
       same sft.parquet from our data_prep job, pre-tokenized the same way (BOS + prompt +
       response + EOS, loss on the response + EOS; the script checks that TRL's first collated
       batch equals ours), the same work: the same rows in the same order (our stage's seeded
       draw, read by TRL sequentially), batch size, steps, AdamW(0.9, 0.95) and lr schedule
       (stages/common/engine.py: linear_warmup, given to TRL as its optimizer/scheduler) and
       clipping. Throughput = non-pad tokens / s of the training loop (both sides count
       attention_mask.sum(), prompt tokens included); the job's and the TRL process's wall
       times (start-up, imports, model build, saving) are shown beside it.
       Quality, one function for both checkpoints: greedy exact-match accuracy on our
       eval.parquet (stages/common/verifier.py), the response-token loss on a fixed batch of
       demonstrations and on the held-out prompts; both training-loss curves at the same steps,
       and the data's noise floor. The final loss of one run is not a measure of the trainer:
       the tiny model learns the addition in a sudden drop whose step moves by 100+ steps with
       float rounding alone (same math, other kernels), see bench/README.md.

GRPO   one RL round from an SFT checkpoint (bench/grpo_vs_trl.py): our `generate` + `score` +
       `update` jobs against TRL's GRPOTrainer with transformers generation, on the same prompts
       (the round's seeded draw), samples per prompt, max_new_tokens, temperature, minibatch,
       epochs (TRL's num_iterations), lr, clip and KL coefficient (k3 KL to the SFT reference,
       loss_type="grpo" = our seq_mean_token_mean). Ours keeps all groups
       (rl.drop_equal_reward_groups=false) so both train on the same number of samples.
       Throughput = sampled completion tokens / s of the whole round (generation, scoring,
       optimisation); also the optimisation phase alone (trained completion tokens / s).
       Two settings (`--grpo-settings`, default both): `tiny`, the SFT comparison's 1M model and
       policy, 256 prompts x 8, 6 new tokens; `25m`, a 25.3M-param tiny Llama (hidden 512, 8
       layers) with its own 30-step SFT job as the policy, 32 prompts x 8, exactly 64 new tokens
       (a minimum of 64 on both sides: rl.min_new_tokens, TRL's generation_kwargs).

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
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import grpo_vs_trl as G  # noqa: E402

FULL = {"num_sft": 20000, "sft_steps": 600, "sft_batch": 64, "rm_steps": 20}
SMALL = {"num_sft": 2000, "sft_steps": 30, "sft_batch": 64, "rm_steps": 5}


# --- TRL side (run in a child process: its own threads, imports and memory) ------------------

def sft_draws(n_rows: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """The rows of each step's global batch, drawn exactly as stages/sft.py draws them."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(n_rows, (batch,), generator=gen).tolist() for _ in range(steps)]


def trl_sft_worker(a: dict) -> dict:
    t_process = time.perf_counter()
    C.set_threads(a["threads"])
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stages.common.engine import linear_warmup
    from stages.common.models import (build_tiny_model, encode_prompts, encode_responses, load_tokenizer,
                                      pack_right)
    from stages.common.sections import TinyModelConfig

    t_imports = time.perf_counter() - t_process
    table = pq.read_table(a["sft_parquet"]).to_pylist()
    tokenizer = load_tokenizer(a["tokenizer"])
    model = build_tiny_model(TinyModelConfig(**a["tiny"]), tokenizer, seed=a["seed"])
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in table])
    responses = encode_responses(tokenizer, [r["response"] for r in table])
    # Same rows in the same order as our stage (its seeded draw with replacement), read sequentially.
    draws = sft_draws(len(table), a["steps"], a["batch"], a["seed"])
    order = [i for step in draws for i in step]
    dataset = Dataset.from_dict({
        "input_ids": [prompts[i] + responses[i] for i in order],
        "completion_mask": [[0] * len(prompts[i]) + [1] * len(responses[i]) for i in order],
    })

    Clock = C.train_clock()

    # Our optimizer and schedule, not TRL's defaults: AdamW(0.9, 0.95) and stages/common/engine.py's
    # linear_warmup (warmup, then linear decay to 10%; TRL's "linear" starts at lr 0 and decays to 0).
    optimizer = torch.optim.AdamW(model.parameters(), lr=a["lr"], weight_decay=0.0, betas=(0.9, 0.95))
    scheduler = linear_warmup(optimizer, a["warmup"], a["steps"])
    args = SFTConfig(
        output_dir=a["out"], per_device_train_batch_size=a["batch"], max_steps=a["steps"],
        train_sampling_strategy="sequential", max_grad_norm=1.0, logging_steps=a["log_every"], save_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=0, seed=a["seed"], completion_only_loss=True,
        max_length=None, disable_tqdm=True, bf16=False, fp16=False,
        gradient_checkpointing=a["gradient_checkpointing"],
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         optimizers=(optimizer, scheduler), callbacks=[Clock()])
    # What TRL trains on: its first collated batch against the tensors our stage builds for the same rows.
    first = next(iter(trainer.get_train_dataloader()))
    ids, attn, resp_mask = pack_right([prompts[i] for i in draws[0]], [responses[i] for i in draws[0]],
                                      tokenizer.pad_token_id)
    ours_labels = ids.masked_fill(resp_mask == 0, -100)
    collated = {"input_ids_equal": torch.equal(first["input_ids"].cpu(), ids),
                "attention_mask_equal": torch.equal(first["attention_mask"].cpu(), attn),
                "labels_equal": torch.equal(first["labels"].cpu(), ours_labels),
                "row0": {k: first[k][0].tolist() for k in ("input_ids", "attention_mask", "labels")},
                "row0_tokens": tokenizer.convert_ids_to_tokens(first["input_ids"][0].tolist())}
    out = trainer.train()
    train_s = Clock.end - Clock.begin
    tokens = int(trainer._total_train_tokens)
    curve = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    trainer.save_model(str(Path(a["out"]) / "final"))
    return {"train_seconds": train_s, "tokens": tokens, "tokens_per_s": tokens / train_s,
            "loss": curve[max(curve)] if curve else out.training_loss, "mean_loss": out.training_loss,
            "curve": curve, "collated": collated, "checkpoint": str(Path(a["out"]) / "final"),
            "imports_s": t_imports, "threads": torch.get_num_threads(),
            "num_params": sum(p.numel() for p in model.parameters())}


def heldout_worker(a: dict) -> dict:
    """One function for every checkpoint: greedy exact-match accuracy on eval.parquet (as the evaluate
    stage), and the response-token mean loss on a fixed batch of demonstrations (the training loss's
    quantity) and on the held-out prompts with their correct answers."""
    C.set_threads(a["threads"])
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from stages.common.generation import HFBackend, Request
    from stages.common.models import encode_prompts, encode_responses, pack_right
    from stages.common.verifier import VERIFIERS

    eval_rows = pq.read_table(a["eval_parquet"]).to_pylist()
    demos = pq.read_table(a["sft_parquet"]).to_pylist()[: a["fixed_rows"]]

    @torch.no_grad()
    def response_loss(model, tokenizer, prompts: list[str], responses: list[str]) -> float:
        ids, attn, mask = pack_right(encode_prompts(tokenizer, prompts), encode_responses(tokenizer, responses),
                                     tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return float((nll * mask[:, 1:]).sum() / mask[:, 1:].sum())

    results = {}
    for name, ckpt in a["checkpoints"].items():
        backend = HFBackend(ckpt)  # the evaluate stage's greedy decoding
        tokenizer, model = backend.tokenizer, backend.model
        samples = backend.generate(Request(encode_prompts(tokenizer, [r["prompt"] for r in eval_rows]), n=1,
                                           temperature=1.0, top_p=1.0, max_new_tokens=a["max_new_tokens"], seed=0,
                                           greedy=True))
        correct = [VERIFIERS["exact"](s[0].text, r["answer"]) for s, r in zip(samples, eval_rows)]
        results[name] = {
            "heldout_accuracy": sum(correct) / len(correct),
            "fixed_batch_loss": response_loss(model, tokenizer, [r["prompt"] for r in demos],
                                              [r["response"] for r in demos]),
            "heldout_loss": response_loss(model, tokenizer, [r["prompt"] for r in eval_rows],
                                          [r["answer"] for r in eval_rows]),
        }
    return results


def noise_floor(rows: list[dict]) -> dict:
    """The synthetic task's irreducible SFT loss: the demonstrator drops the units carry with
    probability p in carry cases, so a model that has learnt it exactly still pays the entropy H(p)
    per carry demonstration, spread over the response's tokens (3 digits + EOS). Greedy decoding of
    that model answers the dropped carry whenever p > 0.5: every carry prompt wrong."""
    import math

    carry = [int(r["prompt"][1]) + int(r["prompt"][4]) >= 10 for r in rows]
    n_carry = sum(carry)
    p = sum(c and not r["correct"] for c, r in zip(carry, rows)) / max(1, n_carry)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0
    tokens = sum(len(r["response"]) + 1 for r in rows)
    return {"p_drop": p, "carry_fraction": n_carry / len(rows), "loss_floor": n_carry * h / tokens}


def run_worker(mode: str, args: dict, profile_to: Path | None = None) -> dict:
    return C.run_worker(Path(__file__), mode, args, profile_to)


# --- our side -------------------------------------------------------------------------------

def our_curve(log: list[str]) -> dict[int, float]:
    """{step: loss} from the stage's `sft step N/M loss X` lines (the mean over each log window)."""
    curve = {}
    for line in log:
        if "sft step " in line:
            words = line[line.index("sft step "):].split()
            curve[int(words[2].split("/")[0])] = float(words[4])
    return curve


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
    if "--_worker" in sys.argv:  # a peer's side, in its own process (run_worker)
        C.worker_main({"trl_sft": trl_sft_worker, "heldout": heldout_worker})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="smoke-test sizes")
    parser.add_argument("--layouts", default=None,
                        help="our RANKSxTHREADS layouts, comma-separated (default: 1xT and, when T>=2, 2x(T/2))")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="total threads per side")
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--skip-grpo", action="store_true")
    parser.add_argument("--grpo-settings", default=",".join(G.SETTINGS),
                        help=f"GRPO settings to run, comma-separated, of {', '.join(G.SETTINGS)} "
                             "(bench/grpo_vs_trl.py; default all)")
    parser.add_argument("--skip-sft", action="store_true")
    parser.add_argument("--drop-equal-groups", action="store_true",
                        help="our default dynamic sampling (fewer samples trained than TRL)")
    parser.add_argument("--profile", action="store_true", help="py-spy both SFT sides (first layout)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL's own default (recomputes activations: ~20%% more compute); off by default, as ours")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    try:
        import pyarrow.parquet as pq
        import trl
    except ImportError:
        sys.exit("TRL is not installed in this environment: run bench/setup_bench_env.sh, then "
                 ".venv-bench/bin/python bench/train_vs_trl.py")

    size = dict(SMALL if args.small else FULL)
    if args.sft_steps:
        size["sft_steps"] = args.sft_steps
    chosen = args.grpo_settings.split(",")
    unknown = [name for name in chosen if name not in G.SETTINGS]
    if unknown:
        sys.exit(f"--grpo-settings: unknown {', '.join(unknown)}; known: {', '.join(G.SETTINGS)}")
    settings = {} if args.skip_grpo else {name: (G.SMALL_SETTINGS if args.small else G.SETTINGS)[name]
                                          for name in chosen}
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
    }
    cfg = C.pipeline_config(overrides, workdir / "store", "bench-data")
    c = cfg.model_dump(mode="json")
    # One pipeline name per layout: same params -> same key, and a layout must not overwrite another's output.
    layout_cfg = {lay: C.pipeline_config(overrides, workdir / "store", f"bench-{lay}") for lay in layouts}
    data = C.run_stage_job("data_prep", cfg, {}, nproc=1, threads=T)
    data_dir = workdir / "data"
    sft_parquet = C.store_download(data, "sft.parquet", data_dir)
    tok_dir = C.fetch_checkpoint(data, data_dir, "tokenizer")

    sft_rows, profiles = [], {}
    curves: dict[str, dict[int, float]] = {}  # side -> {step: mean training loss of the log window ending there}
    sft_jobs: dict[str, C.JobResult] = {}
    for i, lay in enumerate(layouts):
        ranks, threads = map(int, lay.split("x"))
        profile = args.profile and i == 0
        if not args.skip_sft or any(s.own_policy is None for s in settings.values()):
            wrap = C.py_spy_command(C.RESULTS / "pyspy-sft-ours.txt", subprocesses=True) if profile and not args.skip_sft else None
            job = C.run_stage_job("sft", layout_cfg[lay], {"data": data}, nproc=ranks, threads=threads, wrap=wrap)
            sft_jobs[lay] = job
            m = job.metrics
            sft_rows.append({"side": f"alignflow sft ({ranks} rank{'s' * (ranks > 1)} x {threads} thr, "
                                     f"{C.engine_name(ranks, c['engine']['zero_stage'])})",
                             "steps": size["sft_steps"], "batch": size["sft_batch"],
                             "tokens": round(m["tokens_per_s"] * m["train_seconds"]),
                             "train_s": m["train_seconds"], "tokens/s": m["tokens_per_s"],
                             "process_wall_s": job.wall_s, "final_loss": m["loss"]})
            curves[f"ours {lay}"] = our_curve(job.log)
            print(f"  ours sft {lay}: {m['tokens_per_s']:.0f} tok/s, loop {m['train_seconds']:.1f}s, "
                  f"job {job.wall_s:.1f}s", flush=True)
    trl_sft, floor = None, None
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
        curves["TRL"] = {int(k): v for k, v in trl_sft["curve"].items()}
        ckpts = {lay: str(C.fetch_checkpoint(job, workdir / f"sft-{lay}")) for lay, job in sft_jobs.items()}
        heldout = run_worker("heldout", {"threads": T, "checkpoints": {**ckpts, "TRL": trl_sft["checkpoint"]},
                                         "eval_parquet": str(C.store_download(data, "eval.parquet", data_dir)),
                                         "sft_parquet": str(sft_parquet), "fixed_rows": 1024,
                                         "max_new_tokens": c["evaluate"]["max_new_tokens"]})
        for row, name in zip(sft_rows, [*layouts, "TRL"]):
            row.update(heldout[name])
        floor = noise_floor(pq.read_table(sft_parquet).to_pylist())
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

    grpo = {}
    for name, setting in settings.items():
        grpo[name] = G.compare_setting(
            name, setting, base_overrides=overrides, layouts=layouts, threads=T, workdir=workdir, data=data,
            # every layout starts from the same policy: the first layout's SFT
            policy=sft_jobs[layouts[0]] if setting.own_policy is None else None,
            drop_equal_groups=bool(args.drop_equal_groups), trl_gradient_checkpointing=args.trl_gradient_checkpointing)

    print()
    if sft_rows and trl_sft:
        print("## SFT throughput (tokens/s of the training loop; ratio > 1: alignflow faster)\n")
        print(C.markdown_table(sft_rows))
        print(f"\nfinal_loss: the training loss (response tokens + EOS, token mean) averaged over the last "
              f"{c['sft']['log_every']} steps, both sides; fixed_batch_loss: the same quantity, one plain function, "
              f"on the first 1024 demonstrations; heldout_loss: on the {len(pq.read_table(data_dir / 'eval.parquet'))} "
              f"held-out prompts with their correct answers; heldout_accuracy: greedy exact match on them.")
        print(f"Noise floor of the training loss: {floor['loss_floor']:.4f} (the demonstrator drops the carry in "
              f"{floor['p_drop']:.1%} of the {floor['carry_fraction']:.1%} carry cases); greedy accuracy of a model "
              f"that imitates it exactly: ~{1 - floor['carry_fraction']:.1%}.")
        col = trl_sft["collated"]
        print(f"TRL's first collated batch equals ours for the same rows: input_ids {col['input_ids_equal']}, "
              f"attention_mask {col['attention_mask_equal']}, labels {col['labels_equal']}; row 0 "
              f"{col['row0_tokens']} labels {col['row0']['labels']}\n")
        print("## SFT training loss, both sides at the same steps (mean of each log window)\n")
        steps = sorted(set.intersection(*(set(v) for v in curves.values())))
        print(C.markdown_table([{"step": s, **{side: v[s] for side, v in curves.items()}} for s in steps]))
        print()
    if grpo:
        print(G.TABLE_NOTE)
        for name, result in grpo.items():
            G.print_setting(name, result)
    if profiles:
        for side, top in profiles.items():
            print(f"## py-spy, SFT {side}: share of samples per function (inclusive), top {len(top)}\n")
            print(C.markdown_table([{"function": f, "share": f"{s:.1%}"} for f, s in top]))
            print()
    path = C.write_results("train_vs_trl", {
        "trl_version": trl.__version__, "threads": T, "layouts": layouts, "sizes": size,
        "sft": sft_rows, "sft_curves": curves, "sft_noise_floor": floor, "grpo": grpo, "trl_sft_raw": trl_sft,
        "profiles": {k: [{"function": f, "share": s} for f, s in v] for k, v in profiles.items()},
    })
    print(f"results: {path}")


if __name__ == "__main__":
    main()
