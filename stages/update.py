"""update: one policy-gradient update on a round's scored rollouts; writes policy r+1.

Inputs   policy (checkpoint/ of round r), scored (score), value (PPO: the value model of round r)
Output   checkpoint/   the updated policy
         value/        PPO: the updated value model (sequence-classification HF directory)
Metrics  loss, kl, clip_frac, ratio_dev_first, advantage_abs_mean, reward_mean, samples_used,
         groups_dropped, tokens_per_s; PPO: value_loss, value_clip_frac, value_dev_first,
         explained_variance

Every `rl.save_every` optimizer steps (counted over all epochs) the policy, the value model and
their optimizer states go to {output}/_resume/ (stages/common/resume.py), so a killed job resumes
there; its mean metrics then cover the steps after the resume.

`rl.algorithm` decides the estimator, the KL placement and the aggregation (params.RLConfig); every
step of every algorithm is here:
  1. reward = the score's reward of record + DAPO's soft overlong penalty (rl.overlong_buffer);
  2. dynamic sampling (DAPO): groups whose rewards are all equal carry no signal and are dropped;
  3. KL to the reference with rl.kl_mode=reward: a penalty in the reward, from the behaviour policy
       token-level estimators (gae, reinforce_pp):  r_t = -kl_coef * kl_t, plus the reward on the last token
       outcome estimators (grpo, dr_grpo, rloo):     R   = reward - kl_coef * sum_t kl_t
  4. advantages, once for the round, before any step:
       grpo          A = (R - group mean) / (group std + eps)            GRPO, Shao et al. 2024
       dr_grpo       A = R - group mean                                  Dr. GRPO, Liu et al. 2025
       rloo          A = R - mean of the group's other rewards           RLOO, Ahmadian et al. 2024
       reinforce_pp  A_t = whiten over the batch (sum_{s>=t} gamma^(s-t) r_s)   REINFORCE++, Hu 2025
       gae           A_t = whiten(GAE(gamma, lam) of r_t and the score's values V_t), and the value
                     targets R_t = GAE + V_t                              PPO, Schulman et al. 2016/2017
  5. for `epochs` passes over the samples in shuffled minibatches:
       ratio  = exp(logp - logp_behaviour)                  behaviour logprobs come from `generate`
       loss_t = -min(ratio A_t, clip(ratio, 1 - eps_low, 1 + eps_high) A_t)      DAPO's clip-higher
                [+ kl_coef * kl_t(pi || ref)  with rl.kl_mode=loss]
       loss   = aggregate over tokens and responses (rl.loss_agg)
     PPO also steps its value model on 1/2 max((V - R)^2, (V_clip - R)^2), token mean.
The first minibatch is on-policy, so its ratio must be 1: ratio_dev_first checks it, and
value_dev_first that the value model training here is the one that scored the round.
"""

from __future__ import annotations

import time

import torch

from stages.common import runtime
from stages.common.adapters import (Checkpoint, add_adapter, artifact_ref, fetch_checkpoint, load_frozen_base,
                                    load_policy, read_base_ref, save_adapter, trainable_adapter)
from stages.common.critic import load_value_model, value_source
from stages.common.engine import full_parameters, make_engine
from stages.common.losses import (aggregate_loss, clipped_policy_loss, clipped_value_loss, discounted_returns,
                                  dr_grpo_advantages, explained_variance, gae_advantages, group_advantages,
                                  kl_estimate, masked_mean, masked_whiten, overlong_penalty, rloo_advantages,
                                  token_level_rewards)
from stages.common.models import load_causal_lm, load_tokenizer, pack_right, save_checkpoint, token_logprobs
from stages.common.rollouts import PPO_SCORED_SCHEMA, SCORED_SCHEMA, read_tables
from stages.common.resume import Resumer, Trained
from stages.common.params import UpdateParams
from stages.common.sections import UpdateConfig
from stages.common.runtime import BadInput, StageContext, log


def load_rows(ctx: StageContext, group_size: int, schema) -> list[dict]:
    """Scored rows ordered by (prompt, sample): each prompt's responses are consecutive."""
    parts = [ctx.fetch("scored", f.path) for f in ctx.input("scored").files_under("scored")]
    rows = sorted(read_tables(parts, schema).to_pylist(), key=lambda r: (r["prompt_id"], r["sample_idx"]))
    if not rows or len(rows) % group_size:
        raise BadInput(f"update: {len(rows)} scored rows is not a whole number of groups of {group_size}")
    return rows


