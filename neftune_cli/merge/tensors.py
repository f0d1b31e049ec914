"""One output tensor of a merge: where it comes from, and the arithmetic that makes it (peft's, in float32)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from neftune_cli.io import safetensors_io as st
from neftune_cli.io.errors import RuntimeFailure
from neftune_cli.merge.adapter import LoraModule, Replacement
from neftune_cli.merge.common import FLOAT_ST

if TYPE_CHECKING:
    from neftune_cli.merge.experts import ParamLora


@dataclass
class OutputTensor:
    name: str  # output tensor name
    st_dtype: str
    shape: tuple[int, ...]
    src: st.TensorEntry | None  # base tensor (None: only from the replacement)
    replacement: Replacement | None = None
    lora: LoraModule | None = None
    bias_lora: LoraModule | None = None  # lora_B.bias added to this (bias) tensor
    param_lora: ParamLora | None = None  # LoRA on a raw (fused expert / router) parameter, of which this is a piece

    @property
    def merged(self) -> bool:
        return self.lora is not None or self.bias_lora is not None or self.param_lora is not None

    @property
    def modified(self) -> bool:
        return self.replacement is not None or self.merged

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * st.ST_DTYPES[self.st_dtype][1]



def lora_delta(lm: LoraModule) -> torch.Tensor:
    """scaling * B @ A in float32, laid out like the base weight (exactly peft's get_delta_weight arithmetic)."""
    A, B = lm.A.float(), lm.B.float()
    delta = B @ A
    if lm.embedding or lm.fan_in_fan_out:
        delta = delta.T
    return delta.mul_(lm.scaling)  # in place: same arithmetic as peft's `* scaling`, one full-size buffer less


def apply_lora(w: torch.Tensor, lm: LoraModule) -> torch.Tensor:
    """Merge one LoRA module into the float32 weight ``w`` (peft's merge, vanilla or DoRA)."""
    delta = lora_delta(lm)
    if lm.magnitude is None:
        w += delta
        return w
    # DoRA: W' = m / ||W0 + dW|| * (W0 + dW), the norm taken per output feature (per embedding dim for
    # embeddings), exactly as peft's DoraLinearVariant / DoraEmbeddingVariant merge.
    combined = w + delta
    mag = lm.magnitude.float()
    if lm.embedding:
        factor = (mag / torch.linalg.norm(combined.T, dim=1)).view(1, -1)
    elif lm.fan_in_fan_out:
        factor = (mag / torch.linalg.norm(combined.T, dim=1)).view(-1, 1).T
    else:
        factor = (mag / torch.linalg.norm(combined, dim=1)).view(-1, 1)
    return factor * combined


def produce(o: OutputTensor, reader: st.Reader, out_dtype: torch.dtype) -> torch.Tensor:
    """The final tensor for an output entry (only called for modified tensors or dtype casts)."""
    t = o.replacement.tensor if o.replacement is not None else reader.read(o.src)
    if o.merged:
        w = t.to(torch.float32, copy=True)
        if o.lora is not None:
            w = apply_lora(w, o.lora)
        if o.param_lora is not None:
            w += o.param_lora.piece(o.name)
        if o.bias_lora is not None:
            w += o.bias_lora.B_bias.float() * o.bias_lora.scaling
        # NaN/inf make the sum non-finite; the exact elementwise check (4x slower) only runs when it is
        if not math.isfinite(w.sum().item()) and not torch.isfinite(w).all():
            raise RuntimeFailure(f"{o.name}: merging the adapter produced NaN/inf values; the adapter is broken")
        t = w
    if o.st_dtype in FLOAT_ST:
        t = t.to(st.ST_DTYPES[o.st_dtype][0])
    if tuple(t.shape) != o.shape:  # guarded by planning; never write a header that lies
        raise RuntimeError(f"internal error: {o.name} has shape {tuple(t.shape)}, planned {o.shape}")
    return t
