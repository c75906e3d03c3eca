"""generate: sample n responses per prompt from policy r, with per-token logprobs.

Inputs   policy (checkpoint/), data (rl_prompts.parquet)
Output   rollouts/part-{rank}-{chunk}.parquet   ROLLOUT_SCHEMA rows; reward is filled in by `score`
Metrics  num_samples, tokens_per_s, mean_response_tokens, stop_fraction

The round's prompts are a seeded draw, the same on every rank; the backend (`generate.backend`,
stages/common/generation.py) decides which of them each rank samples and which ranks write rows.
Resumable by chunks: each is uploaded when done and recorded in {output}/_resume/generate-rank{r}.json;
a relaunch skips the recorded chunks whose files verify. A chunk's seed is from (seed, round, rank,
chunk), so a resumed job writes the same rows as an uninterrupted one.
"""

from __future__ import annotations

import random
import time
from contextlib import closing

import pyarrow.parquet as pq

from stages.common import runtime, store
from stages.common.adapters import fetch_checkpoint
from stages.common.generation import Backend, BadRequest, Request, make_backend
from stages.common.models import load_tokenizer
from stages.common.params import GenerateParams
from stages.common.rollouts import write_table
from stages.common.runtime import BadInput, StageContext, log


def round_prompts(rows: list[dict], count: int, seed: int, round_idx: int) -> list[dict]:
    if not rows:
        raise BadInput("generate: rl_prompts.parquet is empty")
    rng = random.Random(f"{seed}-round-{round_idx}")
    return rng.sample(rows, count) if count <= len(rows) else [rng.choice(rows) for _ in range(count)]


def chunk_seed(rank_seed: int, chunk: int) -> int:
    """The seed of one chunk: independent of which chunks a (resumed) job generates. Chunk 0 keeps
    the rank's seed, so a share that fits in one chunk samples as it did before chunking."""
    return rank_seed + chunk * 1_000_003


class ChunkLog:
    """This rank's completed chunks, {output}/_resume/generate-rank{r}.json, rewritten after each.
    A record from a job with another world size, chunk size or backend describes other chunks: ignored."""

    def __init__(self, ctx: StageContext, setup: dict):
        self.ctx, self.setup = ctx, setup
        self.chunks: list[dict] = []
        self.uri = store.join(ctx.spec.output, "_resume", f"generate-rank{ctx.rank}.json")
        fs, path = store.filesystem(self.uri, ctx.spec.storage_options)
        record = store.read_json(self.uri, ctx.spec.storage_options) if fs.exists(path) else {}
        same_setup = record.get("setup") == setup
        self.recorded = {c["path"]: store.FileEntry(**c) for c in record.get("chunks", []) if same_setup}

    def fetch_verified(self, relpath: str) -> bool:
        """Download a recorded chunk to its out_path; True when it matches its size and hash."""
        fs, base = store.filesystem(self.ctx.spec.output, self.ctx.spec.storage_options)
        remote, local = f"{base}/{relpath}", str(self.ctx.out_path(relpath))
        if relpath not in self.recorded or not fs.exists(remote):
            return False
        fs.get_file(remote, local)
        try:
            store.check_file(store.LOCAL_FS, local, self.recorded[relpath], store.join(self.ctx.spec.output, relpath))
        except store.ArtifactError as err:
            log(f"generate: {err}: sampling the chunk again")
            return False
        return True

    def add(self, relpath: str) -> None:
        local = self.ctx.out_path(relpath)
        self.chunks.append({"path": relpath, "size": local.stat().st_size, "sha256": store.sha256_file(local)})
        store.write_json(self.uri, {"setup": self.setup, "chunks": self.chunks}, self.ctx.spec.storage_options)


