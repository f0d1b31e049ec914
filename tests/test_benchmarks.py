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
def test_gpu_benchmark_script_runs_every_system(tmp_path, tiny_model_dir):
    env = {**os.environ, "NEFTUNE_BENCH_TINY": "1", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((tmp_path / "tiny-random.json").read_text())["runs"]
    assert {(r["system"], r["batching"]) for r in runs} == {
        ("ours", "pack"), ("ours", "pad"), ("trl", "pad"), ("trl", "padding_free")}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in runs), runs
    assert "ours/TRL tok/s" in (tmp_path / "tiny-random.txt").read_text()
