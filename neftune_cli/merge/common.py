"""Constants and small helpers shared by the merge modules (file names, dtypes, formatting)."""

from __future__ import annotations

import torch

from neftune_cli.io.errors import UsageError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Files that make up a tokenizer (and its chat template). Copied from the adapter dir when it has a tokenizer
# (training may have added tokens or a chat template), else from the base.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
TOKENIZER_DIRS = ("additional_chat_templates",)

OUT_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

FLOAT_ST = {"F16", "BF16", "F32", "F64"}
TORCH_TO_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
ST_TO_NAME = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}

OUT_EMBEDDING_MODULES = ("lm_head", "embed_out", "output")
IN_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)


def parse_dtype(dtype: str) -> torch.dtype:
    try:
        return OUT_DTYPES[str(dtype).lower()]
    except KeyError:
        raise UsageError(f"invalid dtype {dtype!r}: use auto, bfloat16, float16 or float32") from None


def sub_configs(config: dict) -> list[dict]:
    return [config] + [
        config[k] for k in ("text_config", "language_config", "llm_config") if isinstance(config.get(k), dict)
    ]


def set_config(config: dict, key: str, value) -> None:
    hits = [c for c in sub_configs(config) if key in c]
    for c in hits or [config]:
        c[key] = value


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
