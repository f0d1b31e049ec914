"""Our training loop vs TRL's SFTTrainer, both with NEFTune alpha 5: throughput, MFU and peak memory, as ratios.

    python benchmarks/train.py                       # stories260K + Alpaca (../shared/data), CPU
    python benchmarks/train.py --model builtin:tiny-llama --data recipes/data/demo.jsonl --repeats 2 --threads 1
    python benchmarks/train.py --model llama2-7b-random --pack-tokens 8192 --flex --json out.json   # a GPU
    bash benchmarks/gpu.sh                           # the whole GPU comparison, one command, one table

All runs share one process and one base model, built (random weights of a real shape, benchmarks/shapes.py) or
loaded once: LoRA's adapter is removed after each run, so the next gets the same frozen base. Full fine-tuning
changes the weights, so each of its runs gets a fresh copy. Peak memory is each run's own: the peak counter is reset
before it (torch.cuda.max_memory_allocated on CUDA; VmHWM, peak RSS, on CPU, reset through /proc/self/clear_refs).

All systems get the first --examples Alpaca records (Alpaca prompt; only the response + EOS trained; keep the first
--max-seq-len tokens, drop examples left with nothing to train), LoRA (r, alpha 2r, dropout 0, all-linear) or full
fine-tuning, constant lr, bf16 autocast over fp32 trained weights on CUDA (fp32 on CPU), and the same tokens per step:

  ours pack | pad     train.finetune.run_training on a temp recipe (paper noise scale), timed from metrics.jsonl;
                      attention sdpa (packed rows: a dense block-diagonal mask); pack fills each micro-batch to
                      --pack-tokens tokens (or --micro-batch examples if 0)
  ours pack-flex      (--flex, CUDA) the same packed batches with attn_implementation flex_attention
  trl  pad            SFTTrainer, --micro-batch examples padded to the longest of a random batch (TRL's default; HF
                      noise scale): the same examples per step as ours pad
  trl  padding_free   SFTTrainer(padding_free=True): each batch flattened into one row (sdpa reads the packed
                      position_ids), round(--pack-tokens / mean example length) examples: ours pack's tokens per step

Measured: real (non-pad) tokens per second over --steps optimizer steps, from the end of the --warmup-th step to
the end of the last (data loading and logging included). The systems see different examples per step (orders
differ; ours pad groups by length), hence tokens/s rather than s/step. A benchmark: nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
import table  # noqa: E402

RUNS = ["ours:pack", "ours:pad", "trl:pad", "trl:padding_free"]


@contextmanager
def own_peak(device: torch.device):
    """Yields a dict that holds, afterwards, the peak memory of what ran inside (bytes) and how it was read."""
    peak: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        peak.update(peak_memory_bytes=torch.cuda.max_memory_allocated(device), memory_kind="cuda max_memory_allocated")
        return
    try:  # Linux: "5" resets the peak RSS to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        kind = "VmHWM (peak RSS) of the process, reset before the run"
    except OSError:
        kind = "VmHWM (peak RSS) of the process so far"
    yield peak
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    peak.update(peak_memory_bytes=vm, memory_kind=kind)


def rate(marks: list[tuple[int, float, int]], warmup: int) -> dict:
    """marks: (step, time at its end, cumulative real tokens). Timed: from the end of step `warmup` to the last."""
    timed = [m for m in marks if m[0] >= warmup]
    (s0, t0, n0), (s1, t1, n1) = timed[0], timed[-1]
    step_s = [round(b[1] - a[1], 4) for a, b in pairwise(timed)]
    median = sorted(step_s)[len(step_s) // 2]  # resists stalls: a busy shared CPU can make a step 50x slower
    return {"timed_steps": s1 - s0, "tokens": n1 - n0, "tokens_per_s": (n1 - n0) / (t1 - t0),
            "tokens_per_s_median_step": (n1 - n0) / (s1 - s0) / median, "step_seconds": step_s}


def without_adapter(model):
    """The base model again after a LoRA run: peft's layers taken out, the base weights as they were."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    base = model.unload()
    if hasattr(base, "peft_config"):
        del base.peft_config  # else the next get_peft_model warns that it modifies a peft model a second time
    return base


