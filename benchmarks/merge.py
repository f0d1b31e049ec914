"""Benchmark ``neftune merge`` (streamed) against peft's ``merge_and_unload`` on a random Llama-shaped model.

    python benchmarks/merge.py                      # ~2 GB bf16 model, r=16 all-linear adapter
    python benchmarks/merge.py --size-gb 4 --workdir /data/bench --json results.json

Builds the base (bf16, sharded at 500MB) and a LoRA adapter with random nonzero B directly with safetensors (no model
is instantiated), then runs each method in a fresh subprocess and reports its wall time and peak RSS (VmHWM read
inside the child, so each number is that method's own peak; file-backed mmap pages count, as they do for the OS):

  ours: neftune_cli.merge.merge(adapter, out, verify=False)          (output dtype auto = bf16)
  peft: AutoModelForCausalLM.from_pretrained(base, dtype=bf16) -> PeftModel.from_pretrained -> merge_and_unload
        -> save_pretrained(out)

Afterwards the two outputs are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def layer_shapes() -> dict[str, tuple[int, int]]:
    head_dim = HIDDEN // HEADS
    return {
        "self_attn.q_proj": (HEADS * head_dim, HIDDEN),
        "self_attn.k_proj": (KV_HEADS * head_dim, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * head_dim, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HEADS * head_dim),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }


def n_layers_for(size_gb: float) -> int:
    per_layer = sum(a * b for a, b in layer_shapes().values()) + 2 * HIDDEN
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    return max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))


def build_base(folder: Path, layers: int, shard_bytes: int) -> int:
    """Write a random bf16 Llama checkpoint shard by shard (never more than one shard in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).save_pretrained(folder)

    def tensors():
        yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
        for i in range(layers):
            yield f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)
            yield f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,)
            for name, shape in layer_shapes().items():
                yield f"model.layers.{i}.{name}.weight", shape
        yield "model.norm.weight", (HIDDEN,)
        yield "lm_head.weight", (VOCAB, HIDDEN)

    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    names: list[list[str]] = [[]]
    plan = list(tensors())
    for name, shape in plan:  # plan the shards first so that file names carry the total
        n = math.prod(shape) * 2
        if sizes[-1] and sizes[-1] + n > shard_bytes:
            names.append([])
            sizes.append(0)
        names[-1].append(name)
        sizes[-1] += n
    shapes = dict(plan)
    weight_map = {}
    for i, group in enumerate(names):
        fname = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        shard = {}
        for name in group:
            shape = shapes[name]
            if len(shape) == 1:
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                shard[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        del shard
    total = sum(sizes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    del shards
    return total


def build_adapter(folder: Path, base: Path, layers: int, rank: int) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    state = {}
    for i in range(layers):
        for name, (out_f, in_f) in layer_shapes().items():
            key = f"base_model.model.model.layers.{i}.{name}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
            state[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
    folder.mkdir(parents=True)
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), base_model_name_or_path=str(base)
    ).save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------------- children


def child(method: str, base: str, adapter: str, out: str) -> None:
    t0 = time.perf_counter()
    import torch

    if method == "ours":
        sys.path.insert(0, str(REPO))
        from neftune_cli.merge import merge

        rss_imports = vm_hwm_bytes()
        merge(Path(adapter), Path(out), base=base, verify=False, log=lambda s: print("  " + s, file=sys.stderr))
    else:
        import transformers
        from peft import PeftModel

        transformers.logging.set_verbosity_error()
        rss_imports = vm_hwm_bytes()
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter)
        model = model.merge_and_unload()
        model.save_pretrained(out)
    print(
        json.dumps(
            {
                "method": method,
                "seconds": time.perf_counter() - t0,
                "peak_rss": vm_hwm_bytes(),
                "rss_after_imports": rss_imports,
            }
        )
    )


def run_child(method: str, base: Path, adapter: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(base), str(adapter), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{method} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_with_startup"] = wall
    return result


def compare_outputs(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two HF model folders (one tensor in memory at a time)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    ia, ib = index(a), index(b)
    equal, max_diff = 0, 0.0
    for k in sorted(set(ia) & set(ib)):
        with safe_open(str(ia[k]), "pt") as fa, safe_open(str(ib[k]), "pt") as fb:
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
        if ta.dtype == tb.dtype and torch.equal(ta, tb):
            equal += 1
        else:
            max_diff = max(max_diff, (ta.float() - tb.float()).abs().max().item())
    return {
        "common": len(set(ia) & set(ib)),
        "only_one_side": len(set(ia) ^ set(ib)),
        "equal": equal,
        "max_abs_diff": max_diff,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="approximate base size in GB (bf16), default 2")
    ap.add_argument("--workdir", type=Path, help="where to build models (default: a temporary folder, removed)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shard-mb", type=int, default=500, help="shard size of the generated base (MB)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="neftune-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "adapter"
    layers = n_layers_for(args.size_gb)
    try:
        if not (base / "model.safetensors.index.json").exists():
            t = time.perf_counter()
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(adapter, ignore_errors=True)
            size = build_base(base, layers, args.shard_mb * 10**6)
            build_adapter(adapter, base, layers, args.rank)
            print(
                f"built base ({layers} layers, {size / 1e9:.2f} GB bf16) + r={args.rank} adapter "
                f"in {time.perf_counter() - t:.0f}s under {work}"
            )
        size = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        results = {}
        for method in ("ours", "peft"):
            out = work / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            results[method] = run_child(method, base, adapter, out)
        same = compare_outputs(work / "out-ours", work / "out-peft")

        gb = 1e9
        print(
            f"\nbase: {size / gb:.2f} GB bf16, {layers} layers, hidden {HIDDEN}, vocab {VOCAB}; "
            f"adapter r={args.rank} all-linear; {os.cpu_count()} CPUs"
        )
        print(f"{'method':8s} {'wall s':>8s} {'peak RSS GB':>12s} {'RSS after imports GB':>21s}")
        for m, r in results.items():
            print(f"{m:8s} {r['seconds']:8.1f} {r['peak_rss'] / gb:12.2f} {r['rss_after_imports'] / gb:21.2f}")
        o, p = results["ours"], results["peft"]
        print(f"ratio ours/peft: time {o['seconds'] / p['seconds']:.2f}, peak RSS {o['peak_rss'] / p['peak_rss']:.2f}")
        print(
            f"outputs: {same['equal']}/{same['common']} tensors bit-identical, max |diff| {same['max_abs_diff']:.3g}, "
            f"{same['only_one_side']} tensor names on one side only"
        )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "size_bytes": size,
                        "layers": layers,
                        "rank": args.rank,
                        "results": results,
                        "outputs": same,
                        "ratios": {"time": o["seconds"] / p["seconds"], "peak_rss": o["peak_rss"] / p["peak_rss"]},
                    },
                    indent=2,
                )
            )
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
