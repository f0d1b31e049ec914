"""Data preparation speed: examples/s cold (read, render, tokenize prompts and replies, mask, cache write) and warm
(cache hit), on a fresh temporary cache.

    python benchmarks/tokenize_data.py                       # 52K Alpaca, Llama-2 tokenizer, num_proc 2
    taskset -c 0,1 python benchmarks/tokenize_data.py --num-proc 2   # pin to 2 cores for the target (< 30 s cold)
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on the import path and its name shadows the standard
# library's tokenize module (which inspect and linecache import): take the folder off the path first.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "alpaca" / "alpaca_data.json"), help="data file or folder")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "llama2"), help="tokenizer folder")
    parser.add_argument("--template", default="alpaca", choices=["alpaca", "chat", "custom"])
    parser.add_argument("--chat-template", default=None, help="jinja file for --template custom")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="neftune-bench-") as cache_dir:
        os.environ["NEFTUNE_CACHE"] = cache_dir  # fresh: the first run is cold
        from transformers import AutoTokenizer

        from neftune_cli.data.pipeline import prepare
        from neftune_cli.recipe.load import validate

        data = {
            "sources": [{"path": str(Path(args.data).resolve())}],
            "template": args.template,
            "max_seq_len": args.max_seq_len,
            "num_proc": args.num_proc,
            "on_bad_record": "skip",  # Alpaca has 49 records with an empty output
        }
        if args.chat_template:
            data["chat_template"] = Path(args.chat_template).read_text(encoding="utf-8")
        recipe = validate({"model": {"name_or_path": args.tokenizer}, "data": data, "output": {"dir": "unused"}})
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

        results = []
        for label in ("cold", "warm"):
            cpu, wall = cpu_seconds(), time.perf_counter()
            prepared = prepare(recipe, tokenizer, log=lambda message: print(f"  {message}"))
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            records = prepared.report.records
            results.append(f"{label}: {wall:6.2f} s wall, {cpu:6.2f} s CPU, {records / wall:9,.0f} records/s")
        print(f"summary: {prepared.report.summary()}")
        print(
            f"{records:,} records, {args.num_proc} processes, cpu count {os.cpu_count()}, "
            f"affinity {len(os.sched_getaffinity(0))}"
        )
        for line in results:
            print(line)


if __name__ == "__main__":
    main()
