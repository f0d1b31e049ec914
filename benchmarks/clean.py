"""``neftune data clean`` speed and exactness.

1. On the 2K Alpaca sample, the near-duplicate filter: ours (prefix-filter candidates + bit-parallel LCS),
   exhaustive with our LCS, exhaustive with rouge-score's own scorer (as Stanford Alpaca runs it), and datasketch
   MinHash LSH candidates scored with our LCS: time, near-duplicates found, and whether the (record, duplicated
   record, score) results equal rouge-score's.
2. The whole command on the 52K Alpaca set, in its own process (`neftune data clean ... --dry-run`):
   wall time, peak RSS, what each filter removed. Note the load average printed beside it. Then MinHash LSH on the
   52K instructions: time and recall against our (exact) result.

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


def lsh_near_duplicates(texts: list[str | None], threshold: float, jaccard: float = 0.5, num_perm: int = 128) -> dict:
    """The keep-first filter with datasketch MinHash LSH (token sets, Jaccard >= `jaccard` likely) as candidates.

    ROUGE-L F >= 0.7 between two equal-length texts allows a token-set Jaccard as low as 0.54, so 0.5 is the
    natural setting; LSH still misses some pairs (it is probabilistic), which is the recall printed.
    """
    from datasketch import MinHash, MinHashLSH

    from neftune_cli.data.rouge import fmeasure, lcs_length, match_masks, tokens

    seqs = [tokens(t) if t is not None else [] for t in texts]
    hashes = MinHash.bulk([[w.encode() for w in set(seq)] for seq in seqs], num_perm=num_perm)
    lsh = MinHashLSH(threshold=jaccard, num_perm=num_perm)
    masks: dict[int, dict] = {}
    found = {}
    for i, (seq, mh) in enumerate(zip(seqs, hashes, strict=True)):
        if not seq:
            continue
        for j in sorted(lsh.query(mh)):
            score = fmeasure(lcs_length(masks[j], len(seqs[j]), seq), len(seq), len(seqs[j]))
            if score >= threshold:
                found[i] = (j, score)
                break
        else:
            masks[i] = match_masks(seq)
            lsh.insert(i, mh)
    return found


def sample(path: Path, threshold: float) -> None:
    from neftune_cli.data.rouge import exhaustive_near_duplicates, near_duplicates

    texts = [r["instruction"] for r in json.loads(path.read_text(encoding="utf-8"))]
    fast, t_fast = timed(near_duplicates, texts, threshold)
    ours, t_ours = timed(exhaustive_ours, texts, threshold)
    reference, t_ref = timed(exhaustive_near_duplicates, texts, threshold)
    lsh, t_lsh = timed(lsh_near_duplicates, texts, threshold)
    print(f"{path.name}: {len(texts):,} instructions, ROUGE-L >= {threshold}")
    print("| method | time | near-duplicates | equal to rouge-score exhaustive |")
    print("|---|---|---|---|")
    print(f"| candidates (prefix filter) + bit-parallel LCS | {t_fast:.2f} s | {len(fast)} | {fast == reference} |")
    print(f"| exhaustive, bit-parallel LCS | {t_ours:.2f} s | {len(ours)} | {ours == reference} |")
    print(f"| exhaustive, rouge-score `_score_lcs` | {t_ref:.2f} s | {len(reference)} | (reference) |")
    print(f"| datasketch MinHash LSH (Jaccard 0.5, 128 perm) + bit-parallel LCS | {t_lsh:.2f} s | {len(lsh)} | "
          f"{lsh == reference} |")


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


def lsh_recall(path: Path, threshold: float) -> None:
    from neftune_cli.data.rouge import near_duplicates

    texts = [r["instruction"] for r in json.loads(path.read_text(encoding="utf-8"))]
    exact, t_exact = timed(near_duplicates, texts, threshold)
    lsh, t_lsh = timed(lsh_near_duplicates, texts, threshold)
    same = sum(lsh.get(i) == pair for i, pair in exact.items())
    print(f"near-duplicates in {len(texts):,} instructions: ours {len(exact)} in {t_exact:.1f} s; MinHash LSH "
          f"{len(lsh)} in {t_lsh:.1f} s, {same} of ours found identically (recall {same / max(1, len(exact)):.3f}), "
          f"load average {os.getloadavg()[0]:.2f}")


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
        lsh_recall(Path(args.data), args.rouge_l)


if __name__ == "__main__":
    main()
