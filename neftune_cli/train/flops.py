"""Model FLOPs utilisation (MFU): the FLOPs a training step needs per real token, over the device's dense peak.

Per token (forward + backward): a weight matrix costs 2N in forward; its input gradient 2N more; its weight
gradient another 2N, only when it is trained. So frozen weights (LoRA's base) cost 4N and trained ones 6N. The
input embedding is a lookup, not a matmul, and costs nothing unless it is tied to the output head. Attention's
score and value products add 12 x layers x hidden x L per token (L: the example's length; PaLM's convention, which
counts the whole score matrix although a causal mask needs half of it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Dense (not sparse) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets, by the exact model names
# torch.cuda.get_device_name() reports (without the "NVIDIA " prefix, any case). Variants differ: an H100 PCIe has
# three quarters of the SXM part's peak, an L40 half an L40S's. A device not listed gets no MFU rather than a wrong one.
PEAK_BF16 = {
    "B200": 2250e12,
    "GH200 480GB": 989e12, "GH200 144G HBM3e": 989e12,
    "H200": 989e12, "H200 NVL": 835e12,
    "H100 80GB HBM3": 989e12, "H100 SXM5 80GB": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "H800": 989e12, "H800 PCIe": 756e12,
    "A100-SXM4-40GB": 312e12, "A100-SXM4-80GB": 312e12, "A100-PCIE-40GB": 312e12, "A100 80GB PCIe": 312e12,
    "A800-SXM4-80GB": 312e12, "A800 80GB PCIe": 312e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 70e12, "A10": 125e12,
    "GeForce RTX 4090": 165e12,
}
_PEAK_BY_NAME = {name.casefold(): peak for name, peak in PEAK_BF16.items()}


def numel(p: torch.Tensor) -> int:
    """Parameters in a tensor; a 4-bit bitsandbytes weight stores two per byte, and knows its real shape."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def flops_per_token(model: nn.Module, mean_length: float) -> float:
    """Training FLOPs per real token of `model` (plain or peft) on examples of `mean_length` tokens."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    frozen = trained = 0
    for p in model.parameters():
        if p is embedding and not tied:
            continue
        if p.requires_grad:
            trained += numel(p)
        else:
            frozen += numel(p)
    config = model.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * mean_length
    return 4 * frozen + 6 * trained + attention


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    return peak_of(torch.cuda.get_device_name(device))


def peak_of(device_name: str) -> float | None:
    """The peak of a device by its exact name; None for one we do not know."""
    return _PEAK_BY_NAME.get(device_name.strip().removeprefix("NVIDIA ").casefold())


def peak_memory_gb(device: torch.device) -> float | None:
    """The most GPU memory this process's tensors have held so far, in GB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9
