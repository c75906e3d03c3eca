"""LoRA adapters (peft): checkpoints that hold only the adapter and name the model it applies to.

An adapter checkpoint is a `save_pretrained` directory like any other, with peft's files in place
of the weights and one more file:

    adapter_config.json, adapter_model.safetensors   peft's (the trainable weights only)
    alignflow_base.json                              {"uri", "digest"} of the base model
    tokenizer files

The base is either a pipeline artifact's `checkpoint/` (URI `<artifact>/checkpoint`, digest its
manifest's) or a model from outside the store (`model.name_or_path`: a hub name or a local
directory; digest: sha256 over its config and safetensors). A base may itself be an adapter (a
LoRA policy on a LoRA SFT), so a model to load is a chain: one full directory, then the adapters
that apply on top, in order (`Checkpoint`). Loading merges them into one plain model, so every
consumer (evaluate, serving, promotion) sees a full model. The reference model of RL is the base
of the policy's adapter: the SFT model, the same weights with the adapter off.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import store

BASE_FILE = "alignflow_base.json"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT = "checkpoint"


class BaseMismatch(store.ArtifactError):
    """The base found at an adapter's base URI is not the model the adapter was trained on."""


@dataclass(frozen=True)
class Checkpoint:
    """A model as local directories: `base_dir` holds full weights, each of `adapter_dirs` (in order)
    an adapter trained on what comes before it. `dir` has the tokenizer (the outermost directory)."""

    base_dir: Path
    adapter_dirs: tuple[Path, ...] = ()

    @property
    def dir(self) -> Path:
        return self.adapter_dirs[-1] if self.adapter_dirs else self.base_dir

    @property
    def is_adapter(self) -> bool:
        return bool(self.adapter_dirs)

    def without_last_adapter(self) -> "Checkpoint":
        return Checkpoint(self.base_dir, self.adapter_dirs[:-1])


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_base_ref(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / BASE_FILE
    if not path.is_file():
        raise store.ArtifactError(f"{adapter_dir}: an adapter checkpoint without {BASE_FILE} (its base is unknown)")
    return json.loads(path.read_text())


def artifact_ref(artifact: store.Artifact) -> dict:
    """The base reference of a pipeline checkpoint: the artifact's `checkpoint/` and its manifest digest."""
    return {"uri": store.join(artifact.uri, CHECKPOINT), "digest": artifact.digest}


# --- models from outside the store (model.name_or_path) -----------------------------------

def external_dir(name_or_path: str) -> Path:
    """A local directory of the model: the path itself, or the hub snapshot (from the local cache when it is there)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def digest_files(model_dir: str | os.PathLike) -> list[Path]:
    """The files of a model from outside the store that its digest covers: config and weights."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    if not any(p.suffix == ".safetensors" for p in files):
        raise store.ArtifactError(f"{model_dir}: no .safetensors weights (only safetensors checkpoints are loaded)")
    return files


def external_digest(model_dir: str | os.PathLike) -> str:
    """sha256 over a model directory's config and weight files (names and contents)."""
    h = hashlib.sha256()
    for p in digest_files(model_dir):
        h.update(p.name.encode() + b"\0" + store.sha256_file(p).encode() + b"\0")
    return h.hexdigest()


# --- resolving a checkpoint's chain --------------------------------------------------------

def resolve(checkpoint_dir: Path, fetch_base: Callable[[dict, int], Path]) -> Checkpoint:
    """The chain of `checkpoint_dir`: `fetch_base(ref, depth)` returns the local directory of the base
    that `ref` names, checked against its digest."""
    adapters: list[Path] = []
    current = Path(checkpoint_dir)
    while is_adapter_dir(current):
        adapters.insert(0, current)
        current = fetch_base(read_base_ref(current), len(adapters))
    return Checkpoint(current, tuple(adapters))


def is_store_ref(ref: dict) -> bool:
    """Whether a base reference names a pipeline artifact's checkpoint (else a model from outside the store)."""
    return "://" in ref["uri"] and ref["uri"].endswith("/" + CHECKPOINT)


def store_fetcher(dest: Path, storage_options: dict | None = None) -> Callable[[dict, int], Path]:
    """Bases from the store (hash-checked downloads under `dest`) or from outside it (digest recomputed)."""

    def fetch(ref: dict, depth: int) -> Path:
        uri, digest = ref["uri"], ref["digest"]
        if not is_store_ref(ref):
            local = external_dir(uri)
            found = external_digest(local)  # hashes every weight file: once
            if found != digest:
                raise BaseMismatch(f"base model {uri}: its files changed since the adapter was trained on them "
                                   f"(digest {found[:12]}, the adapter's base is {digest[:12]})")
            return local
        artifact = store.read_artifact(uri.removesuffix("/" + CHECKPOINT), storage_options)
        if artifact.digest != digest:
            raise BaseMismatch(f"base model {uri}: manifest digest {artifact.digest[:12]}, but the adapter was "
                               f"trained on {digest[:12]}")
        return store.download_dir(artifact, CHECKPOINT, dest / f"base-{depth}", storage_options)

    return fetch


def fetch_checkpoint(ctx, name: str, subdir: str = CHECKPOINT) -> Checkpoint:
    """A stage's input model with the bases its adapters name, downloaded and checked."""
    return resolve(ctx.fetch_dir(name, subdir), store_fetcher(ctx.workdir / "in" / f"{name}-bases",
                                                              ctx.spec.storage_options))


# --- loading and training -------------------------------------------------------------------

def merge_adapters(model, adapter_dirs):
    """`model` with each adapter applied and merged in, in order: a plain transformers model."""
    from peft import PeftModel

    for adapter_dir in adapter_dirs:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model


def load_policy(checkpoint: Checkpoint, trust_remote_code: bool = False):
    """The causal LM of a checkpoint, adapters merged in."""
    from .models import load_causal_lm

    return merge_adapters(load_causal_lm(checkpoint.base_dir, trust_remote_code), checkpoint.adapter_dirs)


def merged_dir(checkpoint: Checkpoint, dest: Path, trust_remote_code: bool = False) -> Path:
    """A full `save_pretrained` directory of the checkpoint (merged into `dest` when it has adapters)."""
    if not checkpoint.is_adapter:
        return checkpoint.base_dir
    from safetensors.torch import save_file

    from .models import load_tokenizer

    # Every rank merges its own copy: save_pretrained would write on rank 0 only (transformers 5).
    model = load_policy(checkpoint, trust_remote_code)
    dest.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(dest))
    # Tied weights once, under their first name (the input embedding), as save_pretrained does: vLLM
    # skips lm_head.weight of a tied model, so an embedding stored only as lm_head would load as zeros.
    state, stored = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in stored:
            stored.add(tensor.data_ptr())
            state[name] = tensor.contiguous()
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    load_tokenizer(checkpoint.dir, trust_remote_code).save_pretrained(str(dest))
    return dest


