"""A policy checkpoint as an MLflow pyfunc model: what `mlflow.pyfunc.load_model("models:/<name>@champion")`
and `mlflow models serve` load. The model directory (written by `save_model`, registered by
tasks/tracking.py) holds no code and no pickle:

    MLmodel                          python_function: loader_module stages.common.serving, data policy
    policy/_MANIFEST.json            the stage's manifest (file sizes and sha256)
    policy/checkpoint/...            the `save_pretrained` directory (safetensors, config, tokenizer)
    policy/base-1/...                a LoRA policy: the base its adapter names (_MANIFEST.json and
                                     checkpoint/ of a pipeline artifact; checkpoint/ alone for a model
                                     from outside the store), then base-2/... if that is an adapter too

MLflow imports this module from the installed alignflow package and calls `_load_pyfunc(<model>/policy)`:
every checkpoint file is hashed against the manifest (a corrupted or extra file fails the load, naming
it), a base against the digest its adapter names, then the weights load with
`from_pretrained(use_safetensors=True)` (adapters merged in). `predict` takes a list of prompts and
returns one completion each, greedy unless `temperature` > 0.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import adapters, store

DATA_DIR = "policy"  # the model's data directory: the manifest and checkpoint/
CHECKPOINT = "checkpoint"
PARAMS = {"max_new_tokens": 16, "temperature": 0.0}  # predict's parameters and their defaults
SEED = 0  # sampling (temperature > 0) is reproducible per request


def signature():
    """Prompts in, completions out, PARAMS as inference parameters (served: {"inputs": [...], "params": {...}})."""
    from mlflow.models import infer_signature

    return infer_signature(["12+34="], ["46"], params=PARAMS)


def pip_requirements() -> list[str]:
    """The libraries the loader needs, at the versions that wrote the model (alignflow itself, which
    holds this loader, must be installed too: `--env-manager local`)."""
    from importlib.metadata import version

    return [f"{lib}=={version(lib)}" for lib in ("mlflow", "torch", "transformers", "tokenizers", "safetensors",
                                                 "fsspec", "pydantic")]


def save_model(policy: store.Artifact, path: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """Write the MLflow model of `policy` (its checkpoint, hash-checked from the store, and its manifest) to `path`."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="alignflow-model-") as tmp:
        data = Path(tmp) / DATA_DIR
        checkpoint = store.download_dir(policy, CHECKPOINT, data, storage_options)
        store.write_json(str(data / store.MANIFEST), policy.manifest)
        fetch_base = adapters.store_fetcher(Path(tmp) / "bases", storage_options)
        depth = 1
        while adapters.is_adapter_dir(checkpoint):  # a LoRA policy: its bases go with it
            ref, base = adapters.read_base_ref(checkpoint), data / f"base-{depth}"
            fetched = fetch_base(ref, depth)  # checked against the adapter's digest
            checkpoint = base / CHECKPOINT
            if adapters.is_store_ref(ref):
                shutil.copytree(fetched, checkpoint)
                artifact = store.read_artifact(ref["uri"].removesuffix("/" + CHECKPOINT), storage_options)
                store.write_json(str(base / store.MANIFEST), artifact.manifest)
            else:  # from outside the store: the files its digest covers
                checkpoint.mkdir(parents=True)
                for f in adapters.digest_files(fetched):
                    shutil.copy2(f, checkpoint / f.name)
            depth += 1
        mlflow.pyfunc.save_model(str(path), loader_module=__name__, data_path=str(data), signature=signature(),
                                 pip_requirements=pip_requirements())
    return Path(path)


def load_checkpoint(data_path: str | os.PathLike) -> adapters.Checkpoint:
    """The model under `data_path`, every file checked: the policy's against its manifest, each base
    against its own manifest and the digest its adapter names."""
    data = Path(data_path).resolve()

    def local_base(ref: dict, depth: int) -> Path:
        base = data / f"base-{depth}"
        if not adapters.is_store_ref(ref):
            if adapters.external_digest(base / CHECKPOINT) != ref["digest"]:
                raise store.ArtifactError(f"{base / CHECKPOINT}: not the base model the adapter names ({ref['uri']})")
            return base / CHECKPOINT
        checked = verify_checkpoint(base)
        if store.manifest_digest(store.read_json(str(base / store.MANIFEST))) != ref["digest"]:
            raise store.ArtifactError(f"{base / store.MANIFEST}: not the base model the adapter names ({ref['uri']})")
        return checked

    return adapters.resolve(verify_checkpoint(data), local_base)


