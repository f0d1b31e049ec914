#!/usr/bin/env bash
# The GPU comparison in one call on a bare CUDA box with no package index: ours vs TRL's SFTTrainer (NEFTune alpha
# 5; TRL padded and padding_free), bf16 autocast, Alpaca lengths (the first 1,000 records, Llama-2 tokenizer),
# random weights of real shapes (benchmarks/shapes.py, built on the GPU, no download). One table at the end
# (benchmarks/table.py): real tokens/s, MFU, peak memory, ratios, for
#   LoRA r 16 all-linear on the Llama-2-7B shape: ours pad, pack (sdpa), pack (flex_attention); TRL pad, padding_free
#   LoRA on the Llama-3-8B shape: ours pack; TRL pad, padding_free
#   QLoRA (NF4, double quantization) on the 7B shape: ours pack; TRL padding_free
#   full fine-tuning on a ~1B shape (TinyLlama-1.1B's): ours pack; TRL padding_free
#   generation on the 7B shape: ours batched vs a per-prompt model.generate loop
# Like for like: ours pack fills 8,192 tokens per step and TRL padding_free gets as many examples as hold that many
# on average; ours pad and TRL pad get the same 16 examples per step. One process per benchmark, each building its
# base model once for all its runs.
#
#   make gpu-wheels                               # once, where ../shared/data is: wheels and data, both git-ignored
#   bash benchmarks/gpu.sh                        # on the GPU box (OUT: where the numbers go, default runs/bench-gpu)
#   NEFTUNE_BENCH_TINY=1 bash benchmarks/gpu.sh   # every step on a CPU with a tiny model: tries the script
#
# Time on one H200, estimated from sizes (never run on one yet): 12 steps per run (2 untimed) of ~8K tokens; a 7B
# LoRA step needs ~4 x 6.7e9 FLOPs per token x 8K tokens, ~0.6 s at 40% of 989 TFLOP/s, so ~8 s of steps per run
# plus ~10 s of set-up (tokenizing 1,000 examples, checks, saving the adapter): 7B ~2.5 min (5 runs, flex_attention
# compiling, the model built once), 8B ~1.2 min (3 runs), QLoRA ~2 min (13 GB written, then quantized as it loads;
# slower steps), 1.1B full ~0.8 min, generation ~0.6 min (16 prompts x 32 tokens, the loop ~25 ms a token, 7B
# built once more), ~1 min of interpreter starts: ~7.5 minutes. Over 8: lower --steps in `train` below.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/bench-gpu}
WHEELS=${WHEELS:-benchmarks/wheels}
DATA=${DATA:-benchmarks/data}
for f in alpaca_data_first2k.json alpaca_eval_instructions.json llama2-tokenizer/tokenizer.json; do
  [ -e "$DATA/$f" ] || { echo "gpu.sh: no $DATA/$f; run \`make gpu-wheels\` where ../shared/data is" >&2; exit 2; }
done

# What our package and TRL import that the image may lack; resolved against the image, from the wheels alone.
missing=$("$PYTHON" - <<'PY'
import importlib.util
need = {"datasets": "datasets", "trl": "trl", "pydantic": "pydantic", "bitsandbytes": "bitsandbytes",
        "yaml": "pyyaml", "jinja2": "jinja2"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  [ -d "$WHEELS" ] || { echo "gpu.sh: $missing missing and no $WHEELS; run \`make gpu-wheels\`" >&2; exit 2; }
  echo "installing from $WHEELS: $missing"
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" $missing
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false  # the project itself, no install

mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT/table.txt" "$OUT/log.txt"  # only what this script writes there
data=(--data "$DATA/alpaca_data_first2k.json" --tokenizer "$DATA/llama2-tokenizer")
if [ -n "${NEFTUNE_BENCH_TINY:-}" ]; then
  l7=tiny-random l8="" full=tiny-random
  train=(--examples 32 --micro-batch 4 --pack-tokens 512 --steps 2 --warmup 1 --max-seq-len 128 --threads 1)
  flex=()  # flex_attention trains on CUDA only
  gen=(--prompts 4 --batch-size 4 --max-new-tokens 8 --repeats 1 --threads 1)
else
  l7=llama2-7b-random l8=llama3-8b-random full=llama-1b-random
  train=(--examples 1000 --micro-batch 16 --pack-tokens 8192 --steps 10 --warmup 2 --max-seq-len 512)
  flex=(--flex)  # packed rows with flex_attention next to sdpa's dense mask: which one packing should use
  gen=(--prompts 16 --batch-size 16 --max-new-tokens 32 --repeats 1)
fi

written=()
bench() {  # name, then train.py's or generate.py's arguments; its log goes to $OUT/log.txt
  local name=$1; shift
  echo "$name ..."
  written+=("$OUT/$name.json")
  echo "=== $name: $*" >>"$OUT/log.txt"
  "$PYTHON" "$@" >>"$OUT/log.txt" 2>&1 || echo "  $name failed (exit $?): see $OUT/log.txt"
}
bench lora-7b benchmarks/train.py --model "$l7" --label "$l7 LoRA" "${data[@]}" "${train[@]}" "${flex[@]}" \
  --json "$OUT/lora-7b.json"
[ -z "$l8" ] || bench lora-8b benchmarks/train.py --model "$l8" --label "$l8 LoRA" "${data[@]}" "${train[@]}" \
  --runs ours:pack,trl:pad,trl:padding_free --json "$OUT/lora-8b.json"
bench qlora-7b benchmarks/train.py --model "$l7" --label "$l7 QLoRA nf4" --quantization nf4 "${data[@]}" \
  "${train[@]}" --runs ours:pack,trl:padding_free --json "$OUT/qlora-7b.json"
bench full-1b benchmarks/train.py --model "$full" --label "$full full" --finetune full "${data[@]}" "${train[@]}" \
  --runs ours:pack,trl:padding_free --json "$OUT/full-1b.json"
bench generate-7b benchmarks/generate.py --model "$l7" --tokenizer "$DATA/llama2-tokenizer" \
  --prompts-file "$DATA/alpaca_eval_instructions.json" "${gen[@]}" --json "$OUT/generate-7b.json"

numbers=()
for f in "${written[@]}"; do  # in the order they ran
  if [ -f "$f" ]; then numbers+=("$f"); else echo "gpu.sh: no $f (see $OUT/log.txt)" >&2; fi
done
[ ${#numbers[@]} -gt 0 ] || exit 1
"$PYTHON" benchmarks/table.py "${numbers[@]}" | tee "$OUT/table.txt"
echo "numbers: $OUT/*.json, table: $OUT/table.txt, log: $OUT/log.txt"
