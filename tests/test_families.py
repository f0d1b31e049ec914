"""Every model family users fine-tune, as tiny random models built here (the builtin tokenizer, 2 layers, d=32).

For each family: our training forward gives the model's own logits (the start-up guard's question), the first
decoder layer receives the paper's noise (alpha/sqrt(3) per example, padded and packed, whatever the model does to
its embeddings) and noise_norm reports that, packing keeps examples apart or is refused, and a short run trains
(pad and pack), merges equal to peft's merge_and_unload and generates what a plain transformers loop generates.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from data_helpers import save_with_tokenizer

from neftune_cli.infer.generate import Settings, read_prompts, stops_for
from neftune_cli.infer.target import resolve
from neftune_cli.train.noise import example_lengths
from neftune_cli.train.step import CausalLMLoss, attention_stays_within_examples, first_layer, forward_gap

REPO_ROOT = Path(__file__).resolve().parents[1]
ALPHA = 5.0
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
# family -> (config class name, its keyword arguments beyond the vocabulary and special tokens)
FAMILIES = {
    "llama": ("LlamaConfig", SMALL),
    "mistral": ("MistralConfig", {**SMALL, "sliding_window": 16}),
    "qwen2": ("Qwen2Config", SMALL),
    "qwen3": ("Qwen3Config", {**SMALL, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**SMALL, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16}),
    "gemma3_text": ("Gemma3TextConfig", {**SMALL, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16}),
    "phi3": ("Phi3Config", {**SMALL, "resid_pdrop": 0.0, "embd_pdrop": 0.0}),
    "olmo2": ("Olmo2Config", SMALL),
    # Granite's multipliers as IBM's granite-3 configs set them
    "granite": ("GraniteConfig", {**SMALL, "embedding_multiplier": 12.0, "logits_scaling": 8.0,
                                  "residual_multiplier": 0.22, "attention_multiplier": 0.0078125}),
    "cohere": ("CohereConfig", {**SMALL, "logit_scale": 0.0625}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "max_position_embeddings": 256, "hidden_dropout": 0.0}),
    "falcon": ("FalconConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "new_decoder_architecture": True, "num_kv_heads": 2, "hidden_dropout": 0.0}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256, "embd_pdrop": 0.0}),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """A folder per family: a random model of the family's architecture beside the builtin tokenizer's files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for family, (config_name, kwargs) in FAMILIES.items():
        config = getattr(transformers, config_name)(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **kwargs)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # random init at 0.02 gives near-uniform logits; a larger scale makes greedy decisive
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.2)
        folders[family] = save_with_tokenizer(model, root / family, tiny_model_dir)
    return folders


def loss_module(folder: Path, alpha: float = ALPHA) -> CausalLMLoss:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return CausalLMLoss(model, alpha, "paper")


LAYOUTS = {
    "padded": lambda: ({"attention_mask": torch.tensor([[1] * 12 + [0] * 4, [1] * 16, [1] * 7 + [0] * 9])}, 3),
    "packed": lambda: ({"position_ids": torch.cat([torch.arange(n) for n in (12, 16, 7, 5)]).unsqueeze(0)}, 4),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_our_forward_gives_the_models_logits(family, family_dirs):
    assert forward_gap(loss_module(family_dirs[family], alpha=0)) < 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_first_layer_receives_the_papers_noise(family, layout, family_dirs):
    """Measured where it matters: the first decoder layer's input in a noisy forward minus that of a clean one."""
    lm_loss = loss_module(family_dirs[family])
    masks, n_examples = LAYOUTS[layout]()
    shape = next(iter(masks.values())).shape
    ids = (torch.arange(shape[0] * shape[1]).view(shape) * 13) % 900 + 7
    seen = []
    hook = first_layer(lm_loss.decoder).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).detach()),
        with_kwargs=True)
    lm_loss.train()
    lm_loss.model.eval()  # the noise is on (the wrapper trains), dropout off: the layer sees noise and nothing else
    reported = lm_loss(ids, ids, generator=torch.Generator().manual_seed(0), **masks).noise_norms
    lm_loss.eval()
    lm_loss(ids, ids, **masks)
    hook.remove()
    noisy_in, clean_in = seen
    seg_ids, lengths, real = example_lengths(**masks, shape=shape)
    sq = ((noisy_in.float() - clean_in.float()) ** 2).sum(-1) * real
    at_layer = torch.zeros(seg_ids.numel()).scatter_add_(0, seg_ids.flatten(), sq.flatten())[lengths > 0].sqrt()
    assert len(at_layer) == n_examples
    assert at_layer.mean() == pytest.approx(ALPHA / math.sqrt(3), rel=0.08)
    torch.testing.assert_close(reported, at_layer, rtol=1e-3, atol=1e-4)  # noise_norm is what the layer received


