"""dpo: Direct Preference Optimization on the preference pairs, the SFT model as the reference.

Inputs   data (pairs.parquet), sft (checkpoint/)
Output   checkpoint/   the policy, a Hugging Face directory, safetensors, with the tokenizer
Metrics  loss, reward_accuracy, margin (train, last window); eval_reward_accuracy, eval_margin
         (held-out pairs: how often the chosen response gets the larger implicit reward)

The reference log-probabilities are computed once per pair, before the first step, with the
SFT model that the policy starts from: no reference model is kept for the steps. A killed job
resumes from {output}/_resume/ and computes them again from the same SFT checkpoint.

`dpo.loss`: "sigmoid" (DPO) sums a response's token log-probabilities, "ipo" averages them.
"""

from __future__ import annotations

import random
import time

import pyarrow.parquet as pq
import torch

from stages.common import runtime
from stages.common.engine import full_parameters, make_engine
from stages.common.losses import dpo_loss, sequence_logps
from stages.common.adapters import fetch_checkpoint, load_policy
from stages.common.models import (load_causal_lm, load_tokenizer, pack_right,
                                  save_checkpoint, token_logprobs)
from stages.common.params import DPOParams
from stages.common.resume import Resumer, Trained
from stages.common.runtime import BadInput, StageContext, log


def pair_logps(model, tokenizer, rows: list[dict], device, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(chosen | prompt) and log p(rejected | prompt) [pairs], in one forward pass."""
    prompts = [r["prompt_ids"] for r in rows]
    responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    ids, attn, mask = pack_right(prompts + prompts, responses, tokenizer.pad_token_id)
    logps = sequence_logps(token_logprobs(model, ids.to(device), attn.to(device)), mask.to(device), average)
    return logps[: len(rows)], logps[len(rows):]


def reference_logps(ctx: StageContext, model, tokenizer, pairs: list[dict], average: bool) -> torch.Tensor:
    """[pairs, 2] (chosen, rejected) under `model`; each rank scores its shard, every rank gets all."""
    mine = [pairs[i] for i in ctx.shard(len(pairs))]
    out: list[list[float]] = []
    with torch.no_grad():
        for i in range(0, len(mine), 256):
            chosen, rejected = pair_logps(model, tokenizer, mine[i:i + 256], ctx.device, average)
            out += torch.stack([chosen, rejected], -1).tolist()
    return torch.tensor([row for part in ctx.all_gather(out) for row in part])


def run(ctx: StageContext[DPOParams]) -> dict:
    p, cfg = ctx.params, ctx.params.dpo
    pairs = pq.read_table(ctx.fetch("data", "pairs.parquet")).to_pylist()
    if len(pairs) < 10:
        raise BadInput(f"dpo: pairs.parquet has {len(pairs)} rows, need at least 10")
    if same := [i for i, r in enumerate(pairs) if r["chosen"] == r["rejected"]]:
        raise BadInput(f"dpo: pairs.parquet row {same[0]} has chosen equal to rejected ({len(same)} such rows)")
    random.Random(p.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.eval_fraction))
    average = cfg.loss == "ipo"

    sft = fetch_checkpoint(ctx, "sft")  # a LoRA SFT is merged into its base: DPO trains full weights
    trust = p.model.trust_remote_code
    tokenizer = load_tokenizer(sft.dir, trust)
    model = load_policy(sft, trust).requires_grad_(True).to(ctx.device).eval()
    reference = reference_logps(ctx, model, tokenizer, pairs, average)  # the SFT model, before any step
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    eval_ref, train_ref = reference[:n_eval], reference[n_eval:]

    resumer = Resumer(ctx, cfg.save_every, cfg.steps)
    if (resume_dir := resumer.model_dir()) is not None:  # a killed attempt left resume state
        model = load_causal_lm(resume_dir, trust)
    if cfg.batch_size % ctx.world_size:
        raise BadInput(f"dpo.batch_size={cfg.batch_size} is not divisible by {ctx.world_size} ranks")
    micro = cfg.batch_size // ctx.world_size
    engine, _, scheduler = make_engine(model, p.engine, lr=cfg.lr, micro_batch=micro,
                                       warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, device=ctx.device)
    engine.train()
    gen = torch.Generator().manual_seed(p.seed)
    trained = {"model": Trained(engine, scheduler, lambda m, d: save_checkpoint(m, tokenizer, d))}
    start_step = resumer.restore(trained, gen)
    ctx.first_step()
    started, sums, last = time.time(), [0.0, 0.0, 0.0], {}
    for step in range(start_step, cfg.steps):
        batch = torch.randint(len(train_pairs), (cfg.batch_size,), generator=gen)
        mine = batch[ctx.rank * micro : (ctx.rank + 1) * micro]
        chosen, rejected = pair_logps(engine, tokenizer, [train_pairs[i] for i in mine.tolist()], ctx.device, average)
        ref = train_ref[mine].to(ctx.device)
        loss, margins = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], cfg.beta, cfg.loss)
        if not torch.isfinite(loss):
            raise BadInput(f"dpo: loss is {loss.item()} at step {step}")
        engine.backward(loss)
        engine.step()
        for j, v in enumerate((loss.item(), (margins > 0).float().mean().item(), margins.mean().item())):
            sums[j] += v
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            window = min(cfg.log_every, step + 1 - start_step)
            means = [v / ctx.world_size / window for v in ctx.all_reduce_sum(sums)]
            last = dict(zip(("loss", "reward_accuracy", "margin"), means))
            ctx.log_metrics(last, step=step + 1)
            if ctx.is_main:
                log(f"dpo step {step + 1}/{cfg.steps} loss {means[0]:.4f} reward accuracy {means[1]:.3f}")
            sums = [0.0, 0.0, 0.0]
        resumer.maybe_save(step + 1, trained, gen)

    engine.eval()
    idx = list(ctx.shard(len(eval_pairs)))
    right, margin_sum = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(idx), 256):
            part = idx[i:i + 256]
            chosen, rejected = pair_logps(engine, tokenizer, [eval_pairs[j] for j in part], ctx.device, average)
            _, margins = dpo_loss(chosen, rejected, eval_ref[part, 0].to(ctx.device), eval_ref[part, 1].to(ctx.device),
                                  cfg.beta, cfg.loss)
            right += (margins > 0).sum().item()
            margin_sum += margins.sum().item()
    right, margin_sum = ctx.all_reduce_sum([right, margin_sum])
    with full_parameters(engine) as full_model:
        if ctx.is_main:
            save_checkpoint(full_model, tokenizer, ctx.out_path("checkpoint"))
            ctx.save_dir("checkpoint")
    return {**last, "eval_reward_accuracy": right / n_eval, "eval_margin": margin_sum / n_eval,
            "train_seconds": time.time() - started}


if __name__ == "__main__":
    runtime.main(run, DPOParams)
