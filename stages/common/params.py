"""What each stage reads: one typed model per stage (pydantic, torch-free).

A stage's model names the YAML sections (or the part of a section) it reads, under the YAML's
own names, so `rl.clip_eps_high` in the YAML is `params.rl.clip_eps_high` in stages/update.py.
The task builds the model from the config (tasks/spec.py: stage_params), hashes it for the key
and writes it into the spec; the job parses it back into the same model
(`runtime.main(run, UpdateParams)`), and mypy checks every attribute a stage reads.
"""

from __future__ import annotations

from typing import Literal

from .data_config import DataConfig
from .sections import (AdapterOptions, DPOConfig, EngineConfig, EvaluateConfig, GenerateConfig, LoadOptions,
                       ModelConfig, RewardModelConfig, RolloutConfig, ScoringConfig, SFTConfig, Strict, UpdateConfig)


class DataPrepParams(Strict):
    seed: int
    model: ModelConfig  # model.tiny: train a tokenizer on the data
    data: DataConfig


class SFTParams(Strict):
    seed: int
    model: ModelConfig
    engine: EngineConfig
    sft: SFTConfig


class RewardModelParams(Strict):
    seed: int
    model: AdapterOptions
    engine: EngineConfig
    reward_model: RewardModelConfig


class DPOParams(Strict):
    seed: int
    model: LoadOptions
    engine: EngineConfig
    dpo: DPOConfig


class GenerateParams(Strict):
    seed: int
    round: int
    model: LoadOptions
    rl: RolloutConfig
    generate: GenerateConfig


class ScoreParams(Strict):
    round: int
    model: LoadOptions
    rl: ScoringConfig
    verifier: Literal["exact", "numeric"]


class UpdateParams(Strict):
    seed: int
    round: int
    model: AdapterOptions
    engine: EngineConfig
    rl: UpdateConfig


class EvaluateParams(Strict):
    model: LoadOptions
    evaluate: EvaluateConfig
    verifier: Literal["exact", "numeric"]


STAGE_PARAMS: dict[str, type[Strict]] = {
    "data_prep": DataPrepParams, "sft": SFTParams, "reward_model": RewardModelParams, "dpo": DPOParams,
    "generate": GenerateParams, "score": ScoreParams, "update": UpdateParams, "evaluate": EvaluateParams,
}
