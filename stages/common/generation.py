"""Sampling n responses per prompt with per-token logprobs of the sampled tokens.

Backends return the same `Sample`s: `hf` (transformers `generate` with KV cache, batched)
and `vllm`. The logprobs are those of the processed distribution (logits / temperature,
top-p), which is what the trainer recomputes, so the first policy-gradient ratio is 1.
"""

from __future__ import annotations

import importlib.util

import torch

from .vllm_generate import Sample  # one definition for both backends (that module is stdlib-only)

__all__ = ["Sample", "generate_hf", "pick_backend"]


def pick_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"


@torch.no_grad()
def generate_hf(model, tokenizer, prompt_ids: list[list[int]], *, n: int, temperature: float, top_p: float,
                max_new_tokens: int, seed: int, batch_size: int, greedy: bool = False) -> list[list[Sample]]:
    from transformers import GenerationConfig

    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen_cfg = GenerationConfig(
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_p=top_p if not greedy else None,
        top_k=0 if not greedy else None,  # HF samples from the top 50 by default: not what we score
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        output_scores=True,
        return_dict_in_generate=True,
    )
    torch.manual_seed(seed)
    flat = [p for p in prompt_ids for _ in range(n)]  # n consecutive samples per prompt
    samples: list[Sample] = []
    for start in range(0, len(flat), batch_size):
        batch = flat[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding: generation continues every row at the right edge
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        new_tokens = out.sequences[:, width:].cpu()
        logps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).float().cpu()
        for row, lp in zip(new_tokens.tolist(), logps.tolist()):
            length = row.index(eos) + 1 if eos in row else len(row)
            tokens = row[:length]
            samples.append(Sample(
                token_ids=tokens,
                logprobs=lp[:length],
                text=tokenizer.decode(tokens, skip_special_tokens=True),
                finish_reason="stop" if tokens and tokens[-1] == eos else "length",
            ))
    return [samples[i * n : (i + 1) * n] for i in range(len(prompt_ids))]