def run_ours(c: dict, base) -> dict:
    """Our trainer on `base`: its loader is pointed at the model in memory, the rest of the run is the real one."""
    import yaml

    from neftune_cli.models import loading
    from neftune_cli.recipe.load import load_recipe
    from neftune_cli.train import finetune
    from neftune_cli.train.metrics import read_metrics

    run_dir = Path(c["workdir"]) / "run"
    batching = "pack" if c["batching"].startswith("pack") else "pad"
    recipe = {
        "model": {"name_or_path": c["model"], "quantization": c["quantization"],
                  "attn_implementation": "flex_attention" if c["batching"] == "pack-flex" else "sdpa"},
        "data": {"sources": [{"path": c["data"], "format": "alpaca", "max_samples": c["examples"]}],
                 "template": "alpaca", "max_seq_len": c["max_seq_len"], "overlength": "truncate", "cache": False},
        "finetune": c["finetune"],
        **({"lora": {"r": c["lora_r"], "alpha": 2 * c["lora_r"], "dropout": 0.0, "target_modules": "all-linear"}}
           if c["finetune"] == "lora" else {"lora": None}),
        "neftune": {"alpha": c["alpha"], "scale": "paper"},
        "train": {"max_steps": c["warmup"] + c["steps"], "micro_batch_size": c["micro_batch"],
                  "grad_accum": c["grad_accum"], "lr": c["lr"], "schedule": "constant", "warmup_ratio": 0.0,
                  "batching": batching, "log_every": 1, "seed": 0,
                  **({"pack_tokens": c["pack_tokens"]} if batching == "pack" and c["pack_tokens"] else {})},
        "output": {"dir": str(run_dir)},
    }
    path = Path(c["workdir"]) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    built = []

    def base_model(spec, device, empty=False):  # one process: never the meta-device build FSDP asks for
        base.set_attn_implementation(spec.attn_implementation)
        return base

    def load_model(recipe, device, empty=False):
        built.append(real_load_model(recipe, device, empty=empty))
        return built[-1]

    real_load_model = loading.load_model
    try:
        with mock.patch.object(loading, "load_base_model", base_model), \
                mock.patch.object(finetune, "load_model", load_model):
            finetune.run_training(load_recipe(path))
    finally:
        if built:
            without_adapter(built[0])
        base.set_attn_implementation("sdpa")
    records = read_metrics(run_dir)
    marks, total = [], 0
    for r in records:  # "tokens": the attention_mask sum (pad) or the row length (pack), i.e. real tokens
        total += r["tokens"]
        marks.append((r["step"], r["elapsed_s"], total))
    losses = [r["loss"] for r in records if r["step"] > c["warmup"]]
    return {**rate(marks, c["warmup"]), "mean_loss": sum(losses) / len(losses)}