def scratch_merged(checkpoint: Checkpoint, workdir: Path, trust_remote_code: bool = False) -> Path:
    """`merged_dir` in the job's scratch folder, one folder per chain: a job that needs the same merged
    model twice (score's reward and value models from one reward model) merges it once."""
    if not checkpoint.is_adapter:
        return checkpoint.base_dir
    dest = workdir / "merged" / hashlib.sha256(str(checkpoint.dir).encode()).hexdigest()[:12]
    return dest if (dest / "model.safetensors").is_file() else merged_dir(checkpoint, dest, trust_remote_code)


def adapter_task(adapter_dir: str | os.PathLike) -> str:
    """peft's task type of an adapter: CAUSAL_LM (a policy) or SEQ_CLS (a reward model)."""
    return json.loads(Path(adapter_dir, ADAPTER_CONFIG).read_text()).get("task_type") or "CAUSAL_LM"


def load_reward(checkpoint: Checkpoint, workdir: Path, trust_remote_code: bool = False, init_head: bool = False):
    """A sequence classifier (reward or value model) from a checkpoint. A reward-model adapter (SEQ_CLS)
    keeps its head among its own weights (peft's modules_to_save) and applies to a causal LM (the SFT
    model); any other chain is merged into one causal LM first, which gets a new head (`init_head`)."""
    from .models import load_reward_model

    if checkpoint.is_adapter and adapter_task(checkpoint.dir) == "SEQ_CLS":
        base = scratch_merged(checkpoint.without_last_adapter(), workdir, trust_remote_code)
        return merge_adapters(load_reward_model(base, trust_remote_code), checkpoint.adapter_dirs[-1:])
    full = scratch_merged(checkpoint, workdir, trust_remote_code)
    return load_reward_model(full, trust_remote_code, init_head=init_head)


def load_frozen_base(checkpoint: Checkpoint, lora, trust_remote_code: bool, device, workdir: Path,
                     task_type: str = "CAUSAL_LM"):
    """The base an adapter trains on, loaded once and frozen: merged from its chain, or with
    model.lora.load_in_4bit quantized to 4 bits (QLoRA; a CUDA device only)."""
    if lora is not None and lora.load_in_4bit:
        return load_4bit(scratch_merged(checkpoint, workdir, trust_remote_code), trust_remote_code,
                         device, task_type)
    model = load_policy(checkpoint, trust_remote_code) if task_type == "CAUSAL_LM" else \
        load_reward(checkpoint, workdir, trust_remote_code, init_head=True)
    return model.requires_grad_(False)


def load_4bit(model_dir: Path, trust_remote_code: bool, device, task_type: str):
    """QLoRA's base: NF4 weights with bf16 compute (bitsandbytes), prepared for k-bit training."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    if device.type != "cuda":
        raise ValueError("model.lora.load_in_4bit: 4-bit bases (bitsandbytes) need a CUDA GPU; this job has none")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    cls, extra = ((AutoModelForCausalLM, {}) if task_type == "CAUSAL_LM"
                  else (AutoModelForSequenceClassification, {"num_labels": 1}))
    model = cls.from_pretrained(str(model_dir), quantization_config=quantization, dtype=torch.bfloat16,
                                device_map={"": device.index or 0}, use_safetensors=True,
                                trust_remote_code=trust_remote_code, **extra)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def peft_config(lora, task_type: str):
    """peft's LoraConfig from `model.lora`; task_type CAUSAL_LM (policy) or SEQ_CLS (reward model: the
    scalar head `score` then trains and is saved with the adapter)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
                      target_modules=lora.target_modules, bias="none")


def add_adapter(model, lora, task_type: str, seed: int):
    """A new trainable adapter on frozen `model` (the adapter's initial A matrices are drawn from `seed`;
    B starts at zero, so the adapted model starts equal to its base)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, peft_config(lora, task_type))


def trainable_adapter(model, adapter_dir: Path):
    """Frozen `model` with the adapter saved in `adapter_dir`, trainable (a later round, or a resume)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def save_adapter(peft_model, tokenizer, out_dir: str | os.PathLike, base_ref: dict) -> None:
    """The adapter's weights (safetensors), its config, the tokenizer and the base reference."""
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_ref["uri"]  # not the job's scratch directory
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    Path(out_dir, BASE_FILE).write_text(json.dumps(base_ref, indent=1, sort_keys=True))


def lora_rank(adapter_dir: str | os.PathLike) -> int:
    return int(json.loads(Path(adapter_dir, ADAPTER_CONFIG).read_text())["r"])
