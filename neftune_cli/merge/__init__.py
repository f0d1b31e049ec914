"""``neftune merge``: fold a PEFT LoRA adapter into its base model and write a plain Hugging Face model.

The base is streamed one tensor at a time and never loaded as a model:

* the safetensors headers of the base shards are parsed up front, so every output tensor's dtype, shape and
  output shard are known before anything is written;
* tensors the adapter does not touch are copied byte for byte (or cast, when the output dtype differs);
* a tensor the adapter does touch is read, merged in float32 (``W0 + scaling * B @ A``, DoRA, embedding LoRA,
  lora_bias, or replaced by a ``modules_to_save`` copy) and cast to the output dtype once;
* each output shard is written incrementally in the exact safetensors layout ``safetensors.torch.save_file``
  produces (same header, same tensor order, metadata ``{"format": "pt"}``), so peak memory is one tensor plus the
  adapter, whatever ``max_shard_size`` is.

Then (unless ``verify=False``) the merged model is loaded with plain transformers and compared with the base plus the
adapter loaded through peft on a fixed probe batch. A QLoRA adapter (trained on a 4-bit base) is merged and verified
the same way, into the full-precision base, and the logit gap to the 4-bit model it was trained on is reported.
Everything is written to a temporary folder beside ``out`` and renamed into place only when complete and verified, so a
failure never leaves partial output.

Adapter coverage: vanilla LoRA on Linear / Conv1D (``fan_in_fan_out``) / Embedding layers, rsLoRA,
``rank_pattern`` / ``alpha_pattern``, DoRA (merged exactly like peft, Linear and Embedding), ``lora_bias``,
``modules_to_save`` (including a resized vocabulary), base-layer copies and biases saved with ``bias="all"``, LoRA on
raw parameters (``target_parameters``: fused MoE experts and routers, ``experts``). Variants that cannot be expressed
as a merged weight (aLoRA, trainable tokens, layer replication, ...) are refused with a UsageError.

Modules: ``adapter`` (find and read the adapter), ``base`` (resolve the base, read its shard headers), ``plan`` (map
adapter tensors onto base tensors, lay out the output), ``experts`` (LoRA on raw parameters: which parameter, its
delta, the checkpoint tensors it lands in), ``write`` (output checks, the merge arithmetic, the shards and side
files), ``verify`` (merged model against base + adapter), ``quantized`` (QLoRA adapters: the gap to the 4-bit model),
``common`` (file names, dtypes, formatting).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from neftune_cli.io.atomic import atomic_dir
from neftune_cli.io.errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted, RuntimeFailure, UsageError
from neftune_cli.io.outputs import check_not_input
from neftune_cli.merge.adapter import read_adapter, resolve_adapter_dir
from neftune_cli.merge.base import BaseCheckpoint, resolve_base, same_base
from neftune_cli.merge.common import ADAPTER_CONFIG, fmt_bytes, parse_dtype
from neftune_cli.merge.plan import Plan, build_plan
from neftune_cli.merge.quantized import quantization_gap, trained_quantization
from neftune_cli.merge.verify import check_device, verify_merge
from neftune_cli.merge.write import (
    check_disk_space,
    check_out,
    claim,
    release,
    remove_stale_temps,
    write_model,
    write_side_files,
)

__all__ = ["MergeResult", "merge", "parse_size"]


@dataclass
class MergeResult:
    """What ``merge`` produced."""

    out: Path  # the merged model directory
    tensors_merged: int  # base tensors that received a LoRA / DoRA delta (lora_bias included)
    tensors_replaced: int  # base tensors replaced by adapter copies (modules_to_save, resized embeddings)
    shards: int  # number of safetensors files written
    dtype: str  # output dtype: "bfloat16" | "float16" | "float32"
    total_bytes: int  # bytes of tensor data written
    max_abs_logit_diff: float | None  # None when verify=False
    seconds: float  # wall time of the whole merge (verification included)


def parse_size(size: str | int) -> int:
    """Parse a shard size like ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1.5GB"`` or ``1000000`` into bytes.

    Decimal units are powers of 1000 and binary units powers of 1024, as in transformers (1GB = 1e9 bytes).
    """
    if isinstance(size, bool):
        raise UsageError(f"invalid max shard size {size!r}: use a number with a unit, e.g. 5GB, 500MB or 2GiB")
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise UsageError(f"invalid max shard size {size!r}: use a number with a unit, e.g. 5GB, 500MB or 2GiB")
        unit = (m.group(2) or "b").lower().rstrip("b") or "b"
        scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
        scale.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})
        value = int(float(m.group(1)) * scale[unit])
    if value <= 0:
        raise UsageError(f"invalid max shard size {size!r}: it must be positive")
    return value


def merge(
    adapter: Path,
    out: Path,
    *,
    base: str | None = None,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    device: str = "cpu",
    verify: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> MergeResult:
    """Merge the LoRA adapter at ``adapter`` into its base model and write a plain HF model to ``out``.

    ``adapter``: a neftune run dir (its ``final/`` is used), a checkpoint dir, or any PEFT LoRA adapter dir.
    ``base``: local dir or hub id; defaults to the adapter's ``base_model_name_or_path``.
    ``dtype``: ``auto`` (the base's config dtype) or bfloat16 / float16 / float32.
    ``device``: where verification runs. Raises UsageError for bad input, RuntimeFailure when verification fails.
    """
    t0 = time.monotonic()
    out = Path(out).expanduser().absolute()
    try:
        with _sigterm_raises():
            plan, diff = _merge(
                Path(adapter), out, base=base, dtype=dtype, max_shard_size=max_shard_size, device=device,
                verify=verify, overwrite=overwrite, log=log,
            )
    except KeyboardInterrupt:
        raise Interrupted(f"merge interrupted; nothing written to {out}", EXIT_SIGINT) from None
    except _Terminated:
        raise Interrupted(f"merge interrupted; nothing written to {out}", EXIT_SIGTERM) from None
    seconds = time.monotonic() - t0
    log(f"wrote {out} ({len(plan.shards)} shard{'s' if len(plan.shards) != 1 else ''}, {seconds:.1f}s)")
    return MergeResult(
        out=out,
        tensors_merged=plan.n_merged,
        tensors_replaced=plan.n_replaced,
        shards=len(plan.shards),
        dtype=plan.dtype_name,
        total_bytes=plan.total_bytes,
        max_abs_logit_diff=diff,
        seconds=seconds,
    )


def _merge(
    adapter: Path,
    out: Path,
    *,
    base: str | None,
    dtype: str,
    max_shard_size: str,
    device: str,
    verify: bool,
    overwrite: bool,
    log: Callable[[str], None],
) -> tuple[Plan, float | None]:
    """The checks, the plan and the atomic write of ``merge``; returns the plan and the verified logit diff."""
    out_torch_dtype = None if str(dtype).lower() == "auto" else parse_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    if verify:
        check_device(device)

    adapter_dir = resolve_adapter_dir(adapter)
    check_out(out, overwrite, [adapter_dir, adapter.expanduser().absolute()])
    adapter_state = read_adapter(adapter_dir)
    base_spec = base if base is not None else adapter_state.config.get("base_model_name_or_path")
    if not base_spec:
        raise UsageError(
            f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty; pass --base PATH to the base model"
        )
    base_dir = resolve_base(str(base_spec), adapter_state.config.get("revision"), explicit=base is not None)
    check_not_input(out, [base_dir])
    base_model = BaseCheckpoint(base_dir)
    base_model.check_not_quantized()
    recorded = adapter_state.config.get("base_model_name_or_path")
    if base is not None and recorded and not same_base(str(base), str(recorded)):
        log(
            f"warning: --base {base} is not the base this adapter was trained on ({adapter_dir / ADAPTER_CONFIG} "
            f"says {recorded}); merging anyway"
        )

    plan = build_plan(adapter_state, base_model, out_torch_dtype, shard_limit)
    log(
        f"merging {adapter_dir} into {base_spec}: {plan.n_lora} LoRA modules"
        f"{', ' + str(plan.n_replaced) + ' replaced tensors' if plan.n_replaced else ''}, "
        f"{len(plan.outputs)} tensors, {fmt_bytes(plan.total_bytes)} as {plan.dtype_name} in {len(plan.shards)} "
        f"shard{'s' if len(plan.shards) != 1 else ''}"
    )
    for note in plan.notes:
        log(note)
    remove_stale_temps(out, log)  # before the free-space check: their space is ours again
    check_disk_space(out.parent, plan.total_bytes)

    diff: float | None = None
    try:
        with atomic_dir(out) as tmp:  # --overwrite was checked above: the old folder goes only once ours is whole
            claim(tmp)
            write_model(plan, base_model, tmp, log, out)
            write_side_files(plan, base_model, adapter_dir, adapter.expanduser().absolute(), tmp)
            if verify:
                diff, merged_logits = verify_merge(base_dir, adapter_dir, tmp, device, plan, log)
                if (quantized := trained_quantization(adapter_dir)) is not None:
                    log(quantization_gap(quantized, base_dir, adapter_dir, merged_logits, device))
            release(tmp)
    except OSError as e:  # a full disk or a read-only folder was named by atomic_dir already
        raise RuntimeFailure(f"writing {out} failed: {e.strerror or e} ({e.filename or out})") from None
    return plan, diff


class _Terminated(BaseException):
    """Raised by our SIGTERM handler. A BaseException, so no ``except Exception`` on the way swallows it, and every
    ``finally`` (the temporary folder's removal in atomic_dir) runs, as for Ctrl-C's KeyboardInterrupt."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While merging, SIGTERM raises _Terminated instead of killing the process with its temporary folder in place.

    Only in the main thread (where Python runs signal handlers), and not when SIGTERM is ignored on purpose. The
    handler fires once: a second SIGTERM while cleaning up is ignored rather than cutting the cleanup short.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