def test_granite_and_gemma_gains_are_compensated(family_dirs):
    """Granite multiplies the embeddings by embedding_multiplier inside the model; Gemma-2 by sqrt(d) (in the model
    on transformers 4.x, in the embedding module on 5.x, where the module's output already carries it)."""
    assert loss_module(family_dirs["granite"]).first_layer_gain == pytest.approx(12.0, rel=1e-5)
    gemma2 = loss_module(family_dirs["gemma2"]).first_layer_gain
    scaled_in_module = type(loss_module(family_dirs["gemma2"]).model.get_input_embeddings()) is not torch.nn.Embedding
    assert gemma2 == pytest.approx(1.0 if scaled_in_module else math.sqrt(32), rel=1e-5)
    assert loss_module(family_dirs["llama"]).first_layer_gain == 1.0


def assert_merged_like_peft(merged: Path, base: Path, adapter: Path, *, exact: bool) -> dict[str, torch.Tensor]:
    """Every tensor of our merged folder, as transformers loads it, equals peft's merge_and_unload: bit for bit, or
    (exact=False: fused MoE experts, merged per expert here and as one 3-D delta there) to float32 rounding.
    Returns the merged state."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    expected = reference.merge_and_unload().state_dict()
    got = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    assert set(got) == set(expected)
    for name, tensor in got.items():
        if exact:
            assert torch.equal(tensor, expected[name]), name
        else:
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    return got


def recipe_for(folder: Path, family: str, tmp_path: Path, batching: str) -> Path:
    recipe = {
        "model": {"name_or_path": str(folder)},
        "data": {"sources": [{"path": str(REPO_ROOT / "recipes" / "data" / "demo.jsonl"), "max_samples": 24}],
                 "max_seq_len": 96, "cache": False},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 3, "micro_batch_size": 4, "batching": batching, "lr": 1e-3, "log_every": 1},
        "output": {"dir": str(tmp_path / f"{family}-{batching}")},
    }
    path = tmp_path / f"{family}-{batching}.yaml"
    path.write_text(json.dumps(recipe))
    return path


def _generate_benchmark():
    spec = importlib.util.spec_from_file_location("bench_generate", REPO_ROOT / "benchmarks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", FAMILIES)
def test_train_merge_generate(family, family_dirs, tmp_path, cli):

    folder = family_dirs[family]
    packs = attention_stays_within_examples(loss_module(folder, alpha=0))
    code, _, err = cli("train", recipe_for(folder, family, tmp_path, "pack"))
    if packs:
        assert code == 0, err
    else:  # a version that ignores position_ids for this family: refused before any work, with the reason
        assert code == 2 and "lets examples see each other" in err, err
    code, _, err = cli("train", recipe_for(folder, family, tmp_path, "pad"))
    assert code == 0, err
    run = tmp_path / f"{family}-pad"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert records[-1]["noise_norm"] == pytest.approx(ALPHA / math.sqrt(3), rel=0.1)

    merged = tmp_path / f"{family}-merged"
    code, _, err = cli("merge", run, "--out", merged)
    assert code == 0, err
    assert_merged_like_peft(merged, folder, run / "final", exact=True)

    bench = _generate_benchmark()
    target = resolve(str(merged))
    tokenizer = target.tokenizer()
    model = target.load(torch.device("cpu"), merge=True)
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps([{"instruction": "Count the items: a, b, c"},
                                        {"instruction": "What comes after Monday?"}]))
    prompts = [p.ids for p in read_prompts(prompts_file, target, tokenizer)]
    settings = Settings(max_new_tokens=8, batch_size=2)
    stops = stops_for(target, tokenizer)
    assert bench.ours(model, prompts, settings, stops, tokenizer) == \
        bench.per_prompt_loop(model, prompts, settings, stops, tokenizer)


def test_a_model_that_normalises_its_embeddings_keeps_the_noise_on_them(tiny_model_dir, tmp_path, cli):
    """Bloom applies a LayerNorm to the embeddings before its first layer: no gain compensates that, so the noise
    stays where the paper's code and transformers' hook put it, and train says so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    folder = save_with_tokenizer(AutoModelForCausalLM.from_config(config), tmp_path / "bloom", tiny_model_dir)
    assert loss_module(folder).first_layer_gain is None
    code, _, err = cli("train", recipe_for(folder, "bloom", tmp_path, "pad"))
    assert code == 0, err
    assert "transforms the embeddings non-linearly before its first layer" in err


def test_a_kernel_the_model_does_not_support_is_refused_at_validate_and_train(family_dirs, tmp_path, cli):
    path = recipe_for(family_dirs["gpt2"], "gpt2", tmp_path, "pad")
    for command in ("validate", "train"):
        code, _, err = cli(command, path, "--set", "model.attn_implementation=flex_attention")
        assert code == 2 and err.strip() == ("error: model.attn_implementation: GPT2LMHeadModel does not support "
                                             "flex_attention; it takes sdpa, eager, flash_attention_2 (or auto: "
                                             "sdpa)"), err
    assert not (tmp_path / "gpt2-pad").exists()  # refused before the run dir was made


