"""Resume state for long training stages: a killed job loses at most `save_every` steps.

    {output}/_resume/model/...            full weights, HF safetensors dir (rank 0)
    {output}/_resume/optim-rank{r}.safetensors   the rank's AdamW state (its ZeRO partition)
    {output}/_resume/latest.json          written last: step, world size, scheduler, files + hashes

Everything is safetensors or JSON: no pickle is loaded from storage. Under ZeRO the
optimizer's fp32 partitions are rebuilt from the saved weights at engine start (exact in
fp32), then the AdamW moments of this rank's partition are restored, so an interrupted run
continues where it left off. A resume state from another world size is ignored.
"""

from __future__ import annotations

import json
import posixpath

import torch
from safetensors.torch import load_file, save_file

from . import store
from .runtime import StageContext, log

PREFIX = "_resume"


def _base_optimizer(engine):
    """The client torch optimizer (under ZeRO it steps the flat fp32 partition)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu() if torch.is_tensor(value) \
                else torch.tensor(value)
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": param_groups}


class Resumer:
    def __init__(self, ctx: StageContext, save_every: int, total_steps: int):
        self.ctx = ctx
        self.save_every = save_every
        self.total_steps = total_steps
        self.uri = store.join(ctx.spec.output, PREFIX)
        self.opts = ctx.spec.storage_options
        self.latest = self._read_latest()

    def _read_latest(self) -> dict | None:
        fs, base = store.filesystem(self.uri, self.opts)
        path = posixpath.join(base, "latest.json")
        if not fs.exists(path):
            return None
        latest = json.loads(fs.cat_file(path))
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
        if store.sha256_file(local) != entry["sha256"]:
            raise store.ArtifactError(f"{store.join(self.uri, relpath)}: resume file does not match its hash")
        return local

    def model_dir(self):
        """Weights to start from (before the engine wraps the model), or None."""
        if not self.latest:
            return None
        for f in self.latest["files"]:
            if f["path"].startswith("model/"):
                self._fetch(f["path"])
        return self.ctx.workdir / "resume-in" / "model"

    def restore(self, engine, scheduler, generator: torch.Generator) -> int:
        """Load optimizer, scheduler and sampler state; returns the step to continue from."""
        if not self.latest:
            return 0
        tensors = load_file(str(self._fetch(f"optim-rank{self.ctx.rank}.safetensors")))
        generator.set_state(tensors.pop("__generator__"))
        _base_optimizer(engine).load_state_dict(_unflatten_optimizer(tensors, self.latest["param_groups"][self.ctx.rank]))
        scheduler.load_state_dict(self.latest["scheduler"])
        log(f"resumed from step {self.latest['step']} ({self.uri})")
        return self.latest["step"]

    def maybe_save(self, step: int, engine, scheduler, generator: torch.Generator, save_model) -> None:
        """After `step` steps: save every `save_every` (not at the end: the output follows)."""
        if step % self.save_every or step == 0 or step >= self.total_steps:
            return
        from .engine import full_parameters

        files = []
        tensors, groups = _flatten_optimizer(_base_optimizer(engine).state_dict())
        tensors["__generator__"] = generator.get_state()
        local = self.ctx.workdir / "resume-out" / f"optim-rank{self.ctx.rank}.safetensors"
        local.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(local))
        files.append(store.upload(local, self.uri, local.name, self.opts))
        with full_parameters(engine) as model:
            if self.ctx.is_main:
                model_dir = self.ctx.workdir / "resume-out" / "model"
                save_model(model, model_dir)
                files += store.upload_dir(model_dir, self.uri, "model", self.opts)
        gathered = self.ctx.all_gather({"files": [f.__dict__ for f in files], "groups": groups})
        if self.ctx.is_main:
            latest = {"step": step, "world_size": self.ctx.world_size, "scheduler": scheduler.state_dict(),
                      "param_groups": [g["groups"] for g in gathered],
                      "files": [f for g in gathered for f in g["files"]]}
            store.write_json(store.join(self.uri, "latest.json"), latest, self.opts)
        self.ctx.barrier()
