"""QLoRA: the 4-bit base through transformers' BitsAndBytesConfig, and bitsandbytes as an optional extra.

Why there is no ``peft.prepare_model_for_kbit_training``: it does three things, none of which this loop needs.
It freezes the base (``get_peft_model`` does that already), casts every non-quantized weight (embeddings, norms,
output head) to float32 (we keep them in ``model.dtype``: the embeddings, and so the NEFTune noise and its logged
norm, stay in the compute dtype, and a 7B model's embeddings and head do not double in size), and turns on
reentrant gradient checkpointing with a hook that makes the embedding output require grad (our checkpointing is
non-reentrant, which needs no such hook; see modeling.load_model).
"""

from __future__ import annotations

import logging

import torch

from neftune_cli.io.errors import UsageError
from neftune_cli.recipe.schema import ModelSection

INSTALL_HINT = "pip install neftune-cli[qlora]"


def require_bitsandbytes(what: str) -> None:
    """A one-line usage error naming the extra when bitsandbytes is missing (instead of transformers' long one)."""
    # On a CPU without the optional `kernels` package bitsandbytes logs a warning at import; it falls back to
    # its own kernels, so the warning is noise on every run.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError(f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}") from None


def bnb_config(spec: ModelSection, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the recipe's quantization: 4-bit linear layers, the output head and
    embeddings kept in ``compute_dtype`` (transformers never quantizes them), matmuls in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(f"model.quantization: {spec.quantization}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quantization,
                              bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_compute_dtype=compute_dtype)


def keep_cpu_layout(model) -> None:
    """Turn off bitsandbytes' CPU inference path. On its first no-grad forward in eval mode (our packing check,
    eval loss, generation) it repacks each layer's 4-bit weights in place with the block scales rounded to
    bfloat16, so training would go on with other weights than it started with, and it fails outright on a layer
    whose input width is not a multiple of the 64-value block (e.g. stories260K's MLP)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
