"""Builtin models, built locally: no hub, no internet (``model.name_or_path: builtin:tiny-llama``).

``builtin:tiny-llama`` is a ~1M-parameter Llama with a byte-level BPE tokenizer trained on the demo data
(``neftune_cli.demo.tasks``) and the Alpaca prompt strings. It exists so ``make demo`` and the tests run a
real fine-tuning job in about a minute on a small CPU.

The model is materialised into ``$NEFTUNE_CACHE`` (default ``~/.cache/neftune-cli``) under
``builtin/<name>-v<VERSION>``:

- idempotent: a complete folder (it holds ``MARKER``) is reused as is;
- atomic: it is built in a temporary folder beside the final one and renamed into place, so a crash never
  leaves a half-built model, and two processes racing both end with a valid folder (the loser of the race
  drops its copy and uses the winner's);
- deterministic: the same bytes every time. The tokenizer trainer is deterministic, and the weights do not
  come from torch's RNG (whose normal() differs between CPU kernels): each tensor is filled from SHAKE-256
  of its name, turned into uniform values with exact IEEE operations only. Bump ``VERSION`` whenever
  anything that changes the bytes changes (this module or ``demo.tasks``);
- loadable by transformers 4.x and 5.x alike: the tokenizer files are written here, not by ``save_pretrained``
  (transformers 5 writes a tokenizer class 4.x does not know).

Like Llama, the tokenizer prepends ``<s>`` and does not append ``</s>``; its ChatML chat template also
starts with ``{{ bos_token }}`` (like Llama-2-chat), so code that renders the template and then tokenizes
with ``add_special_tokens=True`` gets a double BOS: the data code must handle that.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from neftune_cli.io.atomic import atomic_dir, clean_stale
from neftune_cli.io.cache_dir import cache_root
from neftune_cli.io.errors import UsageError

PREFIX = "builtin:"
VERSION = 3  # v3: the demo tasks changed (so the tokenizer) and embeddings start at std 0.08
WEIGHTS_KEY = "neftune-builtin/1"  # seeds the weights: kept across versions that change only the files around them
MARKER = "neftune-builtin.json"  # written last: a folder without it is not a complete model

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IM_START, IM_END]  # ids 0..5, Llama order for unk/bos/eos

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MODELS: dict[str, dict] = {
    "tiny-llama": {
        "vocab_target": 1536,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        # Token embeddings of norm ~0.9 (0.08 * sqrt(128)), not ~0.23 as with Llama's 0.02: NEFTune's noise has
        # a fixed norm per example (alpha/sqrt(3)), so at 0.02 the demo's alpha 5 drowned the embeddings (the
        # count task: 45% exact match after 1,000 steps at 0.02, 100% after 500 at 0.08).
        "initializer_range": 0.08,
    },
}


def available() -> str:
    return ", ".join(PREFIX + n for n in MODELS)


def _unknown(name: str) -> UsageError:
    return UsageError(f"model.name_or_path: unknown builtin model '{name}'; available: {available()}")


def folder_name(name: str) -> str:
    return f"{name}-v{VERSION}"


def resolve(name_or_path: str) -> str:
    """``builtin:NAME`` -> its local folder (materialised on first use); anything else unchanged."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    return str(materialize(name_or_path[len(PREFIX) :]))


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def materialize(name: str, root: Path | None = None) -> Path:
    """The folder of builtin model ``name`` under ``root`` (default: ``cache_root()``), built if missing."""
    if name not in MODELS:
        raise _unknown(name)
    base = Path(root).expanduser() if root is not None else cache_root()
    parent = base / "builtin"
    final = parent / folder_name(name)
    if is_complete(final):
        return final
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent)
    with atomic_dir(final, is_complete=is_complete) as tmp:
        _build(name, tmp)
    return final


# ---------------------------------------------------------------------------------------------- building


def tokenizer_corpus() -> list[str]:
    """The texts the tokenizer is trained on: the demo records in the Alpaca prompt, and the template strings."""
    from neftune_cli.data.templates import ALPACA_PROMPT_INPUT as PROMPT_INPUT
    from neftune_cli.data.templates import ALPACA_PROMPT_NO_INPUT as PROMPT_NO_INPUT
    from neftune_cli.demo import tasks as demo_tasks

    texts = [
        PROMPT_INPUT,
        PROMPT_NO_INPUT,
        "### Instruction:\n",
        "### Input:\n",
        "### Response:\n",
        "system\nuser\nassistant\n",
    ]
    for r in demo_tasks.train_records():
        template = PROMPT_INPUT if r["input"] else PROMPT_NO_INPUT
        texts.append(template.format(**r) + r["output"])
    return texts


def _build(name: str, out: Path) -> None:
    from transformers import AutoTokenizer

    spec = MODELS[name]
    _save_tokenizer(_train_tokenizer(spec["vocab_target"]), out)
    _build_model(spec, AutoTokenizer.from_pretrained(out), out)  # the tokenizer as users load it
    # Last: the marker says the folder is complete. Deterministic content (no timestamps).
    info = {"name": name, "version": VERSION, "source": "neftune_cli.demo.builtin"}
    (out / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _train_tokenizer(vocab_size: int):
    """The byte-level BPE (a ``tokenizers.Tokenizer``), trained on ``tokenizer_corpus``; BOS in front, like Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def _save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    specials["additional_special_tokens"] = [IM_START, IM_END]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "padding_side": "right",
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (out / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _uniform_(tensor, key: str, bound: float) -> None:
    """Fill ``tensor`` with uniform values in (-bound, bound) derived from SHAKE-256(key): same bits everywhere.

    24-bit integers are exact in float64, ``(k + 0.5) / 2**24 * 2 - 1`` is exact, and the final multiply and
    the float32 cast are correctly rounded IEEE operations, so no platform-dependent math is involved.
    """
    import torch

    n = tensor.numel()
    raw = hashlib.shake_256(key.encode("utf-8")).digest(4 * n)
    ints = torch.frombuffer(bytearray(raw), dtype=torch.int32).to(torch.int64) & 0xFFFFFF
    unit = (ints.to(torch.float64) + 0.5) / float(1 << 24) * 2.0 - 1.0
    with torch.no_grad():
        tensor.copy_((unit * bound).to(tensor.dtype).view_as(tensor))


def _build_model(spec: dict, tok, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    vocab = -(-len(tok) // 8) * 8
    pad_id, bos_id, eos_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    im_end_id = tok.convert_tokens_to_ids(IM_END)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        initializer_range=spec["initializer_range"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Uniform with the configured standard deviation: bound = std * sqrt(3).
    bound = spec["initializer_range"] * 3**0.5
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            if pname.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                _uniform_(param, f"{WEIGHTS_KEY}/{pname}", bound)
        model.get_input_embeddings().weight[pad_id].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=[eos_id, im_end_id],
        pad_token_id=pad_id,
    )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of a CLI run
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
