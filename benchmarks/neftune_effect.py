"""The paper's NEFTune-vs-baseline analysis at small scale: one run per noise alpha, then generate and compare.

    python benchmarks/neftune_effect.py --threads 1                  # stories260K on Alpaca, alpha 0 5 10 15
    python benchmarks/neftune_effect.py --alphas 0 5 --steps 300 --prompts 805

stories260K (a real pretrained tiny Llama) is fine-tuned with LoRA on Alpaca (the first 2K records; 200 held out
for eval loss) under the same seed, data order and steps for every alpha; each run then answers the first
--prompts AlpacaEval instructions (`neftune generate`: greedy, repetition penalty 1.2) and `neftune compare`
reports train loss, eval loss, answer length and diversity per alpha. An experiment, not a test: a 260K-parameter
model need not reproduce what the paper saw on Llama-2-7B (longer answers, eval loss unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

RECIPE = """\
model: {{name_or_path: {model}}}
data:
  sources: [{{path: {data}, format: alpaca}}]
  eval_size: 200
  template: alpaca
  max_seq_len: 256
  on_bad_record: skip
lora: {{r: 16, alpha: 32, dropout: 0.0}}
neftune: {{alpha: {alpha}, scale: paper}}
train: {{max_steps: {steps}, micro_batch_size: 16, lr: 2.0e-3, batching: pad, log_every: 10, eval_every: {steps},
         seed: 0}}
output: {{dir: {out}}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0, 5, 10, 15])
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of 16 examples per run")
    ap.add_argument("--prompts", type=int, default=200, help="the first N AlpacaEval instructions")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--workdir", type=Path, help="keep the runs and answers here (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from neftune_cli.analysis.compare import compare_rows, format_table
    from neftune_cli.infer.generate import Settings, run_generate
    from neftune_cli.infer.target import resolve
    from neftune_cli.recipe.load import load_recipe
    from neftune_cli.train.finetune import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="neftune-effect-"))
    work.mkdir(parents=True, exist_ok=True)
    runs, answers = [], []
    for alpha in args.alphas:
        run = work / f"alpha-{alpha:g}"
        recipe = work / f"alpha-{alpha:g}.yaml"
        recipe.write_text(RECIPE.format(model=SHARED / "models" / "stories260K",
                                        data=SHARED / "alpaca" / "alpaca_data_first2k.json", alpha=alpha,
                                        steps=args.steps, out=run))
        print(f"== alpha {alpha:g}: train {args.steps} steps, answer {args.prompts} AlpacaEval prompts", flush=True)
        run_training(load_recipe(recipe), overwrite=True)
        answers.append(work / f"answers-alpha-{alpha:g}.jsonl")
        run_generate(resolve(str(run)), SHARED / "alpaca_eval" / "alpaca_eval_instructions.json", answers[-1],
                     Settings(max_new_tokens=args.max_new_tokens), fmt="jsonl", generator=None, limit=args.prompts)
        runs.append(run)
    rows = compare_rows(runs, answers)
    print("\n" + "\n".join(format_table(rows)))
    print(f"(runs and answers in {work})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
