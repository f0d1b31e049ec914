"""The end of `make demo`: exact-match accuracy per task on the held-out demo prompts, before and after
fine-tuning, and a few of the answers, from two `neftune generate --format jsonl` outputs.

    python -m neftune_cli.demo.check BEFORE.jsonl AFTER.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from neftune_cli.demo import tasks as demo_tasks
from neftune_cli.io.jsonl import json_lines


def eval_tasks() -> list[tuple[str, dict]]:
    """(task, record) of demo_eval.jsonl, in its order; the task is the problem key's prefix ("opposite:hot|...")."""
    return [(problem.split(":")[0], record)
            for problem, record in demo_tasks.draw(demo_tasks.EVAL_SIZE, demo_tasks.EVAL_SEED, "eval")]


def read_outputs(path: Path, records: list[dict]) -> list[str]:
    rows = [json.loads(line) for _, line in json_lines(path.read_text(encoding="utf-8"))]
    if [r["instruction"] for r in rows] != [r["instruction"] for r in records]:
        raise SystemExit(f"{path}: not the answers to {demo_tasks.EVAL_FILE} (generate all of it, in order)")
    return [r["output"] for r in rows]


def accuracy(tasks: list[str], expected: list[str], outputs: list[str]) -> dict[str, float]:
    right, total = defaultdict(int), defaultdict(int)
    for task, want, got in zip(tasks, expected, outputs, strict=True):
        total[task] += 1
        right[task] += int(got.strip() == want.strip())
    per_task = {task: right[task] / total[task] for task in sorted(total)}
    return per_task | {"all": sum(right.values()) / len(tasks)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftune_cli.demo.check", description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="answers of the base model (generate --format jsonl)")
    parser.add_argument("after", type=Path, help="answers of the fine-tuned model")
    args = parser.parse_args(argv)
    tasks, records = zip(*eval_tasks(), strict=True)
    expected = [r["output"] for r in records]
    before, after = (read_outputs(p, list(records)) for p in (args.before, args.after))
    counts = {t: tasks.count(t) for t in set(tasks)} | {"all": len(tasks)}
    scores = accuracy(list(tasks), expected, before), accuracy(list(tasks), expected, after)
    print(f"exact match on the {len(tasks)} held-out demo prompts (greedy), before -> after fine-tuning:")
    for task in scores[1]:
        print(f"  {task:<12} {counts[task]:>4}  {scores[0][task]:>6.1%} -> {scores[1][task]:>6.1%}")
    print("answers after fine-tuning, the first right and the first wrong one of each task:")
    shown = {}
    for k, task in enumerate(tasks):
        shown.setdefault((task, after[k].strip() == expected[k].strip()), k)
    for (task, right), k in sorted(shown.items(), key=lambda item: (item[0][0], not item[0][1])):
        r = records[k]
        question = r["instruction"] + (f" [{r['input']}]" if r["input"] else "")
        print(f"  {task:<9} {question} -> {after[k]!r} ({'ok' if right else f'expected {expected[k]!r}'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
