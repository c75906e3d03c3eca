"""Resume state for long training stages: a killed job loses at most `save_every` steps.

    {output}/_resume/step-{N}/{name}/...                 full weights of each trained model
                                                         `name`, HF safetensors dir (rank 0)
    {output}/_resume/step-{N}/optim-rank{r}.safetensors  the rank's AdamW state of every model
                                                         (its ZeRO partition), sampler state
    {output}/_resume/latest.json                         written last: step, folder, world size,
                                                         schedulers, files + hashes

Each save writes a folder of its own and only then points latest.json at it (the older folder is
removed after): a job killed mid-save (a rank that outlived a lost node) leaves the last complete
state intact, never a mix of two steps.

A stage names the models it trains, e.g. {"model": Trained(engine, scheduler, save)} (sft)
or {"model": ..., "value": ...} (PPO's update: policy and value model).
Everything is safetensors or JSON: no pickle is loaded from storage. Under ZeRO the
optimizer's fp32 partitions are rebuilt from the saved weights at engine start (exact in
fp32), then the AdamW moments of this rank's partition are restored, so an interrupted run
continues where it left off. A resume state from another world size is ignored.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Callable, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from . import store
from .runtime import StageContext, log

PREFIX = "_resume"
GENERATOR_KEY = "__generator__"


class Trained(NamedTuple):
    """One model a stage trains: its engine (make_engine), LR scheduler, and how to save its weights
    (`save_model(module, directory)`, in a form the stage can load back before wrapping it)."""

    engine: Any
    scheduler: Any
    save_model: Callable


def _base_optimizer(engine):
    """The client torch optimizer (under ZeRO it steps the flat fp32 partition)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _flatten_optimizer(state: dict, name: str) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for idx, entries in state["state"].items():
        for field, value in entries.items():
            tensors[f"{name}/{idx}.{field}"] = value.detach().contiguous().cpu() if torch.is_tensor(value) \
                else torch.tensor(value)
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], name: str, param_groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        owner, rest = key.split("/", 1)
        if owner == name:
            idx, field = rest.split(".", 1)
            state.setdefault(int(idx), {})[field] = value
    return {"state": state, "param_groups": param_groups}


class Resumer:
    def __init__(self, ctx: StageContext, save_every: int, total_steps: int):
        self.ctx = ctx
        self.save_every = save_every
        self.total_steps = total_steps
        self.uri = store.join(ctx.spec.output, PREFIX)
        self.opts = ctx.spec.storage_options
        self.latest: Any = self._read_latest()  # latest.json, or None

    def _read_latest(self) -> dict | None:
        fs, base = store.filesystem(self.uri, self.opts)
        path = posixpath.join(base, "latest.json")
        if not fs.exists(path):
            return None
        try:
            latest = json.loads(fs.cat_file(path))
        except ValueError:  # cut short by a kill while it was written (a local file is not replaced atomically)
            log(f"resume state {path} is unreadable: starting over")
            return None
        if latest.get("world_size") != self.ctx.world_size:
            log(f"resume state at step {latest.get('step')} is for {latest.get('world_size')} ranks, "
                f"this job has {self.ctx.world_size}: starting over")
            return None
        return latest

    @property
    def start_step(self) -> int:
        return self.latest["step"] if self.latest else 0

    def _fetch(self, relpath: str):
        entry = next(f for f in self.latest["files"] if f["path"] == relpath)
        local = self.ctx.workdir / "resume-in" / relpath
        local.parent.mkdir(parents=True, exist_ok=True)
        fs, base = store.filesystem(self.uri, self.opts)
        fs.get_file(posixpath.join(base, relpath), str(local))
        store.check_file(store.LOCAL_FS, str(local), store.FileEntry(**entry), store.join(self.uri, relpath))
        return local

    def model_dir(self, name: str = "model"):
        """Saved weights of model `name` to start from (before the engine wraps it), or None."""
        if not self.latest:
            return None
        folder = self.latest["folder"]
        for f in self.latest["files"]:
            if f["path"].startswith(f"{folder}/{name}/"):
                self._fetch(f["path"])
        return self.ctx.workdir / "resume-in" / folder / name

    def restore(self, trained: dict[str, Trained], generator: torch.Generator) -> int:
        """Load optimizer, scheduler and sampler state; returns the step to continue from."""
        if not self.latest:
            return 0
        tensors = load_file(str(self._fetch(f"{self.latest['folder']}/optim-rank{self.ctx.rank}.safetensors")))
        generator.set_state(tensors.pop(GENERATOR_KEY))
        groups = self.latest["param_groups"][self.ctx.rank]
        for name, t in trained.items():
            _base_optimizer(t.engine).load_state_dict(_unflatten_optimizer(tensors, name, groups[name]))
            t.scheduler.load_state_dict(self.latest["schedulers"][name])
        log(f"resumed from step {self.latest['step']} ({self.uri})")
        return self.latest["step"]

    def maybe_save(self, step: int, trained: dict[str, Trained], generator: torch.Generator) -> None:
        """After `step` steps: save every `save_every` (not at the end: the output follows)."""
        if step % self.save_every or step == 0 or step >= self.total_steps:
            return
        from .engine import full_parameters

        folder = f"step-{step:08d}"
        files, tensors, groups = [], {GENERATOR_KEY: generator.get_state()}, {}
        for name, t in trained.items():
            model_tensors, groups[name] = _flatten_optimizer(_base_optimizer(t.engine).state_dict(), name)
            tensors.update(model_tensors)
        local = self.ctx.workdir / "resume-out" / f"optim-rank{self.ctx.rank}.safetensors"
        local.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(local))
        files.append(store.upload(local, self.uri, f"{folder}/{local.name}", self.opts))
        for name, t in trained.items():
            with full_parameters(t.engine) as model:
                if self.ctx.is_main:
                    model_dir = self.ctx.workdir / "resume-out" / name
                    t.save_model(model, model_dir)
                    files += store.upload_dir(model_dir, self.uri, f"{folder}/{name}", self.opts)
        gathered = self.ctx.all_gather({"files": [f.__dict__ for f in files], "groups": groups})
        if self.ctx.is_main:
            latest = {"step": step, "folder": folder, "world_size": self.ctx.world_size,
                      "schedulers": {name: t.scheduler.state_dict() for name, t in trained.items()},
                      "param_groups": [g["groups"] for g in gathered],
                      "files": [f for g in gathered for f in g["files"]]}
            store.write_json(store.join(self.uri, "latest.json"), latest, self.opts)
            fs, base = store.filesystem(self.uri, self.opts)
            for older in fs.ls(base, detail=False):
                if posixpath.basename(older).startswith("step-") and posixpath.basename(older) != folder:
                    fs.rm(older, recursive=True)
        self.ctx.barrier()