def test_flash_attention_without_flash_attn_names_the_package(family_dirs, tmp_path, cli):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    code, _, err = cli("validate", recipe_for(family_dirs["llama"], "llama", tmp_path, "pad"),
                       "--set", "model.attn_implementation=flash_attention_2")
    assert code == 2 and "needs the flash-attn package" in err and err.count("\n") == 1, err


def test_auto_records_the_kernel_the_run_used(family_dirs, tmp_path, cli):
    import yaml

    code, _, err = cli("train", recipe_for(family_dirs["llama"], "llama", tmp_path, "pad"), "--set",
                       "train.max_steps=1")
    assert code == 0, err
    recorded = yaml.safe_load((tmp_path / "llama-pad" / "recipe.yaml").read_text())
    assert recorded["model"]["attn_implementation"] == "sdpa"


MOE = {
    "mixtral": ("MixtralConfig", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {**SMALL, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32}),
    "olmoe": ("OlmoeConfig", {**SMALL, "num_experts": 4, "num_experts_per_tok": 2}),
}


@pytest.mark.parametrize("family", MOE)
def test_moe_trains_and_merges_like_peft(family, tiny_model_dir, tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config_name, kwargs = MOE[family]
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, **kwargs)
    folder = save_with_tokenizer(AutoModelForCausalLM.from_config(config), tmp_path / family, tiny_model_dir)
    lm_loss = loss_module(folder)
    assert forward_gap(lm_loss) < 1e-5 and lm_loss.first_layer_gain == 1.0

    # the loss we train on is the model's own: token mean + router_aux_loss_coef * its balancing loss
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33], [7, 11, 15, 19, 23, 27, 0, 0]])
    mask = (torch.arange(8) < torch.tensor([[8], [6]])).long()
    targets = ids.masked_fill(mask == 0, -100)
    lm_loss.train()
    lm_loss.model.eval()  # no dropout, no noise (alpha 0 below): the same function as the model's forward
    ours = CausalLMLoss(lm_loss.model, 0, "paper")(ids, torch.roll(targets, -1, 1).index_fill(1, torch.tensor([7]),
                                                                                               -100), mask)
    theirs = lm_loss.model(input_ids=ids, attention_mask=mask, labels=targets, output_router_logits=True)
    torch.testing.assert_close(ours.router_aux, theirs.aux_loss.float())
    coef = lm_loss.model.config.router_aux_loss_coef
    torch.testing.assert_close(ours.loss / ours.trained + coef * ours.router_aux, theirs.loss.float())
    batching = "pack" if attention_stays_within_examples(lm_loss) else "pad"  # OLMoE on 4.57 ignores position_ids
    path = recipe_for(folder, family, tmp_path, batching)
    code, _, err = cli("train", path)
    fused = any(p.dim() == 3 for p in lm_loss.model.parameters())  # transformers 5 fuses the experts
    if fused:
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert code == 2 and len(errors) == 1 and "set lora.dropout: 0" in errors[0], err
        code, _, err = cli("train", path, "--set", "lora.dropout=0")
    assert code == 0, err
    if fused:
        assert "lora on raw parameters (peft target_parameters): " in err and "x 4 experts" in err, err
    coef = lm_loss.model.config.router_aux_loss_coef
    assert f"router load-balancing loss weighted {coef:g} (the model's)" in err, err
    records = [json.loads(line) for line in (tmp_path / f"{family}-{batching}" / "metrics.jsonl").open()]
    aux = [r["router_aux_loss"] for r in records if "loss" in r]
    assert len(aux) == 3 and all(math.isfinite(a) and a > 0 for a in aux)

    run, merged = tmp_path / f"{family}-{batching}", tmp_path / f"{family}-merged"
    code, _, err = cli("merge", run, "--out", merged)
    assert code == 0, err
    got = assert_merged_like_peft(merged, folder, run / "final", exact=False)
    assert any(not torch.equal(tensor, lm_loss.model.state_dict()[name]) for name, tensor in got.items()
               if "expert" in name)  # the experts' LoRA was merged, not dropped


def test_a_router_loss_weight_on_a_dense_model_is_refused_before_any_work(family_dirs, tmp_path, cli):
    recipe = recipe_for(family_dirs["llama"], "llama", tmp_path, "pad")
    for command in ("validate", "train"):
        code, _, err = cli(command, recipe, "--set", "train.router_aux_loss_coef=0.01")
        assert code == 2 and err.strip().endswith(
            "error: train.router_aux_loss_coef: LlamaForCausalLM has no router load-balancing loss"), (command, err)
    assert not (tmp_path / "llama-pad").exists()  # refused before the data step and the run dir
