"""Weights memory of a LoRA run with and without a 4-bit base, from the model's config alone (`neftune validate`).

The model is built on the meta device (shapes only: nothing is read or allocated), so a 70B config costs nothing.
Counted: the frozen base, the trained weights (LoRA A/B in float32 as peft keeps them, modules_to_save copies in
model.dtype), their gradients and AdamW's two moments. Not counted: activations, the CUDA context, allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neftune_cli.models.loading import local_config
from neftune_cli.recipe.schema import LoraSection, ModelSection

# bitsandbytes' 4-bit layout (the QLoRA paper's): 64 weights share one scale; with double quantization the scales
# are 8-bit, 256 of them sharing one float32 scale (4.127 bits per weight instead of 4.5).
QUANT_BLOCK = 64
SCALE_BLOCK = 256


def quantized_bytes_per_weight(double_quant: bool) -> float:
    scale_bits = 8 / QUANT_BLOCK + 32 / (QUANT_BLOCK * SCALE_BLOCK) if double_quant else 32 / QUANT_BLOCK
    return (4 + scale_bits) / 8


@dataclass
class WeightsMemory:
    base: float  # bytes of the frozen base
    trained: float  # bytes of the trained weights
    optimizer: float  # bytes of their gradients and AdamW moments

    @property
    def total(self) -> float:
        return self.base + self.trained + self.optimizer

    def describe(self) -> str:
        return (f"{_gb(self.total)} = base {_gb(self.base)} + adapters {_gb(self.trained)} + gradients and AdamW "
                f"state {_gb(self.optimizer)}")


@dataclass
class Counts:
    dense: int  # parameters kept in model.dtype (embeddings, norms, output head)
    linear: int  # weights of the linear layers a 4-bit base quantizes
    lora: int  # LoRA parameters (float32)
    copies: int  # modules_to_save parameters (model.dtype)


def count(config, lora: LoraSection) -> Counts:
    """Parameter counts of the model `config` describes with the recipe's LoRA on it."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()  # transformers keeps it (and the embeddings) out of the 4-bit layers
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    targets = linears if lora.target_modules == "all-linear" else {
        name: m for name, m in linears.items() if name.rsplit(".", 1)[-1] in lora.target_modules}
    n_lora = sum(lora.r * (m.in_features + m.out_features) + (m.out_features if lora.use_dora else 0)
                 for m in targets.values())
    copies = sum(p.numel() for name, m in model.named_modules()
                 if name.rsplit(".", 1)[-1] in (lora.modules_to_save or []) for p in m.parameters())
    n_linear = sum(m.weight.numel() for m in linears.values())
    return Counts(sum(p.numel() for p in model.parameters()) - n_linear, n_linear, n_lora, copies)


def estimate(counts: Counts, dtype: torch.dtype, quantization: str | None, double_quant: bool) -> WeightsMemory:
    size = torch.empty((), dtype=dtype).element_size()
    linear = counts.linear * (quantized_bytes_per_weight(double_quant) if quantization else size)
    # a gradient and two AdamW moments per trained weight, in the weight's dtype
    return WeightsMemory(base=counts.dense * size + linear, trained=counts.lora * 4 + counts.copies * size,
                         optimizer=3 * (counts.lora * 4 + counts.copies * size))


def summary(spec: ModelSection, lora: LoraSection) -> list[str]:
    """validate's lines: QLoRA next to plain LoRA for this recipe's model and LoRA settings."""
    config = local_config(spec)
    if config is None:
        return [f"memory: not estimated ({spec.name_or_path}'s config.json is not on this machine yet)"]
    counts = count(config, lora)
    # the estimate is for the GPU the run is meant for, where auto means bfloat16
    dtype = torch.bfloat16 if spec.dtype == "auto" else getattr(torch, spec.dtype)
    quantization = spec.quantization or "nf4"
    qlora = estimate(counts, dtype, quantization, spec.double_quant)
    plain = estimate(counts, dtype, None, spec.double_quant)
    mine = " (this recipe)"
    shown = "dtype auto: bfloat16 as on a GPU" if spec.dtype == "auto" else spec.dtype
    return [f"memory for weights, adapters and optimizer state ({shown}; activations not included):",
            f"  QLoRA {quantization}{' + double quant' if spec.double_quant else ''}: {qlora.describe()}"
            f"{mine if spec.quantization else ''}",
            f"  LoRA: {plain.describe()}{'' if spec.quantization else mine}"]


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"
