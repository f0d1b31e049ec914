"""Verifying: the merged model against base + adapter through peft, on a fixed probe batch."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from neftune_cli.io.errors import RuntimeFailure, UsageError, first_line

if TYPE_CHECKING:
    from neftune_cli.merge.plan import Plan

# Verification tolerances on max |logit diff|, relative to max(1, max |reference logit|). The reference is the base
# plus the adapter through peft, in fp32 from the unmerged weights; the merged model also runs in fp32, so the only
# differences are the merged weights' rounding:
# - float32 output: only fp32 re-association (x@W0 + s*(x@A)@B versus x@(W0 + s*B@A)), measured ~1e-5 relative;
#   1e-4 keeps 10x margin and still catches a 1% scaling error.
# - float16 / bfloat16 output: every merged weight is rounded once (2^-11 / 2^-8 relative), the noise of casting an
#   fp32 model to that dtype. On test models that moved the max logit diff by up to 1.0% (fp16) / 3.7% (bf16) of
#   max |logit| with very large deltas, ~0.1% / 1% with realistic ones; 2e-2 / 1e-1 leave 2-10x margin. That still
#   catches a lost, mis-mapped or mis-scaled adapter (whose effect is of the order of the logits), not a subtle 1%
#   error: merge with dtype float32 for a tight check.
_VERIFY_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
_PROBE_SHAPE = (2, 16)
_PROBE_SEED = 1234


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"invalid device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested for verification but CUDA is not available (use --device cpu)")


def probe_ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.randint(0, vocab, _PROBE_SHAPE, generator=g)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """No transformers/peft warnings or progress bars while loading the models we compare."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def verify_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, device: str, plan: Plan, log
            ) -> tuple[float, torch.Tensor]:
    """Max |logit diff| between base+adapter (peft, fp32) and the merged model (fp32) on a fixed probe batch, and
    the merged model's logits there."""
    import transformers

    with quiet_libraries():
        try:
            from peft import PeftModel

            model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
            if plan.new_vocab is not None:
                model.resize_token_embeddings(plan.new_vocab, mean_resizing=False)
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
            model.to(device).eval()
            vocab = model.get_input_embeddings().weight.shape[0]
            ids = probe_ids(vocab).to(device)
            with torch.no_grad():
                ref = model(input_ids=ids).logits.float().cpu()
        except Exception as e:  # noqa: BLE001
            raise RuntimeFailure(
                f"verification could not run base+adapter with peft ({type(e).__name__}: {first_line(e)}); "
                "use --no-verify to skip verification"
            ) from None
        finally:
            model = None
            gc.collect()
        try:
            merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
            merged.to(device).eval()
            with torch.no_grad():
                got = merged(input_ids=ids).logits.float().cpu()
        except Exception as e:  # noqa: BLE001
            raise RuntimeFailure(
                f"verification failed: the merged model does not load or run with transformers "
                f"({type(e).__name__}: {first_line(e)})"
            ) from None
        finally:
            merged = None
            gc.collect()
    if not torch.isfinite(ref).all():
        raise RuntimeFailure("verification failed: base+adapter gives NaN/inf logits; the adapter is broken")
    if got.shape != ref.shape or not torch.isfinite(got).all():
        raise RuntimeFailure("verification failed: the merged model gives NaN/inf logits or a different vocabulary")
    diff = (got - ref).abs().max().item()
    rtol = _VERIFY_RTOL[plan.out_dtype]
    tol = rtol * max(1.0, ref.abs().max().item())
    if not diff <= tol:
        raise RuntimeFailure(
            f"verification failed: max |logit diff| between merged model and base+adapter is {diff:.3g} "
            f"(tolerance {tol:.3g} for {plan.dtype_name} output); nothing was written"
        )
    log(f"verify: max |logit diff| = {diff:.3g} (tolerance {tol:.3g} for {plan.dtype_name}) on {device}")
    return diff, got
