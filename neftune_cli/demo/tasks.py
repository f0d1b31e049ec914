"""Synthetic instruction data for the demo and the tests, written by us (no third-party text).

Small tasks a tiny randomly initialised model can learn with LoRA in a minute or two on a CPU: count the
items of a list, name a word's category, give a word's opposite, add two digits, name what comes after a day,
a month or a number; several phrasings each, some with the whole question in the instruction and an empty
``input``. Tasks that need copying or spelling (reverse a word, take the first item of a list) are not here:
the random model does not learn them in that time (0% after 1,000 steps).

Records are Alpaca records ``{"instruction", "input", "output"}``. ``generate(n, seed, split)`` is
deterministic (``random.Random(seed)`` only). Every problem (task + its arguments + the phrasing) belongs to
exactly one split by a stable hash, so the eval records are disjoint from the training ones by construction:
an eval list to count is a new list, and an eval fact (the opposite of "hot") is asked in a phrasing the
model never saw it in. ``python -m neftune_cli.demo.tasks --out recipes/data`` writes the committed files
``demo.jsonl`` (1400 train records, seed 0) and ``demo_eval.jsonl`` (200 eval records, seed 1).

The builtin tokenizer (``neftune_cli.demo.builtin``) is trained on ``generate(TRAIN_SIZE, TRAIN_SEED)``: changing
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
TRAIN_SIZE, TRAIN_SEED = 1400, 0
EVAL_SIZE, EVAL_SEED = 200, 1
SPLITS = ("train", "eval")
EVAL_SHARE = 10  # percent of problems reserved for eval

CATEGORIES: dict[str, tuple[str, ...]] = {
    name: tuple(words.split())
    for name, words in {
        "fruit": "apple orange lemon banana cherry grape peach pear plum mango melon kiwi",
        "animal": "rabbit kitten zebra otter parrot tiger beetle eagle goose koala llama raven whale horse",
        "color": "yellow blue green red purple pink brown black white gray",
        "place": "river forest garden valley island ocean desert harbor jungle meadow castle bridge",
        "tool": "hammer needle pencil spoon ladder lantern kettle basket bottle wagon",
        "weather": "rain snow wind cloud storm fog frost thunder",
        "instrument": "guitar violin drum piano flute trumpet harp",
    }.items()
}
WORDS: tuple[str, ...] = tuple(w for words in CATEGORIES.values() for w in words)
CATEGORY_OF = {w: name for name, words in CATEGORIES.items() for w in words}
OPPOSITES: dict[str, str] = {
    a: b
    for pair in (
        "hot cold", "big small", "up down", "day night", "fast slow", "old new", "happy sad", "light dark",
        "open closed", "early late", "full empty", "high low", "hard soft", "wet dry", "loud quiet", "rich poor",
        "strong weak", "long short", "left right", "in out", "yes no", "win lose", "push pull", "black white",
    )
    for a, b in (pair.split(), pair.split()[::-1])
}
SEQUENCES = (
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
    "January February March April May June July August September October November December".split(),
    [str(n) for n in range(21)],
)

Record = dict[str, str]


def _join(items) -> str:
    return ", ".join(str(x) for x in items)


def _ask(rng: random.Random, task: str, args: str, inline, with_input, output: str, input_text: str, **fields):
    """``task`` asked about ``args`` in one of its phrasings: the whole question in the instruction (empty
    input), or an instruction plus ``input_text``. The problem key names the phrasing too (see ``split_of``)."""
    template, inp = rng.choice([(t, "") for t in inline] + [(t, input_text) for t in with_input])
    record = {"instruction": template.format(**fields), "input": inp, "output": output}
    return f"{task}:{args}|{template}", record


def _count(rng: random.Random) -> tuple[str, Record]:
    items = rng.sample(WORDS, rng.randint(2, 8))
    asks = ("Count the items in the list.", "How many items are in the list?", "Give the number of words in the list.")
    return _ask(rng, "count", _join(items), (), asks, str(len(items)), _join(items))


def _category(rng: random.Random) -> tuple[str, Record]:
    w = rng.choice(WORDS)
    inline = ("What kind of thing is '{w}'?", "Which group does the word '{w}' belong to?")
    asks = ("Give the category of the word.", "What kind of thing is this?", "Classify the word.")
    return _ask(rng, "category", w, inline, asks, CATEGORY_OF[w], w, w=w)


def _opposite(rng: random.Random) -> tuple[str, Record]:
    w = rng.choice(tuple(OPPOSITES))
    inline = ("What is the opposite of '{w}'?", "Give the opposite of the word {w}.", "What is the antonym of {w}?")
    asks = ("Write the opposite of the word.", "What is the antonym of this word?")
    return _ask(rng, "opposite", w, inline, asks, OPPOSITES[w], w, w=w)


def _add(rng: random.Random) -> tuple[str, Record]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    inline = ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.")
    asks = ("Add the two numbers.", "What is the sum of these numbers?")
    return _ask(rng, "add", f"{a}+{b}", inline, asks, str(a + b), f"{a} and {b}", a=a, b=b)


def _next(rng: random.Random) -> tuple[str, Record]:
    sequence = rng.choice(SEQUENCES)
    i = rng.randrange(len(sequence))
    w, after = sequence[i], sequence[(i + 1) % len(sequence)]
    inline = ("What comes after {w}?", "Which one follows {w}?", "Name the one after {w}.")
    asks = ("What comes next?", "Give the next one in the sequence.")
    return _ask(rng, "next", w, inline, asks, after, w, w=w)


TASKS: tuple[Callable[[random.Random], tuple[str, Record]], ...] = (_count, _category, _opposite, _add, _next)


def split_of(problem: str) -> str:
    """The split a problem belongs to (stable across machines and Python versions: CRC32, not hash())."""
    return "eval" if zlib.crc32(problem.encode("utf-8")) % 100 < EVAL_SHARE else "train"


def generate(n: int, seed: int, split: str = "train") -> list[Record]:
    """``n`` distinct records of ``split`` ("train" or "eval"), the same for the same arguments."""
    return [record for _, record in draw(n, seed, split)]


def draw(n: int, seed: int, split: str = "train") -> list[tuple[str, Record]]:
    """Like ``generate`` but each record comes with its problem key, e.g. ``"opposite:hot|What is the antonym
    of {w}?"``."""
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
    parser = argparse.ArgumentParser(prog="python -m neftune_cli.demo.tasks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("recipes/data"), help="folder for the two files")
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
