"""A QLoRA adapter: how its run quantized the base, and how far the merged model is from what was trained.

The merge itself is the plain one: a QLoRA adapter is folded into the full-precision base (the recipe's
model.name_or_path) and verified against the adapter on that base. The 4-bit model the adapter was trained on
differs from it by the quantization error; that gap is reported for information, never as a failure.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
import yaml

from neftune_cli.io.errors import UsageError, first_line
from neftune_cli.merge.verify import probe_ids, quiet_libraries
from neftune_cli.recipe.schema import ModelSection
from neftune_cli.train.checkpoint import META_FILE


def trained_quantization(adapter_dir: Path) -> ModelSection | None:
    """The model section of the run that wrote this adapter when it trained on a quantized base; None for plain
    LoRA and for adapters from elsewhere. A checkpoint carries its recipe in meta.json, final/ beside the run's
    recipe.yaml."""
    try:
        if (adapter_dir / META_FILE).is_file():
            model = json.loads((adapter_dir / META_FILE).read_text(encoding="utf-8"))["recipe"]["model"]
        elif adapter_dir.name == "final" and (adapter_dir.parent / "recipe.yaml").is_file():
            model = yaml.safe_load((adapter_dir.parent / "recipe.yaml").read_text(encoding="utf-8"))["model"]
        else:
            return None
        spec = ModelSection.model_validate(model)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None  # not one of our runs' files: an ordinary adapter
    return spec if spec.quantization else None


def quantization_gap(spec: ModelSection, base_dir: Path, adapter_dir: Path, merged_logits: torch.Tensor,
                     device: str) -> str:
    """One information line: max |logit diff| on the verification probe between the merged model and the adapter
    on the base quantized as in training (with the training's compute dtype)."""
    from neftune_cli.models.loading import resolve_dtype
    from neftune_cli.models.quantization import bnb_config, keep_cpu_layout

    what = f"{spec.quantization}{' + double quant' if spec.double_quant else ''}"
    try:
        with quiet_libraries():
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            dev = torch.device(device)
            model = AutoModelForCausalLM.from_pretrained(
                str(base_dir), dtype=resolve_dtype(spec.dtype, dev), device_map={"": str(dev)},
                quantization_config=bnb_config(spec, resolve_dtype(spec.dtype, dev)),
            )
            keep_cpu_layout(model)
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
            with torch.no_grad():
                trained = model(input_ids=probe_ids(merged_logits.shape[-1]).to(dev)).logits.float().cpu()
    except UsageError as e:  # bitsandbytes missing: say so, the merge stands
        return f"quantization gap: not measured ({e})"
    except Exception as e:  # noqa: BLE001 - information only: the merge is verified already
        return f"quantization gap: not measured ({type(e).__name__}: {first_line(e)})"
    finally:
        model = None
        gc.collect()
    gap = (merged_logits - trained).abs().max().item()
    return (f"quantization gap: max |logit diff| {gap:.3g} (max |logit| {merged_logits.abs().max().item():.3g}) "
            f"between the merged model and the {what} base + adapter that was trained; information only: the "
            f"merged model is the adapter on the full-precision base")
