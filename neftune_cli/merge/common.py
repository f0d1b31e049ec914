"""Constants and small helpers shared by the merge modules (file names, dtypes, formatting)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from neftune_cli import safetensors_io as st
from neftune_cli.errors import UsageError

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

_OUT_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

_FLOAT_ST = {"F16", "BF16", "F32", "F64"}
_TORCH_TO_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_ST_TO_NAME = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}

_OUT_EMBEDDING_MODULES = ("lm_head", "embed_out", "output")
_IN_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)


def _parse_dtype(dtype: str) -> torch.dtype:
    try:
        return _OUT_DTYPES[str(dtype).lower()]
    except KeyError:
        raise UsageError(f"invalid dtype {dtype!r}: use auto, bfloat16, float16 or float32") from None


def _sub_configs(config: dict) -> list[dict]:
    return [config] + [
        config[k] for k in ("text_config", "language_config", "llm_config") if isinstance(config.get(k), dict)
    ]


def _set_config(config: dict, key: str, value) -> None:
    hits = [c for c in _sub_configs(config) if key in c]
    for c in hits or [config]:
        c[key] = value


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file with one line naming it (before anything parses it further).

    The checks are those of the safetensors format itself: an 8-byte header length, a JSON object header that fits
    in the file, every tensor's byte range inside the data and of the size its dtype and shape say, and the data
    exactly covered (a cut-off download fails the last two).
    """
    bad = UsageError(f"{path}: not a valid safetensors file (truncated or corrupt)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise bad
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > size - 8 or n > _MAX_HEADER:
                raise bad
            header = json.loads(f.read(n))
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError:  # invalid JSON or UTF-8
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    data = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(x, int) for x in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            raise bad
        if dtype in st.ST_DTYPES and offsets[1] - offsets[0] != math.prod(shape) * st.ST_DTYPES[dtype][1]:
            raise bad
        end = max(end, offsets[1])
    if end != data:
        raise bad
