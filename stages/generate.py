"""generate: sample n responses per prompt from policy r, with per-token logprobs.

Inputs   policy (checkpoint/), data (rl_prompts.parquet)
Output   rollouts/part-{rank}-{chunk}.parquet   ROLLOUT_SCHEMA rows; reward is filled in by `score`
Metrics  num_samples, tokens_per_s, mean_response_tokens, stop_fraction

The round's prompts are a seeded draw, the same on every rank; each rank samples its
contiguous share and writes its own part file. Backends (`generate.backend`): `hf`
(transformers `generate`, KV cache, batched) or `vllm` (its own environment on CPU:
scripts/setup_vllm_cpu.sh); both give the same rows, with the processed (temperature)
logprobs the trainer recomputes.

Resumable by chunks: a rank samples its share `generate.chunk_prompts` prompts at a time and
uploads each chunk's part file when it is done, then records it (path, size, sha256) in
{output}/_resume/generate-rank{r}.json. A relaunched job skips the chunks recorded there whose
files still verify. Each hf chunk samples with its own seed, from (seed, round, rank, chunk), so
a resumed job writes the same rows as an uninterrupted one. vLLM starts an engine per call, so
its share is a single chunk (no resume inside the stage).
"""

from __future__ import annotations

import json
import posixpath
import random
import time

import pyarrow.parquet as pq

from stages.common import runtime, store
from stages.common.generation import generate_hf, pick_backend
from stages.common.models import encode_prompts, load_causal_lm, load_tokenizer
from stages.common.rollouts import write_table
from stages.common.params import GenerateParams
from stages.common.runtime import BadInput, StageContext, log


def round_prompts(rows: list[dict], count: int, seed: int, round_idx: int) -> list[dict]:
    if not rows:
        raise BadInput("generate: rl_prompts.parquet is empty")
    rng = random.Random(f"{seed}-round-{round_idx}")
    return rng.sample(rows, count) if count <= len(rows) else [rng.choice(rows) for _ in range(count)]


def chunk_seed(rank_seed: int, chunk: int) -> int:
    """The sampling seed of one chunk, from the rank's seed (seed, round, rank) and the chunk index:
    independent of which chunks a (resumed) job generates. Chunk 0 keeps the rank's seed, so a
    share that fits in one chunk samples as it did before chunking."""
    return rank_seed + chunk * 1_000_003


class ChunkLog:
    """This rank's completed chunks, {output}/_resume/generate-rank{r}.json, rewritten after each.
    A record from a job with another world size, chunk size or backend describes other chunks: ignored."""

    def __init__(self, ctx: StageContext, setup: dict):
        self.ctx, self.setup = ctx, setup
        self.uri = store.join(ctx.spec.output, "_resume", f"generate-rank{ctx.rank}.json")
        fs, path = store.filesystem(self.uri, ctx.spec.storage_options)
        record = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
        self.recorded = {c["path"]: c for c in record.get("chunks", [])} if record.get("setup") == setup else {}
        self.chunks: list[dict] = []

    def fetch_verified(self, relpath: str) -> bool:
        """Download a recorded chunk to its out_path; True when it matches its size and hash."""
        entry = self.recorded.get(relpath)
        if entry is None:
            return False
        fs, base = store.filesystem(self.ctx.spec.output, self.ctx.spec.storage_options)
        remote, local = posixpath.join(base, relpath), self.ctx.out_path(relpath)
        if not fs.exists(remote) or fs.size(remote) != entry["size"]:
            return False
        fs.get_file(remote, str(local))
        return store.sha256_file(local) == entry["sha256"]

    def add(self, relpath: str) -> None:
        local = self.ctx.out_path(relpath)
        self.chunks.append({"path": relpath, "size": local.stat().st_size, "sha256": store.sha256_file(local)})
        store.write_json(self.uri, {"setup": self.setup, "chunks": self.chunks}, self.ctx.spec.storage_options)


