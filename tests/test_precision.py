"""The precision policy (train/precision.py) on a CPU in bf16, the stand-in for a CUDA run's default dtype: float32
master weights move where bf16 weights would not, LoRA's saved activations stay bf16 under autocast, and a bf16
run's losses stay near a float32 run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neftune_cli.demo import tasks as demo_tasks
from neftune_cli.train.precision import FLOAT32, Precision
from neftune_cli.train.step import CausalLMLoss

RECIPE = {
    "model": {"name_or_path": "builtin:tiny-llama"},
    "data": {"sources": [{"path": "train.jsonl", "format": "alpaca"}], "max_seq_len": 96, "cache": False},
    "neftune": {"alpha": 5},
    "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 2e-5, "log_every": 1, "save_every": 4,
              "warmup_ratio": 0, "schedule": "constant"},
}


def train(cli, tmp_path: Path, name: str, **sections) -> Path:
    recipe = json.loads(json.dumps(RECIPE))
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    recipe["output"] = {"dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    code, _, err = cli("train", path)
    assert code == 0, err
    return tmp_path / name


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    (tmp_path / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(32, seed=3)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def changed_fraction(before: dict, after: dict) -> float:
    """Of the weight matrices that get a gradient for every entry (not the input embedding: rows of tokens the data
    never holds get none)."""
    names = [n for n, t in before.items() if t.dim() == 2 and "embed_tokens" not in n]
    changed = sum(int((after[n].float() != before[n].float()).sum()) for n in names)
    return changed / sum(before[n].numel() for n in names)


def test_full_fine_tuning_in_bf16_keeps_float32_master_weights(cli, data_dir, tiny_model_dir):
    """At lr 2e-5 an update is far below a bf16 weight's resolution (2^-8 of it): pure bf16 loses nearly all of
    them, the float32 master weights keep every one (the step-4 checkpoint holds the master weights)."""
    # the builtin model is stored in float32: the runs start from its bf16 rounding
    base = {name: t.to(torch.bfloat16) for name, t in load_file(tiny_model_dir / "model.safetensors").items()}
    mixed = train(cli, data_dir, "mixed", model={"dtype": "bfloat16"}, finetune="full")
    pure = train(cli, data_dir, "pure", model={"dtype": "bfloat16"}, finetune="full", train={"precision": "pure"})
    master = load_file(mixed / "checkpoints" / "step-4" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in master.values())
    assert changed_fraction(base, master) > 0.99
    assert changed_fraction(base, load_file(pure / "checkpoints" / "step-4" / "model.safetensors")) < 0.5
    served = load_file(mixed / "final" / "model.safetensors")  # final/ is served in the dtype the model came in
    assert all(t.dtype == torch.bfloat16 for t in served.values())
    assert json.loads((mixed / "final" / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_pure_full_fine_tuning_says_what_it_loses(cli, data_dir):
    path = data_dir / "r.yaml"
    recipe = {**RECIPE, "model": {"name_or_path": "builtin:tiny-llama", "dtype": "bfloat16"}, "finetune": "full",
              "train": {**RECIPE["train"], "max_steps": 1, "precision": "pure"}, "output": {"dir": "run"}}
    path.write_text(json.dumps(recipe))
    code, _, err = cli("train", path)
    assert code == 0 and "warning: train.precision: pure updates bfloat16 weights directly" in err, err


def saved_activations(lm_loss: CausalLMLoss, ids: torch.Tensor) -> list[tuple[torch.dtype, tuple]]:
    seen = []

    def pack(t):
        seen.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(ids, ids).loss.backward()
    return seen


def test_lora_saves_bf16_activations_under_autocast(tiny_model_dir):
    """peft keeps LoRA weights in float32; without autocast it casts each LoRA input to float32 and saves that.
    Under the policy's autocast LoRA adds no float32 activation to what the model itself saves (its norms')."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 200, (2, 48), generator=torch.Generator().manual_seed(0))
    bf16 = Precision.of(torch.bfloat16, "mixed")

    def fp32_activations(lora: bool, precision: Precision) -> int:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        d = model.config.hidden_size
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0))
        else:
            model.get_input_embeddings().weight.requires_grad_(True)  # something to train: the same graph below
        saved = saved_activations(CausalLMLoss(model, 0, "paper", precision=precision), ids)
        return sum(1 for dtype, shape in saved if dtype == torch.float32 and len(shape) >= 2 and shape[-1] >= d
                   and torch.Size(shape).numel() >= ids.numel() * d)

    base = fp32_activations(lora=False, precision=bf16)
    assert fp32_activations(lora=True, precision=bf16) <= base
    assert fp32_activations(lora=True, precision=FLOAT32) > base  # what the policy prevents


def test_a_bf16_run_tracks_a_float32_run(cli, data_dir):
    fp32 = train(cli, data_dir, "fp32", train={"lr": 1e-3})
    bf16 = train(cli, data_dir, "bf16", model={"dtype": "bfloat16"}, train={"lr": 1e-3})

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]

    a, b = losses(fp32), losses(bf16)
    assert len(a) == len(b) == 4  # bf16 rounds each op
    assert all(abs(x - y) <= 2e-2 * abs(x) for x, y in zip(a, b, strict=True)), (a, b)
