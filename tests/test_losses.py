"""Losses against straightforward references written as plain Python loops over tokens.

Random data in the packed layout the trainer uses: each row is [prompt][response][pad], with
variable prompt and response lengths, and garbage (not zeros) outside the response mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.rl_batches import packed_batch, rand, response
from stages.common.losses import (aggregate_loss, bradley_terry_loss, clipped_policy_loss, clipped_value_loss,
                                  dpo_loss, grpo_loss, kl_estimate, sequence_logps)

TOL = dict(rel=1e-5, abs=1e-6)


# --- references -------------------------------------------------------------------------------

def ref_kl(lp: float, ref: float, estimator: str) -> float:
    log_r = ref - lp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    return min(math.exp(log_r) - 1 - log_r, 10.0)


def ref_policy_token(lp, old, adv, lo, hi) -> float:
    ratio = math.exp(lp - old)
    return -min(ratio * adv, min(max(ratio, 1 - lo), 1 + hi) * adv)


def ref_value_token(v, v_old, ret, eps) -> float:
    v_clip = v_old + min(max(v - v_old, -eps), eps)
    return 0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2)


def ref_aggregate(per_row: list[list[float]], mode: str, max_tokens: int | None = None) -> float:
    if mode == "token_mean":
        return sum(sum(r) for r in per_row) / sum(len(r) for r in per_row)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in per_row) / len(per_row)
    return sum(sum(r) / max_tokens for r in per_row) / len(per_row)


# --- tests ------------------------------------------------------------------------------------------

def test_bradley_terry_matches_loop():
    chosen, rejected = rand(13, 0, 3.0), rand(13, 1, 3.0)
    expected = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 13
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def ref_dpo_pair(pc, pr, rc, rr, beta, loss_type) -> float:
    h = (sum(pc) - sum(rc)) - (sum(pr) - sum(rr)) if loss_type == "sigmoid" else \
        (sum(pc) / len(pc) - sum(rc) / len(rc)) - (sum(pr) / len(pr) - sum(rr) / len(rr))
    if loss_type == "sigmoid":
        return math.log(1 + math.exp(-beta * h))
    return (h - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_loop(loss_type, beta):
    """From token log-probabilities in the packed layout: chosen rows then rejected rows."""
    spans, mask = packed_batch(7, rows=12)
    policy, reference = -rand(mask.shape, 8).abs(), -rand(mask.shape, 9).abs()
    average = loss_type == "ipo"
    seq, ref = sequence_logps(policy, mask, average), sequence_logps(reference, mask, average)
    loss, margins = dpo_loss(seq[:6], seq[6:], ref[:6], ref[6:], beta, loss_type)
    per_pair = [ref_dpo_pair(response(policy, i, spans[i]), response(policy, i + 6, spans[i + 6]),
                             response(reference, i, spans[i]), response(reference, i + 6, spans[i + 6]), beta, loss_type)
                for i in range(6)]
    assert loss.item() == pytest.approx(sum(per_pair) / 6, **TOL)
    assert margins.shape == (6,) and not margins.requires_grad


def test_dpo_gradient_raises_the_chosen_response():
    chosen, rejected = torch.tensor([-3.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    for loss_type in ("sigmoid", "ipo"):
        loss, _ = dpo_loss(chosen, rejected, torch.tensor([-3.0]), torch.tensor([-2.0]), 0.1, loss_type)
        gc, gr = torch.autograd.grad(loss, [chosen, rejected])
        assert gc.item() < 0 < gr.item()  # descent raises log p(chosen) and lowers log p(rejected)
    with pytest.raises(ValueError, match="unknown DPO loss 'hinge'"):
        dpo_loss(chosen, rejected, chosen, rejected, 0.1, "hinge")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_loop(estimator):
    lp, ref = -rand((5, 9), 2).abs(), -rand((5, 9), 3).abs()
    got = kl_estimate(lp, ref, estimator)
    for i in range(5):
        for t in range(9):
            assert got[i, t].item() == pytest.approx(ref_kl(lp[i, t].item(), ref[i, t].item(), estimator), rel=1e-5, abs=1e-6)


def test_kl_estimators_estimate_the_kl():
    """Averaged over samples of pi, k1 and k3 approach KL(pi || ref); k2 is close for nearby policies."""
    gen = torch.Generator().manual_seed(0)
    logits_pi, logits_ref = torch.randn(8, generator=gen) * 0.5, torch.randn(8, generator=gen) * 0.5
    log_pi, log_ref = logits_pi.log_softmax(0), logits_ref.log_softmax(0)
    true_kl = (log_pi.exp() * (log_pi - log_ref)).sum().item()
    x = torch.multinomial(log_pi.exp(), 200_000, replacement=True, generator=gen)
    assert true_kl == pytest.approx(0.239, abs=1e-3)
    for est, tol in (("k1", 0.005), ("k3", 0.005), ("k2", 0.02)):  # k2 is biased
        assert kl_estimate(log_pi[x], log_ref[x], est).mean().item() == pytest.approx(true_kl, abs=tol)
    assert (kl_estimate(log_pi[x], log_ref[x], "k3") >= 0).all()


@pytest.mark.parametrize("lo,hi", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)])
def test_clipped_policy_loss_matches_loop(lo, hi):
    spans, mask = packed_batch(4)
    old = -rand(mask.shape, 5).abs()
    lp = old + rand(mask.shape, 6, 0.3)  # ratios on both sides of both clip edges
    adv = rand(mask.shape, 7)
    loss, stats = clipped_policy_loss(lp, old, adv, mask, lo, hi)
    n_tokens = n_clipped = 0
    for i, span in enumerate(spans):
        for a, b, c, got in zip(*(response(x, i, span) for x in (lp, old, adv, loss))):
            assert got == pytest.approx(ref_policy_token(a, b, c, lo, hi), rel=1e-5, abs=1e-6)
            ratio = math.exp(a - b)
            n_clipped += -c * min(max(ratio, 1 - lo), 1 + hi) > -c * ratio
            n_tokens += 1
    assert stats["clip_frac"] == pytest.approx(n_clipped / n_tokens)
    assert 0 < stats["clip_frac"] < 1


def test_clipped_value_loss_matches_loop():
    spans, mask = packed_batch(8)
    old_v, ret = rand(mask.shape, 9), rand(mask.shape, 10)
    v = old_v + rand(mask.shape, 11, 0.4)
    loss, stats = clipped_value_loss(v, old_v, ret, mask, 0.2)
    for i, span in enumerate(spans):
        for a, b, c, got in zip(*(response(x, i, span) for x in (v, old_v, ret, loss))):
            assert got == pytest.approx(ref_value_token(a, b, c, 0.2), rel=1e-5, abs=1e-6)
    assert 0 < stats["value_clip_frac"] < 1


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_aggregate_loss_matches_loop(mode):
    spans, mask = packed_batch(12, rows=9)
    per_token = rand(mask.shape, 13)
    expected = ref_aggregate([response(per_token, i, s) for i, s in enumerate(spans)], mode, max_tokens=6)
    assert aggregate_loss(per_token, mask, mode, max_tokens=6).item() == pytest.approx(expected, **TOL)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_aggregate_loss_split_over_ranks_equals_whole_minibatch(mode):
    """What update does under data parallelism: rank k gets rows k::W and the whole minibatch's
    counts / W as divisors; DeepSpeed averages the ranks' gradients, i.e. their losses."""
    spans, mask = packed_batch(14, rows=9)
    per_token = rand(mask.shape, 15)
    whole = aggregate_loss(per_token, mask, mode, max_tokens=6)
    world = 2
    shards = [aggregate_loss(per_token[k::world], mask[k::world], mode, max_tokens=6,
                             num_seqs=mask.shape[0] / world, num_tokens=mask.sum().item() / world)
              for k in range(world)]
    assert (sum(shards) / world).item() == pytest.approx(whole.item(), **TOL)


