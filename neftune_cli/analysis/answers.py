"""Length and diversity of a set of answers: the NEFTune paper's analysis (section 5) of why noise helps.

Diversity as the paper takes it from contrastive decoding (Li et al. 2022; SimCTG's ``evaluation.py``): text is
split on whitespace; rep-n = 1 - unique n-grams / total n-grams, with each answer's unique n-grams counted within
that answer and both counts summed over all answers; diversity = (1 - rep-2)(1 - rep-3)(1 - rep-4). rep-n is
reported in percent as the paper does. (SimCTG's loop skips each answer's last n-gram; we count every n-gram, as
the definition says.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from neftune_cli.io.errors import DataError, UsageError
from neftune_cli.io.jsonl import json_lines

NGRAMS = (2, 3, 4)


def read_answers(path: Path) -> list[dict]:
    """AlpacaEval model outputs (a JSON list) or `neftune generate --format jsonl` lines: objects with "output"."""
    if not path.is_file():
        raise UsageError(f"--answers {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
        rows = ([json.loads(line) for _, line in json_lines(text)] if path.suffix == ".jsonl"
                else json.loads(text))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON{' lines' if path.suffix == '.jsonl' else ''} ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: expected a non-empty list of answers with an \"output\" field")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("output"), str):
            raise DataError(f"{path}: answer {i + 1}: expected an object with a string \"output\"")
    return rows


def repetition(texts: list[str], n: int) -> float:
    """rep-n in percent over all answers (0 when no answer has n words)."""
    unique = total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[k:k + n]) for k in range(len(words) - n + 1)]
        unique, total = unique + len(set(grams)), total + len(grams)
    return 100.0 * (1 - unique / total) if total else 0.0


def diversity(texts: list[str]) -> float:
    return float(np.prod([1 - repetition(texts, n) / 100 for n in NGRAMS]))


def answer_stats(rows: list[dict], tokenizer, max_new_tokens: int | None = None) -> dict:
    """Lengths in tokens (the tokenizer's, no special tokens added) and characters, the share of answers cut at
    max_new_tokens, rep-2..4 and diversity.

    The cut share comes from each answer's finish_reason (`--format jsonl`), else from max_new_tokens when given
    (an answer that long was cut), else it is unknown (None).
    """
    texts = [r["output"] for r in rows]
    tokens = np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    chars = np.array([len(t) for t in texts])
    if all("finish_reason" in r for r in rows):
        cut = float(np.mean([r["finish_reason"] == "length" for r in rows]))
    elif max_new_tokens is not None:
        cut = float(np.mean(tokens >= max_new_tokens))
    else:
        cut = None
    stats = {"answers": len(texts), "tokens": _spread(tokens), "chars": _spread(chars), "hit_max_new_tokens": cut}
    stats |= {f"rep_{n}": round(repetition(texts, n), 2) for n in NGRAMS}
    return stats | {"diversity": round(diversity(texts), 4)}


def _spread(values: np.ndarray) -> dict:
    return {"mean": round(float(values.mean()), 1), "median": float(np.median(values)),
            "p90": float(np.percentile(values, 90))}


def format_stats(stats: dict) -> list[str]:
    cut = "unknown" if stats["hit_max_new_tokens"] is None else f"{stats['hit_max_new_tokens']:.1%}"
    return [
        f"answers: {stats['answers']}",
        "length (tokens): mean {mean}, median {median:g}, p90 {p90:g}".format(**stats["tokens"]),
        "length (chars): mean {mean}, median {median:g}, p90 {p90:g}".format(**stats["chars"]),
        f"hit max_new_tokens: {cut}",
        f"rep-2 {stats['rep_2']}%, rep-3 {stats['rep_3']}%, rep-4 {stats['rep_4']}%, diversity {stats['diversity']}",
    ]
