"""The training engine shared by the training stages (sft, reward_model, dpo, update).

Several ranks: DeepSpeed, one path for CPU and GPU: ZeRO stage from the config, torch's AdamW
as the client optimizer (DeepSpeed's compiled CPU Adam costs minutes to build and is no
faster), gloo + fp32 on CPU, NCCL + bf16 on GPU.
One process: plain torch (TorchEngine), the same recipe without ZeRO's partitions to keep,
which cost ~6% of a step at 1M parameters and buy nothing with a world of one.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .sections import EngineConfig


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def linear_warmup(optimizer, warmup_steps: int, total_steps: int | None):
    """Linear warmup, then linear decay to 10% of the peak (constant if total_steps is None)."""

    def scale(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps is None:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.1, 1.0 - 0.9 * progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


class TorchEngine:
    """The single-process engine: what the stages call on a DeepSpeed engine (`engine(...)`,
    `backward`, `step`, `get_lr`, `module`, `optimizer`), in plain torch, with DeepSpeed's recipe:
    clip the gradients' global norm to `gradient_clipping`, step AdamW, then the LR scheduler.
    bf16 is autocast over fp32 weights (DeepSpeed keeps bf16 weights and fp32 master copies)."""

    def __init__(self, model, optimizer, scheduler, gradient_clipping: float, dtype: torch.dtype,
                 device: torch.device):
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, scheduler
        self.gradient_clipping = gradient_clipping
        self.autocast = dtype == torch.bfloat16
        self.device_type = device.type
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clipping)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)


def make_engine(model, engine_cfg: EngineConfig, *, lr: float, micro_batch: int,
                weight_decay: float = 0.0, warmup_steps: int = 0, total_steps: int | None = None,
                device: torch.device | None = None):
    """Wrap `model` in a DeepSpeed engine (several ranks) or a TorchEngine (one process);
    returns (engine, optimizer, scheduler)."""
    device = device or torch.device("cpu")
    dtype = resolve_dtype(engine_cfg.dtype, device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # with an adapter: its weights only
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    scheduler = linear_warmup(optimizer, warmup_steps, total_steps)
    # The stage context starts a process group only for a world of several ranks.
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        engine = TorchEngine(model, optimizer, scheduler, engine_cfg.gradient_clipping, dtype, device)
        return engine, optimizer, scheduler

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": engine_cfg.gradient_clipping,
        # contiguous_gradients copies each gradient into one buffer against GPU memory fragmentation;
        # on CPU it is only a copy, ~5% of a step at 1M parameters.
        "zero_optimization": {"stage": engine_cfg.zero_stage, "contiguous_gradients": device.type == "cuda"},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler


@contextlib.contextmanager
def full_parameters(engine):
    """Full (gathered) weights of the wrapped model: needed to save under ZeRO-3."""
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield engine.module
    else:
        yield engine.module
