"""Seeded choices over examples: the held-out eval split and per-source weights.

Both work on example indices after tokenization, so ``eval_size`` is exact and weights never duplicate an
example into both splits. Each choice has its own ``random.Random`` derived from the seed and a label, so
changing one source's weight does not reshuffle another's sample.
"""

from __future__ import annotations

import random

from neftune_cli.io.errors import DataError
from neftune_cli.recipe.schema import DataSection


def hold_out(indices: list[int], data: DataSection, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) from ``indices`` by data.eval_size / eval_fraction; both keep the dataset order."""
    if data.eval_size is None and data.eval_fraction is None:
        return indices, []
    n = data.eval_size if data.eval_size is not None else max(1, round(data.eval_fraction * len(indices)))
    if n >= len(indices):
        key = f"data.eval_size {n}" if data.eval_size is not None else f"data.eval_fraction {data.eval_fraction}"
        raise DataError(f"{key} leaves no training examples: there are {len(indices)} usable examples")
    chosen = set(random.Random(f"{seed}:eval").sample(range(len(indices)), n))
    train = [x for i, x in enumerate(indices) if i not in chosen]
    held = [x for i, x in enumerate(indices) if i in chosen]
    return train, held


def resample(indices: list[int], weight: float | None, seed: int, label: str) -> list[int]:
    """Weight as a resampling factor: whole copies of every example, plus a seeded sample for the fraction.

    weight 2 -> each example twice; 0.5 -> a random half; 1.5 -> each once plus a random half (no repeats).
    """
    if weight is None or weight == 1:
        return indices
    copies, fraction = int(weight), weight - int(weight)
    extra = round(fraction * len(indices))
    sampled = sorted(random.Random(f"{seed}:weight:{label}").sample(range(len(indices)), extra))
    return indices * copies + [indices[i] for i in sampled]
