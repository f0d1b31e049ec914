"""Our training loop vs TRL's SFTTrainer, both with NEFTune alpha 5: throughput and peak memory, as ratios.

    python benchmarks/train.py                       # stories260K + Alpaca (../shared/data), CPU
    python benchmarks/train.py --model builtin:tiny-llama --data recipes/data/demo.jsonl --repeats 2 --threads 1
    python benchmarks/train.py --model llama2-7b-random --data recipes/data/demo.jsonl --json out.json   # a GPU
    bash benchmarks/gpu.sh                           # the whole GPU comparison (7B and 8B shapes), one command

Each system runs in its own fresh subprocess, so its peak memory is its own (VmHWM on CPU, libraries included;
torch.cuda.max_memory_allocated on CUDA). All get the same model, the first --examples Alpaca records (Alpaca
prompt; only the response + EOS trained; keep the first --max-seq-len tokens, drop examples left with nothing to
train), micro-batch, LoRA (r, alpha 2r, dropout 0, all-linear), constant lr, fp32 on CPU / bf16 on CUDA:

  ours pack | pad     train.finetune.run_training on a temp recipe (paper noise scale), timed from metrics.jsonl;
                      attention sdpa (packed rows: a dense block-diagonal mask)
  ours pack-flex      (--flex, CUDA) the same packed batches with attn_implementation flex_attention
  trl  pad            SFTTrainer, pad to the longest of a random batch (TRL's default; HF noise scale)
  trl  padding_free   SFTTrainer(padding_free=True): each batch flattened into one row

Measured: real (non-pad) tokens per second over --steps optimizer steps, from the end of the --warmup-th step to
the end of the last (data loading and logging included). The systems see different examples per step (orders
differ; ours pad groups by length), hence tokens/s rather than s/step. A benchmark: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RUNS = [("ours", "pack"), ("ours", "pad"), ("trl", "pad"), ("trl", "padding_free")]
FLEX = ("ours", "pack-flex")
PEER = {"pack": ("trl", "padding_free"), "pack-flex": ("trl", "padding_free"), "pad": ("trl", "pad")}  # like for like


def peak_memory() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), "VmHWM (peak RSS)"


def rate(marks: list[tuple[int, float, int]], warmup: int) -> dict:
    """marks: (step, time at its end, cumulative real tokens). Timed: from the end of step `warmup` to the last."""
    timed = [m for m in marks if m[0] >= warmup]
    (s0, t0, n0), (s1, t1, n1) = timed[0], timed[-1]
    step_s = [round(b[1] - a[1], 4) for a, b in pairwise(timed)]
    median = sorted(step_s)[len(step_s) // 2]  # resists stalls: a busy shared CPU can make a step 50x slower
    return {"timed_steps": s1 - s0, "tokens": n1 - n0, "tokens_per_s": (n1 - n0) / (t1 - t0),
            "tokens_per_s_median_step": (n1 - n0) / (s1 - s0) / median, "step_seconds": step_s}


def child_ours(c: dict) -> dict:
    import yaml

    from neftune_cli.recipe.load import load_recipe
    from neftune_cli.train.finetune import run_training

    run_dir = Path(c["workdir"]) / "run"
    batching = "pack" if c["batching"].startswith("pack") else "pad"
    recipe = {
        "model": {"name_or_path": c["model"], "quantization": c["quantization"],
                  "attn_implementation": "flex_attention" if c["batching"] == "pack-flex" else "sdpa"},
        "data": {"sources": [{"path": c["data"], "format": "alpaca", "max_samples": c["examples"]}],
                 "template": "alpaca", "max_seq_len": c["max_seq_len"], "overlength": "truncate", "cache": False},
        "lora": {"r": c["lora_r"], "alpha": 2 * c["lora_r"], "dropout": 0.0, "target_modules": "all-linear"},
        "neftune": {"alpha": c["alpha"], "scale": "paper"},
        "train": {"max_steps": c["warmup"] + c["steps"], "micro_batch_size": c["micro_batch"],
                  "grad_accum": c["grad_accum"], "lr": c["lr"], "schedule": "constant", "warmup_ratio": 0.0,
                  "batching": batching, "log_every": 1, "seed": 0,
                  **({"pack_tokens": c["pack_tokens"]} if batching == "pack" and c["pack_tokens"] else {})},
        "output": {"dir": str(run_dir)},
    }
    path = Path(c["workdir"]) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_training(load_recipe(path))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    marks, total = [], 0
    for r in records:  # "tokens": the attention_mask sum (pad) or the row length (pack), i.e. real tokens
        total += r["tokens"]
        marks.append((r["step"], r["elapsed_s"], total))
    losses = [r["loss"] for r in records if r["step"] > c["warmup"]]
    result = {**rate(marks, c["warmup"]), "mean_loss": sum(losses) / len(losses)}
    return {**result, **mfu(result["tokens_per_s"], c["flops_per_token"])}


def child_trl(c: dict) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from neftune_cli.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT

    cuda, padding_free, max_len = torch.cuda.is_available(), c["batching"] == "padding_free", c["max_seq_len"]
    tokenizer = AutoTokenizer.from_pretrained(c["model"])
    dtype = torch.bfloat16 if cuda else torch.float32
    quantized = {}
    if c["quantization"]:  # the same 4-bit base as ours (neftune_cli.models.quantization); TRL prepares it its own way
        from transformers import BitsAndBytesConfig

        quantized = {"device_map": {"": 0 if cuda else "cpu"}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=c["quantization"], bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)}
    model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=dtype, attn_implementation="sdpa", **quantized)
    text = Path(c["data"]).read_text()
    records = json.loads(text) if c["data"].endswith(".json") else [json.loads(x) for x in text.splitlines() if x]
    rows = [{"prompt": (ALPACA_PROMPT_INPUT if r.get("input") else ALPACA_PROMPT_NO_INPUT).format(**r),
             "completion": r["output"] + tokenizer.eos_token} for r in records[:c["examples"]]]
    if padding_free:
        # TRL refuses max_length with padding_free unless it packs ("not enforced"), so give it the examples
        # tokenized as its own preparation does: prompt and prompt+completion tokenized (BOS added), completion
        # from where they diverge, keep the start, drop examples left with no completion token.
        tokenized = []
        for r in rows:
            p, full = tokenizer(r["prompt"])["input_ids"], tokenizer(r["prompt"] + r["completion"])["input_ids"]
            n = next((i for i, (a, b) in enumerate(zip(p, full, strict=False)) if a != b), min(len(p), len(full)))
            mask = ([0] * n + [1] * (len(full) - n))[:max_len]
            if any(mask):
                tokenized.append({"input_ids": full[:max_len], "completion_mask": mask})
        rows = tokenized
    config = SFTConfig(
        output_dir=str(Path(c["workdir"]) / "trl"), max_steps=c["warmup"] + c["steps"], seed=0,
        per_device_train_batch_size=c["micro_batch"], gradient_accumulation_steps=c["grad_accum"],
        learning_rate=c["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=None if padding_free else max_len, packing=False, padding_free=padding_free,
        completion_only_loss=True, neftune_noise_alpha=c["alpha"],
        gradient_checkpointing=False,  # SFTConfig's default is True; ours trains without it
        bf16=cuda,  # SFTConfig's default is True even on CPU
        logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
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
    result = {**rate(marks, c["warmup"]), "mean_loss": sum(losses) / len(losses)}
    return {**result, **mfu(result["tokens_per_s"], c["flops_per_token"])}


def mfu(tokens_per_s: float, flops_per_token: float) -> dict:
    """MFU on a GPU whose peak neftune_cli.train.flops knows; nothing elsewhere."""
    import torch

    from neftune_cli.train.flops import peak_flops

    peak = peak_flops(torch.device("cuda")) if torch.cuda.is_available() else None
    return {"mfu": tokens_per_s * flops_per_token / peak} if peak else {}


# Real shapes with random weights (no download): right for speed and memory. tiny-random is for trying the
# whole benchmark on a CPU.
SHAPES = {
    "llama2-7b-random": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096},
    "llama3-8b-random": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "tiny-random": {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024},
}


def build_random(shape: str, folder: Path) -> str:
    """Random weights in a real model's shape, saved in bf16, with a tokenizer whose ids fit its vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: much faster
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    source = SHARED / "tokenizers" / "llama2"
    if not source.is_dir():  # any tokenizer with ids < 32000 does for speed; the builtin one is always there
        from neftune_cli.demo.builtin import resolve

        source = Path(resolve("builtin:tiny-llama"))
        print(f"note: no {SHARED / 'tokenizers/llama2'}; using the tokenizer of builtin:tiny-llama")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def run_child(cfg: dict, workdir: Path, env: dict) -> dict:
    """One measurement in a fresh interpreter; its log goes to a file, shown only if it fails."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({**cfg, "workdir": str(workdir)}))
    with open(workdir / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--child", str(workdir / "config.json")],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    if proc.returncode == 0 and (workdir / "result.json").is_file():
        return json.loads((workdir / "result.json").read_text())
    tail = (workdir / "log.txt").read_text().strip().splitlines()[-15:] or ["no output"]
    print("  failed:\n    " + "\n    ".join(tail))
    return {"error": next((x for x in reversed(tail) if "Error" in x), tail[-1]).strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K"),
                    help=f"local HF folder, builtin:tiny-llama, or a random model of a real shape built in a temp dir: "
                    f"{', '.join(SHAPES)}")
    ap.add_argument("--data", default=str(SHARED / "alpaca" / "alpaca_data_first2k.json"), help=".json or .jsonl")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before them")
    ap.add_argument("--batching", choices=["pack", "pad", "both"], default="both", help="ours; TRL runs both")
    ap.add_argument("--flex", action="store_true",
                    help="also ours packed with attn_implementation flex_attention (it trains on CUDA only)")
    ap.add_argument("--quantization", choices=["nf4", "fp4"], help="QLoRA: both systems on a 4-bit base")
    ap.add_argument("--pack-tokens", type=int, default=0,
                    help="ours pack: fill each micro-batch to this many tokens (train.pack_tokens) instead of "
                    "--micro-batch examples")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=5.0, help="NEFTune noise alpha")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--repeats", type=int, default=1, help="run every system this many times, interleaved")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads per system (OMP_NUM_THREADS; 0: torch's default). On a CPU shared with other "
                    "jobs use 1: OpenMP threads spin-waiting for a descheduled sibling make steps 10-100x slower")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--json", help="write every run's numbers here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1 (the first step includes one-time setup)")

    if args.child:
        c = json.loads(Path(args.child).read_text())
        result = (child_ours if c["system"] == "ours" else child_trl)(c)
        result["peak_memory_bytes"], result["memory_kind"] = peak_memory()  # at the end: the whole run's peak
        result["torch_threads"] = __import__("torch").get_num_threads()
        (Path(c["workdir"]) / "result.json").write_text(json.dumps(result))
        return

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both systems take the GPU whenever they see one
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        if args.model in SHAPES:
            print(f"building a random {args.model} model in {tmp} ...", flush=True)
            model = build_random(args.model, tmp / args.model)
        elif args.model.startswith("builtin:"):
            from neftune_cli.demo.builtin import resolve

            model = resolve(args.model)  # its folder, as ours resolves it; TRL needs the folder
        else:
            model = str(Path(args.model).resolve())
        limit = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
        if args.max_seq_len > limit:
            ap.error(f"--max-seq-len {args.max_seq_len} is over the model's {limit}")
        common = {"model": model, "data": str(Path(args.data).resolve()),
                  "flops_per_token": training_flops(model, args.lora_r, mean_length(args, model)),
                  **{k: getattr(args, k) for k in ("examples", "micro_batch", "grad_accum", "max_seq_len", "steps",
                                                   "warmup", "lora_r", "alpha", "lr", "pack_tokens",
                                                   "quantization")}}
        runs = [(s, b) for s, b in RUNS if s == "trl" or args.batching in (b, "both")] + [FLEX] * args.flex
        load = [os.getloadavg()[0]]
        results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
        for i in range(args.repeats):  # interleaved, so a change in the machine's load hits every system
            for system, batching in runs:
                print(f"[{i + 1}/{args.repeats}] {system} {batching}", flush=True)
                cfg = {**common, "system": system, "batching": batching}
                results[(system, batching)].append(run_child(cfg, tmp / f"{system}-{batching}-{i}", env))
        load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # recipes, runs, and llama2-7b-random's 13 GB

    ok = {run: [r for r in rs if "error" not in r] for run, rs in results.items()}
    best = {run: max(rs, key=lambda r: r["tokens_per_s"]) if rs else results[run][0] for run, rs in ok.items()}

    def ratio(a: dict, b: dict, key: str) -> str:
        return f"{a[key] / b[key]:.2f}x" if key in a and key in b else "n/a"

    table = [["system", "batching", "tok/step", "tokens/s", "MFU", "each run", "median-step tok/s", "peak mem", "loss",
              "ours/TRL tok/s", "ours/TRL mem", "ours/TRL-pad tok/s"]]
    for (system, batching), r in best.items():
        if "error" in r:
            table.append([system, batching, "failed: " + r["error"][:80]] + [""] * 9)
            continue
        peer = best[PEER[batching]] if system == "ours" else None
        table.append([system, batching, f"{r['tokens'] / r['timed_steps']:.0f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['mfu']:.1%}" if "mfu" in r else "n/a",
                      "/".join(f"{x['tokens_per_s']:.0f}" for x in ok[(system, batching)]),
                      "/".join(f"{x['tokens_per_s_median_step']:.0f}" for x in ok[(system, batching)]),
                      f"{r['peak_memory_bytes'] / 2**20:.0f} MiB", f"{r['mean_loss']:.3f}",
                      *([ratio(r, peer, "tokens_per_s"), ratio(r, peer, "peak_memory_bytes"),
                         ratio(r, best[("trl", "pad")], "tokens_per_s")] if peer else ["", "", ""])])
    some = next((r for r in best.values() if "error" not in r), {})
    budget = f" (ours pack: {args.pack_tokens} tokens)" if args.pack_tokens else ""
    budget += f", QLoRA {args.quantization}" if args.quantization else ""
    print(f"\n{Path(model).name}, {args.examples} examples, micro-batch {args.micro_batch}{budget} x "
          f"{args.grad_accum}, "
          f"max_seq_len {args.max_seq_len}, LoRA r {args.lora_r} all-linear, NEFTune alpha {args.alpha}, "
          f"{args.steps} timed steps after {args.warmup}, best of {args.repeats}; load average {load[0]:.2f} before, "
          f"{load[1]:.2f} after ({os.cpu_count()} CPUs, {some.get('torch_threads', '?')} torch threads per system)")
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"tokens/s: real (non-pad) tokens per second over the timed steps, best run; peak mem: "
          f"{some.get('memory_kind', 'n/a')} of the system's own process; loss: mean over the timed steps (noise "
          "differs: ours scales it per example, TRL by the padded row); ours/TRL: vs TRL padding_free for pack, "
          "TRL pad for pad")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "model_path": model, "load_average": load,
            "runs": [{"system": s, "batching": b, "repeat": i, **r}
                     for (s, b), rs in results.items() for i, r in enumerate(rs)]}, indent=2))


def training_flops(model: str, lora_r: int, length: float) -> float:
    """FLOPs per token of LoRA training on `model` (neftune_cli.train.flops), from a weightless copy: the same number
    for every system."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from neftune_cli.train.flops import flops_per_token

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    lora = get_peft_model(base, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear"))
    return flops_per_token(lora, length)


def mean_length(args, model: str) -> float:
    """Mean tokens per example (Alpaca prompt + output + EOS, cut at --max-seq-len): the attention term of MFU."""
    from transformers import AutoTokenizer

    from neftune_cli.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = Path(args.data).read_text()
    records = json.loads(text) if args.data.endswith(".json") else [json.loads(x) for x in text.splitlines() if x]
    texts = [(ALPACA_PROMPT_INPUT if r.get("input") else ALPACA_PROMPT_NO_INPUT).format(**r) + r["output"]
             for r in records[:args.examples]]
    lengths = [min(len(ids) + 1, args.max_seq_len) for ids in tokenizer(texts)["input_ids"]]
    return sum(lengths) / len(lengths)


if __name__ == "__main__":
    main()
