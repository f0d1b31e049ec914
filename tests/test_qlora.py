"""QLoRA on a CPU (bitsandbytes runs NF4 there): the 4-bit base stays frozen, resume is exact, the merge folds the
adapter into the full-precision base, and the recipe/extra errors are one line."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_merge import assert_bitwise_equal_to_peft, probe
from test_train import make_recipe, metrics, workdir  # noqa: F401 - workdir is a fixture

from neftune_cli.demo import tasks as demo_tasks
from neftune_cli.models.loading import load_model
from neftune_cli.recipe.load import load_recipe
from neftune_cli.recipe.memory import quantized_bytes_per_weight
from neftune_cli.train.step import CausalLMLoss, attention_stays_within_examples

QLORA = ["--set", "model.quantization=nf4", "--set", "train.max_steps=2", "--set", "train.save_every=1",
         "--set", "data.eval_sources=[]", "--set", "train.grad_accum=1", "--set", "train.micro_batch_size=2"]


def needs_bitsandbytes():
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra (bitsandbytes)")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir):
    """One 2-step NF4 run with a checkpoint per step, trained once for the module: (recipe, run dir)."""
    needs_bitsandbytes()
    from neftune_cli.cli.app import main

    folder = tmp_path_factory.mktemp("qlora")
    (folder / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(48, seed=3)))
    (folder / "eval.jsonl").write_text("")  # the recipe names it; QLORA trains without eval
    recipe = make_recipe(folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(recipe), *QLORA])
    assert exit_info.value.code == 0
    return recipe, folder / "run"


def test_a_quantized_step_changes_only_the_adapter(workdir):  # noqa: F811
    needs_bitsandbytes()
    from bitsandbytes.nn import Linear4bit

    recipe = load_recipe(make_recipe(workdir), ["model.quantization=nf4", "train.gradient_checkpointing=true"]).recipe
    torch.manual_seed(0)
    model = load_model(recipe, torch.device("cpu"))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 4 * 7  # every linear layer of the 4 decoder layers; the output head stays dense
    assert model.get_input_embeddings().weight.dtype == torch.float32  # the compute dtype: NEFTune noise unchanged
    before_absmax = {n: m.weight.quant_state.absmax.clone() for n, m in quantized.items()}
    trainer = CausalLMLoss(model, 5.0, "paper").train()
    assert attention_stays_within_examples(trainer)  # an eval-mode forward first, as training does
    before = {n: p.detach().clone() for n, p in model.named_parameters()}  # the packed 4-bit weights included
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = probe(model.config.vocab_size)
    loss, _, norms, _ = trainer(ids, ids, generator=torch.Generator().manual_seed(2))
    loss.backward()
    optimizer.step()
    assert norms is not None and (norms > 0).all()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and all("lora_" in n for n in changed), changed
    for name, module in quantized.items():  # and the block scales with them
        assert module.weight.quant_state.absmax.dtype == before_absmax[name].dtype
        assert torch.equal(module.weight.quant_state.absmax, before_absmax[name]), name


def test_resume_is_bitwise(cli, qlora_run):
    recipe, run = qlora_run
    final = load_file(run / "final" / "adapter_model.safetensors")
    losses = [r["loss"] for r in metrics(run) if "loss" in r]
    assert len(losses) == 2 and all(r["noise_norm"] > 0 for r in metrics(run) if "loss" in r)
    shutil.rmtree(run / "checkpoints" / "step-2")
    shutil.rmtree(run / "final")
    code, _, err = cli("train", str(recipe), *QLORA, "--resume")
    assert code == 0, err
    assert [r["loss"] for r in metrics(run) if "loss" in r] == losses
    resumed = load_file(run / "final" / "adapter_model.safetensors")
    assert resumed.keys() == final.keys()
    for k in final:
        assert torch.equal(resumed[k], final[k]), k


def test_merge_folds_into_the_full_precision_base(cli, qlora_run, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(qlora_run[1], run)  # the resume test rewrites the original
    code, out, err = cli("merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "float32")
    assert code == 0, err
    assert_bitwise_equal_to_peft(tmp_path / "merged", tiny_model_dir, run / "final")
    # the information line: the merged model against the 4-bit model that was trained
    gap = [line for line in (out + err).splitlines() if "quantization gap" in line]
    assert len(gap) == 1 and "nf4" in gap[0], out + err
    assert float(gap[0].split("max |logit diff| ")[1].split()[0]) > 0  # 4 bits do differ from 32


def test_generate_keeps_the_adapter_apart_from_the_4bit_base(qlora_run):
    """What generate runs is the trained function: the 4-bit base with the adapter beside it, not re-quantized."""
    from peft import PeftModel

    from neftune_cli.infer.target import resolve

    model = resolve(str(qlora_run[1])).load(torch.device("cpu"), merge=True)
    assert isinstance(model, PeftModel)


def test_missing_extra_is_one_line(cli, workdir, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    code, _, err = cli("train", str(make_recipe(workdir)), *QLORA)
    assert code == 2
    assert err.strip().count("\n") == 0 and "pip install neftune-cli[qlora]" in err, err


def test_full_fine_tuning_of_a_quantized_base_is_a_recipe_error(cli, workdir):  # noqa: F811
    code, _, err = cli("validate", str(make_recipe(workdir)), "--set", "model.quantization=nf4",
                       "--set", "finetune=full", "--set", "lora=null")
    assert code == 2
    assert err.strip().count("\n") == 0 and "set finetune: lora" in err, err


LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def test_validate_shows_the_weights_memory_next_to_plain_lora(cli, workdir):  # noqa: F811
    (workdir / "llama2-7b").mkdir()
    (workdir / "llama2-7b" / "config.json").write_text(json.dumps(LLAMA2_7B))
    code, out, err = cli("validate", str(make_recipe(workdir)), "--set", f"model.name_or_path={workdir / 'llama2-7b'}",
                         "--set", "model.quantization=nf4", "--set", "lora.r=16")
    assert code == 0, err
    # 6.48B linear weights at 4.127 bits + 262M embedding/head weights in bf16; LoRA r=16 on every linear layer:
    # 40.0M float32 weights, then a gradient and two AdamW moments each
    assert "QLoRA nf4 + double quant: 4.51 GB = base 3.87 GB + adapters 0.16 GB + gradients and AdamW state " \
           "0.48 GB (this recipe)" in out, out
    assert "LoRA: 14.12 GB = base 13.48 GB" in out
    assert quantized_bytes_per_weight(True) * 8 == pytest.approx(4.127, abs=1e-3)  # the QLoRA paper's figure
