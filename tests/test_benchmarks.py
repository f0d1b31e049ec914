"""The one-command GPU benchmark, tried end to end on a CPU with a tiny model (its numbers mean nothing here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_script_runs_every_system(tmp_path, tiny_tokenizer):
    """gpu.sh's tiny branch end to end, on a stand-in for benchmarks/data (make gpu-data): demo records, the builtin
    tokenizer."""
    data = tmp_path / "data"
    (data / "llama2-tokenizer").mkdir(parents=True)
    records = [json.loads(line) for line in (REPO / "recipes" / "data" / "demo.jsonl").read_text().splitlines()]
    (data / "alpaca_data_first2k.json").write_text(json.dumps(records[:64]))
    (data / "alpaca_eval_instructions.json").write_text(json.dumps(
        [{"instruction": r["instruction"], "dataset": "demo"} for r in records[64:72]]))
    tiny_tokenizer.save_pretrained(data / "llama2-tokenizer")
    env = {**os.environ, "NEFTUNE_BENCH_TINY": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "DATA": str(data)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    runs = json.loads((out / "lora-7b.json").read_text())["runs"]
    assert {(r["system"], r["batching"]) for r in runs} == {
        ("ours", "pack"), ("ours", "pad"), ("trl", "pad"), ("trl", "padding_free")}
    for name in ("lora-7b", "qlora-7b", "full-1b", "generate-7b"):
        runs = json.loads((out / f"{name}.json").read_text())["runs"]
        assert runs and all("error" not in r and r["tokens_per_s"] > 0 for r in runs), (name, runs)
    table = (out / "table.txt").read_text()
    assert all(f"tiny-random {kind}" in table for kind in ("LoRA", "QLoRA", "full")) and "generate" in table


def test_gpu_table_compares_like_for_like():
    """benchmarks/table.py: each system's fastest good run stands for it, and ours is divided by its peer's numbers
    (pack by TRL padding_free, pad by TRL pad); a failed system shows its error and no ratio."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import table

    def run(system, batching, tokens_per_s, mem=2**30, **extra):
        return {"system": system, "batching": batching, "tokens_per_s": tokens_per_s, "tokens": 80, "timed_steps": 10,
                "peak_memory_bytes": mem, "mean_loss": 1.0, **extra}

    bench = {"label": "7b", "setting": "s", "device": "NVIDIA H200", "runs": [
        run("ours", "pack", 300.0, mem=3 * 2**30), run("ours", "pack", 450.0, mem=3 * 2**30, mfu=0.45),
        run("ours", "pad", 200.0), run("trl", "pad", 100.0, mem=4 * 2**30),
        run("trl", "padding_free", 150.0, mem=6 * 2**30), {"system": "ours", "batching": "pack-flex", "error": "E: x"}]}
    got = {(r[1], r[2]): r for r in table.rows(bench)}
    assert got[("ours", "pack")][3:] == ["8", "450", "45.0%", "3.00 GiB", "1.000", "3.00x", "0.50x", "4.50x"]
    assert got[("ours", "pad")][8:] == ["2.00x", "0.25x", "2.00x"]
    assert got[("trl", "pad")][8:] == ["", "", ""]
    assert got[("ours", "pack-flex")][3] == "failed: E: x"
    assert "vs peer" in table.render([bench])
