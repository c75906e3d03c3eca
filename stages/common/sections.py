"""The sections of the YAML that stages read, key by key, with their defaults (pydantic, torch-free).

The pipeline config (tasks/config.py) is made of these sections (the `data` section is in
stages/common/data_config.py); each stage's params model
(stages/common/params.py) is made of them or of parts of them (`rl` is the union of what
generate, score and update read).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TinyModelConfig(Strict):
    """A small Llama built from a config, with a tokenizer trained on the data."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 64


class LoadOptions(Strict):
    """What a stage that loads a checkpoint reads of `model`."""

    trust_remote_code: bool = False


LoraStage = Literal["sft", "reward_model", "update"]


class LoraConfig(Strict):
    """LoRA adapters through peft (stages/common/adapters.py): the listed stages train an adapter on a
    frozen base and write only the adapter, which names its base by URI and digest."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Module names to adapt (q_proj, v_proj...), or "all-linear": every linear layer but the output head.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    stages: list[LoraStage] = ["sft", "reward_model", "update"]
    # QLoRA: the frozen base in 4 bits (bitsandbytes NF4), GPU only.
    load_in_4bit: bool = False

    @model_validator(mode="after")
    def _some_stage(self):
        if not self.stages:
            raise ValueError("model.lora.stages is empty: list the stages that train adapters, or drop model.lora")
        return self


class AdapterOptions(LoadOptions):
    """What a stage that may train an adapter reads of `model`: `lora` is None unless the stage is listed
    in model.lora.stages (tasks/spec.py), so turning adapters on for one stage leaves the others' keys."""

    lora: LoraConfig | None = None


class ModelConfig(AdapterOptions):
    # Exactly one: a Hugging Face model name or local directory, or a tiny model spec.
    name_or_path: str | None = None
    tiny: TinyModelConfig | None = None
    # Render prompts with the tokenizer's chat template (stages/common/chat.py). None: when it has one.
    chat_template: bool | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name_or_path is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.name_or_path or model.tiny")
        if self.lora is not None and "sft" in self.lora.stages and self.tiny is not None:
            raise ValueError("model.lora.stages includes sft, but model.tiny is built from scratch: an adapter "
                             "needs a pretrained base (model.name_or_path), or drop sft from model.lora.stages")
        return self


class EngineConfig(Strict):
    """DeepSpeed: ZeRO stage and precision for every training stage. A job of one process trains in
    plain torch (stages/common/engine.py): the same recipe, no ZeRO stage, bf16 as autocast."""

    zero_stage: int = Field(2, ge=0, le=3)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_clipping: float = Field(1.0, gt=0)


class SFTConfig(Strict):
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)  # global, split over ranks
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    log_every: int = Field(20, ge=1)
    save_every: int = Field(200, ge=1)  # resume state under {output}/_resume/


class RewardModelConfig(Strict):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    log_every: int = Field(20, ge=1)
    save_every: int = Field(100, ge=1)  # resume state under {output}/_resume/


