"""One table from the JSON that benchmarks/train.py and benchmarks/generate.py write (--json), with the ratios.

    python benchmarks/table.py runs/bench-gpu/*.json

Each system's best run (highest tokens/s) stands for it. Ours is compared like for like: pack and pack-flex with
TRL padding_free (the same tokens per step), pad with TRL pad (the same examples per step), batched generation with
the per-prompt loop; "vs TRL pad" sets every ours row beside TRL's default, padded batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from neftune_cli.io.console import table

PEER = {("ours", "pack"): ("trl", "padding_free"), ("ours", "pack-flex"): ("trl", "padding_free"),
        ("ours", "pad"): ("trl", "pad"), ("ours", "batched"): ("loop", "per-prompt")}
HEADER = ["bench", "system", "batching", "tok/step", "tokens/s", "MFU", "peak mem", "loss", "vs peer tok/s",
          "vs peer mem", "vs TRL pad tok/s"]


def best_runs(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (system, batching): the fastest run without an error, else its first (failed) one."""
    best: dict[tuple[str, str], dict] = {}
    for r in runs:
        key, old = (r["system"], r["batching"]), best.get((r["system"], r["batching"]))
        if old is None or "error" in old or ("error" not in r and r["tokens_per_s"] > old["tokens_per_s"]):
            best[key] = r
    return best


def ratio(a: dict, b: dict | None, key: str) -> str:
    ok = b is not None and "error" not in a and "error" not in b and key in a and key in b and b[key]
    return f"{a[key] / b[key]:.2f}x" if ok else ""


def rows(bench: dict) -> list[list[str]]:
    best, out = best_runs(bench["runs"]), []
    for (system, batching), r in best.items():
        row = [bench["label"], system, batching]
        if "error" in r:
            out.append(row + ["failed: " + r["error"][:90]] + [""] * (len(HEADER) - 4))
            continue
        peer = best.get(PEER.get((system, batching), ("", "")))
        trl_pad = best.get(("trl", "pad")) if system == "ours" else None
        per_step = f"{r['tokens'] / r['timed_steps']:.0f}" if "timed_steps" in r else ""
        out.append(row + [per_step, f"{r['tokens_per_s']:.0f}", f"{r['mfu']:.1%}" if "mfu" in r else "",
                          f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if "peak_memory_bytes" in r else "",
                          f"{r['mean_loss']:.3f}" if "mean_loss" in r else "",
                          ratio(r, peer, "tokens_per_s"), ratio(r, peer, "peak_memory_bytes"),
                          ratio(r, trl_pad, "tokens_per_s")])
    return out


def render(benches: list[dict]) -> str:
    lines = table(HEADER, [row for bench in benches for row in rows(bench)])
    lines += [f"{b['label']}: {b['setting']} ({b['device']})" for b in benches]
    kinds = sorted({r["memory_kind"] for b in benches for r in b["runs"] if "memory_kind" in r})
    lines.append("tokens/s: real (non-pad) tokens per second over the timed steps (generation: answer tokens), best "
                 f"run; MFU: of the device's dense bf16 peak; peak mem: {'; '.join(kinds) or 'n/a'}, each run's own; "
                 "loss: mean over the timed steps (noise differs: ours scales it per example, TRL by the padded row); "
                 "vs peer: ours over TRL padding_free (pack), TRL pad (pad), the per-prompt loop (generation)")
    return "\n".join(lines)


def print_table(benches: list[dict]) -> None:
    print(render(benches), flush=True)


if __name__ == "__main__":
    print_table([json.loads(Path(p).read_text()) for p in sys.argv[1:]])
