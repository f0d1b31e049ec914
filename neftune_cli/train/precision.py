"""The precision policy, in one place.

``model.dtype`` is the compute dtype (bf16 on CUDA by default). With ``train.precision: mixed`` (the default, what
the NEFTune paper's runs used through the HF Trainer's bf16 mixed precision):

- the trained parameters are float32 master weights: AdamW updates them in float32 (a bf16 weight does not move
  for an update below 2^-9 of its magnitude, so at fine-tuning learning rates most weights of a pure-bf16 full
  fine-tune never change); frozen weights stay in ``model.dtype``;
- the forward runs under ``torch.autocast(device, model.dtype)``: matmuls in half precision, and the activations
  saved for backward in half precision (peft keeps LoRA weights in float32 and would otherwise cast every LoRA input
  to float32 and save it);
- under FSDP2 the same casts are FSDP's ``MixedPrecisionPolicy(param_dtype=model.dtype, reduce_dtype=float32)``.

``train.precision: pure`` keeps the trained parameters in ``model.dtype`` too (torchtune's default): half the weight,
gradient and optimizer memory of full fine-tuning, at the price above, which train states in a warning.
With ``model.dtype: float32`` both are plain float32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype  # model.dtype: what the matmuls run in and what frozen weights are stored in
    trained: torch.dtype  # the trained parameters, as the optimizer updates them

    @classmethod
    def of(cls, compute: torch.dtype, policy: str) -> Precision:
        return cls(compute, compute if policy == "pure" or compute not in HALF else torch.float32)

    def autocast(self, device: torch.device) -> AbstractContextManager:
        if self.compute not in HALF:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.compute)

    def cast_trained(self, params: list[torch.nn.Parameter]) -> None:
        """Trained parameters to the master dtype (before the optimizer and DDP/FSDP see them)."""
        _cast(params, self.trained)

    def cast_for_serving(self, params: list[torch.nn.Parameter]) -> None:
        """A full fine-tune's trained parameters back to model.dtype, for final/: the model is served in the dtype
        it came in (checkpoints keep the float32 master weights, for an exact resume)."""
        _cast(params, self.compute)

    def warning(self, finetune: str) -> str | None:
        if self.trained in HALF and finetune == "full":
            return (f"train.precision: pure updates {str(self.trained).removeprefix('torch.')} weights directly; an "
                    "update smaller than about 1/256 of a weight is lost, so at fine-tuning learning rates many "
                    "weights never change (precision: mixed keeps float32 master weights)")
        return None

    def fsdp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.compute not in HALF:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=torch.float32)


def _cast(params: list[torch.nn.Parameter], dtype: torch.dtype) -> None:
    for p in params:
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


FLOAT32 = Precision(torch.float32, torch.float32)  # no autocast: every op in its weights' dtype
