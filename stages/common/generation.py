"""Sampling n responses per prompt, with the logprob of every sampled token: a backend takes one
`Request` and returns n `Sample`s per prompt. `hf`: transformers `generate` (KV cache, batched),
below; `vllm`: stages/common/vllm_generate.py. The logprobs are those of the processed distribution
(logits / temperature, top-p), which the trainer recomputes, so the first policy-gradient ratio is
1 (not where `min_new_tokens` masks the stop tokens: the trainer does not mask them). The vLLM
environment imports this module too: only the standard library and torch at the top.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pathlib import Path

    from .adapters import Checkpoint
    from .sections import GenerateConfig
    from .runtime import StageContext


class BadRequest(ValueError):
    """A request that no retry can satisfy (the stage turns it into BadInput, exit 2)."""


@dataclass
class Request:
    prompt_token_ids: list[list[int]]
    n: int  # samples per prompt
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    stop_token_ids: list[int] = field(default_factory=list)  # end a sample, as the model's EOS does
    greedy: bool = False  # argmax decoding (temperature and top_p unused): n copies of one sample
    min_new_tokens: int = 0  # the stop tokens (EOS included) are masked until a sample has this many

    def __post_init__(self):  # the one check, in the caller and again in the vLLM child
        if not (self.n >= 1 and self.max_new_tokens >= 1 and 0 <= self.min_new_tokens <= self.max_new_tokens
                and 0 < self.top_p <= 1 and (self.greedy or self.temperature > 0) and all(self.prompt_token_ids)):
            raise BadRequest(f"invalid generation request: n={self.n}, max_new_tokens={self.max_new_tokens}, "
                             f"min_new_tokens={self.min_new_tokens}, top_p={self.top_p}, temperature="
                             f"{self.temperature}, greedy={self.greedy}, or an empty prompt")


@dataclass
class Sample:
    """One response. `token_ids` end with the stop token when finish_reason is "stop"; `text` is
    decoded without special tokens; `logprobs[i]` is that of `token_ids[i]` where it was sampled."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length" (max_new_tokens or the model's context)


@dataclass(frozen=True)
class Shard:
    """A rank's part of the job: the prompts it samples (indices), in chunks of `chunk` (the unit of
    resume), whether it writes the rows, and whether all ranks run each request together (lockstep)."""

    prompts: range
    chunk: int
    writes: bool = True
    lockstep: bool = False

    def chunks(self) -> list[range]:
        return [self.prompts[i : i + self.chunk] for i in range(0, len(self.prompts), self.chunk)]


class Backend:
    name: str

    def shard(self, ctx: StageContext, n_prompts: int) -> Shard:
        raise NotImplementedError

    def generate(self, request: Request) -> list[list[Sample]]:  # n Samples per prompt
        raise NotImplementedError

    def close(self) -> None:  # releases the engine, if any: `with contextlib.closing(backend)`
        pass


@dataclass
class HFBackend(Backend):
    """transformers `generate` (KV cache) on left-padded batches; each rank samples its contiguous share.
    `adapter_dirs`: LoRA adapters to merge into the model of `model_dir`, in order (the tokenizer is the last's)."""

    model_dir: str
    device: str = "cpu"  # torch's name: "cpu", "cuda:0"
    trust_remote_code: bool = False
    batch_size: int = 512
    chunk_prompts: int = 64
    adapter_dirs: tuple[str, ...] = ()

    name = "hf"

    def __post_init__(self):  # `models` imported here: it needs pydantic, which the vLLM child must not need
        from .models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(self.adapter_dirs[-1] if self.adapter_dirs else self.model_dir,
                                        self.trust_remote_code)
        model = load_causal_lm(self.model_dir, self.trust_remote_code)
        if self.adapter_dirs:
            from .adapters import merge_adapters

            model = merge_adapters(model, self.adapter_dirs)
        self.model = model.to(self.device).eval()

    def shard(self, ctx: StageContext, n_prompts: int) -> Shard:
        return Shard(ctx.shard(n_prompts), self.chunk_prompts)

    @torch.no_grad()
    def generate(self, request: Request) -> list[list[Sample]]:
        from transformers import GenerationConfig

        tok, model, r = self.tokenizer, self.model, request
        stops = list(dict.fromkeys([tok.eos_token_id, *r.stop_token_ids]))
        # top_k=0: HF samples from the top 50 by default, which is not the distribution we score.
        sampling = {} if r.greedy else {"temperature": r.temperature, "top_p": r.top_p, "top_k": 0}
        # On CPU a static KV cache: the default one concatenates every layer's keys and values anew at
        # each token (25M params, 256 x 64 new tokens: 22.6 s -> 17.4 s). On GPU transformers would
        # compile the model for a static cache; vLLM is the GPU path anyway.
        cache = {"cache_implementation": "static"} if model.device.type == "cpu" else {}
        gen_cfg = GenerationConfig(do_sample=not r.greedy, max_new_tokens=r.max_new_tokens,
                                   min_new_tokens=r.min_new_tokens or None, eos_token_id=stops,
                                   pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True,
                                   **cache, **sampling)
        torch.manual_seed(r.seed)
        flat = [p for p in r.prompt_token_ids for _ in range(r.n)]  # n consecutive samples per prompt
        samples: list[Sample] = []
        for start in range(0, len(flat), self.batch_size):
            batch = flat[start : start + self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(batch):  # left padding: generation continues every row at the right edge
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 generation_config=gen_cfg)
            logps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            for row, lp in zip(out.sequences[:, width:].tolist(), logps.float().cpu().tolist()):
                length = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                tokens = row[:length]
                samples.append(Sample(tokens, lp[:length], tok.decode(tokens, skip_special_tokens=True),
                                      "stop" if tokens and tokens[-1] in stops else "length"))
        return [samples[i * r.n : (i + 1) * r.n] for i in range(len(r.prompt_token_ids))]


def make_backend(cfg: GenerateConfig, checkpoint: Checkpoint, device: torch.device, trust_remote_code: bool,
                 workdir: Path) -> Backend:
    """`generate.backend`: auto = vLLM where CUDA and vLLM are both present, else hf; vllm = in this
    process where vLLM is importable, else in the vLLM environment's interpreter. A LoRA policy: merged
    into its base (hf), or its base with the adapter as vLLM's LoRA request (vllm)."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    choice = ("vllm" if device.type == "cuda" and has_vllm else "hf") if cfg.backend == "auto" else cfg.backend
    if choice == "hf":
        return HFBackend(str(checkpoint.base_dir), str(device), trust_remote_code, cfg.batch_size, cfg.chunk_prompts,
                         tuple(str(d) for d in checkpoint.adapter_dirs))
    from .adapters import lora_rank, scratch_merged
    from .vllm_generate import VLLMInProcess, VLLMSubprocess

    engine = {"model_dir": str(checkpoint.base_dir), "device": device.type,
              "tensor_parallel_size": cfg.tensor_parallel_size}
    if checkpoint.is_adapter:  # vLLM applies one adapter: the ones below it are merged into its base
        base = scratch_merged(checkpoint.without_last_adapter(), workdir, trust_remote_code)
        engine.update(model_dir=str(base), lora_dir=str(checkpoint.dir), max_lora_rank=lora_rank(checkpoint.dir))
    return VLLMInProcess(**engine) if has_vllm else VLLMSubprocess(**engine)