def sample_rows(backend: Backend, tokenizer, prompts: list[dict], p: GenerateParams, seed: int, policy: str):
    prompt_ids = [r["prompt_ids"] for r in prompts]  # rendered by data_prep (stages/common/chat.py)
    try:
        groups = backend.generate(Request(prompt_ids, n=p.rl.samples_per_prompt, temperature=p.rl.temperature,
                                          top_p=p.rl.top_p, max_new_tokens=p.rl.max_new_tokens, seed=seed,
                                          stop_token_ids=[tokenizer.eos_token_id],
                                          min_new_tokens=p.rl.min_new_tokens))
    except BadRequest as err:
        raise BadInput(f"generate: {err}") from None
    return [{"prompt_id": r["prompt_id"], "sample_idx": j, "prompt": r["prompt"], "response": s.text,
             "prompt_token_ids": ids, "response_token_ids": s.token_ids, "response_logprobs": s.logprobs,
             "reward": None, "reward_info": None, "finish_reason": s.finish_reason, "policy_key": policy}
            for r, ids, group in zip(prompts, prompt_ids, groups) for j, s in enumerate(group)]


def run(ctx: StageContext[GenerateParams]) -> dict:
    p = ctx.params
    prompts = round_prompts(pq.read_table(ctx.fetch("data", "rl_prompts.parquet")).to_pylist(),
                            p.rl.prompts_per_round, p.seed, p.round)
    policy = fetch_checkpoint(ctx, "policy")  # a LoRA policy: its adapter and the base it names
    tokenizer = load_tokenizer(policy.dir, p.model.trust_remote_code)
    policy_key = ctx.input("policy").manifest["key"]
    with closing(make_backend(p.generate, policy, ctx.device, p.model.trust_remote_code, ctx.workdir)) as backend:
        shard = backend.shard(ctx, len(prompts))
        # Ranks that run each request together must sample alike: they all take rank 0's seed.
        rank_seed = p.seed * 100003 + p.round * 101 + (0 if shard.lockstep else ctx.rank)
        chunks = [[prompts[i] for i in idx] for idx in shard.chunks()]  # vLLM: one (its engine starts once)
        parts = [f"rollouts/part-{ctx.rank:05d}-{c:05d}.parquet" for c in range(len(chunks))]
        done = ChunkLog(ctx, {"world_size": ctx.world_size, "chunk_prompts": shard.chunk, "backend": backend.name})
        skip = [done.fetch_verified(part) for part in parts]
        if shard.lockstep:  # the ranks run each request together: rank 0 (which writes) decides
            skip = ctx.all_gather(skip)[0]

        ctx.first_step()
        elapsed, new_tokens, n_rows, n_tokens, n_stop = 0.0, 0, 0, 0, 0
        for c, (chunk, part) in enumerate(zip(chunks, parts)):
            if not skip[c]:
                started = time.time()
                rows = sample_rows(backend, tokenizer, chunk, p, chunk_seed(rank_seed, c), policy_key)
                elapsed += time.time() - started
            if not shard.writes:
                continue  # it ran the request with rank 0, which writes the rows
            if skip[c]:
                log(f"generate: chunk {c} ({part}) was completed by an earlier attempt: skipped")
                rows = pq.read_table(ctx.out_path(part)).to_pylist()
            else:
                write_table(rows, ctx.out_path(part))
            ctx.save(part)  # uploaded as each chunk completes (again, unchanged, for a skipped one)
            tokens = sum(len(r["response_token_ids"]) for r in rows)
            if not skip[c]:
                done.add(part)
                time.sleep(ctx.spec.debug.get("pause_after_chunk_s", 0))  # for tests: a window to kill the job in
                new_tokens += tokens
            n_rows += len(rows)
            n_tokens += tokens
            n_stop += sum(r["finish_reason"] == "stop" for r in rows)

    n_rows, n_tokens, n_stop = (int(x) for x in ctx.all_reduce_sum([n_rows, n_tokens, n_stop]))
    tokens_per_s = ctx.all_reduce_sum([new_tokens / max(elapsed, 1e-9)])[0]  # of the chunks generated here
    if ctx.is_main:
        log(f"generate[{backend.name}] round {p.round}: {n_rows} samples, {tokens_per_s:.0f} tok/s")
    return {"num_samples": n_rows, "tokens_per_s": tokens_per_s, "mean_response_tokens": n_tokens / max(n_rows, 1),
            "stop_fraction": n_stop / max(n_rows, 1), "generate_seconds": elapsed, "backend": backend.name}


if __name__ == "__main__":
    runtime.main(run, GenerateParams)
