"""Advantage estimators against straightforward references written as plain Python loops.

The pure functions (stages/common/losses.py) on random data in the packed layout (variable
prompt and response lengths, padding, garbage outside the mask), then update's composition of
them for each `rl.advantage` (stages/update.py: round_advantages) on synthetic scored rows.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from stages.common.sections import ALGORITHM_PRESETS, ESTIMATOR_KEYS, RLConfig, UpdateConfig
from tests.rl_batches import packed_batch, rand, response
from stages.common.losses import (discounted_returns, dr_grpo_advantages, explained_variance, gae_advantages,
                                  group_advantages, masked_whiten, overlong_penalty, rloo_advantages,
                                  token_level_rewards)
from stages.update import round_advantages

APPROX = dict(rel=1e-5, abs=1e-5)


# --- references: one response at a time --------------------------------------------------------

def ref_returns(rewards: list[float], gamma: float) -> list[float]:
    out = []
    for t in range(len(rewards)):
        out.append(sum(gamma ** (s - t) * rewards[s] for s in range(t, len(rewards))))
    return out


def ref_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """A_t = sum_l (gamma lam)^l delta_{t+l}; the value after the last token is 0 (the episode ends)."""
    n = len(rewards)
    v = values + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(n)]
    return [sum((gamma * lam) ** (s - t) * deltas[s] for s in range(t, n)) for t in range(n)]


def ref_whiten(xs: list[float]) -> list[float]:
    mean, var = statistics.fmean(xs), statistics.variance(xs)  # unbiased, as verl
    return [(x - mean) / math.sqrt(var + 1e-8) for x in xs]


# --- pure functions ---------------------------------------------------------------------------------

def test_grpo_group_advantages_match_loop():
    rewards = rand(24, 0)
    got = group_advantages(rewards, 4).tolist()
    r = rewards.tolist()
    for g in range(6):
        group = r[4 * g : 4 * g + 4]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        for j in range(4):
            assert got[4 * g + j] == pytest.approx((group[j] - mean) / (std + 1e-6), **APPROX)


def test_dr_grpo_advantages_have_no_std_normalisation():
    rewards = rand(24, 1, 3.0)
    got = dr_grpo_advantages(rewards, 6).tolist()
    r = rewards.tolist()
    for g in range(4):
        group = r[6 * g : 6 * g + 6]
        for j in range(6):
            assert got[6 * g + j] == pytest.approx(group[j] - statistics.fmean(group), **APPROX)


def test_rloo_advantages_match_loop():
    rewards = rand(20, 2)
    got = rloo_advantages(rewards, 5).tolist()
    r = rewards.tolist()
    for g in range(4):
        group = r[5 * g : 5 * g + 5]
        for j in range(5):
            others = [x for k, x in enumerate(group) if k != j]
            assert got[5 * g + j] == pytest.approx(group[j] - sum(others) / len(others), **APPROX)
    # RLOO is the group-mean baseline rescaled by k/(k-1)
    torch.testing.assert_close(rloo_advantages(rewards, 5), dr_grpo_advantages(rewards, 5) * 5 / 4)


def test_equal_reward_groups_get_zero_advantage():
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0])
    for fn in (group_advantages, dr_grpo_advantages, rloo_advantages):
        assert fn(rewards, 4)[:4].abs().max().item() == 0


@pytest.mark.parametrize("buffer,factor", [(0, 1.0), (2, 1.0), (3, 0.5)])
def test_overlong_penalty_matches_dapo(buffer, factor):
    max_tokens = 8
    lengths = torch.arange(1, max_tokens + 1)
    got = overlong_penalty(lengths, max_tokens, buffer, factor).tolist()
    for n, g in zip(lengths.tolist(), got):
        if buffer == 0 or n <= max_tokens - buffer:
            expected = 0.0
        else:  # DAPO eq. 13: ((L_max - L_cache) - |y|) / L_cache, scaled
            expected = ((max_tokens - buffer) - n) / buffer * factor
        assert g == pytest.approx(expected, **APPROX)
    assert got[-1] == pytest.approx(-factor if buffer else 0.0)


def test_token_level_rewards_match_loop():
    spans, mask = packed_batch(3)
    kl, scores = rand(mask.shape, 4), rand(mask.shape[0], 5)
    got = token_level_rewards(scores, kl, mask, 0.05)
    assert (got * (1 - mask)).abs().max().item() == 0
    for i, span in enumerate(spans):
        expected = [-0.05 * k for k in response(kl, i, span)]
        expected[-1] += scores[i].item()
        assert response(got, i, span) == pytest.approx(expected, **APPROX)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_match_loop(gamma):
    spans, mask = packed_batch(6)
    rewards = rand(mask.shape, 7)  # garbage outside the mask must not leak in
    got = discounted_returns(rewards, mask, gamma)
    assert (got * (1 - mask)).abs().max().item() == 0
    for i, span in enumerate(spans):
        assert response(got, i, span) == pytest.approx(ref_returns(response(rewards, i, span), gamma), **APPROX)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_loop(gamma, lam):
    spans, mask = packed_batch(8, rows=9)
    rewards, values = rand(mask.shape, 9), rand(mask.shape, 10)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    assert (adv * (1 - mask)).abs().max().item() == 0 and (ret * (1 - mask)).abs().max().item() == 0
    for i, span in enumerate(spans):
        r, v = response(rewards, i, span), response(values, i, span)
        expected = ref_gae(r, v, gamma, lam)
        assert response(adv, i, span) == pytest.approx(expected, **APPROX)
        assert response(ret, i, span) == pytest.approx([a + b for a, b in zip(expected, v)], **APPROX)
        if lam == 1.0:  # GAE(1) returns are the Monte-Carlo returns
            assert response(ret, i, span) == pytest.approx(ref_returns(r, gamma), **APPROX)


def test_masked_whiten_matches_loop():
    spans, mask = packed_batch(11)
    x = rand(mask.shape, 12, 4.0) + 3
    got = masked_whiten(x, mask)
    flat = [v for i, s in enumerate(spans) for v in response(x, i, s)]
    expected = ref_whiten(flat)
    assert [v for i, s in enumerate(spans) for v in response(got, i, s)] == pytest.approx(expected, **APPROX)
    assert (got * (1 - mask)).abs().max().item() == 0


# --- update's composition, per rl.advantage -----------------------------------------------------------

def scored_rows(seed: int, groups: int = 3, n: int = 4, with_values: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for g in range(groups):
        for j in range(n):
            length = rng.randint(1, 6)
            rows.append({
                "prompt_id": f"p{g}", "sample_idx": j, "prompt_token_ids": [1] * rng.randint(2, 5),
                "response_token_ids": [3] * length,
                "response_logprobs": [-rng.random() * 2 for _ in range(length)],
                "ref_logprobs": [-rng.random() * 2 for _ in range(length)],
                "reward": float(rng.random() < 0.5) + rng.random() * 0.1,
                **({"values": [rng.gauss(0, 1) for _ in range(length)]} if with_values else {}),
            })
    return rows


def rl_params(algorithm: str, **overrides) -> UpdateConfig:
    """What update reads of `rl`: the algorithm's preset, or `custom` where an override departs from it."""
    preset = dict(zip(ESTIMATOR_KEYS, ALGORITHM_PRESETS[algorithm]))
    if any(overrides.get(k, v) != v for k, v in preset.items()):
        algorithm = "custom"
    return UpdateConfig(samples_per_prompt=4, max_new_tokens=6, algorithm=algorithm, **{**preset, **overrides})


