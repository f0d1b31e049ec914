"""Load tokenizers and models named by a recipe (hub id, local folder or builtin)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from neftune_cli.demo import builtin
from neftune_cli.io.errors import UsageError, first_line
from neftune_cli.models.attention import choose_kernel, model_class
from neftune_cli.models.quantization import bnb_config, keep_cpu_layout
from neftune_cli.recipe.schema import ModelSection, Recipe


def model_path(model: ModelSection) -> str:
    """The local folder or hub id to load; builtin models are materialised on first use."""
    return builtin.resolve(model.name_or_path)


def local_config(spec: ModelSection):
    """The model's config when it can be read without a download (local folder, builtin, hub cache), else None."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig

    name = spec.name_or_path
    folder = Path(model_path(spec))
    if not (folder / "config.json").is_file():
        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a valid repo id
            return None
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError):
        return None


def load_tokenizer(model: ModelSection):
    from transformers import AutoTokenizer

    path = model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except OSError as e:
        raise UsageError(f"model.name_or_path: cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def apply_rope_scaling(config, scaling: dict) -> None:
    """Set RoPE scaling on a model config the way the installed transformers reads it, and validate it there.

    transformers 5 keeps rope_theta inside ``rope_parameters`` (assigning ``rope_scaling`` drops it); 4.x reads
    ``rope_scaling`` beside ``rope_theta``.
    """
    try:
        if isinstance(getattr(config, "rope_parameters", None), dict):
            config.rope_parameters = {**config.rope_parameters, **scaling}
            config.validate_rope()
        else:
            from transformers.modeling_rope_utils import rope_config_validation

            config.rope_scaling = {**scaling, "type": scaling["rope_type"]}
            rope_config_validation(config)
    except (KeyError, ValueError, TypeError) as e:
        raise UsageError(f"model.rope_scaling: {str(e).strip(chr(34)).splitlines()[0]}") from None


def load_config(spec: ModelSection):
    """The model's config as training uses it (RoPE scaling applied)."""
    from transformers import AutoConfig

    path = model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"model.name_or_path: cannot load {path}: {str(e).splitlines()[0]}") from None
    if spec.rope_scaling is not None:
        apply_rope_scaling(config, spec.rope_scaling.as_config())
    return config


def router_loss_of(cls):
    """The model's own router load-balancing loss: MoE families' modeling modules define load_balancing_loss_func,
    dense ones do not."""
    return getattr(sys.modules[cls.__module__], "load_balancing_loss_func", None)


def no_router(model_name: str) -> UsageError:
    return UsageError(f"train.router_aux_loss_coef: {model_name} has no router load-balancing loss")


def check_against_config(recipe: Recipe, config) -> str:
    """What the model's config decides about the recipe before any work (validate, where the config is on this
    machine; train, always): the attention kernel it runs (auto resolved, an unsupported one refused), and a router
    loss weight only for a model that has a router (CausalLMLoss checks the built model once more)."""
    spec, path = recipe.model, model_path(recipe.model)
    cls = model_class(config, path, spec.trust_remote_code)
    if recipe.train.router_aux_loss_coef and cls is not None and router_loss_of(cls) is None:
        raise no_router(cls.__name__)
    return choose_kernel(spec, config, path)


def load_base_model(spec: ModelSection, device: torch.device, *, empty: bool = False):
    """The recipe's base model as training loads it (dtype, attention, RoPE scaling); generation and eval reuse it.
    empty: built on the meta device, without weights (FSDP shards it first, then rank 0 sends the weights)."""
    from transformers import AutoModelForCausalLM

    path = model_path(spec)
    config = load_config(spec)
    kernel = choose_kernel(spec, config, path)
    dtype = resolve_dtype(spec.dtype, device)
    if empty:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=kernel,
                                                    trust_remote_code=spec.trust_remote_code)
    # A 4-bit base is quantized as it loads onto its device (device_map); it cannot be moved afterwards.
    placement = {"quantization_config": bnb_config(spec, dtype), "device_map": {"": str(device)}} \
        if spec.quantization else {}
    with named_weights_errors(path):
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=kernel,
            trust_remote_code=spec.trust_remote_code, **placement,
        )
    if not spec.quantization:
        return model.to(device)
    keep_cpu_layout(model)
    return model


@contextmanager
def named_weights_errors(path: str, what: str = "model.name_or_path: cannot load the weights in") -> Iterator[None]:
    """A local model folder without its weights, or with a truncated shard, is the user's to fix (exit 2), named.
    A hub id's OSError (the network, the hub) is left as it is. HFValidationError: a file the folder lacks made
    the loader try the path as a hub id."""
    from huggingface_hub.errors import HFValidationError
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError, HFValidationError) as e:
        if not Path(path).is_dir():
            raise
        raise UsageError(f"{what} {path} ({first_line(e)})") from None


def load_model(recipe: Recipe, device: torch.device, *, empty: bool = False):
    """The model to train: the base in the recipe's dtype (4-bit linear layers under model.quantization), wrapped
    with LoRA unless finetune is full; empty: on the meta device (see load_base_model)."""
    model = load_base_model(recipe.model, device, empty=empty)
    if recipe.train.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (our inputs_embeds carry no grad under LoRA).
        # transformers 5 renamed it (the old name still works there, with a deprecation warning).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = recipe.lora_or_none
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save, use_dora=lora.use_dora, use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    names = [name for name, _ in model.named_modules()]
    for wanted in lora.modules_to_save or []:  # peft ignores a name that matches nothing: nothing would be trained
        if not any(name == wanted or name.endswith(f".{wanted}") for name in names):
            raise UsageError(f"lora.modules_to_save: {wanted!r} names no module of {type(model).__name__} (its "
                             f"top-level modules: {', '.join(n for n in names if n and '.' not in n)})")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        if "ParamWrapper" in str(e) and "lora_dropout" in str(e):  # peft adapts fused 3-D expert weights directly
            raise UsageError(f"lora.dropout: {type(model).__name__} keeps its MoE experts' weights fused, which peft "
                             "can adapt only without dropout; set lora.dropout: 0, or list lora.target_modules "
                             "without the experts") from None
        raise UsageError(f"lora: {str(e).splitlines()[0]}") from None


def param_lora_summary(model) -> str | None:
    """What peft adapts beyond its LoRA layers: raw parameters (target_parameters), i.e. the fused MoE experts and
    routers that `all-linear` reaches on transformers 5, with their trained parameter count; None if nothing."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # a peft without target_parameters
        return None
    groups: dict[str, list[int]] = {}  # "MixtralExperts.gate_up_proj" -> [layers, experts, trained parameters]
    for mod in model.modules():
        if isinstance(mod, ParamWrapper):
            group = groups.setdefault(f"{type(mod.get_base_layer()).__name__}.{mod.parameter_name}", [0, 1, 0])
            group[0] += 1
            group[1] = mod.num_experts
            group[2] += sum(p.numel() for part in (mod.lora_A, mod.lora_B) for p in part.parameters())
    if not groups:
        return None
    parts = [f"{name} ({layers} layers" + (f" x {experts} experts)" if experts > 1 else ")")
             for name, (layers, experts, _) in groups.items()]
    trained = sum(n for _, _, n in groups.values())
    return f"lora on raw parameters (peft target_parameters): {', '.join(parts)}; {trained / 1e6:.3f}M trained"