def run_trl(c: dict, base, tokenizer) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from neftune_cli.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT

    cuda, padding_free, max_len = torch.cuda.is_available(), c["batching"] == "padding_free", c["max_seq_len"]
    rows = [{"prompt": (ALPACA_PROMPT_INPUT if r.get("input") else ALPACA_PROMPT_NO_INPUT).format(**r),
             "completion": r["output"] + tokenizer.eos_token} for r in read_records(c["data"])[:c["examples"]]]
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
        per_device_train_batch_size=c["trl_padding_free_batch"] if padding_free else c["micro_batch"],
        gradient_accumulation_steps=c["grad_accum"],
        learning_rate=c["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=None if padding_free else max_len, packing=False, padding_free=padding_free,
        completion_only_loss=True, neftune_noise_alpha=c["alpha"],
        gradient_checkpointing=False,  # SFTConfig's default is True; ours trains without it
        bf16=cuda,  # SFTConfig's default is True even on CPU
        logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=c["lora_r"], lora_alpha=2 * c["lora_r"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM") if c["finetune"] == "lora" else None
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

    trainer = Counting(model=base, args=config, train_dataset=datasets.Dataset.from_list(rows),
                       processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    try:
        trainer.train()
    finally:
        if getattr(trainer, "neftune_hook_handle", None) is not None:
            trainer.neftune_hook_handle.remove()  # the Trainer removes its noise hook only when training ends well
        without_adapter(trainer.model)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > c["warmup"]]
    return {**rate(marks, c["warmup"]), "mean_loss": sum(losses) / len(losses)}


def read_records(data: str) -> list[dict]:
    text = Path(data).read_text()
    return json.loads(text) if data.endswith(".json") else [json.loads(x) for x in text.splitlines() if x]


def prepare_model(args, device: torch.device, folder: Path) -> str:
    """The model folder the recipes name: a shape's config and tokenizer (its weights too under --quantization, which
    bitsandbytes applies as it loads), or the given folder."""
    if args.model in shapes.SHAPES:
        folder.mkdir()
        shapes.config_of(args.model).save_pretrained(folder)
        shapes.tokenizer(args.tokenizer).save_pretrained(folder)
        if args.quantization:
            shapes.build(args.model, torch.bfloat16, device).save_pretrained(folder)
            gc.collect()
            torch.cuda.empty_cache()
        return str(folder)
    if args.model.startswith("builtin:"):
        from neftune_cli.demo.builtin import resolve

        return resolve(args.model)  # its folder, as ours resolves it; TRL needs the folder
    return str(Path(args.model).resolve())


class Bases:
    """The base model each run trains: one per process for LoRA (QLoRA: 4-bit, as our loader quantizes it), a fresh
    one per run for full fine-tuning; fp32 weights for TRL's full fine-tuning (the HF Trainer's bf16 mixed precision),
    the recipe's dtype for ours (it keeps fp32 copies of what it trains itself)."""

    def __init__(self, args, model: str, device: torch.device):
        self.args, self.model, self.device, self.shared = args, model, device, None

    def get(self, system: str):
        full = self.args.finetune == "full"
        if self.shared is not None and not full:
            return self.shared
        dtype = torch.float32 if system == "trl" and full or self.device.type == "cpu" else torch.bfloat16
        if self.args.model in shapes.SHAPES and not self.args.quantization:
            base = shapes.build(self.args.model, dtype, self.device)
        else:
            from neftune_cli.models.loading import load_base_model
            from neftune_cli.recipe.schema import ModelSection

            dtype_name = str(dtype).removeprefix("torch.")
            base = load_base_model(ModelSection(name_or_path=self.model, dtype=dtype_name, attn_implementation="sdpa",
                                                quantization=self.args.quantization), self.device)
        if not full:
            self.shared = base
        return base

    def release(self) -> None:
        self.shared = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    from neftune_cli.train.flops import peak_flops

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(shapes.SHARED / "models" / "stories260K"),
                    help=f"local HF folder, builtin:tiny-llama, or a random model of a real shape: "
                    f"{', '.join(shapes.SHAPES)}")
    ap.add_argument("--tokenizer", type=Path, help="for a shape: the tokenizer folder (default ../shared's Llama-2)")
    ap.add_argument("--data", default=str(shapes.SHARED / "alpaca" / "alpaca_data_first2k.json"),
                    help="Alpaca records, .json or .jsonl")
    ap.add_argument("--label", help="the benchmark's name in the table (default: the model's)")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8, help="examples per micro-batch (pad; pack without "
                    "--pack-tokens)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before them")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"system:batching pairs, from {', '.join(RUNS)}")
    ap.add_argument("--flex", action="store_true",
                    help="also ours packed with attn_implementation flex_attention (it trains on CUDA only)")
    ap.add_argument("--finetune", choices=["lora", "full"], default="lora")
    ap.add_argument("--quantization", choices=["nf4", "fp4"], help="QLoRA: both systems on a 4-bit base")
    ap.add_argument("--pack-tokens", type=int, default=0,
                    help="ours pack: fill each micro-batch to this many tokens (train.pack_tokens); TRL padding_free "
                    "then gets as many examples as hold that many tokens on average")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=5.0, help="NEFTune noise alpha")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--repeats", type=int, default=1, help="run every system this many times, interleaved")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (0: torch's default). On a CPU shared with other jobs use 1: OpenMP threads "
                    "spin-waiting for a descheduled sibling make steps 10-100x slower")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--json", help="write every run's numbers here (benchmarks/table.py prints several together)")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1 (the first step includes one-time setup)")
    if args.quantization and args.finetune == "full":
        ap.error("--quantization is QLoRA: LoRA only")
    runs = [tuple(r.split(":")) for r in args.runs.split(",")] + [("ours", "pack-flex")] * args.flex
    if unknown := [":".join(r) for r in runs if ":".join(r) not in RUNS + ["ours:pack-flex"]]:
        ap.error(f"--runs: unknown {', '.join(unknown)}")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first looks: both systems take a GPU they see
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_flops(device)

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        model = prepare_model(args, device, tmp / "model")
        limit = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
        if args.max_seq_len > limit:
            ap.error(f"--max-seq-len {args.max_seq_len} is over the model's {limit}")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        length = mean_length(args, tokenizer)
        flops = training_flops(model, args.lora_r if args.finetune == "lora" else None, length)
        common = {"model": model, "data": str(Path(args.data).resolve()),
                  "trl_padding_free_batch": max(1, round(args.pack_tokens / length)) if args.pack_tokens
                  else args.micro_batch,
                  **{k: getattr(args, k) for k in ("examples", "micro_batch", "grad_accum", "max_seq_len", "steps",
                                                   "warmup", "lora_r", "alpha", "lr", "pack_tokens",
                                                   "quantization", "finetune")}}
        bases = Bases(args, model, device)
        load = [os.getloadavg()[0]]
        results = []
        for i in range(args.repeats):  # interleaved, so a change in the machine's load hits every system
            for system, batching in runs:
                print(f"[{i + 1}/{args.repeats}] {system} {batching}", flush=True)
                workdir = tmp / f"{system}-{batching}-{i}"
                cfg = {**common, "system": system, "batching": batching, "workdir": str(workdir)}
                workdir.mkdir()
                result = {"system": system, "batching": batching, "repeat": i}
                try:
                    base = bases.get(system)
                    with own_peak(device) as mem:
                        result |= run_ours(cfg, base) if system == "ours" else run_trl(cfg, base, tokenizer)
                    result |= mem
                    if peak:
                        result["mfu"] = result["tokens_per_s"] * flops / peak
                except Exception as e:  # noqa: BLE001 -- one failed system must not cost the others' numbers
                    result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    print(f"  failed: {result['error']}", flush=True)
                finally:
                    base = None
                    if args.finetune == "full":
                        bases.release()
                    gc.collect()
                results.append(result)
        bases.release()
        load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # recipes, runs, and a quantized shape's weights

    budget = f"pack {args.pack_tokens} tokens, TRL padding_free {common['trl_padding_free_batch']} examples" \
        if args.pack_tokens else f"pack {args.micro_batch} examples"
    bench = {
        "kind": "train", "label": args.label or Path(args.model).name, "args": vars(args) | {"tokenizer": str(
            args.tokenizer)}, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "load_average": load, "mean_example_tokens": length,
        "flops_per_token": flops,
        "setting": f"{args.finetune}{' ' + args.quantization if args.quantization else ''}, {args.examples} examples, "
                   f"pad {args.micro_batch} examples, {budget}, x{args.grad_accum}, max_seq_len {args.max_seq_len}, "
                   f"{args.steps} timed steps after {args.warmup}, best of {args.repeats}",
        "runs": results}
    table.print_table([bench])
    if args.json:
        Path(args.json).write_text(json.dumps(bench, indent=2))


def training_flops(model: str, lora_r: int | None, length: float) -> float:
    """FLOPs per token of training `model` (neftune_cli.train.flops; LoRA r `lora_r` all-linear, or full), from a
    weightless copy: the same number for every system."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from neftune_cli.train.flops import flops_per_token

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    if lora_r is None:
        return flops_per_token(base, length)
    return flops_per_token(get_peft_model(base, LoraConfig(r=lora_r, lora_alpha=2 * lora_r,
                                                           target_modules="all-linear")), length)


def mean_length(args, tokenizer) -> float:
    """Mean tokens per example (Alpaca prompt + output + EOS, cut at --max-seq-len): MFU's attention term and TRL
    padding_free's examples per step."""
    from neftune_cli.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT

    texts = [(ALPACA_PROMPT_INPUT if r.get("input") else ALPACA_PROMPT_NO_INPUT).format(**r) + r["output"]
             for r in read_records(args.data)[:args.examples]]
    lengths = [min(len(ids) + 1, args.max_seq_len) for ids in tokenizer(texts)["input_ids"]]
    return sum(lengths) / len(lengths)


if __name__ == "__main__":
    main()
