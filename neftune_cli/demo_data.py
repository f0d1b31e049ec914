"""Synthetic instruction data for the demo and the tests, written by us (no third-party text).

Small tasks a tiny model can genuinely learn in about a minute on a CPU: reverse or uppercase a word, sort
numbers, count items, add two numbers, take the first or last item of a list; several phrasings each, and
some records with the whole question in the instruction and an empty ``input``.

Records are Alpaca records ``{"instruction", "input", "output"}``. ``generate(n, seed, split)`` is
deterministic (``random.Random(seed)`` only). Every problem (task + its arguments, whatever the phrasing)
belongs to exactly one split by a stable hash, so the eval records are disjoint from the training ones by
construction. ``python -m neftune_cli.demo_data --out recipes/data`` writes the committed files
``demo.jsonl`` (2000 train records, seed 0) and ``demo_eval.jsonl`` (200 eval records, seed 1).

The builtin tokenizer (``neftune_cli.builtin``) is trained on ``generate(TRAIN_SIZE, TRAIN_SEED)``: changing
anything here changes that tokenizer, so bump ``builtin.VERSION`` too.
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from collections.abc import Callable
from pathlib import Path

TRAIN_FILE = "demo.jsonl"
EVAL_FILE = "demo_eval.jsonl"
TRAIN_SIZE, TRAIN_SEED = 2000, 0
EVAL_SIZE, EVAL_SEED = 200, 1
SPLITS = ("train", "eval")
EVAL_SHARE = 10  # percent of problems reserved for eval

WORDS: tuple[str, ...] = tuple(
    """
    apple river stone planet garden window candle forest bridge silver rabbit orange
    pencil castle winter summer valley button guitar pocket mirror ladder basket carpet
    cookie dragon engine flower hammer island jacket kitten lemon marble needle ocean
    pepper quartz rocket saddle tomato umbrella violin walnut yellow zebra anchor bottle
    cactus desert feather glove harbor igloo jungle kettle lantern meadow nutmeg otter
    parrot quilt ribbon spoon tiger velvet wagon yogurt acorn beetle cloud daisy
    eagle fossil goose honey ivory jewel koala llama maple night olive pearl
    raven sugar tulip uncle vapor whale blue green red fish bird tree
    moon star rain snow bread chair table clock horse music paper sand
    wind lamp
    """.split()
)

Record = dict[str, str]


def _words(rng: random.Random, k: int) -> list[str]:
    return rng.sample(WORDS, k)


def _numbers(rng: random.Random, k: int, top: int = 99) -> list[int]:
    return [rng.randint(0, top) for _ in range(k)]


def _join(items) -> str:
    return ", ".join(str(x) for x in items)


def _reverse(rng: random.Random) -> tuple[str, Record]:
    w = rng.choice(WORDS)
    if rng.random() < 0.25:
        instr = rng.choice(("Reverse the word '{w}'.", "Spell '{w}' backwards.", "What is '{w}' written backwards?"))
        return f"reverse:{w}", {"instruction": instr.format(w=w), "input": "", "output": w[::-1]}
    instr = rng.choice(
        (
            "Reverse the letters of the word.",
            "Spell the word backwards.",
            "Write the given word in reverse order.",
            "Return the word with its letters reversed.",
        )
    )
    return f"reverse:{w}", {"instruction": instr, "input": w, "output": w[::-1]}


def _upper(rng: random.Random) -> tuple[str, Record]:
    w = rng.choice(WORDS)
    if rng.random() < 0.25:
        instr = rng.choice(("Write the word {w} in capital letters.", "What is '{w}' in uppercase?"))
        return f"upper:{w}", {"instruction": instr.format(w=w), "input": "", "output": w.upper()}
    instr = rng.choice(
        (
            "Convert the word to uppercase.",
            "Write the word in capital letters.",
            "Uppercase the following word.",
        )
    )
    return f"upper:{w}", {"instruction": instr, "input": w, "output": w.upper()}


def _sort(rng: random.Random) -> tuple[str, Record]:
    nums = _numbers(rng, rng.randint(3, 6))
    instr = rng.choice(
        (
            "Sort the numbers in ascending order.",
            "Arrange these numbers from smallest to largest.",
            "Put the numbers in increasing order.",
            "Order the list of numbers from lowest to highest.",
        )
    )
    return f"sort:{_join(nums)}", {"instruction": instr, "input": _join(nums), "output": _join(sorted(nums))}


def _count(rng: random.Random) -> tuple[str, Record]:
    items = _words(rng, rng.randint(2, 8))
    instr = rng.choice(
        (
            "Count the items in the list.",
            "How many items are in the list?",
            "Give the number of words in the list.",
        )
    )
    return f"count:{_join(items)}", {"instruction": instr, "input": _join(items), "output": str(len(items))}


def _add(rng: random.Random) -> tuple[str, Record]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    key = f"add:{a}+{b}"
    if rng.random() < 0.5:
        instr = rng.choice(("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."))
        return key, {"instruction": instr.format(a=a, b=b), "input": "", "output": str(a + b)}
    instr = rng.choice(("Add the two numbers.", "What is the sum of these numbers?", "Compute the sum."))
    return key, {"instruction": instr, "input": f"{a} and {b}", "output": str(a + b)}


def _first_last(rng: random.Random) -> tuple[str, Record]:
    items = _words(rng, rng.randint(3, 6))
    if rng.random() < 0.5:
        instr = rng.choice(("Return the first item of the list.", "What is the first word in the list?"))
        return f"first:{_join(items)}", {"instruction": instr, "input": _join(items), "output": items[0]}
    instr = rng.choice(("Return the last item of the list.", "What is the last word in the list?"))
    return f"last:{_join(items)}", {"instruction": instr, "input": _join(items), "output": items[-1]}


TASKS: tuple[Callable[[random.Random], tuple[str, Record]], ...] = (
    _reverse,
    _upper,
    _sort,
    _count,
    _add,
    _first_last,
)


def split_of(problem: str) -> str:
    """The split a problem belongs to (stable across machines and Python versions: CRC32, not hash())."""
    return "eval" if zlib.crc32(problem.encode("utf-8")) % 100 < EVAL_SHARE else "train"


def generate(n: int, seed: int, split: str = "train") -> list[Record]:
    """``n`` distinct records of ``split`` ("train" or "eval"), the same for the same arguments."""
    return [record for _, record in draw(n, seed, split)]


def draw(n: int, seed: int, split: str = "train") -> list[tuple[str, Record]]:
    """Like ``generate`` but each record comes with its problem key (e.g. ``"reverse:planet"``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    rng = random.Random(seed)
    out: list[tuple[str, Record]] = []
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"cannot draw {n} distinct {split} records")
        problem, record = rng.choice(TASKS)(rng)
        if split_of(problem) != split:
            continue
        key = (record["instruction"], record["input"])
        if key in seen:
            continue
        seen.add(key)
        out.append((problem, record))
    return out


def train_records() -> list[Record]:
    """The records of the committed ``demo.jsonl``."""
    return generate(TRAIN_SIZE, TRAIN_SEED, "train")


def eval_records() -> list[Record]:
    """The records of the committed ``demo_eval.jsonl``."""
    return generate(EVAL_SIZE, EVAL_SEED, "eval")


def to_jsonl(records: list[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in ((TRAIN_FILE, train_records()), (EVAL_FILE, eval_records())):
        path = out_dir / name
        path.write_text(to_jsonl(records), encoding="utf-8", newline="\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftune_cli.demo_data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("recipes/data"), help="folder for the two files")
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
