"""`neftune generate`'s decoding vs the per-prompt `model.generate` loop users write by hand: speed as a ratio,
and whether greedy answers are identical.

    python benchmarks/generate.py --threads 1                              # stories260K, AlpacaEval prompts, CPU
    python benchmarks/generate.py --model llama2-7b-random --prompts 256   # a GPU: Llama-2-7B shape, bf16
    python benchmarks/generate.py --model tiny-random --json out.json      # any shape in benchmarks/shapes.py

Both sides get the same model object, the first --prompts AlpacaEval instructions formatted with the Alpaca
prompt (data.prompt_ids), greedy decoding with repetition penalty 1.2 (the paper's setting), the same stop tokens
and max_new_tokens. Ours: length-sorted, left-padded batches with the KV cache (neftune_cli.infer.generate). The loop:
one `model.generate` call per prompt with transformers' stock processors. Measured in one process, alternating, best of
--repeats, after an untimed warm-up of each; tokens/s counts generated answer tokens; peak memory is each side's own
(benchmarks/train.py's own_peak). --json writes benchmarks/table.py's input. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
import table  # noqa: E402
from train import own_peak  # noqa: E402

SHARED = shapes.SHARED


def per_prompt_loop(model, prompts: list[list[int]], settings, stops, tokenizer) -> list:
    """What users write by hand: one model.generate call per prompt, transformers' own processors."""
    from neftune_cli.infer.generate import finish

    device = next(model.parameters()).device
    answers = []
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=settings.max_new_tokens,
                               do_sample=False, repetition_penalty=settings.repetition_penalty,
                               eos_token_id=stops.token_ids, pad_token_id=stops.token_ids[0])
        answers.append(finish(y[0, len(ids):].tolist(), tokenizer, stops, settings.max_new_tokens))
    return answers


def ours(model, prompts: list[list[int]], settings, stops, tokenizer) -> list:
    from neftune_cli.infer.generate import generate

    done = {}
    for part in generate(model, tokenizer, prompts, settings, stops):
        done |= part
    return [done[i] for i in range(len(prompts))]


def load(model_arg: str, tokenizer_dir: Path | None):
    """(target, model, tokenizer): a local model with the Alpaca prompt, or random weights of a shape."""
    from neftune_cli.infer.target import Target, plain_data_section, resolve

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model_arg not in shapes.SHAPES:
        target = resolve(model_arg, "alpaca")
        return target, target.load(device, merge=True), target.tokenizer()
    model = shapes.build(model_arg, torch.bfloat16 if device.type == "cuda" else torch.float32, device).eval()
    return Target(model_arg, None, plain_data_section("alpaca")), model, shapes.tokenizer(tokenizer_dir)


def timed(fn, *args) -> tuple[list, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    from neftune_cli.infer.generate import Settings, read_prompts, stops_for

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K"),
                    help=f"local HF folder, builtin:tiny-llama, or random weights of a shape: "
                    f"{', '.join(shapes.SHAPES)}")
    ap.add_argument("--tokenizer", type=Path, help="for a shape: the tokenizer folder (default ../shared's Llama-2)")
    ap.add_argument("--prompts-file", type=Path, default=SHARED / "alpaca_eval" / "alpaca_eval_instructions.json")
    ap.add_argument("--prompts", type=int, default=128, help="the first N AlpacaEval instructions")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; use 1 on a "
                    "CPU shared with other jobs)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N, the two sides alternating")
    ap.add_argument("--json", type=Path, help="also write the results here (benchmarks/table.py's input)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target, model, tokenizer = load(args.model, args.tokenizer)
    prompts = [p.ids for p in read_prompts(args.prompts_file, target, tokenizer)[:args.prompts]]
    stops = stops_for(target, tokenizer)
    settings = Settings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    warm = Settings(max_new_tokens=4, batch_size=args.batch_size)
    ours(model, prompts[:args.batch_size], warm, stops, tokenizer)
    per_prompt_loop(model, prompts[:2], warm, stops, tokenizer)

    device = next(model.parameters()).device
    t_ours = t_loop = float("inf")
    for _ in range(args.repeats):  # alternating, best of N: a busy shared CPU slows whichever runs during a stall
        with own_peak(device) as mem_ours:
            mine, t = timed(ours, model, prompts, settings, stops, tokenizer)
        t_ours = min(t_ours, t)
        with own_peak(device) as mem_loop:
            theirs, t = timed(per_prompt_loop, model, prompts, settings, stops, tokenizer)
        t_loop = min(t_loop, t)
    tokens_ours, tokens_loop = sum(a.output_tokens for a in mine), sum(a.output_tokens for a in theirs)
    result = {
        "model": Path(args.model).name, "device": str(device), "dtype": str(next(model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(),
        "prompts": len(prompts), "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "ours_s": round(t_ours, 2), "loop_s": round(t_loop, 2),
        "ours_tokens_per_s": round(tokens_ours / t_ours, 1), "loop_tokens_per_s": round(tokens_loop / t_loop, 1),
        "speedup": round(t_loop / t_ours, 2),
        "identical_answers": sum(a == b for a, b in zip(mine, theirs, strict=True)),
        "hit_max_new_tokens": sum(a.finish_reason == "length" for a in mine),
    }
    print(f"{result['model']} on {result['device']} ({result['dtype']}, {result['torch_threads']} threads): "
          f"{len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}")
    print(f"  ours  {t_ours:8.2f} s  {result['ours_tokens_per_s']:>10,.1f} tokens/s")
    print(f"  loop  {t_loop:8.2f} s  {result['loop_tokens_per_s']:>10,.1f} tokens/s")
    print(f"  speedup {result['speedup']}x; greedy answers identical: {result['identical_answers']}/{len(prompts)}")
    if args.json:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        bench = {"kind": "generate", "label": f"generate {result['model']}", "device": name, "result": result,
                 "setting": f"{len(prompts)} AlpacaEval prompts, greedy, max_new_tokens {args.max_new_tokens}, "
                            f"batch {args.batch_size}, best of {args.repeats}; greedy answers identical "
                            f"{result['identical_answers']}/{len(prompts)}",
                 "runs": [{"system": "ours", "batching": "batched", "tokens_per_s": tokens_ours / t_ours, **mem_ours},
                          {"system": "loop", "batching": "per-prompt", "tokens_per_s": tokens_loop / t_loop,
                           **mem_loop}]}
        args.json.write_text(json.dumps(bench, indent=2) + "\n")
        table.print_table([bench])


if __name__ == "__main__":
    main()
