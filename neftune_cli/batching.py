"""Micro-batch plans and collation: padded batches or padding-free packed rows.

The plan for an epoch depends only on (seed, epoch), never on iterator state, so resuming at step k needs
nothing but k; a rank of a multi-process run can take its share of the same plan.
Targets are shifted here, per example: the target of an example's last token is -100, so a packed row never
trains one example to predict the next example's first token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

IGNORE = -100


def plan_epoch(lengths: Sequence[int], micro_batch_size: int, *, seed: int, epoch: int,
               group_by_length: bool) -> list[list[int]]:
    """Example indices for each micro-batch of one epoch (the last one may be short).

    group_by_length: sort within mega-batches of 64 micro-batches so padded batches hold similar lengths
    (HF's LengthGroupedSampler idea), then shuffle the micro-batch order so lengths don't trend over the epoch.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = micro_batch_size * 64
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]
    batches = [order[s:s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def _shifted(labels: Sequence[int]) -> list[int]:
    return list(labels[1:]) + [IGNORE]


def collate_pad(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Pads have attention_mask 0 and target -100."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.as_tensor(e["input_ids"])
        targets[row, :n] = torch.as_tensor(_shifted(e["labels"]))
        mask[row, :n] = 1
    return {"input_ids": ids, "targets": targets, "attention_mask": mask}


def collate_pack(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Concatenate the examples into one row; position_ids restart at 0 per example.

    The model then attends within each example only (transformers derives the segments from position_ids:
    cu_seqlens for flash-attention varlen, a block-diagonal mask for sdpa/eager).
    """
    ids, targets, positions = [], [], []
    for e in examples:
        ids += list(e["input_ids"])
        targets += _shifted(e["labels"])
        positions += range(len(e["input_ids"]))
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return {"input_ids": as_row(ids), "targets": as_row(targets), "position_ids": as_row(positions)}


def as_examples(columns: dict) -> list[dict]:
    """A slice of a tokenized dataset (a dict of columns) as a list of examples."""
    return [{"input_ids": i, "labels": lab} for i, lab in zip(columns["input_ids"], columns["labels"], strict=True)]


def batch_builder(batching: str, pad_id: int, device: torch.device):
    """`batch_of(dataset, indices)`: the micro-batch of those examples, collated as `batching` says, on `device`.

    Training and `neftune eval` share it, so an eval loss computed later equals the one the loop logged.
    """

    def batch_of(dataset, indices: list[int]) -> dict[str, torch.Tensor]:
        examples = as_examples(dataset[indices])
        batch = collate_pack(examples) if batching == "pack" else collate_pad(examples, pad_id)
        return {k: v.to(device) for k, v in batch.items()}

    return batch_of
