"""QLoRA end to end on a CPU with a real pretrained model: train, resume, merge, evaluate.

    python benchmarks/qlora_cpu.py                   # stories260K + 400 Alpaca records from ../shared/data
    python benchmarks/qlora_cpu.py --workdir /tmp/qlora-bench

stories260K (a 260K-parameter Llama) in NF4 + double quantization, LoRA r=16 on all linear layers, 48 steps with
gradient checkpointing and NEFTune alpha 5. Then: --resume from the step-25 checkpoint of a copy must give the same
metrics and a bitwise-equal adapter; `neftune merge` into the fp32 base (verified, with the quantization gap line);
the eval loss of the 4-bit model that was trained (`neftune eval RUN`) next to that of the merged fp32 model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NEFTUNE = [sys.executable, "-m", "neftune_cli"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([*NEFTUNE, *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1]}")
    return done


def metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/neftune-qlora-bench"))
    work = parser.parse_args().workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    records = json.loads((SHARED / "alpaca" / "alpaca_data_first2k.json").read_text())
    (work / "train.json").write_text(json.dumps(records[:400]))
    (work / "eval.json").write_text(json.dumps(records[1900:1950]))
    (work / "r.yaml").write_text(f"""\
model: {{name_or_path: {SHARED / "models" / "stories260K"}, quantization: nf4}}
data:
  sources: [{{path: train.json, format: alpaca}}]
  eval_sources: [{{path: eval.json, format: alpaca}}]
  max_seq_len: 256
  on_bad_record: skip  # the real set has a few records with an empty output
lora: {{r: 16, alpha: 32, dropout: 0.0}}
neftune: {{alpha: 5}}
train: {{epochs: 1, micro_batch_size: 8, lr: 5.0e-3, eval_every: 1000, log_every: 10, save_every: 25,
         gradient_checkpointing: true}}
output: {{dir: run}}
""")
    started = time.perf_counter()
    run("train", "r.yaml", cwd=work)
    train_s = time.perf_counter() - started
    trained = work / "run"
    full = work / "run-uninterrupted"
    shutil.copytree(trained, full)
    shutil.rmtree(trained / "checkpoints" / "step-48")
    shutil.rmtree(trained / "final")
    run("train", "r.yaml", "--resume", cwd=work)
    a, b = load_file(trained / "final" / "adapter_model.safetensors"), load_file(full / "final" /
                                                                                "adapter_model.safetensors")
    bitwise = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merge_log = run("merge", "run", "--out", "merged", "--dtype", "float32", cwd=work).stderr
    evals = [r["eval_loss"] for r in metrics(full) if "eval_loss" in r]
    merged_eval = json.loads(run("eval", "merged", "--data", "r.yaml", "--json", cwd=work).stdout)
    print(f"train: 48 steps in {train_s:.0f}s; eval loss {evals[0]:.4f} -> {evals[-1]:.4f} (4-bit base + adapter)")
    print(f"resume from step 25: metrics equal {metrics(trained) == metrics(full)}, adapter bitwise equal {bitwise}")
    for line in merge_log.splitlines():
        if line.startswith(("verify:", "quantization gap:")):
            print(f"merge {line}")
    print(f"merged fp32 model: eval loss {merged_eval['loss']['eval_loss']:.4f}")


if __name__ == "__main__":
    main()
