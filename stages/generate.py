"""generate: sample n responses per prompt from policy r, with per-token logprobs.

Inputs   policy (checkpoint/), data (rl_prompts.parquet)
Output   rollouts/part-{rank}.parquet   ROLLOUT_SCHEMA rows; reward is filled in by `score`
Metrics  num_samples, tokens_per_s, mean_response_tokens, stop_fraction

The round's prompts are a seeded draw, the same on every rank; each rank samples its
contiguous share and writes its own part file. Backends (`generate.backend`): `hf`
(transformers `generate`, KV cache, batched) or `vllm` (its own environment on CPU:
scripts/setup_vllm_cpu.sh); both give the same rows, with the processed (temperature)
logprobs the trainer recomputes.
"""

from __future__ import annotations

import random
import time

import pyarrow.parquet as pq

from stages.common import runtime
from stages.common.generation import generate_hf, pick_backend
from stages.common.models import encode_prompts, load_causal_lm, load_tokenizer
from stages.common.rollouts import write_table
from stages.common.runtime import BadInput, StageContext, log


def round_prompts(rows: list[dict], count: int, seed: int, round_idx: int) -> list[dict]:
    if not rows:
        raise BadInput("generate: rl_prompts.parquet is empty")
    rng = random.Random(f"{seed}-round-{round_idx}")
    return rng.sample(rows, count) if count <= len(rows) else [rng.choice(rows) for _ in range(count)]


def run(ctx: StageContext) -> dict:
    rl, gen_cfg = ctx.params["rl"], ctx.params["generate"]
    prompts = round_prompts(pq.read_table(ctx.fetch("data", "rl_prompts.parquet")).to_pylist(),
                            rl["prompts_per_round"], ctx.params["seed"], ctx.params["round"])
    backend = pick_backend(gen_cfg["backend"])
    tp = gen_cfg["tensor_parallel_size"]
    if backend == "vllm" and (ctx.device.type == "cpu" or tp > 1):
        # One engine for the job: on CPU two engines would pin the same core; with tensor
        # parallelism every rank runs the same requests and rank 0 keeps the rows.
        mine = prompts if ctx.is_main or tp > 1 else []
    else:
        mine = [prompts[i] for i in ctx.shard(len(prompts))]
    policy_dir = ctx.fetch_dir("policy", "checkpoint")
    trust = ctx.params["model"]["trust_remote_code"]
    tokenizer = load_tokenizer(policy_dir, trust)
    prompt_ids = encode_prompts(tokenizer, [p["prompt"] for p in mine])
    seed = ctx.params["seed"] * 100003 + ctx.params["round"] * 101 + ctx.rank

    started = time.time()
    if not mine:
        samples = []
    elif backend == "hf":
        model = load_causal_lm(policy_dir, trust).to(ctx.device)
        samples = generate_hf(model, tokenizer, prompt_ids, n=rl["samples_per_prompt"], temperature=rl["temperature"],
                              top_p=rl["top_p"], max_new_tokens=rl["max_new_tokens"], seed=seed,
                              batch_size=gen_cfg["batch_size"])
    else:
        from stages.common.vllm_generate import BadRequest, generate_vllm

        try:
            samples = generate_vllm(
                str(policy_dir), prompt_ids, n=rl["samples_per_prompt"], temperature=rl["temperature"],
                top_p=rl["top_p"], max_new_tokens=rl["max_new_tokens"], seed=seed,
                stop_token_ids=[tokenizer.eos_token_id], tensor_parallel_size=tp,
                distributed_executor_backend="external_launcher" if tp > 1 else None,
                dtype="bfloat16" if ctx.device.type == "cuda" else "float32")
        except BadRequest as err:
            raise BadInput(f"generate: {err}") from None
        if tp > 1 and not ctx.is_main:
            mine, prompt_ids, samples = [], [], []
    elapsed = time.time() - started

    policy_key = ctx.input("policy").manifest["key"]
    rows = [
        {
            "prompt_id": p["prompt_id"], "sample_idx": j, "prompt": p["prompt"], "response": s.text,
            "prompt_token_ids": ids, "response_token_ids": s.token_ids, "response_logprobs": s.logprobs,
            "reward": None, "reward_info": None, "finish_reason": s.finish_reason, "policy_key": policy_key,
        }
        for p, ids, group in zip(mine, prompt_ids, samples)
        for j, s in enumerate(group)
    ]
    if mine:
        part = f"rollouts/part-{ctx.rank:05d}.parquet"
        write_table(rows, ctx.out_path(part))
        ctx.save(part)

    n_rows, n_tokens, n_stop = ctx.all_reduce_sum(
        [len(rows), sum(len(r["response_token_ids"]) for r in rows), sum(r["finish_reason"] == "stop" for r in rows)])
    tokens_per_s = ctx.all_reduce_sum([sum(len(r["response_token_ids"]) for r in rows) / max(elapsed, 1e-9)])[0]
    if ctx.is_main:
        log(f"generate[{backend}] round {ctx.params['round']}: {n_rows} samples, {tokens_per_s:.0f} tok/s")
    return {"num_samples": n_rows, "tokens_per_s": tokens_per_s, "mean_response_tokens": n_tokens / max(n_rows, 1),
            "stop_fraction": n_stop / max(n_rows, 1), "generate_seconds": elapsed, "backend": backend}


if __name__ == "__main__":
    runtime.main(run)
