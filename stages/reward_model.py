"""reward_model: a scalar reward head on the SFT model, trained with the Bradley-Terry loss.

Inputs   data (pairs.parquet), sft (checkpoint/)
Output   checkpoint/   sequence-classification model (1 label), safetensors
Metrics  loss, train_accuracy, eval_accuracy (held-out pairs where r_chosen > r_rejected)

Initialised from the SFT weights: from scratch it learns nothing on the tiny task. The
reward is read at the last non-pad token, the EOS that ends the response.
"""

from __future__ import annotations

import random
import time

import pyarrow.parquet as pq
import torch

from stages.common import runtime
from stages.common.adapters import (Checkpoint, add_adapter, artifact_ref, fetch_checkpoint, load_frozen_base,
                                    load_reward, save_adapter, trainable_adapter)
from stages.common.engine import full_parameters, make_engine
from stages.common.losses import bradley_terry_loss
from stages.common.resume import Resumer, Trained
from stages.common.models import load_reward_model, load_tokenizer, pack_right, save_checkpoint
from stages.common.params import RewardModelParams
from stages.common.runtime import BadInput, StageContext, log


def pair_rewards(model, tokenizer, rows: list[dict], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected responses, in one forward pass."""
    prompts = [r["prompt_ids"] for r in rows]  # rendered by data_prep: the whole conversation is scored
    responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    ids, attn, _ = pack_right(prompts + prompts, responses, tokenizer.pad_token_id)
    rewards = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.squeeze(-1).float()
    return rewards[: len(rows)], rewards[len(rows):]


def model_to_train(ctx: StageContext[RewardModelParams], sft: Checkpoint, resume_dir, tokenizer):
    """(model, save): the SFT model with a new scalar head, all of it trained; or with model.lora an
    adapter on it (peft's SEQ_CLS task: the head trains in full and is saved with the adapter)."""
    lora, trust = ctx.params.model.lora, ctx.params.model.trust_remote_code
    if lora is None:
        model = load_reward_model(resume_dir, trust) if resume_dir else \
            load_reward(sft, ctx.workdir, trust, init_head=True).requires_grad_(True)
        return model, lambda m, d: save_checkpoint(m, tokenizer, d)
    model = load_frozen_base(sft, lora, trust, ctx.device, ctx.workdir, task_type="SEQ_CLS")
    model.config.pad_token_id = tokenizer.pad_token_id
    model = trainable_adapter(model, resume_dir) if resume_dir else add_adapter(model, lora, "SEQ_CLS", ctx.params.seed)
    base_ref = artifact_ref(ctx.input("sft"))
    return model, lambda m, d: save_adapter(m, tokenizer, d, base_ref)


def run(ctx: StageContext[RewardModelParams]) -> dict:
    p, cfg = ctx.params, ctx.params.reward_model
    pairs = pq.read_table(ctx.fetch("data", "pairs.parquet")).to_pylist()
    if len(pairs) < 10:
        raise BadInput(f"reward_model: pairs.parquet has {len(pairs)} rows, need at least 10")
    random.Random(p.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.eval_fraction))
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]

    sft = fetch_checkpoint(ctx, "sft")
    tokenizer = load_tokenizer(sft.dir, p.model.trust_remote_code)
    resumer = Resumer(ctx, cfg.save_every, cfg.steps)
    torch.manual_seed(p.seed)  # the new scalar head (or adapter) is drawn from torch's global generator
    model, save_model = model_to_train(ctx, sft, resumer.model_dir(), tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id

    if cfg.batch_size % ctx.world_size:
        raise BadInput(f"reward_model.batch_size={cfg.batch_size} is not divisible by {ctx.world_size} ranks")
    micro = cfg.batch_size // ctx.world_size
    engine, _, scheduler = make_engine(model, p.engine, lr=cfg.lr, micro_batch=micro,
                                       warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, device=ctx.device)
    engine.train()
    gen = torch.Generator().manual_seed(p.seed)
    trained = {"model": Trained(engine, scheduler, save_model)}
    start_step = resumer.restore(trained, gen)
    ctx.first_step()
    started, loss_sum, acc_sum, last = time.time(), 0.0, 0.0, (float("nan"), float("nan"))
    for step in range(start_step, cfg.steps):
        batch = torch.randint(len(train_pairs), (cfg.batch_size,), generator=gen).tolist()
        rows = [train_pairs[i] for i in batch[ctx.rank * micro : (ctx.rank + 1) * micro]]
        chosen, rejected = pair_rewards(engine, tokenizer, rows, ctx.device)
        loss = bradley_terry_loss(chosen, rejected)
        if not torch.isfinite(loss):
            raise BadInput(f"reward_model: loss is {loss.item()} at step {step}")
        engine.backward(loss)
        engine.step()
        loss_sum += loss.item()
        acc_sum += (chosen > rejected).float().mean().item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            loss_avg, acc_avg = (v / ctx.world_size / cfg.log_every for v in ctx.all_reduce_sum([loss_sum, acc_sum]))
            ctx.log_metrics({"loss": loss_avg, "train_accuracy": acc_avg}, step=step + 1)
            if ctx.is_main:
                log(f"reward_model step {step + 1}/{cfg.steps} loss {loss_avg:.4f} acc {acc_avg:.3f}")
            last = (loss_avg, acc_avg)
            loss_sum, acc_sum = 0.0, 0.0
        resumer.maybe_save(step + 1, trained, gen)

    engine.eval()
    mine = [eval_pairs[i] for i in ctx.shard(len(eval_pairs))]
    with torch.no_grad():
        correct = sum((c > r).sum().item() for c, r in
                      (pair_rewards(engine, tokenizer, mine[i:i + 256], ctx.device) for i in range(0, len(mine), 256)))
    eval_accuracy = ctx.all_reduce_sum([correct])[0] / len(eval_pairs)
    with full_parameters(engine) as full_model:
        if ctx.is_main:
            save_model(full_model, ctx.out_path("checkpoint"))
            ctx.save_dir("checkpoint")
    return {"loss": last[0], "train_accuracy": last[1], "eval_accuracy": eval_accuracy,
            "train_seconds": time.time() - started}


if __name__ == "__main__":
    runtime.main(run, RewardModelParams)
