"""What a run records per step: `metrics.jsonl` always (strict JSON, one object per line), and the same numbers to
the trackers `train.report_to` names (train/trackers.py). Rank 0 writes; `compare` and `plot` read."""

from __future__ import annotations

import json
import math
from pathlib import Path

from neftune_cli.io.atomic import atomic_file
from neftune_cli.io.errors import DataError, UsageError
from neftune_cli.io.jsonl import json_lines
from neftune_cli.recipe.schema import Recipe
from neftune_cli.train.trackers import log_to, open_trackers

METRICS_FILE = "metrics.jsonl"


def json_line(record: dict) -> str:
    """Strict JSON: a non-finite number (which JSON has no word for) is written as null."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(record, allow_nan=False) + "\n"


class MetricsLog:
    """The run's metric sinks. `start_step` > 0 (a resume from that checkpoint): what the interrupted run logged
    after it is dropped from metrics.jsonl (the resumed run logs those steps again) and from TensorBoard by its
    `purge_step`; trackers that cannot drop history are not sent those steps again."""

    def __init__(self, run_root: Path, recipe: Recipe, start_step: int = 0):
        path = run_root / METRICS_FILE
        self._already_logged = set()
        if start_step and path.exists():
            records = read_metrics(run_root)  # a damaged line is named
            self._already_logged = {(r["step"], "eval" if "eval_loss" in r else "train") for r in records
                                    if r["step"] > start_step}
            with atomic_file(path) as f:
                f.write("".join(json_line(r) for r in records if r["step"] <= start_step))
        self._trackers = open_trackers(run_root, recipe, start_step)
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json_line(record))
        self._file.flush()  # a reader (tail -f, a killed run's leftovers) sees whole steps
        self._trackers = log_to(self._trackers, record, self._already_logged)

    def close(self, finished: bool = False) -> None:
        self._file.close()
        for tracker in self._trackers:
            tracker.close(finished)


def read_metrics(run: Path) -> list[dict]:
    path = run / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{run}: no metrics.jsonl (not a training run?)")
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    for n, line in json_lines(text):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {n}: invalid JSON") from None
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            raise DataError(f"{path}: line {n}: expected an object with a \"step\" number")
        for key, value in record.items():
            if key in _NUMBERS and value is not None and not _is_number(value):
                raise DataError(f"{path}: line {n}: {key}: expected a number, got {json.dumps(value)[:40]}")
        records.append(record)
    return records


_NUMBERS = {"step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_s",
            "noise_norm", "elapsed_s"}


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def log_line(record: dict) -> str:
    """A metrics record as the train log prints it."""
    return (f"step {record['step']} epoch {record['epoch']:.2f} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"grad_norm {record['grad_norm']:.3f} noise_norm {record['noise_norm']:.3f} "
            + (f"router_aux_loss {record['router_aux_loss']:.4f} " if "router_aux_loss" in record else "")
            + f"tokens/s {record['tokens_per_s']:.0f}" + (f" mfu {record['mfu']:.1%}" if "mfu" in record else "")
            + (f" peak_memory_gb {record['peak_memory_gb']:.2f}" if "peak_memory_gb" in record else ""))
