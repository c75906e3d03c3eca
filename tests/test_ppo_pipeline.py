"""PPO's value model, and PPO end to end.

- The value model reads V(state before token t) at the same positions as the trainer's logprobs,
  from a reward model (its trained head) or from the SFT model (a zero head).
- One round of the real pipeline (Prefect flow, torchrun stages, 2 ranks) on the small config of
  conftest with `rl.algorithm: ppo` and the reward model's reward: `score` writes the `values`
  column from the value model of round 0 (the reward model), `update` trains the value model
  alongside the policy and writes `value/` next to `checkpoint/`.
"""

from __future__ import annotations

import types

import pytest
import torch

from stages.common import store
from stages.common.critic import load_value_model, value_source
from stages.common.sections import TinyModelConfig
from stages.common.models import (build_tiny_model, load_reward_model, pack_right, save_checkpoint,
                                  train_char_tokenizer)
from stages.common.rollouts import PPO_SCORED_SCHEMA, read_tables


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny causal LM saved as the SFT stage saves it."""
    tokenizer = train_char_tokenizer(["0123456789+="])
    model = build_tiny_model(TinyModelConfig(**{"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                                                  "max_position_embeddings": 32}), tokenizer, seed=0)
    path = tmp_path_factory.mktemp("sft") / "checkpoint"
    save_checkpoint(model, tokenizer, path)
    return path, tokenizer


def test_value_model_positions_and_sources(tiny_checkpoint, tmp_path):
    path, tokenizer = tiny_checkpoint
    stage = lambda name: types.SimpleNamespace(manifest={"stage": name})  # noqa: E731
    assert value_source(stage("sft")) == ("checkpoint", True)
    assert value_source(stage("reward_model")) == ("checkpoint", False)
    assert value_source(stage("update")) == ("value", False)

    prompts, responses = [[1, 5, 6], [1, 7, 8, 9, 10]], [[11, 12, 2], [13, 2]]
    ids, attn, mask = pack_right(prompts, responses, tokenizer.pad_token_id)
    from_sft = load_value_model(path, tokenizer.pad_token_id, zero_head=True).eval()
    with torch.no_grad():
        assert from_sft(ids, attn).abs().max().item() == 0  # a value model from SFT starts knowing nothing

    # A reward model (random head here): V at the position after the last token is the reward model's
    # score of the whole sequence, so values[:, t] is the head on the hidden state of token t-1.
    reward_model = load_reward_model(path, init_head=True)
    torch.nn.init.normal_(reward_model.score.weight, std=1.0)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    save_checkpoint(reward_model, tokenizer, tmp_path / "rm")
    critic = load_value_model(tmp_path / "rm", tokenizer.pad_token_id, zero_head=False).eval()
    with torch.no_grad():
        values = critic(ids, attn)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            end = len(p) + len(r)
            prefix = torch.tensor([p + r[:-1]])  # the state before the last response token
            assert values[i, end - 1].item() == pytest.approx(reward_model(input_ids=prefix).logits.item(), abs=1e-5)
            if end < ids.shape[1]:
                full = torch.tensor([p + r])
                assert values[i, end].item() == pytest.approx(reward_model(input_ids=full).logits.item(), abs=1e-5)
        assert values[:, 0].abs().max().item() == 0


@pytest.mark.usefixtures("prefect_harness")
def test_ppo_one_round(tiny_config):
    from flows.alignment import alignment

    path = tiny_config(**{"rl.algorithm": "ppo", "rl.reward": "reward_model", "rl.kl_coef": 0.05})
    summary = alignment(config_path=str(path), rounds=1)

    update = store.read_artifact(summary["policy_checkpoint_uri"].removesuffix("/checkpoint"))
    files = {f["path"] for f in update.manifest["files"]}
    assert {"checkpoint/model.safetensors", "value/model.safetensors", "value/config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # safetensors only
    inputs = update.manifest["inputs"]
    reward_model_uri = inputs["value"]["uri"]
    assert "/reward_model/" in reward_model_uri  # round 0's value model: initialised from the reward model

    metrics = update.metrics
    assert metrics["ratio_dev_first"] < 1e-4  # the first minibatch is on-policy
    assert metrics["value_dev_first"] < 1e-4  # and its value model is the one that scored the round
    assert metrics["samples_used"] > 0 and metrics["optimizer_steps"] > 0
    for key in ("value_loss", "explained_variance", "kl", "clip_frac"):
        assert key in metrics

    scored = store.read_artifact(inputs["scored"]["uri"])
    assert scored.manifest["inputs"]["value"]["uri"] == reward_model_uri  # score and update read the same one
    fs, base = store.filesystem(scored.uri)
    parts = [f"{base}/{f.path}" for f in scored.files_under("scored")]
    table = read_tables(parts, PPO_SCORED_SCHEMA)  # checks values is list<float32>, aligned with the tokens
    assert table.schema.field("values").type == PPO_SCORED_SCHEMA.field("values").type
    assert table.num_rows == 16 * 4
    values = [v for row in table.column("values").to_pylist() for v in row]
    assert len(values) == sum(len(r) for r in table.column("response_token_ids").to_pylist())
    assert len(set(values)) > 1
    assert "value_mean" in scored.metrics
