"""Micro-batch plans and collation: padded batches or padding-free packed rows.

The plan for an epoch depends only on (seed, epoch), never on iterator state, so resuming at step k needs
nothing but k; a rank of a multi-process run can take its share of the same plan.
Targets are shifted here, per example: the target of an example's last token is -100, so a packed row never
trains one example to predict the next example's first token.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence

import torch

IGNORE = -100


def plan_epoch(lengths: Sequence[int], micro_batch_size: int, *, seed: int, epoch: int,
               group_by_length: bool, token_budget: int | None = None) -> list[list[int]]:
    """Example indices for each micro-batch of one epoch (the last one may be short).

    group_by_length: sort within mega-batches of 64 micro-batches so padded batches hold similar lengths
    (HF's LengthGroupedSampler idea), then shuffle the micro-batch order so lengths don't trend over the epoch.
    token_budget: instead of micro_batch_size examples, as many examples (in the shuffled order) as fit in this
    many tokens, so every packed forward is about the same size whatever the example lengths.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if token_budget is not None:
        return _fill(order, lengths, token_budget)
    if group_by_length:
        mega = micro_batch_size * 64
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]
    batches = [order[s:s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def _fill(order: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy, in order: a micro-batch takes examples until the next would pass the budget."""
    batches, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    return batches + [current] if current else batches


class StepPlan:
    """Which micro-batches each optimizer step trains on, for any step of the run: each epoch's seeded plan cut
    into steps of `grad_accum` micro-batches (the epoch's last step may have fewer). It depends only on the
    lengths and the settings, so a resumed run and every rank of a distributed one compute the same.
    """

    def __init__(self, lengths: Sequence[int], *, micro_batch_size: int, grad_accum: int, seed: int,
                 group_by_length: bool, token_budget: int | None):
        self.grad_accum = grad_accum
        self._plan = functools.lru_cache(maxsize=1)(lambda epoch: plan_epoch(
            lengths, micro_batch_size, seed=seed, epoch=epoch, group_by_length=group_by_length,
            token_budget=token_budget))
        self._steps: dict[int, int] = {}

    def steps_in_epoch(self, epoch: int) -> int:
        if epoch not in self._steps:  # a token budget makes the count differ between epochs
            self._steps[epoch] = math.ceil(len(self._plan(epoch)) / self.grad_accum)
        return self._steps[epoch]

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within it), both from 0, of optimizer step `step` (from 1)."""
        epoch, k = 0, step - 1
        while k >= self.steps_in_epoch(epoch):
            k -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, k

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, k = self.locate(step)
        return self._plan(epoch)[k * self.grad_accum:(k + 1) * self.grad_accum]

    def epochs_done(self, step: int) -> float:
        epoch, k = self.locate(step)
        return epoch + (k + 1) / self.steps_in_epoch(epoch)


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


class Batch(dict):
    """A micro-batch: the model's keyword arguments (tensors on the device), and its token counts, taken on the
    host while collating so that the training step never waits on the device to read them."""

    trained: int  # targets that count in the loss
    tokens: int  # real (non-pad) tokens


def batch_builder(batching: str, pad_id: int, device: torch.device):
    """`batch_of(dataset, indices)`: the micro-batch of those examples, collated as `batching` says, on `device`.

    Training and `neftune eval` share it, so an eval loss computed later equals the one the loop logged.
    """

    def batch_of(dataset, indices: list[int]) -> Batch:
        examples = as_examples(dataset[indices])
        collated = collate_pack(examples) if batching == "pack" else collate_pad(examples, pad_id)
        batch = Batch({k: v.to(device, non_blocking=True) for k, v in collated.items()})
        batch.trained = int((collated["targets"] != IGNORE).sum())
        batch.tokens = sum(len(e["input_ids"]) for e in examples)
        return batch

    return batch_of