def verify_checkpoint(data_path: str | os.PathLike) -> Path:
    """The checkpoint directory under `data_path`, once every file in it matches the manifest beside it."""
    data = Path(data_path).resolve()
    try:
        manifest = store.read_json(str(data / store.MANIFEST))
    except FileNotFoundError:
        raise store.ArtifactError(f"{data / store.MANIFEST}: missing (the model has no manifest)") from None
    model = store.Artifact(uri=data.as_uri(), digest=store.manifest_digest(manifest), manifest=manifest)
    listed = {e.path for e in model.files_under(CHECKPOINT)}
    if not listed:
        raise store.ArtifactError(f"{data / store.MANIFEST}: lists no files under {CHECKPOINT}/")
    store.verify_files(model, prefix=CHECKPOINT)
    for p in sorted((data / CHECKPOINT).rglob("*")):  # nothing the manifest does not vouch for is loaded
        if p.is_file() and p.relative_to(data).as_posix() not in listed:
            raise store.ArtifactError(f"{p}: not listed in {data / store.MANIFEST}")
    return data / CHECKPOINT


class PolicyModel:
    """Completions from a verified checkpoint, through the generation backend the evaluate stage uses."""

    def __init__(self, checkpoint: adapters.Checkpoint):
        from .generation import HFBackend

        self.backend = HFBackend(str(checkpoint.base_dir), adapter_dirs=tuple(map(str, checkpoint.adapter_dirs)))

    def predict(self, model_input, params: dict | None = None) -> list[str]:
        from .generation import Request

        prompts = _prompts(model_input)
        p = {**PARAMS, **(params or {})}
        temperature, max_new_tokens = float(p["temperature"]), int(p["max_new_tokens"])
        if temperature < 0 or max_new_tokens < 1:
            raise ValueError(f"params: temperature must be >= 0 (got {temperature}) and max_new_tokens >= 1 "
                             f"(got {max_new_tokens})")
        if not prompts:
            return []
        request = Request(_encode(self.backend.tokenizer, prompts), n=1, temperature=temperature or 1.0,
                          top_p=1.0, max_new_tokens=max_new_tokens, seed=SEED, greedy=temperature == 0)
        return [samples[0].text for samples in self.backend.generate(request)]


def _prompts(model_input) -> list[str]:
    """A list of prompts from what pyfunc hands over: a list or array of str, a str, or a one-column DataFrame."""
    if hasattr(model_input, "columns"):  # pandas: the served JSON's "inputs" with a column schema
        if len(model_input.columns) != 1:
            raise ValueError(f"model input: expected one column of prompts, got columns {list(model_input.columns)}")
        model_input = model_input.iloc[:, 0]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if isinstance(model_input, str):
        model_input = [model_input]
    if not isinstance(model_input, list) or not all(isinstance(x, str) for x in model_input):
        raise ValueError(f"model input: expected a list of prompt strings, got {type(model_input).__name__}")
    return model_input


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt, rendered as data_prep rendered the training prompts (with the chat template
    when the tokenizer has one); a prompt the tokenizer cannot encode (e.g. a character the tiny one never
    saw) is named."""
    from .chat import render_prompt, uses_template

    chat = uses_template(tokenizer, None, "the served model")
    ids = []
    for i, prompt in enumerate(prompts):
        try:
            ids.append(render_prompt(tokenizer, prompt, chat))
        except Exception as err:  # the tokenizers library raises a bare Exception
            raise ValueError(f"model input: prompt {i} ({prompt[:50]!r}) cannot be tokenized: {err}") from None
    return ids


def _load_pyfunc(data_path: str) -> PolicyModel:
    """MLflow's entry point (the MLmodel's loader_module): verify, then load."""
    return PolicyModel(load_checkpoint(data_path))