def left_aligned(values: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response-token lists as a [N, longest] tensor (response token t in column t) and its mask."""
    width = max(len(v) for v in values)
    out, mask = torch.zeros((len(values), width)), torch.zeros((len(values), width))
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v, dtype=torch.float32)
        mask[i, : len(v)] = 1
    return out, mask


def padded(values: list[list[float]], prompt_lens: list[int], width: int) -> torch.Tensor:
    """Per-response-token values placed at their positions in the packed [prompt][response] rows."""
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, (v, p) in enumerate(zip(values, prompt_lens)):
        out[i, p : p + len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def round_advantages(samples: list[dict], rl: UpdateConfig) -> dict:
    """Steps 1, 3 and 4 for the round's kept samples (whole groups, in order); adds per-token
    `advantages` (and, for gae, `returns`) to each sample. Returns round statistics."""
    n = rl.samples_per_prompt
    old_lp, mask = left_aligned([r["response_logprobs"] for r in samples])
    ref_lp, _ = left_aligned([r["ref_logprobs"] for r in samples])
    reward = torch.tensor([r["reward"] for r in samples], dtype=torch.float32)
    reward = reward + overlong_penalty(mask.sum(dim=1), rl.max_new_tokens, rl.overlong_buffer,
                                       rl.overlong_penalty)
    kl = kl_estimate(old_lp, ref_lp, rl.kl_estimator) * mask  # of the behaviour policy, per token
    beta = rl.kl_coef if rl.kl_mode == "reward" else 0.0

    returns, stats = None, {}
    if rl.advantage == "grpo":
        advantages = group_advantages(reward - beta * kl.sum(dim=1), n).unsqueeze(1) * mask
    elif rl.advantage == "dr_grpo":
        advantages = dr_grpo_advantages(reward - beta * kl.sum(dim=1), n).unsqueeze(1) * mask
    elif rl.advantage == "rloo":
        advantages = rloo_advantages(reward - beta * kl.sum(dim=1), n).unsqueeze(1) * mask
    elif rl.advantage == "reinforce_pp":
        token_rewards = token_level_rewards(reward, kl, mask, beta)
        advantages = masked_whiten(discounted_returns(token_rewards, mask, rl.gamma), mask)
    elif rl.advantage == "gae":
        values, _ = left_aligned([r["values"] for r in samples])
        token_rewards = token_level_rewards(reward, kl, mask, beta)
        advantages, returns = gae_advantages(token_rewards, values, mask, rl.gamma, rl.lam)
        advantages = masked_whiten(advantages, mask)
        stats["explained_variance"] = explained_variance(values, returns, mask)  # of the values that scored
        stats["return_mean"] = masked_mean(returns, mask).item()
    else:
        raise BadInput(f"update: unknown advantage estimator {rl.advantage!r}")

    for i, row in enumerate(samples):
        length = len(row["response_token_ids"])
        row["advantages"] = advantages[i, :length].tolist()
        if returns is not None:
            row["returns"] = returns[i, :length].tolist()
    stats.update(reward_mean=reward.mean().item(), behaviour_kl=masked_mean(kl, mask).item(),
                 advantage_abs_mean=masked_mean(advantages.abs(), mask).item())
    return stats


def policy_to_train(ctx: StageContext[UpdateParams], policy: Checkpoint, resume_dir, tokenizer):
    """The model this update trains, and how to save it. Without model.lora: the policy's full weights.
    With it: an adapter on a frozen base, loaded once. Round 0 starts a new adapter on the SFT policy;
    later rounds go on training the adapter that the previous update wrote, on the same base. The
    base is the SFT policy, which is the reference too (score's ref_logprobs): the adapter off."""
    p, lora, trust = ctx.params, ctx.params.model.lora, ctx.params.model.trust_remote_code
    if lora is None:
        if policy.is_adapter and ctx.input("policy").manifest["stage"] == "update":
            raise BadInput("update: the policy is a LoRA adapter, but model.lora.stages does not list update")
        # A LoRA SFT policy (model.lora.stages: [sft]) is merged into full weights, all of which train.
        model = load_causal_lm(resume_dir, trust) if resume_dir else load_policy(policy, trust).requires_grad_(True)
        return model, lambda m, d: save_checkpoint(m, tokenizer, d)
    continuing = policy.is_adapter and ctx.input("policy").manifest["stage"] == "update"
    base, base_ref = ((policy.without_last_adapter(), read_base_ref(policy.dir)) if continuing
                      else (policy, artifact_ref(ctx.input("policy"))))
    model = load_frozen_base(base, lora, trust, ctx.device, ctx.workdir)
    adapter_dir = resume_dir or (policy.dir if continuing else None)
    model = trainable_adapter(model, adapter_dir) if adapter_dir else add_adapter(model, lora, "CAUSAL_LM", p.seed)
    return model, lambda m, d: save_adapter(m, tokenizer, d, base_ref)


def run(ctx: StageContext[UpdateParams]) -> dict:
    p, rl = ctx.params, ctx.params.rl
    n = rl.samples_per_prompt
    ppo = rl.trains_value_model  # the gae estimator: PPO's value model trains alongside the policy
    if ppo != ("value" in ctx.spec.inputs):
        raise BadInput(f"update: rl.advantage {rl.advantage!r} " + ("needs" if ppo else "takes no") + " value input")
    rows = load_rows(ctx, n, PPO_SCORED_SCHEMA if ppo else SCORED_SCHEMA)
    groups = [rows[i : i + n] for i in range(0, len(rows), n)]
    kept = [g for g in groups if not (rl.drop_equal_reward_groups and len({r["reward"] for r in g}) == 1)]
    samples = [r for g in kept for r in g]
    round_stats = round_advantages(samples, rl) if samples else {}

    policy_in = fetch_checkpoint(ctx, "policy")
    trust = p.model.trust_remote_code
    tokenizer = load_tokenizer(policy_in.dir, trust)
    if rl.minibatch_size % ctx.world_size:
        raise BadInput(f"rl.minibatch_size={rl.minibatch_size} is not divisible by {ctx.world_size} ranks")
    micro = rl.minibatch_size // ctx.world_size
    # Every rank needs at least one sample per minibatch; a round with no signal leaves the policy as it was.
    n_minibatches = max(1, len(samples) // rl.minibatch_size) if len(samples) >= ctx.world_size else 0
    resumer = Resumer(ctx, rl.save_every, rl.epochs * n_minibatches)  # a killed attempt may have left state
    policy_model, save_policy = policy_to_train(ctx, policy_in, resumer.model_dir("model"), tokenizer)
    policy, _, policy_sched = make_engine(policy_model, p.engine, lr=rl.lr, micro_batch=micro,
                                          device=ctx.device)
    policy.train()
    trained = {"model": Trained(policy, policy_sched, save_policy)}
    critic = None
    if ppo:
        subdir, zero_head = value_source(ctx.input("value"))
        value_dir = resumer.model_dir("value")
        value_model = load_value_model(value_dir or fetch_checkpoint(ctx, "value", subdir), tokenizer.pad_token_id,
                                       zero_head and value_dir is None, trust, workdir=ctx.workdir)
        critic, _, critic_sched = make_engine(value_model, p.engine, lr=rl.value_lr,
                                              micro_batch=micro, device=ctx.device)
        critic.train()
        trained["value"] = Trained(critic, critic_sched, lambda m, d: save_checkpoint(m.classifier, tokenizer, d))
    clip_low = rl.clip_eps if rl.clip_eps_low is None else rl.clip_eps_low
    clip_high = rl.clip_eps if rl.clip_eps_high is None else rl.clip_eps_high

    # Each epoch's minibatch order is drawn from `gen`. The resume state keeps the generator as it
    # was before the order of the epoch in progress was drawn, so a resumed job redraws that order.
    gen = torch.Generator().manual_seed(p.seed * 7919 + p.round)
    step = resumer.restore(trained, gen)  # optimizer steps done, counted over all epochs
    ctx.first_step()
    stats_log, first, tokens, started = [], {}, 0, time.time()
    for epoch in range(step // n_minibatches if n_minibatches else 0, rl.epochs if n_minibatches else 0):
        epoch_gen = torch.Generator().set_state(gen.get_state())
        order = torch.randperm(len(samples), generator=gen)
        for mb in torch.tensor_split(order, n_minibatches)[step - epoch * n_minibatches:]:
            batch = [samples[i] for i in mb.tolist()]
            mine = batch[ctx.rank :: ctx.world_size]
            # Divisors of the whole minibatch / ranks: the ranks' averaged gradients are the minibatch's.
            num_seqs = len(batch) / ctx.world_size
            num_tokens = sum(len(r["response_token_ids"]) for r in batch) / ctx.world_size
            prompt_lens = [len(r["prompt_token_ids"]) for r in mine]
            ids, attn, mask = pack_right([r["prompt_token_ids"] for r in mine], [r["response_token_ids"] for r in mine],
                                         tokenizer.pad_token_id)
            width = ids.shape[1]
            old_lp = padded([r["response_logprobs"] for r in mine], prompt_lens, width).to(ctx.device)
            ref_lp = padded([r["ref_logprobs"] for r in mine], prompt_lens, width).to(ctx.device)
            adv = padded([r["advantages"] for r in mine], prompt_lens, width).to(ctx.device)
            ids, attn, mask = ids.to(ctx.device), attn.to(ctx.device), mask.to(ctx.device)

            # Policy: clipped surrogate [+ KL term], aggregated as configured.
            logp = token_logprobs(policy, ids, attn, rl.temperature)
            per_token, stats = clipped_policy_loss(logp, old_lp, adv, mask, clip_low, clip_high)
            kl = kl_estimate(logp, ref_lp, rl.kl_estimator)
            if rl.kl_mode == "loss" and rl.kl_coef > 0:
                per_token = per_token + rl.kl_coef * kl
            loss = aggregate_loss(per_token, mask, rl.loss_agg, num_seqs=num_seqs, num_tokens=num_tokens,
                                  max_tokens=rl.max_new_tokens)
            if not torch.isfinite(loss):
                raise BadInput(f"update: loss is {loss.item()} at epoch {epoch} step {step}")
            policy.backward(loss)
            policy.step()
            stats.update(loss=loss.item(), kl=masked_mean(kl.detach(), mask).item())

            # PPO's value model: clipped value loss towards the GAE returns, token mean.
            if critic is not None:
                old_values = padded([r["values"] for r in mine], prompt_lens, width).to(ctx.device)
                returns = padded([r["returns"] for r in mine], prompt_lens, width).to(ctx.device)
                values = critic(ids, attn)
                v_per_token, v_stats = clipped_value_loss(values, old_values, returns, mask, rl.value_clip_eps)
                value_loss = aggregate_loss(v_per_token, mask, "token_mean", num_tokens=num_tokens)
                if not torch.isfinite(value_loss):
                    raise BadInput(f"update: value loss is {value_loss.item()} at epoch {epoch} step {step}")
                critic.backward(value_loss)
                critic.step()
                stats.update(v_stats, value_loss=value_loss.item(),
                             value_dev=masked_mean((values.detach() - old_values).abs(), mask).item())

            tokens += int(mask.sum())
            step += 1
            stats = dict(zip(stats, (v / ctx.world_size for v in ctx.all_reduce_sum(list(stats.values())))))
            if step == 1:  # measured on the first minibatch only (a resumed job does not see it)
                first = {f"{k}_first": stats[k] for k in ("ratio_dev", "value_dev") if k in stats}
            stats_log.append(stats)
            ctx.log_metrics(stats, step=step)
            # After an epoch's last minibatch, `gen` is already where the next epoch draws from.
            resumer.maybe_save(step, trained, gen if step % n_minibatches == 0 else epoch_gen)
    elapsed = time.time() - started

    with full_parameters(policy) as full_model:
        if ctx.is_main:
            save_policy(full_model, ctx.out_path("checkpoint"))
            ctx.save_dir("checkpoint")
    if critic is not None:
        with full_parameters(critic) as full_critic:
            if ctx.is_main:
                save_checkpoint(full_critic.classifier, tokenizer, ctx.out_path("value"))
                ctx.save_dir("value")
    mean = {k: sum(s[k] for s in stats_log) / len(stats_log) for k in stats_log[0]} if stats_log else {}
    total_tokens = ctx.all_reduce_sum([tokens])[0]
    if ctx.is_main:
        log(f"update[{rl.algorithm}/{rl.advantage}] round {p.round}: {len(kept)}/{len(groups)} "
            f"groups used, {step} steps, " + ", ".join(f"{k}={v:.4f}" for k, v in {**round_stats, **mean}.items())
            + f", first step {first}")
    return {**round_stats, **mean, "ratio_dev_first": 0.0, **({"value_dev_first": 0.0} if ppo else {}), **first,
            "samples_used": len(samples), "groups_dropped": len(groups) - len(kept), "optimizer_steps": step,
            "tokens_per_s": total_tokens / max(elapsed, 1e-9)}


if __name__ == "__main__":
    runtime.main(run, UpdateParams)
