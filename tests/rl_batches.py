"""Random ragged batches for the RL loss and advantage tests."""

from __future__ import annotations

import random

import torch


def packed_batch(seed: int, rows: int = 7, max_prompt: int = 5, max_response: int = 6):
    """(spans, mask): spans[i] = (start, length) of row i's response; mask [rows, T] marks them."""
    rng = random.Random(seed)
    spans = [(rng.randint(1, max_prompt), rng.randint(1, max_response)) for _ in range(rows)]
    width = max(p + n for p, n in spans) + 2  # every row has some right padding
    mask = torch.zeros(rows, width)
    for i, (p, n) in enumerate(spans):
        mask[i, p : p + n] = 1
    return spans, mask


def rand(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def response(x: torch.Tensor, i: int, span) -> list[float]:
    p, n = span
    return x[i, p : p + n].tolist()
