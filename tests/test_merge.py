"""Tests for ``neftune_cli.merge``: tiny random Llama / GPT-2 models built locally, adapters made with peft."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import neftune_cli.merge.tensors as merge_tensors
from neftune_cli.io import safetensors_io as st
from neftune_cli.io.errors import RuntimeFailure, UsageError
from neftune_cli.merge import MergeResult, merge, parse_size
from neftune_cli.merge.common import TORCH_TO_ST

# peft / transformers warn a lot about tiny random models; keep that noise (and their log level) to this module
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    hf_logging = transformers.utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


VOCAB = 128
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def quiet(_msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------- builders


def make_tokenizer(vocab: int = VOCAB, chat_template: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_base(
    path: Path,
    *,
    vocab: int = VOCAB,
    hidden: int = 32,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shard: str | None = None,
    attention_bias: bool = False,
    tokenizer: bool = True,
) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attention_bias=attention_bias,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # random init has zero biases / unit norms: make every tensor informative
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        make_tokenizer(vocab).save_pretrained(path)
    return path


def perturb_trainable(model, seed: int = 1, scale: float = 0.1) -> None:
    """Nonzero random updates on everything trainable (LoRA B, DoRA magnitudes, modules_to_save copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def make_adapter(
    base: Path,
    path: Path,
    *,
    resize: int | None = None,
    dtype: torch.dtype = torch.float32,
    safe: bool = True,
    seed: int = 1,
    **lora,
) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    perturb_trainable(pm, seed)
    pm.save_pretrained(path, safe_serialization=safe)
    return path


def peft_model(base: Path, adapter: Path, *, dtype=torch.float32, resize: int | None = None):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    return PeftModel.from_pretrained(model, adapter).eval()


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def probe(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(7))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_bitwise_equal_to_peft(out: Path, base: Path, adapter: Path, *, dtype=torch.float32) -> None:
    ref = without_tied_duplicates(peft_model(base, adapter, dtype=dtype).merge_and_unload().state_dict())
    got = merged_state(out)
    assert set(got) == set(ref), set(got) ^ set(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), f"{k}: max diff {(got[k].float() - v.float()).abs().max()}"


def without_tied_duplicates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """state_dict() lists a tied lm_head under both names; a checkpoint stores it once."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """A base with a tokenizer and a q/k/v/o + MLP adapter whose folder carries a chat-template tokenizer."""
    root = tmp_path_factory.mktemp("llama")
    base = make_base(root / "base")
    adapter = make_adapter(
        base, root / "adapter", target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    )
    make_tokenizer(chat_template=CHAT_TEMPLATE).save_pretrained(adapter)
    return base, adapter


# ---------------------------------------------------------------------------------------------------- exactness


def test_fp32_merge_is_bitwise_peft_and_loads_without_peft(llama, tmp_path):
    base, adapter = llama
    lines: list[str] = []
    res = merge(adapter, tmp_path / "out", log=lines.append)

    assert isinstance(res, MergeResult)
    assert res.out == (tmp_path / "out").absolute() and res.shards == 1 and res.dtype == "float32"
    assert res.tensors_merged == 12 and res.tensors_replaced == 0
    assert res.max_abs_logit_diff is not None and res.max_abs_logit_diff < 1e-4
    assert any(line.startswith("shard 1/1") for line in lines) and any("verify:" in line for line in lines)
    assert_bitwise_equal_to_peft(res.out, base, adapter)

    # plain transformers, no peft: same logits as the PeftModel
    merged = AutoModelForCausalLM.from_pretrained(res.out).eval()
    ids = probe()
    ref = logits(peft_model(base, adapter), ids)
    assert (logits(merged, ids) - ref).abs().max() < 1e-5
    assert not (logits(AutoModelForCausalLM.from_pretrained(base), ids) - ref).abs().max() < 1e-3  # adapter matters

    files = {p.name for p in res.out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors", "model.safetensors.index.json"} & files
    with safe_open(res.out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # the tokenizer (with its chat template) comes from the adapter folder, which has one
    tok = transformers.AutoTokenizer.from_pretrained(res.out)
    assert tok.chat_template == CHAT_TEMPLATE
    assert not no_leftovers(tmp_path)


def test_bf16_merge_within_one_rounding_step_and_dtype_override(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", dtype=torch.bfloat16, target_modules="all-linear")
    res = merge(adapter, tmp_path / "out", log=quiet)  # auto -> the base's bfloat16
    assert res.dtype == "bfloat16" and json.loads((res.out / "config.json").read_text())["dtype"] == "bfloat16"

    ref = peft_model(base, adapter, dtype=torch.bfloat16).merge_and_unload().state_dict()
    got = merged_state(res.out)
    assert set(got) == set(ref)
    changed = 0
    for k, v in ref.items():
        assert got[k].dtype == torch.bfloat16, k
        # one bf16 rounding step: at most one unit in the last place (2^-7 relative, 8 significant bits)
        ulp = torch.where(v == 0, torch.full_like(v.float(), 2.0**-133), v.float().abs() * 2.0**-7)
        assert ((got[k].float() - v.float()).abs() <= ulp).all(), k
        changed += int(not torch.equal(got[k], load_base_tensor(base, k)))
    assert changed == 14  # 7 linear layers x 2 decoder layers really changed

    # dtype override: float32 output from the bf16 base, config updated; equal to peft's fp32 merge bit for bit
    res32 = merge(adapter, tmp_path / "out32", dtype="float32", verify=False, log=quiet)
    assert json.loads((res32.out / "config.json").read_text())["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in merged_state(res32.out).values())
    assert_bitwise_equal_to_peft(res32.out, base, adapter, dtype=torch.float32)

    # the looser bf16 verification still catches an adapter that got lost
    monkeypatch.setattr(merge_tensors, "lora_delta", lambda lm: torch.zeros(1))
    with pytest.raises(RuntimeFailure, match="verification failed.*for bfloat16 output"):
        merge(adapter, tmp_path / "lost", log=quiet)
    assert not (tmp_path / "lost").exists() and not no_leftovers(tmp_path)


def load_base_tensor(base: Path, key: str) -> torch.Tensor:
    return merged_state(base)[key]


def test_multi_shard_output_with_index(llama, tmp_path):
    base, adapter = llama
    res = merge(adapter, tmp_path / "out", max_shard_size="20KB", verify=False, log=quiet)
    shards = sorted(res.out.glob("model-*.safetensors"))
    assert res.shards == len(shards) > 3
    assert shards[0].name == f"model-00001-of-{res.shards:05d}.safetensors"
    index = json.loads((res.out / "model.safetensors.index.json").read_text())
    state = merged_state(res.out)
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for s in shards:  # each shard within the limit unless it holds a single bigger tensor
        with safe_open(s, "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    assert not (res.out / "model.safetensors").exists()
    assert_bitwise_equal_to_peft(res.out, base, adapter)
    assert AutoModelForCausalLM.from_pretrained(res.out) is not None


def test_sharded_base_is_streamed(tmp_path):
    base = make_base(tmp_path / "base", shard="30KB")
    assert (base / "model.safetensors.index.json").exists()
    adapter = make_adapter(base, tmp_path / "adapter")
    res = merge(adapter, tmp_path / "out", verify=True, log=quiet)
    assert res.shards == 1
    assert_bitwise_equal_to_peft(res.out, base, adapter)


@pytest.mark.parametrize(
    ("lora", "merged", "replaced"),
    [
        pytest.param({"use_rslora": True, "r": 8, "lora_alpha": 4}, 4, 0, id="rslora"),
        pytest.param(
            {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"layers.1.self_attn.v_proj": 32}}, 4, 0, id="patterns"
        ),
        pytest.param({"target_modules": "all-linear"}, 14, 0, id="all-linear"),
        # peft saves a frozen copy of a targeted embedding (base_layer): it equals the base tensor it replaces
        pytest.param({"target_modules": ["q_proj", "embed_tokens"]}, 3, 1, id="embedding-lora"),
        pytest.param({"modules_to_save": ["lm_head", "embed_tokens"]}, 4, 2, id="modules_to_save"),
    ],
)
def test_variants_are_bitwise_peft(lora, merged, replaced, llama, tmp_path):
    base, _ = llama
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    res = merge(adapter, tmp_path / "out", verify=False, log=quiet)
    assert_bitwise_equal_to_peft(res.out, base, adapter)
    assert (res.tensors_merged, res.tensors_replaced) == (merged, replaced)


def test_rslora_scaling_is_not_plain_scaling(llama, tmp_path, monkeypatch):
    """rsLoRA scales by alpha/sqrt(r): prove the flag matters (a plain alpha/r merge would differ from peft)."""
    base, _ = llama
    adapter = make_adapter(base, tmp_path / "adapter", use_rslora=True, r=8, lora_alpha=4)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_rslora"] = False
    cfg_path.write_text(json.dumps(cfg))
    res = merge(adapter, tmp_path / "out", verify=False, log=quiet)
    cfg["use_rslora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AssertionError):
        assert_bitwise_equal_to_peft(res.out, base, adapter)


def test_dora_equals_peft(llama, tmp_path):
    base, _ = llama
    adapter = make_adapter(base, tmp_path / "adapter", use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    res = merge(adapter, tmp_path / "out", log=quiet)  # verified against the PeftModel too
    assert_bitwise_equal_to_peft(res.out, base, adapter)
    got = merged_state(res.out)
    # the magnitude really is applied: a plain LoRA merge of the same A/B differs
    q = "model.layers.0.self_attn.q_proj.weight"
    plain = peft_model(base, adapter)
    plain.base_model.model.model.layers[0].self_attn.q_proj.lora_variant.clear()
    assert not torch.allclose(got[q], plain.merge_and_unload().state_dict()[q], atol=1e-4)


def test_dora_on_embedding_equals_peft(llama, tmp_path):
    base, _ = llama
    adapter = make_adapter(base, tmp_path / "adapter", use_dora=True, target_modules=["embed_tokens", "q_proj"])
    res = merge(adapter, tmp_path / "out", verify=False, log=quiet)
    assert_bitwise_equal_to_peft(res.out, base, adapter)
    assert res.tensors_merged == 3


def test_lora_bias_merges_into_base_bias(tmp_path):
    base = make_base(tmp_path / "base", attention_bias=True)
    adapter = make_adapter(base, tmp_path / "adapter", lora_bias=True)
    res = merge(adapter, tmp_path / "out", log=quiet)
    assert_bitwise_equal_to_peft(res.out, base, adapter)
    b = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(merged_state(res.out)[b], load_base_tensor(base, b))


def test_resized_vocab_with_modules_to_save(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", resize=136, modules_to_save=["embed_tokens", "lm_head"])
    res = merge(adapter, tmp_path / "out", log=quiet)  # verify resizes the base before loading the adapter
    cfg = json.loads((res.out / "config.json").read_text())
    assert cfg["vocab_size"] == 136
    merged = AutoModelForCausalLM.from_pretrained(res.out).eval()
    assert merged.get_input_embeddings().weight.shape == (136, 32)
    ids = probe(136)
    ref = logits(peft_model(base, adapter, resize=136), ids)
    assert (logits(merged, ids) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resized_vocab_saved_as_plain_embeddings(tied, tmp_path):
    """Without modules_to_save, peft saves resized embeddings under their plain names (both, even when tied)."""
    base = make_base(tmp_path / "base", tied=tied)
    adapter = make_adapter(base, tmp_path / "adapter", resize=136)
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    res = merge(adapter, tmp_path / "out", log=quiet)
    cfg = json.loads((res.out / "config.json").read_text())
    assert cfg["vocab_size"] == 136 and cfg["tie_word_embeddings"] is tied
    state = merged_state(res.out)
    assert state["model.embed_tokens.weight"].shape == (136, 32)
    assert ("lm_head.weight" in state) is not tied
    ids = probe(136)
    ref = logits(peft_model(base, adapter, resize=136), ids)
    assert (logits(AutoModelForCausalLM.from_pretrained(res.out).eval(), ids) - ref).abs().max() < 1e-5


def test_resized_vocab_with_embedding_lora_and_saved_embeddings(tmp_path):
    """peft saves the resized embeddings (base_layer copy and lm_head) when the base path has a config."""
    base = make_base(tmp_path / "base")
    adapter = make_adapter(
        base, tmp_path / "adapter", resize=136, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]
    )
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    res = merge(adapter, tmp_path / "out", log=quiet)
    assert json.loads((res.out / "config.json").read_text())["vocab_size"] == 136
    assert merged_state(res.out)["model.embed_tokens.weight"].shape == (136, 32)


def test_gpt2_fan_in_fan_out_conv1d(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    # c_proj is square (32x32) in attention: only the layer type tells whether to transpose; lm_head is an
    # nn.Linear, so peft flips the saved fan_in_fan_out flag back to False after the Conv1D layers
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc", "lm_head"])
    res = merge(adapter, tmp_path / "out", log=quiet)
    assert_bitwise_equal_to_peft(res.out, base, adapter)


# ---------------------------------------------------------------------------------------------------- tied embeddings


def test_tied_model_untouched_embeddings_stay_tied(tmp_path):
    base = make_base(tmp_path / "base", tied=True)
    adapter = make_adapter(base, tmp_path / "adapter")
    res = merge(adapter, tmp_path / "out", log=quiet)
    assert "lm_head.weight" not in merged_state(res.out)
    assert json.loads((res.out / "config.json").read_text())["tie_word_embeddings"] is True
    assert_bitwise_equal_to_peft(res.out, base, adapter)


@pytest.mark.parametrize(
    "lora",
    [
        pytest.param({"target_modules": ["q_proj", "embed_tokens"]}, id="embedding-lora"),
        pytest.param({"target_modules": ["q_proj", "lm_head"]}, id="lm_head-lora"),
        pytest.param({"modules_to_save": ["lm_head"]}, id="lm_head-modules_to_save"),
    ],
)
def test_tied_model_one_sided_change_is_untied_like_peftmodel(lora, tmp_path):
    """The PeftModel changes one side of the tie only; so does the merge (peft's own merge would change both)."""
    base = make_base(tmp_path / "base", tied=True)
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    res = merge(adapter, tmp_path / "out", log=quiet)
    state = merged_state(res.out)
    assert json.loads((res.out / "config.json").read_text())["tie_word_embeddings"] is False
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    ids = probe()
    ref = logits(peft_model(base, adapter), ids)
    merged = AutoModelForCausalLM.from_pretrained(res.out).eval()
    assert (logits(merged, ids) - ref).abs().max() < 1e-5


def test_tied_model_weight_tied_adapters_stay_tied(tmp_path):
    base = make_base(tmp_path / "base", tied=True)
    adapter = make_adapter(
        base, tmp_path / "adapter", modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True
    )
    res = merge(adapter, tmp_path / "out", log=quiet)
    assert "lm_head.weight" not in merged_state(res.out)
    assert json.loads((res.out / "config.json").read_text())["tie_word_embeddings"] is True
    assert res.tensors_replaced == 1


# ---------------------------------------------------------------------------------------------------- adapter formats


def test_bin_adapter_and_adapter_name_in_keys(llama, tmp_path):
    base, adapter = llama
    ref_out = merge(adapter, tmp_path / "ref", verify=False, log=quiet).out
    # other tools: .bin weights, keys that keep the ".default" adapter name, a neftune run dir with final/
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    state = load_file(adapter / "adapter_model.safetensors")
    state = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in state.items()
    }
    torch.save(state, run / "final" / "adapter_model.bin")
    (run / "final" / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    res = merge(run, tmp_path / "out", base=str(base), verify=False, log=quiet)
    a, b = merged_state(ref_out), merged_state(res.out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # no tokenizer in the run dir: the base's is used
    assert (res.out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()


def test_base_from_hub_id(llama, tmp_path, monkeypatch):
    import huggingface_hub

    base, adapter = llama
    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        return str(base)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    res = merge(adapter, tmp_path / "out", base="some-org/some-model", verify=False, log=quiet)
    assert res.tensors_merged == 12
    assert calls[0][0] == "some-org/some-model" and calls[0][2] is True  # cache first
    assert ("model.safetensors",) in [c[1] for c in calls]

    def failing(*a, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(UsageError, match=r"could not be found locally nor downloaded.*--base PATH"):
        merge(adapter, tmp_path / "out2", base="some-org/missing", verify=False, log=quiet)


# ---------------------------------------------------------------------------------------------------- refusals


def test_mismatched_hidden_size_names_the_tensor(llama, tmp_path):
    _, adapter = llama
    other = make_base(tmp_path / "other", hidden=48)
    with pytest.raises(UsageError) as e:
        merge(adapter, tmp_path / "out", base=str(other), log=quiet)
    msg = str(e.value)
    assert re.fullmatch(
        r"model\.layers\.0\.\S+\.weight: adapter expects \(\d+, \d+\) but base has \(\d+, \d+\) - is --base the "
        r"model this adapter was trained on\?",
        msg,
    ), msg
    assert "48" in msg or "96" in msg
    assert not (tmp_path / "out").exists()


def test_mismatched_vocab_names_the_tensor(tmp_path):
    base = make_base(tmp_path / "base", vocab=100)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "embed_tokens"])
    other = make_base(tmp_path / "other", vocab=VOCAB, seed=5)
    with pytest.raises(
        UsageError,
        match=r"model\.embed_tokens\.weight: adapter expects \(100, 32\) but base has \(128, 32\) - is --base",
    ):
        merge(adapter, tmp_path / "out", base=str(other), log=quiet)
    # modules_to_save of one embedding only: cannot be a resize of this base
    adapter2 = make_adapter(base, tmp_path / "adapter2", modules_to_save=["embed_tokens"])
    with pytest.raises(UsageError, match=r"resizes the vocabulary inconsistently.*lm_head\.weight has 128 rows"):
        merge(adapter2, tmp_path / "out", base=str(other), log=quiet)


def test_missing_adapter_files(llama, tmp_path):
    base, adapter = llama
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="missing adapter_config.json"):
        merge(empty, tmp_path / "out", log=quiet)
    (empty / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(UsageError, match="missing adapter_model.safetensors"):
        merge(empty, tmp_path / "out", log=quiet)
    with pytest.raises(UsageError, match="does not exist"):
        merge(tmp_path / "nope", tmp_path / "out", log=quiet)
    with pytest.raises(UsageError, match="does not exist"):
        merge(adapter, tmp_path / "out", base=str(tmp_path / "no" / "such" / "base"), log=quiet)


def test_unmatched_adapter_tensors_are_errors(llama, tmp_path):
    base, adapter = llama
    state = load_file(adapter / "adapter_model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())

    extra = dict(state)
    extra["base_model.model.model.layers.0.self_attn.nonexistent.lora_A.weight"] = torch.zeros(4, 32)
    extra["base_model.model.model.layers.0.self_attn.nonexistent.lora_B.weight"] = torch.zeros(32, 4)
    save_file(extra, bad / "adapter_model.safetensors")
    with pytest.raises(UsageError, match=r"nonexistent\.weight, which is not in the base model"):
        merge(bad, tmp_path / "out", log=quiet)

    orphan = {k: v for k, v in state.items() if k != "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"}
    save_file(orphan, bad / "adapter_model.safetensors")
    with pytest.raises(UsageError, match=r"layers\.1\.self_attn\.q_proj\.lora_A\.weight has no matching lora_B"):
        merge(bad, tmp_path / "out", log=quiet)


def test_broken_adapter_with_nan_is_refused(llama, tmp_path):
    _, adapter = llama
    state = load_file(adapter / "adapter_model.safetensors")
    state["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][0, 0] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    save_file(state, bad / "adapter_model.safetensors")
    with pytest.raises(RuntimeFailure, match=r"model\.layers\.1\.mlp\.down_proj\.weight: .*NaN/inf"):
        merge(bad, tmp_path / "out", verify=False, log=quiet)
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_refuses_non_lora_and_unmergeable_variants(llama, tmp_path):
    base, adapter = llama
    for field, value, pattern in [
        ("peft_type", "IA3", "only LORA adapters"),
        ("alora_invocation_tokens", [5, 6], "aLoRA"),
    ]:
        d = tmp_path / field
        d.mkdir()
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg[field] = value
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        (d / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        with pytest.raises(UsageError, match=pattern):
            merge(d, tmp_path / "out", log=quiet)


def test_quantized_base_refused(llama, tmp_path):
    base, adapter = llama
    qbase = tmp_path / "qbase"
    qbase.mkdir()
    for f in base.iterdir():
        (qbase / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((qbase / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qbase / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"quantized \(bitsandbytes\); merge into the original 16-bit base"):
        merge(adapter, tmp_path / "out", base=str(qbase), log=quiet)


def test_bin_only_base_refused(llama, tmp_path):
    base, adapter = llama
    bbase = tmp_path / "bbase"
    bbase.mkdir()
    (bbase / "config.json").write_text((base / "config.json").read_text())
    torch.save(load_file(base / "model.safetensors"), bbase / "pytorch_model.bin")
    with pytest.raises(UsageError, match=r"only \.bin weights"):
        merge(adapter, tmp_path / "out", base=str(bbase), log=quiet)


def test_bad_options(llama, tmp_path):
    _, adapter = llama
    with pytest.raises(UsageError, match="invalid dtype"):
        merge(adapter, tmp_path / "out", dtype="int8", log=quiet)
    with pytest.raises(UsageError, match="invalid max shard size"):
        merge(adapter, tmp_path / "out", max_shard_size="lots", log=quiet)
    with pytest.raises(UsageError, match="input of this command"):
        merge(adapter, adapter, overwrite=True, log=quiet)
    assert (adapter / "adapter_model.safetensors").exists()


def test_bad_verification_device(llama, tmp_path):
    _, adapter = llama
    with pytest.raises(UsageError, match="invalid device"):
        merge(adapter, tmp_path / "out", device="warp-drive", log=quiet)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            merge(adapter, tmp_path / "out", device="cuda", log=quiet)
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5gb") == 1_500_000_000
    assert parse_size("20KB") == 20_000
    assert parse_size("100") == parse_size(100) == 100
    for bad in ("", "GB", "-1GB", "0", "5XB"):
        with pytest.raises(UsageError):
            parse_size(bad)


# ---------------------------------------------------------------------------------------------------- atomicity


def test_existing_out_refused_then_replaced_with_overwrite(llama, tmp_path):
    _, adapter = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UsageError, match="already exists.*--overwrite"):
        merge(adapter, out, log=quiet)
    # a folder we did not write is never ours to replace, --overwrite or not
    with pytest.raises(UsageError, match="holds 'keep.txt', which neftune did not write"):
        merge(adapter, out, overwrite=True, log=quiet)
    assert (out / "keep.txt").read_text() == "old" and len(list(out.iterdir())) == 1

    (out / "keep.txt").unlink()  # an empty folder holds nothing to lose
    res = merge(adapter, out, overwrite=True, verify=False, log=quiet)
    assert res.out == out.absolute() and (out / "model.safetensors").exists()
    first = (out / "model.safetensors").stat().st_ino
    merge(adapter, out, overwrite=True, verify=False, log=quiet)  # our own merged model: replaced
    assert (out / "model.safetensors").stat().st_ino != first
    assert not no_leftovers(tmp_path)


def test_failure_mid_merge_leaves_nothing(llama, tmp_path, monkeypatch):
    _, adapter = llama
    real = st.write_shard
    calls = []

    def flaky(path, items, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, items, metadata)

    monkeypatch.setattr(st, "write_shard", flaky)
    with pytest.raises(RuntimeFailure, match=r"writing .*model-00002-of-.* failed: No space left on device"):
        merge(adapter, tmp_path / "out", max_shard_size="20KB", log=quiet)
    assert len(calls) == 2
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)

    # with --overwrite the old output survives a failed merge untouched
    monkeypatch.setattr(st, "write_shard", real)
    merge(adapter, tmp_path / "out", verify=False, log=quiet)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(st, "write_shard", flaky)
    calls.clear()
    with pytest.raises(RuntimeFailure):
        merge(adapter, tmp_path / "out", max_shard_size="20KB", overwrite=True, log=quiet)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before and not no_leftovers(tmp_path)


def test_verification_failure_leaves_nothing(llama, tmp_path, monkeypatch):
    _, adapter = llama
    real = merge_tensors.lora_delta
    monkeypatch.setattr(merge_tensors, "lora_delta", lambda lm: real(lm) * 1.01)  # a 1% scaling bug
    with pytest.raises(RuntimeFailure, match=r"verification failed: max \|logit diff\|.*tolerance"):
        merge(adapter, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)
    # the same bug goes unnoticed without verification (that is what --no-verify trades away)
    merge(adapter, tmp_path / "out", verify=False, log=quiet)


# ---------------------------------------------------------------------------------------------------- writer


def test_shard_writer_is_byte_identical_to_save_file(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5).to(torch.bfloat16),
        "a.weight": torch.randn(2, 2),
        "steps": torch.tensor([1, 2, 3]),
        "scalar": torch.tensor(0.5, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    items = [
        (
            k,
            TORCH_TO_ST.get(v.dtype) or {torch.int64: "I64", torch.bool: "BOOL"}[v.dtype],
            tuple(v.shape),
            lambda f, v=v: f.write(st.tensor_bytes(v)),
        )
        for k, v in tensors.items()
    ]
    st.write_shard(tmp_path / "ours.safetensors", items, {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_a_trained_run_merges_through_the_cli(cli, tmp_path, tiny_model_dir):
    """`neftune train` then `neftune merge RUN`: the merged model gives the adapter model's logits."""
    from neftune_cli.demo import tasks as demo_tasks

    (tmp_path / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(32, seed=7)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
model: {{name_or_path: builtin:tiny-llama}}
data: {{sources: [{{path: train.jsonl}}], max_seq_len: 128}}
lora: {{r: 8, alpha: 16, modules_to_save: [lm_head]}}
train: {{max_steps: 3, micro_batch_size: 8, lr: 1.0e-2}}
output: {{dir: {tmp_path / 'run'}}}
""")
    code, _, err = cli("train", str(recipe))
    assert code == 0, err
    code, out, err = cli("merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    assert "max |logit diff|" in err and "merged model written to" in out

    ids = torch.randint(6, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "final")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # fresh: PeftModel changed the first in place
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-3)  # training changed something
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    code, _, err = cli("merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert code == 2 and "--overwrite" in err
