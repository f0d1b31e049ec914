"""Benchmark our training loop against TRL's SFTTrainer (both with NEFTune alpha 5), side by side, as ratios.

    python benchmarks/train.py                                   # stories260K + Alpaca 2K (../shared/data), CPU
    python benchmarks/train.py --model builtin:tiny-llama --data recipes/data/demo.jsonl --repeats 2
    python benchmarks/train.py --model llama2-7b-random --data recipes/data/demo.jsonl --json out.json   # GPU

Every system runs in its own fresh subprocess (so the peak memory is its own: VmHWM on CPU, which includes the
imported libraries; torch.cuda.max_memory_allocated on CUDA) on the same model, the same first --examples Alpaca
records (Alpaca prompt, only response + EOS trained, truncated to --max-seq-len), the same micro-batch, LoRA (r,
alpha 2r, dropout 0, all-linear), constant lr, fp32 on CPU / bf16 weights on CUDA, and NEFTune alpha 5:

  ours pack / pad   neftune_cli.train.run_training on a temp recipe (paper noise scale); read from metrics.jsonl
  trl  pad          SFTTrainer(padding_free=False): pad to the longest in a random batch (TRL's default)
  trl  padding_free SFTTrainer(padding_free=True): the batch flattened into one row (no packing across steps)

Measured: real (non-pad) tokens per second over --steps optimizer steps, after --warmup untimed steps, from the
end of the last warmup step to the end of the last step (data loading, logging included). Same steps and batch
size, but not the same examples per step: the orders differ (ours pad groups by length), hence tokens/s, not s/step.
A benchmark, not a test: nothing is asserted about the numbers.
"""

from __future__ import annotations

import os
import sys

# Running this file puts benchmarks/ first on sys.path, where benchmarks/tokenize.py shadows the standard library's
# `tokenize` (which torch needs): drop it before importing anything else.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RUNS = [("ours", "pack"), ("ours", "pad"), ("trl", "pad"), ("trl", "padding_free")]


def peak_memory() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), "VmHWM (peak RSS)"


def rate(marks: list[tuple[int, float, int]], warmup: int) -> dict:
    """marks: (step, time at its end, cumulative real tokens). Timed window: end of step `warmup` to the last."""
    (s0, t0, n0), (s1, t1, n1) = next(m for m in marks if m[0] == warmup), marks[-1]
    timed = [m for m in marks if m[0] >= warmup]
    step_s = [round(b[1] - a[1], 4) for a, b in zip(timed, timed[1:])]  # in the JSON: shows stalls under load
    return {"timed_steps": s1 - s0, "seconds": t1 - t0, "tokens": n1 - n0, "tokens_per_s": (n1 - n0) / (t1 - t0),
            "step_seconds": step_s}


def child_ours(c: dict) -> dict:
    import yaml

    from neftune_cli.recipe import load_recipe
    from neftune_cli.train import run_training

    run_dir = Path(c["workdir"]) / "run"
    recipe = {
        "model": {"name_or_path": c["model"], "attn_implementation": "sdpa"},
        "data": {"sources": [{"path": c["data"], "format": "alpaca", "max_samples": c["examples"]}],
                 "template": "alpaca", "max_seq_len": c["max_seq_len"], "overlength": "truncate", "cache": False},
        "lora": {"r": c["lora_r"], "alpha": 2 * c["lora_r"], "dropout": 0.0, "target_modules": "all-linear"},
        "neftune": {"alpha": c["alpha"], "scale": "paper"},
        "train": {"max_steps": c["warmup"] + c["steps"], "micro_batch_size": c["micro_batch"],
                  "grad_accum": c["grad_accum"], "lr": c["lr"], "schedule": "constant", "warmup_ratio": 0.0,
                  "batching": c["batching"], "log_every": 1, "seed": 0},
        "output": {"dir": str(run_dir)},
    }
    path = Path(c["workdir"]) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_training(load_recipe(path))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens" in r]  # metrics.jsonl also holds eval records (none here)
    marks, total = [], 0
    for r in records:  # "tokens" is the attention_mask sum (pad) or the row length (pack): real tokens
        total += r["tokens"]
        marks.append((r["step"], r["elapsed_s"], total))
    losses = [r["loss"] for r in records if r["step"] > c["warmup"]]
    return {**rate(marks, c["warmup"]), "mean_loss": sum(losses) / len(losses)}


