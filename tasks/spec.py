"""What a stage job is told: its typed params, its key and its place in the store.

    params = the stage's model (stages/common/params.py), cut from the pipeline config
    key    = hash(stage, params, its inputs' manifest digests, its code version)
    output = {root}/{pipeline}/{stage}/{key}

Same inputs -> same key -> same place: a rerun, a UI retry or a new run finds the output there.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from pydantic import BaseModel

from stages.common import store
from stages.common.adapters import external_digest
from stages.common.params import STAGE_PARAMS
from stages.common.role_datasets import local_path
from stages.common.sections import Strict
from stages.common.runtime import StageSpec
from tasks.config import PipelineConfig

STAGES_DIR = Path(store.__file__).resolve().parent.parent


def stage_params(stage: str, cfg: PipelineConfig, round_idx: int | None = None) -> Strict:
    """The stage's params model, each field taken from the config key of the same name.

    A field typed as part of a section (`rl: RolloutConfig`) gets only that part of it, so a
    stage's key depends on exactly what its job reads (stages/common/params.py).
    """
    model = STAGE_PARAMS[stage]
    values = {}
    for name, field in model.model_fields.items():
        value = round_idx if name == "round" else getattr(cfg, name)
        part = field.annotation
        if isinstance(value, BaseModel) and type(value) is not part:
            value = part.model_validate(value.model_dump(include=set(part.model_fields)))
        if name == "model" and getattr(value, "lora", None) is not None and stage not in value.lora.stages:
            value = value.model_copy(update={"lora": None})  # this stage trains no adapter
        values[name] = value
    return model(**values)


def stage_code_files(stage: str) -> list[Path]:
    """The stage's module and every `stages.common` module it imports, transitively."""
    common = STAGES_DIR / "common"
    seen: set[Path] = set()
    todo = [STAGES_DIR / f"{stage}.py"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1 and path.parent == common:  # from . import x / from .x import y
                    names = [f"stages.common.{node.module}"] if node.module else \
                        [f"stages.common.{a.name}" for a in node.names]
                elif node.module == "stages.common":
                    names = [f"stages.common.{a.name}" for a in node.names]
                elif node.module:
                    names = [node.module]
            for name in names:
                parts = name.split(".")
                if parts[:2] == ["stages", "common"] and len(parts) > 2 and (common / f"{parts[2]}.py").is_file():
                    todo.append(common / f"{parts[2]}.py")
    return sorted(seen)


def code_version(stage: str) -> str:
    """Hash of the code that produces the stage's output: a change to it gives new keys."""
    h = hashlib.sha256()
    for f in stage_code_files(stage):
        h.update(f.relative_to(STAGES_DIR).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def compute_key(stage: str, params: dict, input_digests: dict[str, str], code: str) -> str:
    """Same stage, params, inputs and code -> same key -> same place in the store."""
    payload = {"stage": stage, "params": params, "inputs": input_digests, "code": code}
    return hashlib.sha256(store.canonical_json(payload)).hexdigest()[:16]


def external_inputs(stage: str, cfg: PipelineConfig) -> dict[str, str]:
    """Digests of what a stage reads from outside the store, so new contents at the same path make a new
    key: data_prep's local dataset files and the local model's tokenizer (it renders with it); sft's
    local pretrained base (the digest its adapter records). A hub name is keyed by the name alone:
    hashing it would mean downloading it here."""
    base = cfg.model.name_or_path
    local_base = base is not None and Path(base).is_dir()
    if stage == "data_prep":
        digests = {f"data.{role}": store.sha256_file(local_path(ds))
                   for role, ds in cfg.data.datasets().items() if ds.is_local and local_path(ds).is_file()}
        return digests | ({"tokenizer": tokenizer_digest(base)} if local_base else {})
    if stage == "sft" and local_base:
        return {"base_model": external_digest(base)}
    return {}


def tokenizer_digest(model_dir: str) -> str:
    """sha256 over a model directory's tokenizer files (vocabulary, merges, config, chat template)."""
    h = hashlib.sha256()
    for p in sorted(Path(model_dir).iterdir()):
        if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")) and p.is_file():
            h.update(p.name.encode() + b"\0" + store.sha256_file(p).encode() + b"\0")
    return h.hexdigest()


def stage_spec(stage: str, cfg: PipelineConfig, inputs: dict[str, store.Artifact],
               round_idx: int | None = None) -> StageSpec:
    """The job's spec, less tracking and fault injection (the launching task adds those)."""
    params = stage_params(stage, cfg, round_idx).model_dump(mode="json")
    code = code_version(stage)
    digests = {name: art.digest for name, art in inputs.items()} | external_inputs(stage, cfg)
    key = compute_key(stage, params, digests, code)
    return StageSpec(stage=stage, key=key, pipeline=cfg.pipeline, inputs={n: a.uri for n, a in inputs.items()},
                     output=store.join(cfg.storage_root(), cfg.pipeline, stage, key), params=params,
                     code_version=code, storage_options=cfg.storage_options())