class DPOConfig(Strict):
    """The `dpo` stage (method: dpo): the policy from SFT on the preference pairs, SFT as the reference."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)  # pairs per step, global, split over ranks
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    eval_fraction: float = Field(0.1, gt=0, lt=1)  # held-out pairs for the preference accuracy
    log_every: int = Field(20, ge=1)
    save_every: int = Field(100, ge=1)  # resume state under {output}/_resume/


class GenerateConfig(Strict):
    backend: Literal["auto", "hf", "vllm"] = "auto"  # auto: vLLM when CUDA and vLLM are present
    batch_size: int = Field(512, ge=1)  # sequences per generate() call on one rank (hf)
    # vLLM on GPU: 1 = data parallel (an engine per rank); N > 1 = tensor parallel over the
    # job's ranks through vLLM's external_launcher (the job's world size must equal N).
    tensor_parallel_size: int = Field(1, ge=1)
    chunk_prompts: int = Field(64, ge=1)  # prompts per rollout file; a killed job redoes at most one chunk per rank


class EvaluateConfig(Strict):
    max_new_tokens: int = Field(6, ge=1)
    batch_size: int = Field(512, ge=1)


# --- rl: the section is the union of what generate, score and update read -------------------


class Temperature(Strict):
    temperature: float = Field(1.0, gt=0)  # sampling; the trainer divides its logits by it too


class Sampling(Temperature):
    """rl keys that both generate and update read."""

    samples_per_prompt: int = Field(8, ge=2)
    max_new_tokens: int = Field(6, ge=1)


class RolloutConfig(Sampling):
    """What generate reads of `rl`."""

    prompts_per_round: int = Field(256, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    # No stop token before this many new tokens (benchmarks: a fixed response length). The recorded
    # logprobs are of what was sampled from, the stop tokens masked, which the trainer does not mask:
    # where a stop was likely, the first ratio is below 1.
    min_new_tokens: int = 0

    # Keys added after stage keys were in use: left out of the dump at their default, so a config that
    # does not set them keeps its stage keys (tasks/spec.py hashes the dump); the job reads the default back.
    _KEY_NEUTRAL_DEFAULTS: ClassVar[dict[str, object]] = {"min_new_tokens": 0}

    @model_serializer(mode="wrap")
    def _drop_key_neutral_defaults(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        for key, default in self._KEY_NEUTRAL_DEFAULTS.items():
            if key in data and data[key] == default:
                del data[key]
        return data

    @model_validator(mode="after")
    def _min_new_tokens_fits(self):
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"rl.min_new_tokens ({self.min_new_tokens}) must be between 0 and rl.max_new_tokens "
                             f"({self.max_new_tokens})")
        return self


class ScoringConfig(Temperature):
    """What score reads of `rl`."""

    reward: Literal["verifier", "reward_model"] = "verifier"


ALGORITHM_PRESETS = {  # advantage, kl_mode, kl_estimator, loss_agg
    "ppo": ("gae", "reward", "k1", "token_mean"),
    "grpo": ("grpo", "loss", "k3", "seq_mean_token_mean"),
    "dr_grpo": ("dr_grpo", "loss", "k3", "seq_mean_token_sum"),
    "rloo": ("rloo", "reward", "k1", "seq_mean_token_sum"),
    "reinforce_pp": ("reinforce_pp", "reward", "k1", "token_mean"),
}
ESTIMATOR_KEYS = ("advantage", "kl_mode", "kl_estimator", "loss_agg")
VALUE_KEYS = ("lam", "value_init", "value_lr", "value_clip_eps")

Algorithm = Literal["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "custom"]


class UpdateConfig(Sampling):
    """What update reads of `rl`: the estimator, the loss, the KL, PPO's value model."""

    algorithm: Algorithm = "grpo"
    lr: float = Field(3e-5, gt=0)
    epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(256, ge=1)  # global sequences per optimizer step
    save_every: int = Field(50, ge=1)  # optimizer steps between resume states (under {output}/_resume/)

    # Advantage estimator: set by `algorithm` (ALGORITHM_PRESETS), or by hand with `custom`.
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    gamma: float = Field(1.0, ge=0, le=1)  # discount (gae, reinforce_pp)
    lam: float = Field(0.95, ge=0, le=1)  # GAE lambda

    # Policy loss: PPO clip, asymmetric as in DAPO when clip_eps_low/high are set.
    clip_eps: float = Field(0.2, gt=0)
    clip_eps_low: float | None = Field(None, gt=0, lt=1)  # None: clip_eps
    clip_eps_high: float | None = Field(None, gt=0)  # None: clip_eps (DAPO "clip-higher": 0.28)
    # seq_mean_token_mean: mean over each response's tokens, then over responses (GRPO);
    # token_mean: mean over all tokens of the minibatch (DAPO, PPO);
    # seq_mean_token_sum: each response's token sum / max_new_tokens, mean over responses (Dr. GRPO).
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum"] = "seq_mean_token_mean"

    # KL to the reference (the SFT policy).
    kl_coef: float = Field(0.1, ge=0)
    kl_mode: Literal["reward", "loss"] = "loss"  # a penalty in the reward, or a term of the loss
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # Schulman, "Approximating KL divergence" (2020)

    # DAPO: dynamic sampling (drop groups whose rewards are all equal) and the soft overlong penalty
    # min(0, -(len - (max_new_tokens - overlong_buffer)) / overlong_buffer * overlong_penalty).
    drop_equal_reward_groups: bool = True
    overlong_buffer: int = Field(0, ge=0)  # 0: off
    overlong_penalty: float = Field(1.0, ge=0)

    # PPO's value model (critic), trained alongside the policy with a clipped value loss.
    value_lr: float = Field(1e-4, gt=0)
    value_clip_eps: float = Field(0.5, gt=0)  # as verl; in units of the reward

    @property
    def trains_value_model(self) -> bool:
        return self.advantage == "gae"

    @model_validator(mode="after")
    def _overlong_fits(self):
        if self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"rl.overlong_buffer ({self.overlong_buffer}) must be below rl.max_new_tokens "
                             f"({self.max_new_tokens})")
        return self


