"""Losses and advantages, written out so each line can be checked against its paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - mean of its group) / (std of its group + eps); rows are grouped consecutively."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased, as in the GRPO reference code
    return ((grouped - mean) / (std + eps)).view(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref): exp(ref - pi) - (ref - pi) - 1 >= 0."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps: float, kl_coef: float):
    """GRPO (Shao et al. 2024): clipped surrogate + k3 KL, token-mean per sequence, then batch mean.

    logprobs/old_logprobs/ref_logprobs/mask: [B, T]; advantages: [B] (one per sequence).
    Returns (loss, stats).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    kl = kl_k3(logprobs, ref_logprobs)
    per_token = -surrogate + kl_coef * kl
    loss = masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {
            "clip_frac": masked_mean(clipped, mask).item(),
            "kl": masked_mean(kl, mask).item(),
            "ratio_dev": masked_mean((ratio - 1).abs(), mask).item(),
        }
    return loss, stats
