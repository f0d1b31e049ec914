"""`neftune generate`'s decoding vs the per-prompt `model.generate` loop users write by hand: speed as a ratio,
and whether greedy answers are identical.

    python benchmarks/generate.py --threads 1                              # stories260K, AlpacaEval prompts, CPU
    python benchmarks/generate.py --model llama2-7b-random --prompts 256   # a GPU: Llama-2-7B shape, bf16

Both sides get the same model object, the first --prompts AlpacaEval instructions formatted with the Alpaca
prompt (data.prompt_ids), greedy decoding with repetition penalty 1.2 (the paper's setting), the same stop tokens
and max_new_tokens. Ours: length-sorted, left-padded batches with the KV cache (neftune_cli.infer.generate). The loop:
one `model.generate` call per prompt with transformers' stock processors. Measured in one process, alternating, best of
--repeats, after an untimed warm-up of each; tokens/s counts generated answer tokens. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


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


def load(model_arg: str):
    """(target, model, tokenizer): a local model with the Alpaca prompt, or random Llama-2-7B-shaped weights."""
    from neftune_cli.infer.target import Target, plain_data_section, resolve

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model_arg != "llama2-7b-random":
        target = resolve(model_arg, "alpaca")
        return target, target.load(device, merge=True), target.tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    with device:  # random init where it runs: no 13 GB written to disk
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "llama2")
    return Target("llama2-7b-random", None, plain_data_section("alpaca")), model, tokenizer


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
                    help="local HF folder, builtin:tiny-llama, or llama2-7b-random (random weights, for GPUs)")
    ap.add_argument("--prompts", type=int, default=128, help="the first N AlpacaEval instructions")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; use 1 on a "
                    "CPU shared with other jobs)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N, the two sides alternating")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target, model, tokenizer = load(args.model)
    prompts = [p.ids for p in read_prompts(SHARED / "alpaca_eval" / "alpaca_eval_instructions.json", target,
                                           tokenizer)[:args.prompts]]
    stops = stops_for(target, tokenizer)
    settings = Settings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    warm = Settings(max_new_tokens=4, batch_size=args.batch_size)
    ours(model, prompts[:args.batch_size], warm, stops, tokenizer)
    per_prompt_loop(model, prompts[:2], warm, stops, tokenizer)

    t_ours = t_loop = float("inf")
    for _ in range(args.repeats):  # alternating, best of N: a busy shared CPU slows whichever runs during a stall
        mine, t = timed(ours, model, prompts, settings, stops, tokenizer)
        t_ours = min(t_ours, t)
        theirs, t = timed(per_prompt_loop, model, prompts, settings, stops, tokenizer)
        t_loop = min(t_loop, t)
    tokens_ours, tokens_loop = sum(a.output_tokens for a in mine), sum(a.output_tokens for a in theirs)
    result = {
        "model": Path(args.model).name, "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype), "torch_threads": torch.get_num_threads(),
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
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
