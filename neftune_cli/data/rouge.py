"""ROUGE-L between instructions, and the keep-first near-duplicate filter of Self-Instruct, fast and exact.

Self-Instruct and Stanford Alpaca keep a new instruction only if its ROUGE-L F against every kept one is below a
threshold, scored by ``rouge_score``'s ``RougeScorer(["rougeL"], use_stemmer=False)``. ``tokens`` and ``fmeasure``
here give exactly that library's numbers (same tokenizer, same float arithmetic, so ties at the threshold agree;
a test compares them), with a bit-parallel LCS instead of its Python dynamic-programming table.

Comparing every pair is quadratic (1.35e9 pairs for the 52K Alpaca set). ``near_duplicates`` finds the same
pairs from candidates only, with prefix filtering, which loses nothing:

- ROUGE-L F = 2L/(m+n) for an LCS of length L between token sequences of lengths m >= n, so F >= t needs
  L >= t(m+n)/2. L is at most the multiset overlap o of the two token bags, and at most n, hence o >= t*n and
  o >= t*m/(2-t) (n >= t*m/(2-t) follows from n >= L).
- Give every (token, occurrence) element a global rank, rarest first, and sort each record's elements by it.
  If two records share o elements, the K rarest shared ones lie within the first (size - o + K) elements of
  each. With the bounds above, the longer record's first (m - ceil(t*m/(2-t)) + K) elements and the shorter
  record's first (n - ceil(t*n) + K) elements share at least min(K, o) elements.
- So every record is indexed under its short prefix, keyed by (element, its length); every record then probes,
  for each partner length n <= m that F >= t allows, the entries of length n with its first
  (m - ceil(t(m+n)/2) + K) elements, and pairs sharing min(K, ceil(t(m+n)/2)) of them are candidates. Rare
  elements make short posting lists; K = 2 keeps the common words that do reach a prefix from making candidates
  on their own. The join and the counting run in numpy; the keep-first pass scores only candidates.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
SHARED = 2  # K above: prefix elements a candidate must share
# Partner lengths within 5% of each other share an index key, so a long text probes O(log) keys, not one per
# length; every length up to 20 still has its own.
LENGTH_BUCKET = math.log(1.05)
PROBE_BLOCK = 4096  # records probing at a time: bounds the join's memory (pairs of one block)
EPS = 1e-9  # bounds are rounded down by this much, so float error can only add candidates


def tokens(text: str) -> list[str]:
    """rouge_score.tokenize.tokenize(text, stemmer=None): lowercase, then runs of [a-z0-9]."""
    return _NON_ALPHANUM.sub(" ", text.lower()).split()


def fmeasure(lcs: int, m: int, n: int) -> float:
    """ROUGE-L F1 as rouge_score computes it (precision and recall first), for equal floats at the threshold."""
    if lcs == 0:
        return 0.0
    precision, recall = lcs / n, lcs / m
    return 2 * precision * recall / (precision + recall)


def match_masks(seq: Sequence) -> dict:
    """For the bit-parallel LCS: item -> bitmask of its positions in seq."""
    masks: dict = {}
    for position, item in enumerate(seq):
        masks[item] = masks.get(item, 0) | (1 << position)
    return masks


def lcs_length(masks: dict, m: int, other: Sequence) -> int:
    """Length of the longest common subsequence of a length-m sequence (given by its match_masks) and other.

    Hyyrö's bit-vector algorithm: one pass over `other`, a few integer operations per item.
    """
    full = (1 << m) - 1
    v = full
    for item in other:
        u = v & masks.get(item, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F between two texts."""
    ta, tb = tokens(a), tokens(b)
    if not ta or not tb:
        return 0.0
    return fmeasure(lcs_length(match_masks(ta), len(ta), tb), len(ta), len(tb))


def near_duplicates(
    texts: Sequence[str | None], threshold: float, progress: Callable[[str, int], None] | None = None
) -> dict[int, tuple[int, float]]:
    """Keep-first filter: {i: (j, score)} for each text whose ROUGE-L F against an earlier kept text j is
    >= threshold (j is the earliest such). None marks a record another filter removed: neither compared nor kept.

    Equal to comparing each text with every earlier kept one (``exhaustive_near_duplicates``).
    progress(phase, n) is called now and then with the texts done in each phase: "candidates", then "scoring".
    """
    ids, ranked = _encode(texts)
    candidates = _candidate_pairs(ids, ranked, threshold, progress)
    masks: dict[int, dict] = {}
    found: dict[int, tuple[int, float]] = {}
    for i, seq in enumerate(ids):
        if progress is not None and i % 2048 == 0:
            progress("scoring", i)
        if not seq:
            continue
        m = len(seq)
        for j in candidates[i]:
            if j in masks:  # kept
                n = len(ids[j])
                score = fmeasure(lcs_length(masks[j], n, seq), m, n)
                if score >= threshold:
                    found[i] = (j, score)
                    break
        else:
            masks[i] = match_masks(seq)
    if progress is not None:
        progress("scoring", len(ids))
    return found


