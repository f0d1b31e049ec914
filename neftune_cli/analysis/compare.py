"""`neftune compare`: the paper's NEFTune-vs-baseline table for the user's own runs, one row per run.

Everything comes from what training wrote: recipe.yaml (noise settings) and metrics.jsonl (steps, tokens, time,
losses), plus the answers' length and diversity when answer files are given, and each benchmark's primary score
(value ± stderr) from the RUN/lm_eval-*.json files `neftune eval RUN --tasks ...` wrote.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from neftune_cli.analysis.answers import answer_stats, read_answers
from neftune_cli.infer.harness import run_results, score_cell, task_rows
from neftune_cli.io.console import log, table
from neftune_cli.io.errors import DataError, UsageError, first_line
from neftune_cli.train.metrics import read_metrics

COLUMNS = ["run", "alpha", "scale", "steps", "tokens", "wall_s", "train_loss", "eval_loss",
           "answer_tokens", "answer_chars", "hit_max", "rep_2", "diversity"]


def run_row(run: Path) -> dict:
    noise = _noise(run / "recipe.yaml")
    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("eval_loss") is not None]
    tokens, wall = _tokens_and_time(train)
    return {"run": run.name, "alpha": noise.get("alpha") or 0, "scale": noise.get("scale"),
            "steps": train[-1]["step"] if train else 0, "tokens": tokens, "wall_s": round(wall, 1),
            "train_loss": train[-1]["loss"] if train else None, "eval_loss": evals[-1]["eval_loss"] if evals else None}


def _noise(recipe_file: Path) -> dict:
    """The run's neftune section; a damaged recipe.yaml is named (exit 2), a missing one means no noise known."""
    if not recipe_file.is_file():
        return {}
    try:
        recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{recipe_file}: not readable YAML ({first_line(e)})") from None
    noise = recipe.get("neftune") or {} if isinstance(recipe, dict) else None
    if not isinstance(noise, dict):
        raise DataError(f"{recipe_file}: expected a recipe mapping with a neftune section")
    return noise


def _tokens_and_time(train: list[dict]) -> tuple[int, float]:
    """Each log record covers the window since the previous one (tokens_per_s x its length = its tokens); elapsed_s
    restarts at 0 when a run is resumed, so each resumed segment adds its own time."""
    tokens, wall, previous = 0.0, 0.0, 0.0
    for r in train:
        elapsed = r.get("elapsed_s") or 0.0
        if elapsed < previous:  # a resume: a new segment from 0
            wall, previous = wall + previous, 0.0
        tokens += (r.get("tokens_per_s") or 0.0) * (elapsed - previous)
        previous = elapsed
    return round(tokens), wall + previous


def compare_rows(runs: list[Path], answers: list[Path]) -> list[dict]:
    from neftune_cli.infer.target import resolve

    if answers and len(answers) != len(runs):
        raise UsageError(f"--answers: give one answers file per run ({len(runs)} runs, {len(answers)} files)")
    rows = []
    for k, run in enumerate(runs):
        row = run_row(run)
        if answers:
            stats = answer_stats(read_answers(answers[k]), resolve(str(run)).tokenizer())
            row |= {"answer_tokens": stats["tokens"]["mean"], "answer_chars": stats["chars"]["mean"],
                    "hit_max": stats["hit_max_new_tokens"], "rep_2": stats["rep_2"], "diversity": stats["diversity"]}
        rows.append(row | _task_scores(run))
    _warn_unlike_settings(rows)
    return rows


def _task_scores(run: Path) -> dict:
    """Each task's latest score in the run's eval --tasks results."""
    scores = {}
    for results in run_results(run):
        limit = (results.get("config") or {}).get("limit")
        scores |= {r["task"]: {"metric": r["metric"], "value": r["value"], "stderr": r["stderr"],
                               "n_shot": r["n_shot"], "limit": limit} for r in task_rows(results)}
    return {"tasks": scores} if scores else {}


def _warn_unlike_settings(rows: list[dict]) -> None:
    """Scores of one task under another shot count or sample limit are not comparable: say so."""
    for task in {t for r in rows for t in r.get("tasks", {})}:
        settings = {(r["tasks"][task]["n_shot"], r["tasks"][task]["limit"]) for r in rows if task in r.get("tasks", {})}
        if len(settings) > 1:
            log(f"warning: compare: {task} was run with different settings across runs (n-shot, limit): "
                f"{sorted(settings, key=str)}")


def format_table(rows: list[dict]) -> list[str]:
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    tasks = sorted({(t, s["metric"]) for r in rows for t, s in r.get("tasks", {}).items()})
    cells = [[_cell(c, r.get(c)) for c in columns]
             + [score_cell(r["tasks"][t]) if (r.get("tasks") or {}).get(t, {}).get("metric") == m else "n/a"
                for t, m in tasks] for r in rows]
    return table(columns + [f"{t} {m}" for t, m in tasks], cells)


FORMATS = {"alpha": "{:g}", "tokens": "{:,}", "wall_s": "{:.1f}", "train_loss": "{:.4f}", "eval_loss": "{:.4f}",
           "answer_tokens": "{:.1f}", "answer_chars": "{:.1f}", "hit_max": "{:.1%}", "rep_2": "{:.2f}",
           "diversity": "{:.4f}"}


def _cell(column: str, value) -> str:
    return "n/a" if value is None else FORMATS.get(column, "{}").format(value)
