"""The learning rate over a run's optimizer steps: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math
from dataclasses import dataclass

from neftune_cli.data.batching import StepPlan
from neftune_cli.recipe.schema import TrainSection


@dataclass
class Schedule:
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, cfg: TrainSection, plan: StepPlan) -> Schedule:
        total = cfg.max_steps or plan.total_steps(cfg.epochs)
        return cls(total, math.ceil(cfg.warmup_ratio * total))

    def lr_factor(self, kind: str, step: int) -> float:
        """LR multiplier before optimizer step `step` (0-based), as transformers' schedulers define it."""
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0
