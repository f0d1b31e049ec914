"""What a run records per step: `metrics.jsonl` always (strict JSON, one object per line), and TensorBoard
events under `tensorboard/` when `train.report_to` names it. Rank 0 writes; `compare` and `plot` read."""

from __future__ import annotations

import json
import math
from pathlib import Path

from neftune_cli.io.atomic import atomic_file
from neftune_cli.io.errors import DataError, UsageError
from neftune_cli.io.jsonl import json_lines

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def json_line(record: dict) -> str:
    """Strict JSON: a non-finite number (which JSON has no word for) is written as null."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(record, allow_nan=False) + "\n"


def summary_writer_class():
    """torch's TensorBoard writer, or a one-line error naming the extra that provides it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch imports the tensorboard package lazily, here
        raise UsageError("train.report_to: tensorboard needs the tensorboard package: "
                         "pip install 'neftune-cli[tensorboard]'") from None
    return SummaryWriter


class MetricsLog:
    """The run's metric sinks. `start_step` > 0 (a resume from that checkpoint): what the interrupted run logged
    after it is dropped, from metrics.jsonl here and from TensorBoard by its `purge_step`; the resumed run logs
    those steps again."""

    def __init__(self, run_root: Path, report_to: list[str], start_step: int = 0):
        path = run_root / METRICS_FILE
        if start_step and path.exists():
            kept = [r for r in read_metrics(run_root) if r["step"] <= start_step]  # a damaged line is named
            with atomic_file(path) as f:
                f.write("".join(json_line(r) for r in kept))
        self._tensorboard = None
        if "tensorboard" in report_to:
            purge = start_step + 1 if start_step else None
            self._tensorboard = summary_writer_class()(str(run_root / TENSORBOARD_DIR), purge_step=purge)
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json_line(record))
        self._file.flush()  # a reader (tail -f, a killed run's leftovers) sees whole steps
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, int | float) and math.isfinite(value):
                    tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
                    self._tensorboard.add_scalar(tag, value, record["step"])
            self._tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


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
            f"tokens/s {record['tokens_per_s']:.0f}" + (f" mfu {record['mfu']:.1%}" if "mfu" in record else ""))