def kl_of(row: dict, rl: UpdateConfig) -> list[float]:
    """Per-token k1/k2/k3 of the behaviour policy against the reference (Schulman 2020)."""
    out = []
    for lp, ref in zip(row["response_logprobs"], row["ref_logprobs"]):
        log_r = ref - lp
        out.append({"k1": -log_r, "k2": 0.5 * log_r**2, "k3": min(math.exp(log_r) - 1 - log_r, 10.0)}[rl.kl_estimator])
    return out


def penalised_reward(row: dict, rl: UpdateConfig) -> float:
    n = len(row["response_token_ids"])
    buffer, cap = rl.overlong_buffer, rl.max_new_tokens
    pen = min(0.0, -(n - (cap - buffer)) / buffer * rl.overlong_penalty) if buffer else 0.0
    return row["reward"] + pen


@pytest.mark.parametrize("algorithm,kl_mode", [("grpo", "loss"), ("grpo", "reward"), ("dr_grpo", "loss"),
                                                ("rloo", "reward"), ("rloo", "loss")])
def test_outcome_estimators_in_update(algorithm, kl_mode):
    rl = rl_params(algorithm=algorithm, kl_mode=kl_mode, kl_coef=0.2, overlong_buffer=2)
    rows = scored_rows(20)
    round_advantages(rows, rl)
    beta = 0.2 if kl_mode == "reward" else 0.0
    seq = [penalised_reward(r, rl) - beta * sum(kl_of(r, rl)) for r in rows]
    for g in range(3):
        group = seq[4 * g : 4 * g + 4]
        for j, row in enumerate(rows[4 * g : 4 * g + 4]):
            if algorithm == "grpo":
                a = (group[j] - statistics.fmean(group)) / (statistics.stdev(group) + 1e-6)
            elif algorithm == "dr_grpo":
                a = group[j] - statistics.fmean(group)
            else:
                a = group[j] - (sum(group) - group[j]) / 3
            assert row["advantages"] == pytest.approx([a] * len(row["response_token_ids"]), **APPROX)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_reinforce_pp_in_update(kl_estimator):
    """REINFORCE++: token rewards -beta kl_t (+ reward at the end), returns, whitened over the batch."""
    rl = rl_params(algorithm="reinforce_pp", kl_coef=0.1, kl_estimator=kl_estimator, gamma=0.95)
    rows = scored_rows(21)
    round_advantages(rows, rl)
    returns = []
    for r in rows:
        token_rewards = [-0.1 * k for k in kl_of(r, rl)]
        token_rewards[-1] += r["reward"]
        returns.append(ref_returns(token_rewards, 0.95))
    expected = ref_whiten([x for ret in returns for x in ret])
    assert [x for r in rows for x in r["advantages"]] == pytest.approx(expected, **APPROX)


