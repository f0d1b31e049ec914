"""``neftune data clean`` speed and exactness.

1. On the 2K Alpaca sample, the near-duplicate filter three ways: ours (prefix-filter candidates + bit-parallel
   LCS), exhaustive with our LCS, and exhaustive with rouge-score's own scorer (as Stanford Alpaca runs it):
   time, near-duplicates found, and whether the (record, duplicated record, score) results are equal.
2. The whole command on the 52K Alpaca set, in its own process (`neftune data clean ... --dry-run`):
   wall time, peak RSS, what each filter removed. Note the load average printed beside it.

    python benchmarks/clean.py
    taskset -c 0,1 python benchmarks/clean.py     # 2 cores, the target: 52K in under 60 s
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def exhaustive_ours(texts: list[str], threshold: float) -> dict:
    """Brute force with our tokenizer and LCS: isolates the candidate search from the scorer."""
    from neftune_cli.data.rouge import fmeasure, lcs_length, match_masks, tokens

    kept: list[tuple[int, list[str], dict]] = []
    found = {}
    for i, text in enumerate(texts):
        seq = tokens(text)
        if not seq:
            continue
        for j, other, masks in kept:
            score = fmeasure(lcs_length(masks, len(other), seq), len(seq), len(other))
            if score >= threshold:
                found[i] = (j, score)
                break
        else:
            kept.append((i, seq, match_masks(seq)))
    return found


def sample(path: Path, threshold: float) -> None:
    from neftune_cli.data.rouge import exhaustive_near_duplicates, near_duplicates

    texts = [r["instruction"] for r in json.loads(path.read_text(encoding="utf-8"))]
    fast, t_fast = timed(near_duplicates, texts, threshold)
    ours, t_ours = timed(exhaustive_ours, texts, threshold)
    reference, t_ref = timed(exhaustive_near_duplicates, texts, threshold)
    print(f"{path.name}: {len(texts):,} instructions, ROUGE-L >= {threshold}")
    print("| method | time | near-duplicates | equal to rouge-score exhaustive |")
    print("|---|---|---|---|")
    print(f"| candidates (prefix filter) + bit-parallel LCS | {t_fast:.2f} s | {len(fast)} | {fast == reference} |")
    print(f"| exhaustive, bit-parallel LCS | {t_ours:.2f} s | {len(ours)} | {ours == reference} |")
    print(f"| exhaustive, rouge-score `_score_lcs` | {t_ref:.2f} s | {len(reference)} | (reference) |")


def full(path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="neftune-bench-") as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "neftune_cli", "data", "clean", str(path), "--dry-run", "--report",
                   str(report)]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        result = json.loads(report.read_text())
    removed = ", ".join(f"{name} {f['removed']:,}" for name, f in result["filters"].items() if f["enabled"])
    print(f"\n{path.name}: {result['records']:,} records in {wall:.1f} s wall, peak RSS {rss:.2f} GB "
          f"(load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
          f"{len(os.sched_getaffinity(0))} cores allowed)")
    print(f"removed: {removed}; kept {result['kept']:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", default=str(SHARED / "alpaca" / "alpaca_data_first2k.json"))
    parser.add_argument("--data", default=str(SHARED / "alpaca" / "alpaca_data.json"))
    parser.add_argument("--rouge-l", type=float, default=0.7)
    parser.add_argument("--skip-full", action="store_true", help="only the 2K comparison")
    args = parser.parse_args()
    sample(Path(args.sample), args.rouge_l)
    if not args.skip_full:
        full(Path(args.data))


if __name__ == "__main__":
    main()
