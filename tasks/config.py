"""The pipeline config: one strict schema, validated before any compute starts.

Unknown keys and wrong types are errors that name the key (`rl.clip_eps: Input should be
a valid number`). The sections the stages read are defined with the stages
(stages/common/sections.py); the ones only the orchestrator reads (storage, tracking, launch,
promote) are here. Stage jobs never read this file: tasks/spec.py cuts it into their params.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from stages.common import store
from stages.common.data_config import DataConfig
from stages.common.sections import (DPOConfig, EngineConfig, EvaluateConfig, GenerateConfig,
                                  ModelConfig, RewardModelConfig, RLConfig, SFTConfig, Strict)


class ConfigError(ValueError):
    """A config file that cannot run: the message names the file and the key."""


class StorageConfig(Strict):
    # fsspec URI or local path. None: $ALIGNFLOW_STORAGE_ROOT, else ./.alignflow/store.
    root: str | None = None
    # For S3-compatible servers (MinIO, moto...); credentials come from the environment only.
    s3_endpoint_url: str | None = None


class TrackingConfig(Strict):
    # None: $MLFLOW_TRACKING_URI, else a SQLite file under ./.alignflow.
    uri: str | None = None
    experiment: str = "alignflow"
    registered_model: str = "alignflow-policy"


StageName = Literal["data_prep", "sft", "reward_model", "dpo", "generate", "score", "update", "evaluate"]


class SlurmConfig(Strict):
    """The shape of one Slurm job (launch.backend: slurm): `#SBATCH` options and setup lines."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)  # --gpus-per-node; 0: no GPU requested
    # torchrun processes per node; None: gpus_per_node if set, else launch.nproc_per_node
    nproc_per_node: int | None = Field(None, ge=1)
    cpus_per_task: int | None = Field(None, ge=1)  # one task per node: the node's CPUs for all its ranks
    mem: str | None = None  # --mem, per node ("64G")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str | None = None  # --time ("2:00:00"); None: launch.timeout_s rounded up, so an orphan ends too
    sbatch_options: list[str] = []  # more `#SBATCH` options, as written after it ("--exclusive")
    setup: list[str] = []  # shell lines run before srun (module load, source an environment)
    # c10d rendezvous port on the allocation's first node; None: 20000 + job id % 20000, so two
    # jobs sharing a node do not collide
    rdzv_port: int | None = Field(None, ge=1024, le=65535)
    # Job scripts and output files; must be visible from the worker and the nodes (a shared
    # filesystem). None: .alignflow/slurm-jobs under the project.
    job_dir: str | None = None


class LaunchConfig(Strict):
    backend: Literal["local", "slurm"] = "local"
    nproc_per_node: int = Field(2, ge=1)
    timeout_s: float = Field(3600, gt=0)
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(2.0, ge=0)
    # One writer per output key: a job's lease expires this long after its last heartbeat.
    lease_ttl_s: float = Field(60.0, gt=0)
    # Interpreter for stage jobs; None: this interpreter. `stage_python` overrides it per stage
    # (production images for generation and training often differ).
    python: str | None = None
    stage_python: dict[str, str] = {}
    # Local jobs on this interpreter are forked from a warm job server that has imported torch,
    # transformers and DeepSpeed once (tasks/warm_jobs.py); false: each job is a cold torchrun.
    warm_start: bool = True
    slurm: SlurmConfig = SlurmConfig()
    # Per stage: the keys given replace launch.slurm's (generation and training want other shapes).
    slurm_per_stage: dict[StageName, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _per_stage_shapes_are_valid(self) -> "LaunchConfig":
        for stage in self.slurm_per_stage:
            try:
                self.slurm_for(stage)
            except ValidationError as err:
                e = err.errors()[0]
                key = ".".join(str(p) for p in e["loc"])
                msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
                raise ValueError(f"launch.slurm_per_stage.{stage}.{key}: {msg}") from None
        return self

    def slurm_for(self, stage: str) -> SlurmConfig:
        overrides = {str(name): keys for name, keys in self.slurm_per_stage.items()}.get(stage, {})
        return SlurmConfig.model_validate({**self.slurm.model_dump(), **overrides})


class PromoteConfig(Strict):
    metric: Literal["accuracy"] = "accuracy"
    margin: float = Field(0.0, ge=0)
    min_score: float = Field(0.0, ge=0)


class PipelineConfig(Strict):
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
    # How the policy is trained from SFT: rounds of RL (generate, score, update), or DPO on the pairs.
    method: Literal["rl", "dpo"] = "rl"
    dpo: DPOConfig = DPOConfig()
    generate: GenerateConfig = GenerateConfig()
    rl: RLConfig = RLConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()

    def digest(self) -> str:
        """Hash of what determines the results (not where they are stored or tracked)."""
        data = self.model_dump(mode="json", exclude={"storage", "tracking", "launch"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def rl_rounds(self, override: int | None = None) -> int:
        """The rounds of RL a run does: `rl.rounds` unless overridden; none with method: dpo."""
        return 0 if self.method == "dpo" else self.rl.rounds if override is None else override

    def storage_root(self) -> str:
        root = self.storage.root or os.environ.get("ALIGNFLOW_STORAGE_ROOT") or ".alignflow/store"
        return normalize_uri(root)

    def tracking_uri(self) -> str:
        uri = self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = "sqlite:///" + str(Path(".alignflow/mlflow.db").resolve())
        return uri

    def storage_options(self) -> dict:
        return store.storage_options(self.storage_root(), self.storage.s3_endpoint_url)

    @property
    def verifier(self) -> str:
        """The reward of record's checker for score and evaluate: exact match on the synthetic task."""
        return self.data.verifier if self.data.source == "datasets" else "exact"


def check_machines(cfg: PipelineConfig) -> None:
    """What the config asks of the machines its jobs run on, checked before any job starts."""
    lora = cfg.model.lora
    if lora is None or not lora.load_in_4bit:
        return
    if cfg.launch.backend == "slurm":
        no_gpu = [s for s in lora.stages if cfg.launch.slurm_for(s).gpus_per_node == 0]
        if no_gpu:
            raise ConfigError(f"model.lora.load_in_4bit: QLoRA's 4-bit base needs a GPU, but launch.slurm gives "
                              f"{', '.join(no_gpu)} gpus_per_node: 0")
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError("model.lora.load_in_4bit: QLoRA's 4-bit base (bitsandbytes) needs a CUDA GPU and this "
                          "machine has none; set it to false to train the adapters on the full-precision base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.lora.load_in_4bit: bitsandbytes is not installed (pip install -e '.[qlora]')")


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