def test_gae_in_update():
    """PPO: GAE on token rewards (-beta k1_t, reward at the end) and the score's values, whitened;
    the value targets are the un-whitened GAE + values."""
    rl = rl_params(algorithm="ppo", kl_coef=0.05, gamma=1.0, lam=0.9)
    rows = scored_rows(22, with_values=True)
    stats = round_advantages(rows, rl)
    raw, targets = [], []
    for r in rows:
        token_rewards = [-0.05 * k for k in kl_of(r, rl)]
        token_rewards[-1] += r["reward"]
        adv = ref_gae(token_rewards, r["values"], 1.0, 0.9)
        raw.append(adv)
        targets.append([a + v for a, v in zip(adv, r["values"])])
    assert [x for r in rows for x in r["advantages"]] == pytest.approx(ref_whiten([x for a in raw for x in a]), **APPROX)
    assert [x for r in rows for x in r["returns"]] == pytest.approx([x for t in targets for x in t], **APPROX)
    assert math.isfinite(stats["explained_variance"])


# --- which estimator a config picks ---------------------------------------------------------------

@pytest.mark.parametrize("algorithm,advantage,kl_mode,kl_estimator,loss_agg", [
    ("ppo", "gae", "reward", "k1", "token_mean"),
    ("grpo", "grpo", "loss", "k3", "seq_mean_token_mean"),
    ("dr_grpo", "dr_grpo", "loss", "k3", "seq_mean_token_sum"),
    ("rloo", "rloo", "reward", "k1", "seq_mean_token_sum"),
    ("reinforce_pp", "reinforce_pp", "reward", "k1", "token_mean"),
])
def test_algorithm_configs(algorithm, advantage, kl_mode, kl_estimator, loss_agg):
    from pathlib import Path

    from tasks.config import load_config

    expected = (advantage, kl_mode, kl_estimator, loss_agg)
    rl = RLConfig.model_validate({"algorithm": algorithm})  # the paper's defaults
    assert (rl.advantage, rl.kl_mode, rl.kl_estimator, rl.loss_agg) == expected
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / f"{algorithm}.yaml")
    assert (cfg.rl.algorithm, cfg.rl.advantage, cfg.rl.kl_mode, cfg.rl.kl_estimator, cfg.rl.loss_agg) == (
        algorithm, *expected)
    assert cfg.rl.reward == ("reward_model" if algorithm == "ppo" else "verifier")
    # A key that restates the algorithm's choice is fine; one that contradicts it is an error naming both.
    assert RLConfig.model_validate({"algorithm": algorithm, "loss_agg": loss_agg}).loss_agg == loss_agg
    other = "token_mean" if loss_agg != "token_mean" else "seq_mean_token_mean"
    with pytest.raises(ValueError, match=f"rl.loss_agg '{other}' contradicts rl.algorithm '{algorithm}'"):
        RLConfig.model_validate({"algorithm": algorithm, "loss_agg": other})


