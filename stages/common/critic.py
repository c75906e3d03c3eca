"""PPO's value model: a scalar-head sequence classifier read at every position.

The value of the state before response token t (prompt + the tokens before t) is the head
applied to the hidden state at position t-1, so values line up with `token_logprobs` and
the response mask of `pack_right`. The value model of round r lives in the artifact that
made it:
    round 0   the reward model's checkpoint/ (`rl.value_init: reward_model`), or the SFT
              checkpoint/ with a new zero head (`rl.value_init: sft`: every value starts at 0)
    round r   the value/ directory that `update` of round r-1 wrote next to its checkpoint/
Zero (not random) init keeps `score` and `update` of round 0 on the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.common.adapters import Checkpoint, load_reward
from stages.common.models import load_reward_model


class TokenValues(torch.nn.Module):
    """values[:, t] = V(tokens < t) for t >= 1 (position 0 gets 0); a DeepSpeed engine can wrap it."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids, attention_mask):
        hidden = self.classifier.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        values = self.classifier.score(hidden).squeeze(-1).float()
        return F.pad(values[:, :-1], (1, 0))


def value_source(artifact) -> tuple[str, bool]:
    """(directory inside the artifact, whether the head starts from zero) for a value input."""
    stage = artifact.manifest["stage"]
    if stage == "update":
        return "value", False
    if stage == "reward_model":
        return "checkpoint", False
    if stage == "sft":
        return "checkpoint", True
    raise ValueError(f"a value model cannot come from a {stage!r} artifact")


def load_value_model(source, pad_token_id: int, zero_head: bool, trust_remote_code: bool = False, workdir=None):
    """`source`: a checkpoint directory, or a Checkpoint (a LoRA reward model is merged, under `workdir`)."""
    if isinstance(source, Checkpoint):
        classifier = load_reward(source, workdir, trust_remote_code)
    else:
        classifier = load_reward_model(source, trust_remote_code)
    classifier.config.pad_token_id = pad_token_id
    if zero_head:
        torch.nn.init.zeros_(classifier.score.weight)
    return TokenValues(classifier)
