"""Which attention kernel a model runs: the recipe's choice checked against what the model's class supports.

``auto`` is the best kernel the model supports (sdpa where it can, else eager), resolved before the run records its
recipe, so a run's recipe.yaml names the kernel it trained with. A kernel the model does not support is a usage
error naming the kernels it takes, at `validate` (when the config is on this machine) and at `train`.
"""

from __future__ import annotations

import importlib.util

from neftune_cli.io.errors import UsageError
from neftune_cli.recipe.schema import ModelSection


def model_class(config, path: str, trust_remote_code: bool):
    """The class AutoModelForCausalLM would build for this config, without building it; None when unknown."""
    from transformers import AutoModelForCausalLM

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], path)
    mapping = AutoModelForCausalLM._model_mapping
    return mapping[type(config)] if type(config) in mapping else None


def supported_kernels(cls) -> list[str]:
    flash = getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False)
    return (["sdpa"] if cls._supports_sdpa else []) + ["eager"] + (["flash_attention_2"] if flash else []) \
        + (["flex_attention"] if getattr(cls, "_supports_flex_attn", False) else [])


def choose_kernel(spec: ModelSection, config, path: str) -> str:
    """The kernel to load the model with: the recipe's, checked, or the best supported one for auto."""
    cls = model_class(config, path, spec.trust_remote_code)
    wanted = spec.attn_implementation
    if cls is None:  # a class we cannot inspect: transformers checks the kernel as it loads the model
        return "sdpa" if wanted == "auto" else wanted
    kernels = supported_kernels(cls)
    if wanted == "auto":
        return kernels[0]
    if wanted not in kernels:
        raise UsageError(f"model.attn_implementation: {cls.__name__} does not support {wanted}; it takes "
                         f"{', '.join(kernels)} (or auto: {kernels[0]})")
    if wanted == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UsageError("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                         "(pip install flash-attn, on a CUDA machine); or use auto")
    return wanted