def test_grpo_loss_matches_loop():
    """The GRPO objective (Shao et al. 2024): per response, the token mean of
    -min(ratio A, clip(ratio) A) + beta k3; then the mean over responses."""
    spans, mask = packed_batch(16)
    old, ref = -rand(mask.shape, 17).abs(), -rand(mask.shape, 18).abs()
    lp = old + rand(mask.shape, 19, 0.3)
    adv = rand(mask.shape[0], 20)
    loss, stats = grpo_loss(lp, old, ref, adv, mask, 0.2, 0.1)
    per_row, kls = [], []
    for i, span in enumerate(spans):
        terms = []
        for a, b, r in zip(*(response(x, i, span) for x in (lp, old, ref))):
            terms.append(ref_policy_token(a, b, adv[i].item(), 0.2, 0.2) + 0.1 * ref_kl(a, r, "k3"))
            kls.append(ref_kl(a, r, "k3"))
        per_row.append(terms)
    assert loss.item() == pytest.approx(ref_aggregate(per_row, "seq_mean_token_mean"), **TOL)
    assert stats["kl"] == pytest.approx(sum(kls) / len(kls), **TOL)


def test_policy_gradient_at_ratio_one_is_reinforce():
    """On-policy (ratio 1) the clipped surrogate's gradient is -A * grad log pi, per token."""
    spans, mask = packed_batch(21)
    lp = (-rand(mask.shape, 22).abs()).requires_grad_()
    adv = rand(mask.shape, 23)
    loss, _ = clipped_policy_loss(lp, lp.detach(), adv, mask, 0.2, 0.28)
    (loss * mask).sum().backward()
    torch.testing.assert_close(lp.grad, -adv * mask)


def test_gradients_stay_finite_at_a_log_ratio_of_100_in_float32():
    """exp(100) overflows float32: without the clamp of the log ratio the loss is finite and the
    gradient NaN (verl and OpenRLHF clamp to [-20, 20])."""
    old = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    for estimator in ("k1", "k2", "k3"):
        logp = torch.tensor([[100.0, -100.0, 0.0], [0.5, 100.0, -0.5]], requires_grad=True)
        per_token, _ = clipped_policy_loss(logp, old, torch.ones(2, 3), mask, 0.2, 0.2)
        loss = aggregate_loss(per_token + 0.1 * kl_estimate(logp, old, estimator), mask, "token_mean")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), (estimator, logp.grad)
    # the clamp changes nothing inside [-20, 20]
    logp = torch.tensor([[0.3, -0.2]])
    ratio_loss, _ = clipped_policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 10.0, 10.0)
    assert torch.allclose(ratio_loss, -torch.exp(logp))
    assert torch.allclose(kl_estimate(logp, torch.zeros(1, 2), "k3"), torch.exp(-logp) - 1 + logp)
