"""The pipeline config: one strict schema, validated before any compute starts.

Unknown keys and wrong types are errors that name the key (`rl.clip_eps: Input should be
a valid number`). Stages never read this file: tasks cut it into per-stage params.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file that cannot run: the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StorageConfig(_Strict):
    # fsspec URI or local path. None: $ALIGNFLOW_STORAGE_ROOT, else ./.alignflow/store.
    root: str | None = None
    # For S3-compatible servers (MinIO, moto...); credentials come from the environment only.
    s3_endpoint_url: str | None = None


class TrackingConfig(_Strict):
    # None: $MLFLOW_TRACKING_URI, else a SQLite file under ./.alignflow.
    uri: str | None = None
    experiment: str = "alignflow"
    registered_model: str = "alignflow-policy"


class LaunchConfig(_Strict):
    backend: Literal["local"] = "local"
    nproc_per_node: int = Field(2, ge=1)
    timeout_s: float = Field(3600, gt=0)
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(2.0, ge=0)
    # Interpreter for stage jobs; None: this interpreter. `stage_python` overrides it per stage
    # (production images for generation and training often differ).
    python: str | None = None
    stage_python: dict[str, str] = {}


class TinyModelConfig(_Strict):
    """A small Llama built from a config, with a tokenizer trained on the data."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 64


class ModelConfig(_Strict):
    # Exactly one: a Hugging Face model name or local directory, or a tiny model spec.
    name_or_path: str | None = None
    tiny: TinyModelConfig | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name_or_path is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.name_or_path or model.tiny")
        return self


class SyntheticDataConfig(_Strict):
    """Two-digit addition with zero-padded operands: `07+45=` -> `052`.

    The demonstrator drops the units carry in `teacher_carry_drop` of carry cases, so about
    29% of SFT demonstrations are wrong in a systematic way that RL can fix.
    """

    num_sft: int = Field(20000, ge=1)
    num_pairs: int = Field(6000, ge=1)
    num_eval: int = Field(1000, ge=1)
    teacher_carry_drop: float = Field(0.65, ge=0, le=1)


class HFDataConfig(_Strict):
    """A Hugging Face dataset name, or a local .parquet/.jsonl/.json file, with a column mapping."""

    path: str
    name: str | None = None
    split: str = "train"
    eval_split: str | None = None  # None: hold out `num_eval` rows of `split`
    num_eval: int = Field(500, ge=1)
    prompt_column: str = "prompt"
    response_column: str = "response"  # the demonstration used for SFT
    answer_column: str = "answer"  # the reference answer the verifier checks
    prompt_template: str = "{prompt}"
    verifier: Literal["exact", "numeric"] = "numeric"


class DataConfig(_Strict):
    source: Literal["synthetic", "hf"] = "synthetic"
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    hf: HFDataConfig | None = None

    @model_validator(mode="after")
    def _hf_needs_section(self):
        if self.source == "hf" and self.hf is None:
            raise ValueError("data.source is 'hf' but the data.hf section is missing")
        return self


class EngineConfig(_Strict):
    """DeepSpeed: ZeRO stage and precision for every training stage."""

    zero_stage: int = Field(2, ge=0, le=3)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_clipping: float = Field(1.0, gt=0)


class SFTConfig(_Strict):
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)  # global, split over ranks
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    log_every: int = Field(20, ge=1)
    save_every: int = Field(200, ge=1)  # resume state under {output}/_resume/


class RewardModelConfig(_Strict):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    log_every: int = Field(20, ge=1)
    save_every: int = Field(100, ge=1)  # resume state under {output}/_resume/


class GenerateConfig(_Strict):
    backend: Literal["auto", "hf", "vllm"] = "auto"  # auto: vLLM when CUDA and vLLM are present
    batch_size: int = Field(512, ge=1)  # sequences per generate() call on one rank (hf)
    # vLLM on GPU: 1 = data parallel (an engine per rank); N > 1 = tensor parallel over the
    # job's ranks through vLLM's external_launcher (the job's world size must equal N).
    tensor_parallel_size: int = Field(1, ge=1)
    chunk_prompts: int = Field(64, ge=1)  # prompts per rollout file; a killed job redoes at most one chunk per rank