def child_trl(c: dict) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from neftune_cli.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT

    cuda, padding_free = torch.cuda.is_available(), c["batching"] == "padding_free"
    tokenizer = AutoTokenizer.from_pretrained(c["model"])
    model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    text = Path(c["data"]).read_text()
    records = json.loads(text) if c["data"].endswith(".json") else [json.loads(x) for x in text.splitlines() if x]
    rows = [{"prompt": (ALPACA_PROMPT_INPUT if r.get("input") else ALPACA_PROMPT_NO_INPUT).format(**r),
             "completion": r["output"] + tokenizer.eos_token} for r in records[:c["examples"]]]
    if padding_free:
        # TRL refuses max_length with padding_free and no packing ("not enforced"), so hand it the examples
        # tokenized and truncated exactly as its own preparation does: prompt and prompt+completion tokenized
        # (BOS added), the completion starting where they diverge, keep_start, fully masked examples dropped.
        tokenized = []
        for r in rows:
            p, full = tokenizer(r["prompt"])["input_ids"], tokenizer(r["prompt"] + r["completion"])["input_ids"]
            n = next((i for i, (a, b) in enumerate(zip(p, full)) if a != b), min(len(p), len(full)))
            mask = ([0] * n + [1] * (len(full) - n))[:c["max_seq_len"]]
            if any(mask):
                tokenized.append({"input_ids": full[:c["max_seq_len"]], "completion_mask": mask})
        rows = tokenized
    config = SFTConfig(
        output_dir=str(Path(c["workdir"]) / "trl"), max_steps=c["warmup"] + c["steps"],
        per_device_train_batch_size=c["micro_batch"], gradient_accumulation_steps=c["grad_accum"],
        learning_rate=c["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=None if padding_free else c["max_seq_len"], packing=False, padding_free=padding_free,
        completion_only_loss=True, neftune_noise_alpha=c["alpha"],
        gradient_checkpointing=False,  # SFTConfig defaults to True; ours trains without it
        bf16=cuda,  # SFTConfig defaults to True, also on CPU; bf16 autocast on CUDA only
        logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0)
    lora = LoraConfig(r=c["lora_r"], lora_alpha=2 * c["lora_r"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    marks = []

    class Counting(SFTTrainer):
        real_tokens = 0

        def training_step(self, model, inputs, *args, **kwargs):
            # a padded batch has an attention_mask; a padding-free one is a single row without pads
            mask = inputs.get("attention_mask")
            self.real_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            return super().training_step(model, inputs, *args, **kwargs)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            marks.append((state.global_step, time.perf_counter(), trainer.real_tokens))

    trainer = Counting(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                       processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > c["warmup"]]
    return {**rate(marks, c["warmup"]), "mean_loss": sum(losses) / len(losses)}


def build_llama2_7b(folder: Path) -> Path:
    """A random-init model of Llama-2-7B's shape, saved in bf16 (real weights are not available here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # init on the GPU: minutes faster
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    source = SHARED / "tokenizers" / "llama2"
    if not source.is_dir():  # any tokenizer with ids < 32000 will do for speed; the builtin one is always there
        from neftune_cli.builtin import resolve

        source = Path(resolve("builtin:tiny-llama"))
        print(f"note: {SHARED / 'tokenizers/llama2'} not found, using the tokenizer of builtin:tiny-llama")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def run_child(system: str, batching: str, common: dict, workdir: Path, env: dict) -> dict:
    """One measurement in a fresh interpreter; its log goes to a file, shown only when it fails."""
    workdir.mkdir(parents=True)
    cfg = {**common, "system": system, "batching": batching, "workdir": str(workdir)}
    (workdir / "config.json").write_text(json.dumps(cfg))
    with open(workdir / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--child", str(workdir / "config.json")],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    result_file = workdir / "result.json"
    if proc.returncode != 0 or not result_file.is_file():
        tail = (workdir / "log.txt").read_text().strip().splitlines()[-15:]
        error = next((line for line in reversed(tail) if "Error" in line), tail[-1] if tail else "no output")
        print(f"  {system} {batching} failed (exit {proc.returncode}): {error}\n    " + "\n    ".join(tail))
        return {"error": error.strip()}
    return json.loads(result_file.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K"),
                    help="local HF folder, builtin:tiny-llama, or llama2-7b-random (built here, bf16; for GPUs)")
    ap.add_argument("--data", default=str(SHARED / "alpaca" / "alpaca_data_first2k.json"),
                    help="Alpaca records (.json list or .jsonl)")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before them")
    ap.add_argument("--batching", choices=["pack", "pad", "both"], default="both", help="for ours")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=5.0, help="NEFTune noise alpha")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--repeats", type=int, default=1, help="run every system this many times (interleaved)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        c = json.loads(Path(args.child).read_text())
        result = (child_ours if c["system"] == "ours" else child_trl)(c)
        # at the very end: the whole run's high-water mark
        result["peak_memory_bytes"], result["memory_kind"] = peak_memory()
        (Path(c["workdir"]) / "result.json").write_text(json.dumps(result))
        return

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both systems pick CUDA whenever they see it
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if args.model == "llama2-7b-random":
        print(f"building a random Llama-2-7B-shaped model in {tmp / 'llama2-7b-random'} ...")
        model = str(build_llama2_7b(tmp / "llama2-7b-random"))
    elif args.model.startswith("builtin:"):
        from neftune_cli.builtin import resolve

        model = resolve(args.model)  # TRL needs the folder; ours would resolve it the same way
    else:
        model = str(Path(args.model).resolve())
    max_len = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
    if args.max_seq_len > max_len:
        ap.error(f"--max-seq-len {args.max_seq_len} exceeds the model's {max_len}")
    common = {"model": model, "data": str(Path(args.data).resolve()), "examples": args.examples,
              "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "max_seq_len": args.max_seq_len,
              "steps": args.steps, "warmup": args.warmup, "lora_r": args.lora_r, "alpha": args.alpha, "lr": args.lr}
    runs = [(s, b) for s, b in RUNS if s == "trl" or args.batching in (b, "both")]

    load_before = os.getloadavg()
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    for i in range(args.repeats):  # interleaved, so a change in machine load spreads over all systems
        for system, batching in runs:
            print(f"[{i + 1}/{args.repeats}] {system} {batching} ...", flush=True)
            results[(system, batching)].append(
                run_child(system, batching, common, tmp / f"{system}-{batching}-{i}", env))
    load_after = os.getloadavg()

    best = {run: max((r for r in rs if "error" not in r), key=lambda r: r["tokens_per_s"], default=rs[0])
            for run, rs in results.items()}
    # like for like: ours pack vs TRL padding-free (no pads), ours pad vs TRL pad; and everything vs TRL's default
    peer = {"pack": ("trl", "padding_free"), "pad": ("trl", "pad")}

    def ratio(a: dict, b: dict, key: str) -> str:
        return f"{a[key] / b[key]:.2f}x" if key in a and key in b else "n/a"

    print(f"\n{Path(model).name}, {args.examples} examples, micro-batch {args.micro_batch} x {args.grad_accum}, "
          f"max_seq_len {args.max_seq_len}, LoRA r {args.lora_r} all-linear, NEFTune alpha {args.alpha}; "
          f"{args.steps} timed steps after {args.warmup}; best of {args.repeats}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    head = ["system", "batching", "tok/step", "tokens/s", "all runs", "peak mem", "loss",
            "tok/s vs peer", "mem vs peer", "tok/s vs TRL pad"]
    table = [head]
    for (system, batching), r in best.items():
        if "error" in r:
            table.append([system, batching, "failed: " + r["error"][:60]] + [""] * (len(head) - 3))
            continue
        other = best.get(peer.get(batching, ("", "")), {}) if system == "ours" else {}
        table.append([
            system, batching, f"{r['tokens'] / r['timed_steps']:.0f}", f"{r['tokens_per_s']:.0f}",
            "/".join(f"{x['tokens_per_s']:.0f}" for x in results[(system, batching)] if "error" not in x),
            f"{r['peak_memory_bytes'] / 2**20:.0f} MiB", f"{r['mean_loss']:.3f}",
            ratio(r, other, "tokens_per_s") if other else "",
            ratio(r, other, "peak_memory_bytes") if other else "",
            ratio(r, best[("trl", "pad")], "tokens_per_s") if system == "ours" else ""])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    kind = next((r["memory_kind"] for r in best.values() if "memory_kind" in r), "n/a")
    print(f"tokens/s: real (non-pad) tokens per second over the timed steps; peak mem: {kind} of each system's own "
          "process (on CPU: libraries included); loss: mean over the timed steps (noise scales differ: ours paper, "
          "TRL hf); ratios: ours / TRL, peer = TRL padding_free for ours pack, TRL pad for ours pad")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "model_path": model, "load_average": {"before": load_before, "after": load_after},
            "runs": [{"system": s, "batching": b, "repeat": i, **r}
                     for (s, b), rs in results.items() for i, r in enumerate(rs)]}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)  # temp recipes, runs, and the 13 GB model of llama2-7b-random


if __name__ == "__main__":
    main()
