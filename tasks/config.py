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
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from stages.common import store
from stages.common.sections import (DataConfig, EngineConfig, EvaluateConfig, GenerateConfig, ModelConfig,
                                  RewardModelConfig, RLConfig, SFTConfig, Strict)


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


class LaunchConfig(Strict):
    backend: Literal["local"] = "local"
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
        return store.storage_options(self.storage_root(), self.storage.s3_endpoint_url)

    @property
    def verifier(self) -> str:
        """The reward of record's checker for score and evaluate: exact match on the synthetic task."""
        return self.data.hf.verifier if self.data.source == "hf" else "exact"


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
