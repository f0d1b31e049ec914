"""What the data preparation did, in numbers: nothing is dropped, cut or skipped without being counted.

``Report`` is JSON-able (``to_dict`` / ``from_dict``, stored in the cache and the run directory) and has a
one-line ``summary()`` for logs. The functions below it compute the extra statistics ``neftune data stats``
shows from a split's ``length`` column.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np

MAX_REASONS = 5  # bad-record reasons kept for the report (the count is always complete)


@dataclass
class SourceReport:
    path: str
    format: str = ""
    weight: float | None = None
    records: int = 0  # raw records read (after max_samples)
    bad: int = 0  # skipped (on_bad_record: skip)
    truncated: int = 0  # kept, cut to max_seq_len
    dropped_overlength: int = 0  # overlength: drop
    dropped_untrained: int = 0  # no trained token within max_seq_len
    splits: int = 0  # conversations cut where a later prompt re-tokenizes an earlier reply (one more example each)
    examples: int = 0  # usable examples after tokenization
    held_out: int = 0  # moved to the eval split (eval_fraction / eval_size)
    used: int = 0  # examples in the final split, after weighting


@dataclass
class SplitReport:
    examples: int
    tokens: int
    trained_tokens: int
    length_mean: float
    length_p50: int
    length_p95: int
    length_max: int

    @classmethod
    def of(cls, lengths: np.ndarray, trained: np.ndarray) -> SplitReport:
        if len(lengths) == 0:
            return cls(0, 0, 0, 0.0, 0, 0, 0)
        return cls(
            examples=len(lengths),
            tokens=int(lengths.sum()),
            trained_tokens=int(trained.sum()),
            length_mean=round(float(lengths.mean()), 2),
            length_p50=int(np.percentile(lengths, 50)),
            length_p95=int(np.percentile(lengths, 95)),
            length_max=int(lengths.max()),
        )

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0


@dataclass
class Report:
    template: str
    max_seq_len: int
    end_of_turn: str  # the last trained token of a response, as text: what generation must stop on
    sources: list[SourceReport]
    eval_sources: list[SourceReport]
    train: SplitReport
    eval: SplitReport | None
    bad_reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS, "where: field ...: reason"

    def _all_sources(self) -> list[SourceReport]:
        return self.sources + self.eval_sources

    @property
    def records(self) -> int:
        return sum(s.records for s in self._all_sources())

    @property
    def bad(self) -> int:
        return sum(s.bad for s in self._all_sources())

    @property
    def truncated(self) -> int:
        return sum(s.truncated for s in self._all_sources())

    @property
    def dropped(self) -> int:
        return sum(s.dropped_overlength + s.dropped_untrained for s in self._all_sources())

    @property
    def splits(self) -> int:
        return sum(s.splits for s in self._all_sources())

    def summary(self) -> str:
        t = self.train
        eval_part = f"eval {self.eval.examples:,}" if self.eval else "no eval"
        return (
            f"train {t.examples:,} examples / {t.tokens:,} tokens ({t.trained_fraction:.0%} trained), {eval_part}; "
            f"from {self.records:,} records: {self.bad:,} bad skipped, {self.truncated:,} truncated, "
            f"{self.dropped:,} dropped, {self.splits:,} conversation splits; length mean {t.length_mean:.0f}, "
            f"p95 {t.length_p95}, max {t.length_max} "
            f"(max_seq_len {self.max_seq_len})"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        return cls(
            **{k: v for k, v in d.items() if k not in {"sources", "eval_sources", "train", "eval"}},
            sources=[SourceReport(**s) for s in d["sources"]],
            eval_sources=[SourceReport(**s) for s in d["eval_sources"]],
            train=SplitReport(**d["train"]),
            eval=SplitReport(**d["eval"]) if d["eval"] else None,
        )


# --- statistics for `neftune data stats` ------------------------------------------------------------------


def percentiles(lengths: np.ndarray, qs: tuple[int, ...] = (5, 25, 50, 75, 95, 99)) -> dict[str, int]:
    if len(lengths) == 0:
        return {}
    return {f"p{q}": int(np.percentile(lengths, q)) for q in qs} | {"max": int(lengths.max())}


def histogram(lengths: np.ndarray, bins: int = 16) -> list[dict[str, int]]:
    """Counts of lengths in ``bins`` equal ranges covering 1..the longest."""
    if len(lengths) == 0:
        return []
    edges = np.unique(np.linspace(0, int(lengths.max()), bins + 1).round().astype(int))
    counts, _ = np.histogram(lengths, bins=edges)
    return [
        {"from": int(lo) + 1, "to": int(hi), "count": int(c)}
        for lo, hi, c in zip(edges, edges[1:], counts, strict=False)
    ]


def padding_waste(lengths: np.ndarray, micro_batch_size: int, seed: int) -> float:
    """Fraction of computed positions that are padding when random micro-batches are padded to their longest."""
    if len(lengths) == 0:
        return 0.0
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    shuffled = lengths[order]
    padded = 0
    for i in range(0, len(shuffled), micro_batch_size):
        batch = shuffled[i : i + micro_batch_size]
        padded += int(batch.max()) * len(batch)
    return 1 - float(shuffled.sum()) / padded
