#!/usr/bin/env bash
# The GPU comparison in one command: ours vs TRL's SFTTrainer (neftune_noise_alpha 5, its padded collator and its
# padding_free), LoRA r 16 all-linear, bf16, Alpaca-length data, on random-weight models of Llama-2-7B's and
# Llama-3-8B's shapes (no download), QLoRA (NF4) on the 7B shape, and generation on the 7B shape. Prints a table
# per run and writes the numbers to $OUT (default runs/bench-gpu). Never run on a GPU yet: its time on one H200
# is not known.
#
#   bash benchmarks/gpu.sh                  # on a GPU box (installs what it lacks first, see below)
#   NEFTUNE_BENCH_TINY=1 bash benchmarks/gpu.sh   # the same steps on a CPU with a tiny model: tries the script
#
# A bare CUDA image has torch, transformers, peft, pyarrow, typer and rich but not datasets, trl or pydantic:
# wheels carried beside this script in $WHEELS (default benchmarks/wheels; fill it with
# `pip download -d benchmarks/wheels datasets trl pydantic pyyaml jinja2 bitsandbytes`) are installed without an
# index; the project itself goes in with --no-deps, so the image's torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/bench-gpu}
WHEELS=${WHEELS:-benchmarks/wheels}
DATA=${DATA:-../shared/data/alpaca/alpaca_data_first2k.json}
[ -f "$DATA" ] || DATA=recipes/data/demo.jsonl   # Alpaca's lengths if we have it; our demo data otherwise

missing=$("$PYTHON" - <<'PY'
import importlib.util
need = {"datasets": "datasets", "trl": "trl", "pydantic": "pydantic", "yaml": "pyyaml", "jinja2": "jinja2",
        "typer": "typer", "rich": "rich", "peft": "peft", "safetensors": "safetensors", "bitsandbytes": "bitsandbytes"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing: $missing"
  if [ -d "$WHEELS" ]; then
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" $missing
  else
    "$PYTHON" -m pip install -q $missing
  fi
fi
(cd / && "$PYTHON" -c "import neftune_cli" 2>/dev/null) || "$PYTHON" -m pip install -q --no-deps -e .

mkdir -p "$OUT"
if [ -n "${NEFTUNE_BENCH_TINY:-}" ]; then
  models=(tiny-random); common=(--examples 32 --micro-batch 4 --steps 2 --warmup 1 --max-seq-len 128 --threads 1)
  flex=()  # flex_attention trains on CUDA only
else
  models=(llama2-7b-random llama3-8b-random)
  common=(--examples 2048 --micro-batch 16 --pack-tokens 8192 --steps 20 --warmup 3 --max-seq-len 512)
  flex=(--flex)  # packed rows with flex_attention next to sdpa's dense mask: which one packing should use
fi
for model in "${models[@]}"; do
  "$PYTHON" benchmarks/train.py --model "$model" --data "$DATA" "${common[@]}" "${flex[@]}" \
    --json "$OUT/$model.json" \
    | tee "$OUT/$model.txt"
done
if [ -z "${NEFTUNE_BENCH_TINY:-}" ]; then  # QLoRA (NF4, double quantization) on the 7B shape, ours vs TRL
  "$PYTHON" benchmarks/train.py --model llama2-7b-random --data "$DATA" "${common[@]}" --quantization nf4 \
    --json "$OUT/llama2-7b-random-qlora.json" | tee "$OUT/llama2-7b-random-qlora.txt"
  # generation, ours vs a per-prompt model.generate loop (random weights never stop: every answer is 128 tokens)
  if [ -f ../shared/data/alpaca_eval/alpaca_eval_instructions.json ]; then
    "$PYTHON" benchmarks/generate.py --model llama2-7b-random --prompts 32 --batch-size 16 --repeats 1 \
      --json "$OUT/generate-llama2-7b-random.json" | tee "$OUT/generate-llama2-7b-random.txt"
  fi
fi
echo "numbers: $OUT/*.json, tables: $OUT/*.txt"
