"""update: one GRPO policy update on a round's scored rollouts; writes policy r+1.

Inputs   policy (checkpoint/ of round r), scored (score)
Output   checkpoint/   the updated policy
Metrics  loss, kl, clip_frac, ratio_dev_first, samples_used, groups_dropped, tokens_per_s

GRPO (Shao et al. 2024), every step visible here:
  1. advantage of each response = (reward - group mean) / (group std + eps), per prompt group;
  2. groups whose rewards are all equal carry no signal and are dropped (DAPO's dynamic sampling);
  3. for `epochs` passes over the samples in shuffled minibatches:
       ratio = exp(logp_new - logp_behaviour)          behaviour logprobs come from `generate`
       loss  = -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) + kl_coef * k3(pi || ref)
     averaged over each response's tokens, then over responses.
The first minibatch is on-policy, so its ratio must be 1: ratio_dev_first checks it.
"""

from __future__ import annotations

import time

import torch

from stages.common import runtime
from stages.common.engine import full_parameters, make_engine
from stages.common.losses import grpo_loss, group_advantages
from stages.common.models import load_causal_lm, load_tokenizer, pack_right, save_checkpoint, token_logprobs
from stages.common.rollouts import SCORED_SCHEMA, read_tables
from stages.common.runtime import BadInput, StageContext, log


def load_groups(ctx: StageContext, group_size: int) -> list[dict]:
    """Scored rows ordered by (prompt, sample), with their group-normalised advantage."""
    parts = [ctx.fetch("scored", f.path) for f in ctx.input("scored").files_under("scored")]
    rows = sorted(read_tables(parts, SCORED_SCHEMA).to_pylist(), key=lambda r: (r["prompt_id"], r["sample_idx"]))
    if not rows or len(rows) % group_size:
        raise BadInput(f"update: {len(rows)} scored rows is not a whole number of groups of {group_size}")
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
    advantages = group_advantages(rewards, group_size)
    for row, adv in zip(rows, advantages.tolist()):
        row["advantage"] = adv
    return rows


def padded(values: list[list[float]], prompt_lens: list[int], width: int) -> torch.Tensor:
    """Per-response-token values placed at their positions in the packed [prompt][response] rows."""
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, (v, p) in enumerate(zip(values, prompt_lens)):
        out[i, p : p + len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def run(ctx: StageContext) -> dict:
    rl = ctx.params["rl"]
    n = rl["samples_per_prompt"]
    rows = load_groups(ctx, n)
    groups = [rows[i : i + n] for i in range(0, len(rows), n)]
    kept = [g for g in groups if not (rl["drop_equal_reward_groups"] and len({r["reward"] for r in g}) == 1)]
    samples = [r for g in kept for r in g]

    policy_dir = ctx.fetch_dir("policy", "checkpoint")
    trust = ctx.params["model"]["trust_remote_code"]
    tokenizer = load_tokenizer(policy_dir, trust)
    model = load_causal_lm(policy_dir, trust)
    if rl["minibatch_size"] % ctx.world_size:
        raise BadInput(f"rl.minibatch_size={rl['minibatch_size']} is not divisible by {ctx.world_size} ranks")
    engine, _, _ = make_engine(model, ctx.params["engine"], lr=rl["lr"],
                               micro_batch=rl["minibatch_size"] // ctx.world_size, device=ctx.device)
    engine.train()

    gen = torch.Generator().manual_seed(ctx.params["seed"] * 7919 + ctx.params["round"])
    # Every rank needs at least one sample per minibatch; a round with no signal leaves the policy as it was.
    n_minibatches = max(1, len(samples) // rl["minibatch_size"]) if len(samples) >= ctx.world_size else 0
    stats_log, ratio_dev_first, tokens, started, step = [], None, 0, time.time(), 0
    for epoch in range(rl["epochs"] if n_minibatches else 0):
        order = torch.randperm(len(samples), generator=gen)
        for mb in torch.tensor_split(order, n_minibatches):
            mine = [samples[i] for i in mb[ctx.rank :: ctx.world_size].tolist()]
            prompt_lens = [len(r["prompt_token_ids"]) for r in mine]
            ids, attn, mask = pack_right([r["prompt_token_ids"] for r in mine], [r["response_token_ids"] for r in mine],
                                         tokenizer.pad_token_id)
            old_lp = padded([r["response_logprobs"] for r in mine], prompt_lens, ids.shape[1])
            ref_lp = padded([r["ref_logprobs"] for r in mine], prompt_lens, ids.shape[1])
            adv = torch.tensor([r["advantage"] for r in mine], dtype=torch.float32)
            logp = token_logprobs(engine, ids.to(ctx.device), attn.to(ctx.device), rl["temperature"])
            loss, stats = grpo_loss(logp, old_lp.to(ctx.device), ref_lp.to(ctx.device), adv.to(ctx.device),
                                    mask.to(ctx.device), rl["clip_eps"], rl["kl_coef"])
            if not torch.isfinite(loss):
                raise BadInput(f"update: loss is {loss.item()} at epoch {epoch} step {step}")
            engine.backward(loss)
            engine.step()
            tokens += int(mask.sum())
            step += 1
            stats = dict(zip(["loss", *stats], (v / ctx.world_size for v in ctx.all_reduce_sum([loss.item(), *stats.values()]))))
            if ratio_dev_first is None:
                ratio_dev_first = stats["ratio_dev"]
            stats_log.append(stats)
            ctx.log_metrics(stats, step=step)
    elapsed = time.time() - started

    with full_parameters(engine) as full_model:
        if ctx.is_main:
            save_checkpoint(full_model, tokenizer, ctx.out_path("checkpoint"))
            ctx.save_dir("checkpoint")
    mean = {k: sum(s[k] for s in stats_log) / len(stats_log) for k in stats_log[0]} if stats_log else {}
    total_tokens = ctx.all_reduce_sum([tokens])[0]
    if ctx.is_main:
        log(f"update round {ctx.params['round']}: {len(kept)}/{len(groups)} groups used, {step} steps, "
            + ", ".join(f"{k}={v:.4f}" for k, v in mean.items()) + f", first ratio dev {ratio_dev_first}")
    return {**mean, "ratio_dev_first": ratio_dev_first if ratio_dev_first is not None else 0.0,
            "samples_used": len(samples), "groups_dropped": len(groups) - len(kept), "optimizer_steps": step,
            "tokens_per_s": total_tokens / max(elapsed, 1e-9)}


if __name__ == "__main__":
    runtime.main(run)