def exhaustive_near_duplicates(texts: Sequence[str | None], threshold: float) -> dict[int, tuple[int, float]]:
    """The same filter by brute force, scored with rouge_score itself: the reference for tests and benchmarks."""
    from rouge_score import rouge_scorer

    tokenize = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer.tokenize
    kept: list[tuple[int, list[str]]] = []
    found: dict[int, tuple[int, float]] = {}
    for i, text in enumerate(texts):
        if text is None:
            continue
        seq = tokenize(text)
        for j, other in kept:
            score = rouge_scorer._score_lcs(seq, other).fmeasure
            if score >= threshold:
                found[i] = (j, score)
                break
        else:
            kept.append((i, seq))
    return found


def _encode(texts: Sequence[str | None]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids per text, and its (token, occurrence) elements as global ranks sorted rarest first."""
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(t, len(vocab)) for t in tokens(text)] if text is not None else [] for text in texts]
    elements = []
    for seq in ids:
        seen: Counter = Counter()
        own = []
        for token in seq:
            own.append((token, seen[token]))
            seen[token] += 1
        elements.append(own)
    frequency = Counter(e for own in elements for e in own)
    rank = {e: r for r, e in enumerate(sorted(frequency, key=lambda e: (frequency[e], e)))}
    return ids, [sorted(rank[e] for e in own) for own in elements]


def _candidate_pairs(ids: list[list[int]], ranked: list[list[int]], t: float,
                     progress: Callable[[str, int], None] | None) -> list[list[int]]:
    """Per record i, the earlier records j (ascending) that may reach ROUGE-L F >= t with i: a superset of the
    true pairs.

    Every record is indexed under (element, its length's bucket) for its short prefix; every record probes, for
    each bucket of the shorter-or-equal partner lengths n that F >= t allows, that bucket's entries with its
    prefix for the bucket's shortest n (the longest prefix any n in it needs). The join and the counting run in
    numpy, a block of probing records at a time to bound memory.
    """
    size = len(ids)
    top = max(map(len, ids), default=0) + 1
    bucket = [0] + [int(math.log(n) / LENGTH_BUCKET) for n in range(1, top)]
    starts = [n for n in range(2, top) if bucket[n] != bucket[n - 1]]  # the shortest length of each bucket
    buckets = bucket[-1] + 1
    index_keys, index_rows = [], []
    for i, elements in enumerate(ranked):
        m = len(elements)
        for element in elements[: m - math.ceil(t * m - EPS) + SHARED]:
            index_keys.append(element * buckets + bucket[m])
            index_rows.append(i)
    keys = np.asarray(index_keys, np.int64)
    order = np.argsort(keys, kind="stable")
    keys, rows = keys[order], np.asarray(index_rows, np.int64)[order]
    lengths = np.asarray([len(s) for s in ids], np.int64)
    later_parts, earlier_parts = [], []
    for block in range(0, size, PROBE_BLOCK):
        if progress is not None:
            progress("candidates", block)
        probe_keys, probe_rows = [], []
        for i in range(block, min(block + PROBE_BLOCK, size)):
            elements = ranked[i]
            m = len(elements)
            shortest = max(1, math.ceil(t * m / (2 - t) - EPS))
            for n in [shortest, *starts[bisect_right(starts, shortest):bisect_right(starts, m)]]:
                overlap = math.ceil(t * (m + n) / 2 - EPS)  # o(m, n): the least overlap F >= t allows
                for element in elements[: m - overlap + SHARED]:
                    probe_keys.append(element * buckets + bucket[n])
                    probe_rows.append(i)
        codes, shared = np.unique(_join(keys, rows, np.asarray(probe_keys, np.int64),
                                        np.asarray(probe_rows, np.int64), size), return_counts=True)
        a, b = codes // size, codes % size  # a probed with the longer (or equal) text, b was indexed
        need = np.minimum(SHARED, np.ceil(t * (lengths[a] + lengths[b]) / 2 - EPS))
        # a bucket also holds longer partners (found from their side) and ones outside the band: not candidates
        in_band = (lengths[b] <= lengths[a]) & (lengths[b] >= t * lengths[a] / (2 - t) - EPS)
        keep = (shared >= need) & (a != b) & in_band
        later_parts.append(np.maximum(a[keep], b[keep]))
        earlier_parts.append(np.minimum(a[keep], b[keep]))
    if progress is not None:
        progress("candidates", size)
    if not later_parts:
        return []
    # sorted, once each: equal lengths find a pair from both sides
    codes = np.unique(np.concatenate(later_parts) * size + np.concatenate(earlier_parts))
    bounds = np.searchsorted(codes // size, np.arange(size + 1))
    earlier = (codes % size).tolist()
    return [earlier[bounds[i]:bounds[i + 1]] for i in range(size)]


def _join(keys, rows, probe_keys, probe_rows, size: int):
    """Pair codes probe_row * size + row for every probe key equal to an index key (keys sorted)."""
    starts = np.searchsorted(keys, probe_keys, side="left")
    counts = np.searchsorted(keys, probe_keys, side="right") - starts
    first = np.repeat(starts - np.cumsum(counts) + counts, counts)  # each match's group start, minus its run
    return np.repeat(probe_rows, counts) * size + rows[first + np.arange(int(counts.sum()))]
