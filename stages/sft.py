"""sft: supervised fine-tuning on the demonstrations, loss on response tokens only.

Inputs   data (data_prep)
Output   checkpoint/   Hugging Face directory, safetensors, with the tokenizer
Metrics  loss, tokens_per_s

Every `save_every` steps the full training state goes to {output}/_resume/ (safetensors),
so a killed job resumes there instead of at step 0.

The base model is the tiny Llama built from the config (tokenizer from data_prep) or a
`from_pretrained` model. Each step draws a global batch with a seeded generator; each
rank trains on its slice, DeepSpeed averages the gradients.
"""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import torch

from stages.common import runtime
from stages.common.adapters import (Checkpoint, add_adapter, external_digest, external_dir, load_frozen_base,
                                    save_adapter, trainable_adapter)
from stages.common.engine import full_parameters, make_engine
from stages.common.resume import Resumer, Trained
from stages.common.models import (build_tiny_model, load_causal_lm,
                                  load_tokenizer, pack_right, save_checkpoint)
from stages.common.params import SFTParams
from stages.common.runtime import BadInput, StageContext, log


def base_model_and_tokenizer(ctx: StageContext[SFTParams]):
    model_cfg = ctx.params.model
    if model_cfg.tiny is not None:
        tokenizer = load_tokenizer(ctx.fetch_dir("data", "tokenizer"))
        return build_tiny_model(model_cfg.tiny, tokenizer, seed=ctx.params.seed), tokenizer
    path = str(model_cfg.name_or_path)  # ModelConfig: exactly one of tiny and name_or_path
    return load_causal_lm(path, model_cfg.trust_remote_code), load_tokenizer(path, model_cfg.trust_remote_code)


def model_to_train(ctx: StageContext[SFTParams], resume_dir):
    """(model, tokenizer, save): the full model, or with model.lora an adapter on the frozen pretrained
    base, which the checkpoint names by its name_or_path and the digest of its files."""
    model_cfg, lora = ctx.params.model, ctx.params.model.lora
    if lora is None:
        model, tokenizer = base_model_and_tokenizer(ctx)
        if resume_dir is not None:  # a killed attempt left resume state
            model = load_causal_lm(resume_dir, model_cfg.trust_remote_code)
        return model, tokenizer, lambda m, d: save_checkpoint(m, tokenizer, d)
    path, trust = str(model_cfg.name_or_path), model_cfg.trust_remote_code  # ModelConfig: lora on sft needs one
    try:
        base_dir = external_dir(path)
        base_ref = {"uri": path, "digest": external_digest(base_dir)}
    except (OSError, ValueError) as err:
        raise BadInput(f"sft: model.name_or_path {path!r}: {err}") from None
    tokenizer = load_tokenizer(base_dir, trust)
    model = load_frozen_base(Checkpoint(base_dir), lora, trust, ctx.device, ctx.workdir)
    model = trainable_adapter(model, resume_dir) if resume_dir else add_adapter(model, lora, "CAUSAL_LM", ctx.params.seed)
    return model, tokenizer, lambda m, d: save_adapter(m, tokenizer, d, base_ref)


def run(ctx: StageContext[SFTParams]) -> dict:
    p, cfg = ctx.params, ctx.params.sft
    table = pq.read_table(ctx.fetch("data", "sft.parquet")).to_pylist()
    if not table:
        raise BadInput("sft: sft.parquet is empty")
    resumer = Resumer(ctx, cfg.save_every, cfg.steps)
    model, tokenizer, save_model = model_to_train(ctx, resumer.model_dir())
    # Rendered by data_prep (chat template included): the loss covers the response, the assistant's tokens.
    prompts, responses = [r["prompt_ids"] for r in table], [r["response_ids"] for r in table]

    if cfg.batch_size % ctx.world_size:
        raise BadInput(f"sft.batch_size={cfg.batch_size} is not divisible by {ctx.world_size} ranks")
    micro = cfg.batch_size // ctx.world_size
    engine, _, scheduler = make_engine(model, p.engine, lr=cfg.lr, micro_batch=micro,
                                       weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                       total_steps=cfg.steps, device=ctx.device)
    engine.train()
    gen = torch.Generator().manual_seed(p.seed)
    trained = {"model": Trained(engine, scheduler, save_model)}
    start_step = resumer.restore(trained, gen)
    ctx.first_step()
    tokens_seen, loss_sum, started, last_loss = 0, 0.0, time.time(), float("nan")
    for step in range(start_step, cfg.steps):
        batch = torch.randint(len(table), (cfg.batch_size,), generator=gen).tolist()
        mine = batch[ctx.rank * micro : (ctx.rank + 1) * micro]
        ids, attn, resp_mask = pack_right([prompts[i] for i in mine], [responses[i] for i in mine],
                                          tokenizer.pad_token_id)
        labels = ids.masked_fill(resp_mask == 0, -100)
        loss = engine(input_ids=ids.to(ctx.device), attention_mask=attn.to(ctx.device),
                      labels=labels.to(ctx.device)).loss
        if ctx.spec.debug.get("nan_loss_at_step") == step:  # fault injection for tests
            loss = loss * float("nan")
        if not torch.isfinite(loss):  # before backward: a bad step never reaches the weights
            raise BadInput(f"sft: loss is {loss.item()} at step {step}")
        engine.backward(loss)
        engine.step()
        tokens_seen += int(attn.sum())
        loss_sum += loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean_loss = ctx.all_reduce_sum([loss_sum / cfg.log_every])[0] / ctx.world_size
            ctx.log_metrics({"loss": mean_loss, "lr": engine.get_lr()[0]}, step=step + 1)
            if ctx.is_main:
                log(f"sft step {step + 1}/{cfg.steps} loss {mean_loss:.4f}")
            last_loss, loss_sum = mean_loss, 0.0
        resumer.maybe_save(step + 1, trained, gen)

    elapsed = time.time() - started
    total_tokens = ctx.all_reduce_sum([tokens_seen])[0]
    with full_parameters(engine) as full_model:
        if ctx.is_main:
            save_model(full_model, ctx.out_path("checkpoint"))
            ctx.save_dir("checkpoint")
    return {"loss": last_loss, "tokens_per_s": total_tokens / elapsed, "train_seconds": elapsed,
            "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
            "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)}


if __name__ == "__main__":
    runtime.main(run, SFTParams)