def run(ctx: StageContext[GenerateParams]) -> dict:
    p = ctx.params
    rl, gen_cfg = p.rl, p.generate
    prompts = round_prompts(pq.read_table(ctx.fetch("data", "rl_prompts.parquet")).to_pylist(),
                            rl.prompts_per_round, p.seed, p.round)
    backend = pick_backend(gen_cfg.backend)
    tp = gen_cfg.tensor_parallel_size
    if backend == "vllm" and (ctx.device.type == "cpu" or tp > 1):
        # One engine for the job: on CPU two engines would pin the same core; with tensor
        # parallelism every rank runs the same requests and rank 0 keeps the rows.
        mine = prompts if ctx.is_main or tp > 1 else []
    else:
        mine = [prompts[i] for i in ctx.shard(len(prompts))]
    keeps_rows = not (backend == "vllm" and tp > 1 and not ctx.is_main)
    policy_dir = ctx.fetch_dir("policy", "checkpoint")
    trust = p.model.trust_remote_code
    tokenizer = load_tokenizer(policy_dir, trust)
    seed = p.seed * 100003 + p.round * 101 + ctx.rank
    policy_key = ctx.input("policy").manifest["key"]

    size = gen_cfg.chunk_prompts if backend == "hf" else max(1, len(mine))
    chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
    parts = [f"rollouts/part-{ctx.rank:05d}-{c:05d}.parquet" for c in range(len(chunks))]
    done = ChunkLog(ctx, {"world_size": ctx.world_size, "chunk_prompts": size, "backend": backend})
    skip = [done.fetch_verified(part) for part in parts]
    if backend == "vllm" and tp > 1:  # the ranks run each request together: rank 0 decides
        skip = ctx.all_gather(skip)[0]

    model, elapsed, n_rows, n_tokens, n_stop, new_tokens = None, 0.0, 0, 0, 0, 0
    for c, (chunk, part) in enumerate(zip(chunks, parts)):
        if skip[c]:
            if keeps_rows:
                log(f"generate: chunk {c} ({part}) was completed by an earlier attempt: skipped")
                rows = pq.read_table(ctx.out_path(part)).to_pylist()
        else:
            started = time.time()
            prompt_ids = encode_prompts(tokenizer, [p["prompt"] for p in chunk])
            if backend == "hf":
                model = model or load_causal_lm(policy_dir, trust).to(ctx.device)
                samples = generate_hf(model, tokenizer, prompt_ids, n=rl.samples_per_prompt,
                                      temperature=rl.temperature, top_p=rl.top_p,
                                      max_new_tokens=rl.max_new_tokens,
                                      seed=chunk_seed(seed, c),
                                      batch_size=gen_cfg.batch_size)
            else:
                from stages.common.vllm_generate import BadRequest, generate_vllm

                try:
                    samples = generate_vllm(
                        str(policy_dir), prompt_ids, n=rl.samples_per_prompt, temperature=rl.temperature,
                        top_p=rl.top_p, max_new_tokens=rl.max_new_tokens, seed=seed,
                        stop_token_ids=[tokenizer.eos_token_id], tensor_parallel_size=tp,
                        distributed_executor_backend="external_launcher" if tp > 1 else None,
                        dtype="bfloat16" if ctx.device.type == "cuda" else "float32")
                except BadRequest as err:
                    raise BadInput(f"generate: {err}") from None
            elapsed += time.time() - started
            rows = [
                {
                    "prompt_id": p["prompt_id"], "sample_idx": j, "prompt": p["prompt"], "response": s.text,
                    "prompt_token_ids": ids, "response_token_ids": s.token_ids, "response_logprobs": s.logprobs,
                    "reward": None, "reward_info": None, "finish_reason": s.finish_reason, "policy_key": policy_key,
                }
                for p, ids, group in zip(chunk, prompt_ids, samples)
                for j, s in enumerate(group)
            ]
            if keeps_rows:
                write_table(rows, ctx.out_path(part))
        if not keeps_rows:
            continue
        ctx.save(part)  # uploaded as each chunk completes (again, unchanged, for a skipped one)
        if not skip[c]:
            done.add(part)
            time.sleep(ctx.spec.debug.get("pause_after_chunk_s", 0))  # for tests: a window to kill the job in
            new_tokens += sum(len(r["response_token_ids"]) for r in rows)
        n_rows += len(rows)
        n_tokens += sum(len(r["response_token_ids"]) for r in rows)
        n_stop += sum(r["finish_reason"] == "stop" for r in rows)

    n_rows, n_tokens, n_stop = ctx.all_reduce_sum([n_rows, n_tokens, n_stop])
    tokens_per_s = ctx.all_reduce_sum([new_tokens / max(elapsed, 1e-9)])[0]  # of the chunks generated here
    if ctx.is_main:
        log(f"generate[{backend}] round {p.round}: {n_rows} samples, {tokens_per_s:.0f} tok/s")
    return {"num_samples": n_rows, "tokens_per_s": tokens_per_s, "mean_response_tokens": n_tokens / max(n_rows, 1),
            "stop_fraction": n_stop / max(n_rows, 1), "generate_seconds": elapsed, "backend": backend}


if __name__ == "__main__":
    runtime.main(run, GenerateParams)
