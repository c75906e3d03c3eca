"""The trainer's logprobs of the sampled tokens match the generator's, so the first ratio is 1.

`generate` samples with transformers `generate` (left-padded prompts, KV cache) and records
the processed logprobs (logits / temperature); `update` recomputes them teacher-forced on
right-packed [prompt][response] rows. On-policy, ratio = exp(logp - logp_behaviour) must be 1:
any mismatch (temperature, top-k, padding, position ids, an off-by-one shift) biases every
policy-gradient estimator. fp32 on CPU, tolerance 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from stages.common.generation import HFBackend, Request
from stages.common.losses import clipped_policy_loss, masked_mean
from stages.common.models import (build_tiny_model, encode_prompts, pack_right, save_checkpoint, token_logprobs,
                                  train_char_tokenizer)
from stages.common.sections import TinyModelConfig
from stages.update import padded

TOL = 1e-4
PROMPTS = ["7+5=", "12+34=", "3+88=", "90+9=", "1+1=", "45+67="]  # different lengths: left padding in generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The model in memory (the trainer's side) and saved, as the generate stage loads it."""
    tokenizer = train_char_tokenizer(["0123456789+="])
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                             max_position_embeddings=32), tokenizer, seed=0)
    model_dir = tmp_path_factory.mktemp("tiny")
    save_checkpoint(model, tokenizer, model_dir)
    return model.eval(), tokenizer, str(model_dir)


def sample_rows(tiny, temperature: float) -> list[dict]:
    _, tokenizer, model_dir = tiny
    prompt_ids = encode_prompts(tokenizer, PROMPTS)
    backend = HFBackend(model_dir, batch_size=10)  # batches that straddle prompts
    groups = backend.generate(Request(prompt_ids, n=4, temperature=temperature, top_p=1.0, max_new_tokens=8, seed=1))
    return [{"prompt_token_ids": p, "response_token_ids": s.token_ids, "response_logprobs": s.logprobs}
            for p, group in zip(prompt_ids, groups) for s in group]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_match_generator(tiny, temperature):
    model, tokenizer, _ = tiny
    rows = sample_rows(tiny, temperature)
    assert len({len(r["response_token_ids"]) for r in rows}) > 1  # variable lengths, so padding is exercised
    ids, attn, mask = pack_right([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows],
                                 tokenizer.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(model, ids, attn, temperature)
    worst = 0.0
    for i, r in enumerate(rows):  # token by token, at the positions update reads them from
        p, n = len(r["prompt_token_ids"]), len(r["response_token_ids"])
        for got, want in zip(logp[i, p : p + n].tolist(), r["response_logprobs"]):
            worst = max(worst, abs(got - want))
    print(f"max |trainer - generator| logprob at T={temperature}: {worst:.2e}")
    assert worst < TOL, f"max |trainer - generator| logprob = {worst:.2e}"

    # ...and so the first on-policy minibatch of update has ratio 1 and no clipping.
    old = padded([r["response_logprobs"] for r in rows], [len(r["prompt_token_ids"]) for r in rows], ids.shape[1])
    adv = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0))
    _, stats = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    assert stats["ratio_dev"] < TOL and stats["clip_frac"] == 0
    assert masked_mean((torch.exp(logp - old) - 1).abs(), mask).item() < TOL


def test_temperature_mismatch_is_caught(tiny):
    """The check has teeth: scoring at the wrong temperature moves the logprobs far beyond 1e-4."""
    model, tokenizer, _ = tiny
    rows = sample_rows(tiny, 0.7)
    ids, attn, mask = pack_right([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows],
                                 tokenizer.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(model, ids, attn, 1.0)
    old = padded([r["response_logprobs"] for r in rows], [len(r["prompt_token_ids"]) for r in rows], ids.shape[1])
    assert masked_mean((logp - old).abs(), mask).item() > 100 * TOL