class RLConfig(_Strict):
    """The RL rounds: sampling, the reward, the advantage estimator, the loss, the value model.

    `algorithm` fills in its paper's `advantage`, `kl_mode`, `kl_estimator` and `loss_agg` for
    the keys the YAML leaves out (a key in the YAML always wins):
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
    Only `ppo` trains a value model, and only its `gae` estimator uses one.
    """

    algorithm: Literal["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    rounds: int = Field(8, ge=0)
    reward: Literal["verifier", "reward_model"] = "verifier"
    prompts_per_round: int = Field(256, ge=1)
    samples_per_prompt: int = Field(8, ge=2)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(6, ge=1)
    lr: float = Field(3e-5, gt=0)
    epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(256, ge=1)  # global sequences per optimizer step
    save_every: int = Field(50, ge=1)  # update's optimizer steps between resume states (under {output}/_resume/)

    # Advantage estimator (defaults from `algorithm`).
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
    value_init: Literal["reward_model", "sft"] = "reward_model"
    value_lr: float = Field(1e-4, gt=0)
    value_clip_eps: float = Field(0.5, gt=0)  # as verl; in units of the reward

    @model_validator(mode="before")
    @classmethod
    def _algorithm_defaults(cls, data):
        paper = {  # advantage, kl_mode, kl_estimator, loss_agg
            "ppo": ("gae", "reward", "k1", "token_mean"),
            "grpo": ("grpo", "loss", "k3", "seq_mean_token_mean"),
            "dr_grpo": ("dr_grpo", "loss", "k3", "seq_mean_token_sum"),
            "rloo": ("rloo", "reward", "k1", "seq_mean_token_sum"),
            "reinforce_pp": ("reinforce_pp", "reward", "k1", "token_mean"),
        }
        if isinstance(data, dict) and data.get("algorithm", "grpo") in paper:
            keys = ("advantage", "kl_mode", "kl_estimator", "loss_agg")
            return {**dict(zip(keys, paper[data.get("algorithm", "grpo")])), **data}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if (self.advantage == "gae") != (self.algorithm == "ppo"):
            raise ValueError("rl.advantage 'gae' needs the value model of rl.algorithm 'ppo', and ppo uses gae")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"rl.overlong_buffer ({self.overlong_buffer}) must be below rl.max_new_tokens "
                             f"({self.max_new_tokens})")
        return self


class EvaluateConfig(_Strict):
    max_new_tokens: int = Field(6, ge=1)
    batch_size: int = Field(512, ge=1)


class PromoteConfig(_Strict):
    metric: Literal["accuracy"] = "accuracy"
    margin: float = Field(0.0, ge=0)
    min_score: float = Field(0.0, ge=0)


class PipelineConfig(_Strict):
    pipeline: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    launch: LaunchConfig = LaunchConfig()
    model: ModelConfig
    data: DataConfig = DataConfig()
    engine: EngineConfig = EngineConfig()
    sft: SFTConfig = SFTConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    generate: GenerateConfig = GenerateConfig()
    rl: RLConfig = RLConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()

    def digest(self) -> str:
        """Hash of what determines the results (not where they are stored or tracked)."""
        data = self.model_dump(mode="json", exclude={"storage", "tracking", "launch"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def storage_root(self) -> str:
        root = self.storage.root or os.environ.get("ALIGNFLOW_STORAGE_ROOT") or ".alignflow/store"
        return normalize_uri(root)

    def tracking_uri(self) -> str:
        uri = self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = "sqlite:///" + str(Path(".alignflow/mlflow.db").resolve())
        return uri

    def storage_options(self) -> dict:
        if self.storage.s3_endpoint_url and self.storage_root().startswith("s3://"):
            return {"client_kwargs": {"endpoint_url": self.storage.s3_endpoint_url}}
        return {}


def normalize_uri(uri: str) -> str:
    """Plain and relative paths become absolute file:// URIs; other schemes pass through."""
    if "://" in uri:
        if uri.startswith("file://"):
            return "file://" + str(Path(uri[len("file://"):]).resolve())
        return uri.rstrip("/")
    return "file://" + str(Path(uri).resolve())


def _format_errors(path: str, err: ValidationError) -> str:
    lines = [f"invalid config {path}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<config>") -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_config(path: str | os.PathLike) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {path}: {err}") from None
    return parse_config(data, str(path))