def test_custom_names_the_variant_explicitly():
    mixed = {"advantage": "rloo", "kl_mode": "loss", "kl_estimator": "k3", "loss_agg": "token_mean"}
    rl = RLConfig.model_validate({"algorithm": "custom", **mixed})
    assert (rl.advantage, rl.kl_mode, rl.kl_estimator, rl.loss_agg) == tuple(mixed.values())
    assert not rl.trains_value_model
    with pytest.raises(ValueError, match=r"rl.algorithm 'custom' takes its variant from the YAML: set rl.kl_estimator"):
        RLConfig.model_validate({"algorithm": "custom", "advantage": "rloo", "kl_mode": "loss", "loss_agg": "token_mean"})
    # gae under custom trains the value model, as ppo does
    assert RLConfig.model_validate({"algorithm": "custom", **mixed, "advantage": "gae"}).trains_value_model


def test_value_keys_need_a_value_model():
    with pytest.raises(ValueError, match=r"rl.value_lr is set, but rl.algorithm 'grpo' trains no value model"):
        RLConfig.model_validate({"algorithm": "grpo", "value_lr": 1e-4})
    assert RLConfig.model_validate({"algorithm": "ppo", "value_lr": 1e-4}).value_lr == 1e-4


def test_gae_needs_the_value_model_of_ppo():
    with pytest.raises(ValueError, match="gae"):
        RLConfig.model_validate({"algorithm": "grpo", "advantage": "gae"})
    with pytest.raises(ValueError, match="gae"):
        RLConfig.model_validate({"algorithm": "ppo", "advantage": "grpo"})
    with pytest.raises(ValueError, match="overlong_buffer"):
        RLConfig.model_validate({"max_new_tokens": 6, "overlong_buffer": 6})


def test_explained_variance_matches_loop():
    spans, mask = packed_batch(30)
    values, returns = rand(mask.shape, 31), rand(mask.shape, 32, 2.0)
    rs = [x for i, s in enumerate(spans) for x in response(returns, i, s)]
    vs = [x for i, s in enumerate(spans) for x in response(values, i, s)]
    expected = 1 - statistics.variance([r - v for r, v in zip(rs, vs)]) / statistics.variance(rs)
    assert explained_variance(values, returns, mask) == pytest.approx(expected, **APPROX)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
