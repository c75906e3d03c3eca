"""Losses and advantages, written out so each line can be checked against its paper.

Pure functions of tensors. Per-token tensors are [B, T] with a 0/1 `mask` marking the
response tokens (the positions `pack_right` marks; any layout works, padding anywhere);
per-response tensors are [B]. Responses of one prompt are consecutive rows (groups).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: far past any clip, far from float32's overflow at ~88


# --- reward model -----------------------------------------------------------------------

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


def sequence_logps(token_logps: torch.Tensor, response_mask: torch.Tensor, average: bool) -> torch.Tensor:
    """[rows, T] token log-probabilities -> [rows]: summed over each response's tokens, or averaged."""
    total = (token_logps * response_mask).sum(-1)
    return total / response_mask.sum(-1).clamp(min=1) if average else total


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's loss over pairs, and each pair's implicit reward margin.

    All inputs [pairs]: the response's log-probability under the policy and the reference
    (summed over its tokens for "sigmoid", averaged over them for "ipo", as IPO is defined).
        h       = (chosen - ref_chosen) - (rejected - ref_rejected)
        sigmoid = -log sigmoid(beta * h)                   (Rafailov et al. 2023)
        ipo     = (h - 1 / (2 * beta))^2                   (Azar et al. 2023)
    margin = beta * h: the chosen response's implicit reward minus the rejected one's.
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    return losses.mean(), (beta * h).detach()


# --- masked statistics ------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries."""
    mean = masked_mean(x, mask)
    return (((x - mean) ** 2) * mask).sum() / (mask.sum() - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries of the whole batch (unbiased var, as verl)."""
    return (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 for a perfect value model, 0 for a constant one, < 0 for worse."""
    return 1 - (masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)).item()


# --- KL to the reference ------------------------------------------------------------------

def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimates of KL(pi || ref) from samples of pi (Schulman 2020, "Approximating KL").

    With log r = log ref - log pi at the sampled token:
      k1 = -log r                 unbiased, can be negative (the classic RLHF reward penalty)
      k2 = (log r)^2 / 2          biased, low variance, >= 0
      k3 = (r - 1) - log r        unbiased, low variance, >= 0 (GRPO); clamped at 10 as verl does
    log r is clamped to [-20, 20] first, as in verl: exp(100) is inf in float32, and the clamp
    after it would turn the gradient into 0 * inf = NaN while the loss stays finite.
    """
    log_r = torch.clamp(ref_logprobs - logprobs, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.clamp(torch.exp(log_r) - 1 - log_r, max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}")


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref): exp(ref - pi) - (ref - pi) - 1 >= 0."""
    return kl_estimate(logprobs, ref_logprobs, "k3")


# --- rewards --------------------------------------------------------------------------------

def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward.

    0 up to max_tokens - buffer tokens, then falling linearly to -factor at max_tokens:
    min(0, -(len - (max_tokens - buffer)) / buffer * factor).
    """
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    expected = max_tokens - buffer
    return torch.clamp(-(lengths.float() - expected) / buffer * factor, max=0.0)


def token_level_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * kl_t on every response token, plus the response's score on its last token."""
    rewards = -kl_coef * kl * mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, -1).max(dim=1).values  # index of each row's last response token
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


# --- advantage estimators ----------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (r - mean of its group) / (std of its group + eps)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased, as in the GRPO reference code
    return ((grouped - mean) / (std + eps)).view(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): r - mean of its group; no std normalisation (its difficulty bias)."""
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): r_i - mean of the other k-1 rewards of its group."""
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s-t) r_s over the response tokens (masked positions are skipped)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        running = m * (rewards[:, t] + gamma * running) + (1 - m) * running
        returns[:, t] = running
    return returns * mask


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """GAE (Schulman et al. 2016): A_t = sum_l (gamma*lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t.

    The episode ends after the last response token (V after it is 0); masked positions are skipped.
    Returns (advantages, returns = advantages + values), zero outside the mask.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        next_value = m * values[:, t] + (1 - m) * next_value
        next_adv = m * adv + (1 - m) * next_adv
        advantages[:, t] = next_adv
    return advantages * mask, (advantages + values) * mask


# --- losses ---------------------------------------------------------------------------------

def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low: float, clip_high: float):
    """PPO's clipped surrogate (Schulman et al. 2017), per token; DAPO's asymmetric clip-higher.

    ratio = exp(logp - logp_old);  loss_t = -min(ratio * A_t, clip(ratio, 1 - clip_low, 1 + clip_high) * A_t)
    The log ratio is clamped to [-20, 20] before exp (as verl, OpenRLHF): an overflow would give a
    NaN gradient under a finite loss. Returns (loss [B, T], stats).
    """
    ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask).item(),  # where the clip binds
            "ratio_dev": masked_mean((ratio - 1).abs(), mask).item(),
        }
    return loss, stats


def clipped_value_loss(values, old_values, returns, mask, clip_eps: float):
    """PPO's clipped value loss (as OpenRLHF/verl), per token:

    V_clip = V_old + clip(V - V_old, -eps, eps);  loss_t = 1/2 max((V - R)^2, (V_clip - R)^2)
    Returns (loss [B, T], stats).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped_loss, clipped_loss)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped_loss > unclipped_loss).float(), mask).item()}
    return loss, stats


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str, *, num_seqs: float | None = None,
                   num_tokens: float | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

      token_mean            sum over all tokens / number of tokens (DAPO; PPO in OpenRLHF/verl)
      seq_mean_token_mean   each response's token mean, then the mean over responses (GRPO)
      seq_mean_token_sum    each response's token sum / max_tokens, then the mean over responses
                            (Dr. GRPO: a constant normaliser, no length bias)
    num_seqs / num_tokens replace this batch's counts as divisors: under data parallelism pass the
    whole minibatch's count / world size, so the ranks' averaged gradients are the minibatch's.
    """
    if mode == "token_mean":
        return (loss * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))
    per_seq = (loss * mask).sum(dim=1)
    if mode == "seq_mean_token_mean":
        per_seq = per_seq / mask.sum(dim=1).clamp(min=1)
    elif mode == "seq_mean_token_sum":
        per_seq = per_seq / max_tokens
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return per_seq.sum() / (num_seqs if num_seqs is not None else loss.shape[0])


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps: float, kl_coef: float):
    """GRPO's objective in one call: clipped surrogate + k3 KL, token mean per sequence, then batch mean.

    logprobs/old_logprobs/ref_logprobs/mask: [B, T]; advantages: [B] (one per sequence).
    Returns (loss, stats). `update` composes the same pieces, with every switch configurable.
    """
    surrogate, stats = clipped_policy_loss(logprobs, old_logprobs, advantages.unsqueeze(1), mask, clip_eps, clip_eps)
    kl = kl_estimate(logprobs, ref_logprobs, "k3")
    loss = aggregate_loss(surrogate + kl_coef * kl, mask, "seq_mean_token_mean")
    stats["kl"] = masked_mean(kl.detach(), mask).item()
    return loss, stats