class RLConfig(RolloutConfig, ScoringConfig, UpdateConfig):
    """The RL rounds. `algorithm` decides the estimator, the KL placement and the aggregation:
      ppo           InstructGPT-style RLHF (Ouyang et al. 2022; as in OpenRLHF/verl): GAE with a
                    value model, a per-token k1 KL penalty in the reward, token-mean loss.
      grpo          Shao et al. 2024: group-normalised outcome advantage, k3 KL as a loss term,
                    mean over each response's tokens, then over responses.
      dr_grpo       Liu et al. 2025 (Dr. GRPO): no std normalisation; each response's token sum
                    over a constant normaliser (max_new_tokens) instead of its token mean.
      rloo          Ahmadian et al. 2024: leave-one-out baseline; the response's k1 KL (summed over
                    its tokens) subtracted from its reward; the response's log-prob summed.
      reinforce_pp  Hu 2025 (REINFORCE++): per-token k1 KL penalty in the reward, discounted
                    returns normalised over the whole batch, token-mean loss.
      custom        none of these: the YAML sets advantage, kl_mode, kl_estimator and loss_agg.
    A YAML key that contradicts the algorithm is an error, not a silent mix. Only the `gae`
    estimator trains a value model, and only then do the value keys mean anything.
    """

    rounds: int = Field(8, ge=0)
    value_init: Literal["reward_model", "sft"] = "reward_model"  # PPO's value model of round 0

    @model_validator(mode="before")
    @classmethod
    def _algorithm_decides(cls, data):
        if not isinstance(data, dict):
            return data
        algorithm = data.get("algorithm", "grpo")
        if algorithm == "custom":
            missing = [f"rl.{k}" for k in ESTIMATOR_KEYS if k not in data]
            if missing:
                raise ValueError(f"rl.algorithm 'custom' takes its variant from the YAML: set {', '.join(missing)}")
        elif algorithm in ALGORITHM_PRESETS:
            preset = dict(zip(ESTIMATOR_KEYS, ALGORITHM_PRESETS[algorithm]))
            for key, value in preset.items():
                if key in data and data[key] != value:
                    raise ValueError(f"rl.{key} {data[key]!r} contradicts rl.algorithm {algorithm!r}, which uses "
                                     f"{value!r}; to combine them, set rl.algorithm: custom")
            data = {**data, **preset}
        if data.get("advantage", "grpo") != "gae":
            for key in VALUE_KEYS:
                if key in data:
                    raise ValueError(f"rl.{key} is set, but rl.algorithm {algorithm!r} trains no value model "
                                     "(only the gae estimator does)")
        return data
