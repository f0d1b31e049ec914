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
adapter loaded through peft on a fixed probe batch. Everything is written to a temporary folder beside ``out`` and
renamed into place only when complete and verified, so a failure never leaves partial output.

Adapter coverage: vanilla LoRA on Linear / Conv1D (``fan_in_fan_out``) / Embedding layers, rsLoRA,
``rank_pattern`` / ``alpha_pattern``, DoRA (merged exactly like peft, Linear and Embedding), ``lora_bias``,
``modules_to_save`` (including a resized vocabulary), base-layer copies and biases saved with ``bias="all"``.
Variants that cannot be expressed as a merged weight (aLoRA, target_parameters, trainable tokens, layer replication,
...) are refused with a UsageError.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neftune_cli import safetensors_io as st
from neftune_cli.atomic import atomic_dir
from neftune_cli.errors import RuntimeFailure, UsageError

__all__ = ["MergeResult", "merge", "parse_size"]

# --------------------------------------------------------------------------------------------------------------------
# constants

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Files that make up a tokenizer (and its chat template). Copied from the adapter dir when it has a tokenizer
# (training may have added tokens or a chat template), else from the base.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
TOKENIZER_DIRS = ("additional_chat_templates",)

_OUT_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

_FLOAT_ST = {"F16", "BF16", "F32", "F64"}
_TORCH_TO_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_ST_TO_NAME = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}

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

_OUT_EMBEDDING_MODULES = ("lm_head", "embed_out", "output")
_IN_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)

# LoraConfig fields whose non-default value means the adapter is not a plain (mergeable) LoRA.
_UNSUPPORTED_FIELDS = {
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens), which only activates after its invocation tokens",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
}


# --------------------------------------------------------------------------------------------------------------------
# public API


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
    out_torch_dtype = None if str(dtype).lower() == "auto" else _parse_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    if verify:
        _check_device(device)

    adapter_dir = _resolve_adapter_dir(Path(adapter))
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)
    adapter_state = _read_adapter(adapter_dir)
    base_spec = base if base is not None else adapter_state.config.get("base_model_name_or_path")
    if not base_spec:
        raise UsageError(
            f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty; pass --base PATH to the base model"
        )
    base_dir = _resolve_base(str(base_spec), adapter_state.config.get("revision"), explicit=base is not None)
    _check_not_overlapping(out, [adapter_dir, Path(adapter).expanduser().absolute(), base_dir])
    base_model = _BaseCheckpoint(base_dir)
    base_model.check_not_quantized()

    plan = _plan(adapter_state, base_model, out_torch_dtype, shard_limit)
    log(
        f"merging {adapter_dir} into {base_spec}: {plan.n_lora} LoRA modules"
        f"{', ' + str(plan.n_replaced) + ' replaced tensors' if plan.n_replaced else ''}, "
        f"{len(plan.outputs)} tensors, {_fmt_bytes(plan.total_bytes)} as {plan.dtype_name} in {len(plan.shards)} "
        f"shard{'s' if len(plan.shards) != 1 else ''}"
    )
    for note in plan.notes:
        log(note)
    _check_disk_space(out.parent, plan.total_bytes)

    diff: float | None = None
    try:
        with atomic_dir(out) as tmp:  # --overwrite was checked above: the old folder goes only once ours is whole
            _write_model(plan, base_model, tmp, log)
            _write_side_files(plan, base_model, adapter_dir, Path(adapter).expanduser().absolute(), tmp)
            if verify:
                diff = _verify(base_dir, adapter_dir, tmp, device, plan, log)
    except OSError as e:
        raise RuntimeFailure(f"writing {out} failed: {e.strerror or e} ({e.filename or out})") from None
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


# --------------------------------------------------------------------------------------------------------------------
# input resolution and checks


def _parse_dtype(dtype: str) -> torch.dtype:
    try:
        return _OUT_DTYPES[str(dtype).lower()]
    except KeyError:
        raise UsageError(f"invalid dtype {dtype!r}: use auto, bfloat16, float16 or float32") from None


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"invalid device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested for verification but CUDA is not available (use --device cpu)")


def _resolve_adapter_dir(adapter: Path) -> Path:
    adapter = adapter.expanduser().absolute()
    if not adapter.exists():
        raise UsageError(f"adapter directory {adapter} does not exist")
    if not adapter.is_dir():
        raise UsageError(f"adapter {adapter} is not a directory (expected a run dir or a PEFT adapter dir)")
    final = adapter / "final"
    if (final / ADAPTER_CONFIG).is_file():
        return final
    if (adapter / ADAPTER_CONFIG).is_file():
        return adapter
    where = f"{adapter}" + (f" (nor in {final})" if final.is_dir() else "")
    raise UsageError(f"missing {ADAPTER_CONFIG} in {where}: not a PEFT adapter directory")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"output path {out} exists and is not a directory")
        if not overwrite:
            raise UsageError(f"output directory {out} already exists (use --overwrite to replace it)")
    if not out.parent.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {out.parent}: {e.strerror or e}") from None
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"output folder {out.parent} is not writable")


def _check_not_overlapping(out: Path, inputs: Iterable[Path]) -> None:
    o = out.resolve()
    for p in inputs:
        r = p.resolve()
        if o == r or o in r.parents:
            raise UsageError(f"output directory {out} would replace the input {p}; choose another --out")


def _check_disk_space(folder: Path, nbytes: int) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    need = int(nbytes * 1.02) + 50 * 2**20
    if free < need:
        raise RuntimeFailure(
            f"not enough disk space in {folder}: the merged model needs about {_fmt_bytes(need)}, "
            f"{_fmt_bytes(free)} free"
        )


def _resolve_base(spec: str, revision: str | None, *, explicit: bool) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.exists():
        raise UsageError(f"base model {spec} is not a directory")
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", spec) is not None
    if not looks_like_hub_id:
        hint = "" if explicit else " (base_model_name_or_path in adapter_config.json); pass --base PATH"
        raise UsageError(f"base model directory {spec} does not exist{hint}")
    return _snapshot_base(spec, revision)


def _snapshot_base(repo_id: str, revision: str | None) -> Path:
    """Resolve a hub id to a local snapshot: from the cache first, else download (config, tokenizer, safetensors)."""
    import huggingface_hub

    meta_patterns = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]

    def fetch(patterns: list[str], required: list[str]) -> Path:
        last: Exception | None = None
        for local_only in (True, False):
            try:
                snap = Path(
                    huggingface_hub.snapshot_download(
                        repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_only
                    )
                )
            except Exception as e:  # noqa: BLE001 - any hub/network error means "not available"
                last = e
                continue
            if all((snap / f).is_file() for f in required) or not local_only:
                return snap  # a partial cache falls through to a download
        raise UsageError(
            f"base model {repo_id!r} could not be found locally nor downloaded ({type(last).__name__}); "
            "pass --base PATH to a local copy of the model the adapter was trained on"
        ) from None

    snap = fetch(meta_patterns, ["config.json"])
    if not (snap / "config.json").is_file():
        raise UsageError(f"base model {repo_id!r} has no config.json; pass --base PATH to a Hugging Face model folder")
    if (snap / SAFE_INDEX).is_file():
        try:
            files = sorted(set(json.loads((snap / SAFE_INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"base model {repo_id!r}: {SAFE_INDEX} is not a valid index") from None
    elif (snap / "pytorch_model.bin.index.json").is_file():
        files = []
    else:
        files = [SAFE_SINGLE]
    if files:
        try:
            snap = fetch(files, files)
        except UsageError:
            if files != [SAFE_SINGLE]:
                raise
    if not any((snap / f).is_file() for f in (SAFE_SINGLE, SAFE_INDEX)):
        raise UsageError(
            f"base model {repo_id!r} has no safetensors weights (only .bin?); merging streams safetensors only - "
            "convert the base with save_pretrained(safe_serialization=True) and pass --base PATH"
        )
    return snap


# --------------------------------------------------------------------------------------------------------------------
# base model


class _BaseCheckpoint:
    def __init__(self, path: Path) -> None:
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise UsageError(f"base model {path} has no config.json (not a Hugging Face model folder)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise UsageError(f"{cfg_path}: invalid JSON ({e})") from None
        self.files = self._weight_files()
        self.entries: dict[str, st.TensorEntry] = {}
        for f in self.files:
            for name, entry in st.read_header(f).items():
                if name in self.entries:
                    raise UsageError(f"base model {path}: tensor {name} appears in two shards")
                self.entries[name] = entry
        if not self.entries:
            raise UsageError(f"base model {path} has no tensors")

    def _weight_files(self) -> list[Path]:
        index = self.path / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{index}: not a valid safetensors index (no weight_map)") from None
            files = list(dict.fromkeys(weight_map.values()))
            for f in files:
                if not (self.path / f).is_file():
                    raise UsageError(f"base shard {self.path / f} listed in {SAFE_INDEX} is missing")
            return [self.path / f for f in files]
        if (self.path / SAFE_SINGLE).is_file():
            return [self.path / SAFE_SINGLE]
        if any((self.path / b).is_file() for b in BIN_FILES):
            raise UsageError(
                f"base model {self.path} has only .bin weights; merging streams safetensors only - convert it with "
                "save_pretrained(safe_serialization=True) first"
            )
        raise UsageError(f"base model {self.path} has no {SAFE_SINGLE} or {SAFE_INDEX}")

    def sub_configs(self) -> list[dict]:
        """The config and its nested text config (where multimodal models keep vocab size, dtype, tying)."""
        cfgs = [self.config]
        for key in ("text_config", "language_config", "llm_config"):
            if isinstance(self.config.get(key), dict):
                cfgs.append(self.config[key])
        return cfgs

    def check_not_quantized(self) -> None:
        for cfg in self.sub_configs():
            q = cfg.get("quantization_config")
            if q:
                method = q.get("quant_method", "quantized") if isinstance(q, dict) else "quantized"
                raise UsageError(
                    f"base model {self.path} is quantized ({method}); merge into the original 16-bit base instead "
                    "(pass --base with the unquantized model)"
                )

    def config_value(self, key: str, default=None):
        for cfg in self.sub_configs():
            if key in cfg and cfg[key] is not None:
                return cfg[key]
        return default

    def tied(self) -> bool:
        # transformers' PretrainedConfig default is True
        return bool(self.config_value("tie_word_embeddings", True))

    def resolve(self, name: str) -> str | None:
        """Map an adapter-side parameter name to the base checkpoint's name."""
        if name in self.entries:
            return name
        head, _, rest = name.partition(".")
        if rest and rest in self.entries:  # adapter made on XForCausalLM, base saved from the bare model (gpt2)
            return rest
        for prefix in {k.split(".", 1)[0] for k in self.entries if "." in k}:
            if f"{prefix}.{name}" in self.entries:
                return f"{prefix}.{name}"
        return None

    def output_embedding(self, vocab: int | None, embed_key: str | None) -> str | None:
        """The stored output embedding (lm_head), if the checkpoint has one."""
        hits = [
            k
            for k, e in self.entries.items()
            if k != embed_key
            and k.endswith(".weight")
            and k.rsplit(".", 2)[-2] in _OUT_EMBEDDING_MODULES
            and len(e.shape) == 2
            and (vocab is None or e.shape[0] == vocab)
        ]
        return hits[0] if len(hits) == 1 else None

    def input_embedding(self) -> str | None:
        vocab = self.config_value("vocab_size")
        for suffix in _IN_EMBEDDING_SUFFIXES:
            hits = [k for k in self.entries if k == suffix or k.endswith("." + suffix)]
            if len(hits) == 1:
                return hits[0]
        hits = [
            k
            for k, e in self.entries.items()
            if len(e.shape) == 2 and e.shape[0] == vocab and k.rsplit(".", 2)[-2] not in _OUT_EMBEDDING_MODULES
        ]
        return hits[0] if len(hits) == 1 else None


# --------------------------------------------------------------------------------------------------------------------
# adapter


@dataclass
class _AdapterState:
    dir: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    weights_file: Path


def _read_adapter(adapter_dir: Path) -> _AdapterState:
    cfg_path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise UsageError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{cfg_path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UsageError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be merged")
    for key, what in _UNSUPPORTED_FIELDS.items():
        if config.get(key):
            raise UsageError(f"{cfg_path}: {what} cannot be merged into plain weights")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "mica":
        raise UsageError(f"{cfg_path}: MiCA (init_lora_weights='mica') cannot be merged by neftune merge")

    weights = next((adapter_dir / w for w in ADAPTER_WEIGHTS if (adapter_dir / w).is_file()), None)
    if weights is None:
        raise UsageError(f"missing {ADAPTER_WEIGHTS[0]} (or {ADAPTER_WEIGHTS[1]}) in {adapter_dir}")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(weights))
        else:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file
        raise UsageError(f"{weights}: cannot read adapter weights ({type(e).__name__}: {e})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UsageError(f"{weights}: expected a mapping of tensor names to tensors")
    if not tensors:
        raise UsageError(f"{weights}: the adapter holds no tensors")
    return _AdapterState(adapter_dir, config, tensors, weights)


_LORA_RE = re.compile(
    r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<name>(?!(?:weight|bias)$)[^.]+))?(?:\.(?P<param>weight|bias))?$"
)


@dataclass
class _LoraModule:
    module: str
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    B_bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    embedding: bool = False
    keys: dict[str, str] = field(default_factory=dict)  # part -> adapter key (for messages)
    r: int = 0
    scaling: float = 0.0
    fan_in_fan_out: bool = False


@dataclass
class _Replacement:
    tensor: torch.Tensor
    key: str  # adapter key
    kind: str  # "modules_to_save" | "base_layer" | "plain"


def _strip_prefix(key: str) -> str:
    for p in ("base_model.model.", "base_model."):
        if key.startswith(p):
            return key[len(p) :]
    return key


def _parse_adapter_keys(state: _AdapterState) -> tuple[dict[str, _LoraModule], dict[str, _Replacement]]:
    loras: dict[str, _LoraModule] = {}
    repl: dict[str, _Replacement] = {}
    names: set[str] = set()
    wfile = state.weights_file.name
    for key, tensor in state.tensors.items():
        k = _strip_prefix(key)
        m = _LORA_RE.match(k)
        if m and not (m.group("kind").startswith("lora_embedding") and m.group("param")):
            kind, param = m.group("kind"), m.group("param")
            if m.group("name"):
                names.add(m.group("name"))
            lm = loras.setdefault(m.group("mod"), _LoraModule(m.group("mod")))
            part = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}.get(kind, "mag")
            if kind == "lora_B" and param == "bias":
                part = "B_bias"
            elif kind in ("lora_A",) and param == "bias":
                raise UsageError(f"{wfile}: unexpected tensor {key} (lora_A has no bias)")
            if part in lm.keys:
                raise UsageError(f"{wfile}: {key} and {lm.keys[part]} are the same LoRA tensor (several adapters?)")
            lm.keys[part] = key
            setattr(lm, part if part != "mag" else "magnitude", tensor)
            if kind.startswith("lora_embedding"):
                lm.embedding = True
            continue
        if ".original_module." in k:
            continue  # peft's untouched copy of a modules_to_save module: the base already has it
        mts = re.match(r"^(?P<mod>.+)\.modules_to_save\.(?:(?P<name>default)\.)?(?P<param>.+)$", k)
        if mts:
            if mts.group("name"):
                names.add(mts.group("name"))
            target, kind = f"{mts.group('mod')}.{mts.group('param')}", "modules_to_save"
        elif ".base_layer." in k:
            target, kind = k.replace(".base_layer.", "."), "base_layer"
        elif "trainable_tokens" in k or ".token_adapter." in k:
            raise UsageError(f"{wfile}: {key} is a trainable-tokens tensor, which neftune merge does not support")
        else:
            # peft >= 0.13 saves modules_to_save copies under the plain name; other plain keys are copies that
            # load into the base tensor itself (resized embeddings, biases trained with bias="all")
            module = k.rsplit(".", 1)[0]
            mts_names = state.config.get("modules_to_save") or []
            is_mts = any(module == m or module.endswith("." + m) for m in mts_names)
            target, kind = k, "modules_to_save" if is_mts else "plain"
        if target in repl:
            # peft saves a resized modules_to_save module twice (wrapper copy and embedding layer): equal copies
            prev = repl[target]
            if prev.tensor.shape != tensor.shape or not torch.equal(prev.tensor, tensor.to(prev.tensor.dtype)):
                raise UsageError(f"{wfile}: {key} and {prev.key} both replace {target} with different values")
            if kind == "modules_to_save":
                prev.kind = kind
            continue
        repl[target] = _Replacement(tensor, key, kind)
    if len(names) > 1:
        raise UsageError(f"{wfile}: holds several adapters ({', '.join(sorted(names))}); save one adapter per folder")
    for lm in loras.values():
        for part in ("A", "B"):
            if getattr(lm, part) is None:
                other = next(iter(lm.keys.values()))
                raise UsageError(f"{wfile}: {other} has no matching lora_{part} tensor")
        if lm.A.dim() != 2 or lm.B.dim() != 2 or lm.A.shape[0] != lm.B.shape[1]:
            raise UsageError(
                f"{wfile}: {lm.keys['A']} {tuple(lm.A.shape)} and {lm.keys['B']} {tuple(lm.B.shape)} "
                "are not a LoRA pair (conv LoRA is not supported)"
            )
        if lm.magnitude is not None and not state.config.get("use_dora"):
            raise UsageError(f"{wfile}: {lm.keys['mag']} is a DoRA tensor but use_dora is not set in the config")
        if state.config.get("use_dora") and lm.magnitude is None:
            raise UsageError(f"{wfile}: use_dora is set but {lm.module} has no lora_magnitude_vector")
    return loras, repl


def _pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key: the first pattern key matching the end of the module name wins."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


# --------------------------------------------------------------------------------------------------------------------
# planning


@dataclass
class _Output:
    name: str  # output tensor name
    st_dtype: str
    shape: tuple[int, ...]
    src: st.TensorEntry | None  # base tensor (None: only from the replacement)
    replacement: _Replacement | None = None
    lora: _LoraModule | None = None
    bias_lora: _LoraModule | None = None  # lora_B.bias added to this (bias) tensor

    @property
    def modified(self) -> bool:
        return self.replacement is not None or self.lora is not None or self.bias_lora is not None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * st.ST_DTYPES[self.st_dtype][1]


@dataclass
class _Plan:
    outputs: list[_Output]
    shards: list[list[_Output]]
    shard_names: list[str]
    out_dtype: torch.dtype
    dtype_name: str
    config: dict  # output config.json
    n_lora: int
    n_merged: int
    n_replaced: int
    total_bytes: int
    new_vocab: int | None
    notes: list[str]


def _plan(state: _AdapterState, base: _BaseCheckpoint, out_dtype: torch.dtype | None, shard_limit: int) -> _Plan:
    cfg = state.config
    wfile = state.weights_file.name
    loras, repl = _parse_adapter_keys(state)
    notes: list[str] = []
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "corda", "loftq"):
        notes.append(
            f"note: the adapter was initialised with {init!r}: merging is only right into the base it was trained on "
            "(for PiSSA/OLoRA/CorDA the residual base saved at init, unless the adapter was converted to plain LoRA)"
        )

    out_dtype = out_dtype or _auto_dtype(base)
    out_st = _TORCH_TO_ST[out_dtype]

    def out_st_dtype(st: str) -> str:
        return out_st if st in _FLOAT_ST else st

    mismatch = "is --base the model this adapter was trained on?"
    embed_key = base.input_embedding()
    vocab = base.config_value("vocab_size") or (base.entries[embed_key].shape[0] if embed_key else None)
    stored_out = base.output_embedding(vocab, embed_key)
    tied = base.tied() and embed_key is not None

    # Assign every adapter target to a base tensor. The output embedding of a tied model is usually not stored: a
    # target there becomes a "virtual" tensor derived from the input embedding.
    virtual: dict[str, str] = {}

    def target(param: str, adapter_key: str) -> str:
        found = base.resolve(param)
        if found is not None:
            return found
        module = param.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if tied and stored_out is None and param.endswith(".weight") and module in _OUT_EMBEDDING_MODULES:
            virtual[param] = embed_key
            return param
        raise UsageError(
            f"{wfile}: {adapter_key} targets {param}, which is not in the base model {base.path} - {mismatch}"
        )

    repl_by_base: dict[str, _Replacement] = {}
    for param, r in repl.items():
        name = target(param, r.key)
        if name in repl_by_base:
            raise UsageError(f"{wfile}: {r.key} and {repl_by_base[name].key} both replace {name}")
        repl_by_base[name] = r
    lora_by_base: dict[str, _LoraModule] = {}
    bias_by_base: dict[str, _LoraModule] = {}
    for module, lm in loras.items():
        name = target(module + ".weight", lm.keys["A"])
        if name in lora_by_base:
            raise UsageError(f"{wfile}: {lm.keys['A']} and {lora_by_base[name].keys['A']} both target {name}")
        lora_by_base[name] = lm
        if lm.B_bias is not None:
            bias_key = base.resolve(module + ".bias")
            if bias_key is None:
                raise UsageError(
                    f"{wfile}: {lm.keys['B_bias']} (lora_bias) needs {module}.bias, which the base model does not have"
                )
            bias_by_base[bias_key] = lm
    if len(virtual) > 1:
        raise UsageError(f"{wfile}: targets several output embeddings ({', '.join(virtual)}) of a tied model")

    # Tied model whose output embedding is not stored: when the adapter touches either embedding, follow what the
    # PeftModel computes. Plain copies (peft's saved resized embeddings, LoRA base_layer copies) load into the one
    # shared matrix; modules_to_save copies and LoRA layers act on one side only.
    out_name = next(iter(virtual), None)
    if tied and stored_out is None and out_name is None and (embed_key in repl_by_base or embed_key in lora_by_base):
        out_name = _output_embedding_name(base.path) or "lm_head.weight"
        virtual[out_name] = embed_key
    if out_name is not None:
        e_r, o_r = repl_by_base.get(embed_key), repl_by_base.get(out_name)
        shared = next((r for r in (e_r, o_r) if r is not None and r.kind != "modules_to_save"), None)
        if shared is not None:
            for name, r in ((embed_key, e_r), (out_name, o_r)):
                if r is None or r.kind != "modules_to_save":
                    repl_by_base[name] = shared

    def base_shape(name: str) -> tuple[int, ...]:
        return base.entries[virtual.get(name, name)].shape

    # replacement shapes: equal to the base, or a resized vocabulary (first dim) of an embedding / output layer
    resized: dict[str, int] = {}
    for name, r in repl_by_base.items():
        want, have = tuple(r.tensor.shape), base_shape(name)
        if want == have:
            continue
        vocab_like = len(want) == len(have) >= 1 and want[1:] == have[1:] and have[0] == vocab
        if vocab_like and r.kind == "base_layer":
            # a frozen copy of a LoRA-targeted embedding: a resize keeps the old rows, another base does not
            n = min(want[0], have[0])
            reader = st.Reader()
            try:
                base_rows = reader.read(base.entries[virtual.get(name, name)])[:n]
            finally:
                reader.close()
            vocab_like = torch.equal(base_rows.to(r.tensor.dtype), r.tensor[:n])
        if not vocab_like:
            raise UsageError(f"{name}: adapter expects {_shape(want)} but base has {_shape(have)} - {mismatch}")
        resized[name] = want[0]

    def effective_shape(name: str) -> tuple[int, ...]:
        r = repl_by_base.get(name)
        return tuple(r.tensor.shape) if r is not None else base_shape(name)

    _check_loras(cfg, wfile, lora_by_base, bias_by_base, base, effective_shape, mismatch)
    for name in list(lora_by_base) + list(repl_by_base):
        src = base.entries.get(virtual.get(name, name))
        if src is not None and src.dtype not in _FLOAT_ST:
            raise UsageError(f"{name}: base tensor is {src.dtype}, not floating point (a quantized base?)")

    # outputs, in base order
    def make(name: str, src: st.TensorEntry) -> _Output:
        o = _Output(name, out_st_dtype(src.dtype), effective_shape(name), src)
        o.replacement, o.lora, o.bias_lora = repl_by_base.get(name), lora_by_base.get(name), bias_by_base.get(name)
        return o

    outputs = [make(name, entry) for name, entry in base.entries.items()]
    by_name = {o.name: o for o in outputs}

    # Tied embeddings: keep them tied when both sides end up equal, else write both and untie (peft's own
    # merge_and_unload would fold a one-sided LoRA into the shared matrix, changing the other side too).
    config = json.loads(json.dumps(base.config))
    out_key = out_name or stored_out
    untie = False
    if tied and out_key is not None and (by_name[embed_key].modified or out_name or by_name[out_key].modified):
        out_o = make(out_name, base.entries[embed_key]) if out_name else by_name[out_key]
        reader = st.Reader()
        try:
            e_t = _produce(by_name[embed_key], reader, out_dtype)
            o_t = _produce(out_o, reader, out_dtype)
        finally:
            reader.close()
        same = _nearly_equal(e_t, o_t)
        del e_t, o_t
        if same:
            notes.append(f"tied embeddings: {embed_key} and {out_key} stay tied (the adapter changes both alike)")
        else:
            untie = True
            if out_name:
                outputs.insert(outputs.index(by_name[embed_key]) + 1, out_o)
                by_name[out_name] = out_o
            notes.append(
                f"tied embeddings: the adapter changes {embed_key} and {out_key} differently; writing both and "
                "setting tie_word_embeddings=false"
            )

    # vocabulary: every vocabulary-sized tensor must agree after the merge
    new_vocab = None
    if resized:
        vocab_names = set(resized) | {n for n in (embed_key, out_key) if n in by_name}
        sizes = {n: by_name[n].shape[0] for n in vocab_names if n in by_name}
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{k} has {v} rows" for k, v in sorted(sizes.items()))
            raise UsageError(f"the adapter resizes the vocabulary inconsistently ({detail}) - {mismatch}")
        size = next(iter(sizes.values()))
        if size != vocab:
            new_vocab = size
            _set_config(config, "vocab_size", size)
            notes.append(f"vocabulary resized by the adapter: vocab_size {vocab} -> {size}")
    if untie:
        _set_config(config, "tie_word_embeddings", False)
    for c in _sub_configs(config):
        c.pop("quantization_config", None)
    dtype_name = _ST_TO_NAME[out_st]
    for c in [c for c in _sub_configs(config) if "dtype" in c or "torch_dtype" in c] or [config]:
        if "torch_dtype" in c:
            c["torch_dtype"] = dtype_name
        if "dtype" in c or "torch_dtype" not in c:
            c["dtype"] = dtype_name

    # shards: greedy in base order, like transformers (a tensor larger than the limit gets a shard of its own)
    shards: list[list[_Output]] = []
    size = 0
    for o in outputs:
        if not shards or (size + o.nbytes > shard_limit and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    n = len(shards)
    shard_names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    return _Plan(
        outputs=outputs,
        shards=shards,
        shard_names=shard_names,
        out_dtype=out_dtype,
        dtype_name=dtype_name,
        config=config,
        n_lora=len(loras),
        n_merged=sum(1 for o in outputs if o.lora is not None or o.bias_lora is not None),
        n_replaced=sum(1 for o in outputs if o.replacement is not None),
        total_bytes=sum(o.nbytes for o in outputs),
        new_vocab=new_vocab,
        notes=notes,
    )


def _nearly_equal(a: torch.Tensor, b: torch.Tensor, rows: int = 4096) -> bool:
    """Equal up to fp32 matmul re-association (1e-6 relative), compared a few rows at a time (bounded memory)."""
    if a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    scale = max(1.0, max(a[i : i + rows].float().abs().max().item() for i in range(0, a.shape[0], rows)))
    return all(
        (a[i : i + rows].float() - b[i : i + rows].float()).abs().max().item() <= 1e-6 * scale
        for i in range(0, a.shape[0], rows)
    )


def _auto_dtype(base: _BaseCheckpoint) -> torch.dtype:
    """The base's config dtype, else the most common stored floating dtype."""
    name = str(base.config_value("dtype") or base.config_value("torch_dtype") or "").replace("torch.", "")
    if name in _OUT_DTYPES:
        return _OUT_DTYPES[name]
    stored = [e.dtype for e in base.entries.values() if e.dtype in ("F16", "BF16", "F32")]
    common = max(set(stored), key=stored.count) if stored else "F32"
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(common, torch.float32)


def _check_loras(cfg, wfile, lora_by_base, bias_by_base, base, effective_shape, mismatch) -> None:
    """Shapes, ranks, scalings and layouts of the LoRA modules against the (effective) base tensors."""
    fif_cfg = bool(cfg.get("fan_in_fan_out"))
    kinds: dict[str, str] | None = None
    for name, lm in lora_by_base.items():
        have = effective_shape(name)
        r_default = cfg.get("r") if cfg.get("r") is not None else lm.A.shape[0]
        r = int(_pattern_value(cfg.get("rank_pattern"), lm.module, r_default))
        alpha_default = cfg.get("lora_alpha") if cfg.get("lora_alpha") is not None else 8  # LoraConfig's default
        alpha = _pattern_value(cfg.get("alpha_pattern"), lm.module, alpha_default)
        if lm.A.shape[0] != r:
            raise UsageError(
                f"{wfile}: {lm.keys['A']} has rank {lm.A.shape[0]} but adapter_config.json says r={r} for {lm.module}"
            )
        lm.r = r
        lm.scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if len(have) != 2:
            raise UsageError(f"{name}: LoRA target is not a 2-D weight (base has {_shape(have)})")
        if lm.embedding:
            want = (lm.A.shape[1], lm.B.shape[0])
            if have != want:
                raise UsageError(f"{name}: adapter expects {_shape(want)} but base has {_shape(have)} - {mismatch}")
            mag_len = want[1]
        else:
            want = (lm.B.shape[0], lm.A.shape[1])
            direct, transposed = have == want, have == want[::-1]
            if direct and transposed:  # square: ask the model which layer type it is (Conv1D stores (in, out))
                if kinds is None:
                    kinds = _module_kinds(base.path) if (fif_cfg or _any_transposed(lora_by_base, base)) else {}
                kind = kinds.get(lm.module)
                lm.fan_in_fan_out = (kind == "Conv1D") if kind else fif_cfg
            elif direct or transposed:
                lm.fan_in_fan_out = transposed
            else:
                shown = want[::-1] if fif_cfg else want
                raise UsageError(f"{name}: adapter expects {_shape(shown)} but base has {_shape(have)} - {mismatch}")
            mag_len = want[0]
        if lm.magnitude is not None and tuple(lm.magnitude.shape) != (mag_len,):
            raise UsageError(
                f"{name}: DoRA magnitude {lm.keys['mag']} has shape {_shape(tuple(lm.magnitude.shape))}, "
                f"expected ({mag_len},) - {mismatch}"
            )
    for name, lm in bias_by_base.items():
        if base.entries[name].shape != tuple(lm.B_bias.shape):
            raise UsageError(
                f"{name}: adapter expects {_shape(tuple(lm.B_bias.shape))} but base has "
                f"{_shape(base.entries[name].shape)} - {mismatch}"
            )


def _sub_configs(config: dict) -> list[dict]:
    return [config] + [
        config[k] for k in ("text_config", "language_config", "llm_config") if isinstance(config.get(k), dict)
    ]


def _set_config(config: dict, key: str, value) -> None:
    hits = [c for c in _sub_configs(config) if key in c]
    for c in hits or [config]:
        c[key] = value


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _any_transposed(loras: dict[str, _LoraModule], base: _BaseCheckpoint) -> bool:
    for name, lm in loras.items():
        if not lm.embedding and name in base.entries:
            have, want = base.entries[name].shape, (lm.B.shape[0], lm.A.shape[1])
            if have != want and have == want[::-1]:
                return True
    return False


def _meta_model(base_dir: Path):
    """The model built on the meta device (no weights, no memory); None when that is not possible."""
    try:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(str(base_dir))
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 - custom architectures: callers fall back to conventions
        return None


def _output_embedding_name(base_dir: Path) -> str | None:
    model = _meta_model(base_dir)
    out = model.get_output_embeddings() if model is not None else None
    if out is None:
        return None
    return next((f"{name}.weight" for name, mod in model.named_modules() if mod is out), None)


def _module_kinds(base_dir: Path) -> dict[str, str]:
    """Layer class per module name, from the meta-device model; {} if it cannot be built."""
    model = _meta_model(base_dir)
    return {name: type(mod).__name__ for name, mod in model.named_modules()} if model is not None else {}


# --------------------------------------------------------------------------------------------------------------------
# merging


def _lora_delta(lm: _LoraModule) -> torch.Tensor:
    """scaling * B @ A in float32, laid out like the base weight (exactly peft's get_delta_weight arithmetic)."""
    A, B = lm.A.float(), lm.B.float()
    delta = B @ A
    if lm.embedding or lm.fan_in_fan_out:
        delta = delta.T
    return delta.mul_(lm.scaling)  # in place: same arithmetic as peft's `* scaling`, one full-size buffer less


def _apply_lora(w: torch.Tensor, lm: _LoraModule) -> torch.Tensor:
    """Merge one LoRA module into the float32 weight ``w`` (peft's merge, vanilla or DoRA)."""
    delta = _lora_delta(lm)
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


def _produce(o: _Output, reader: st.Reader, out_dtype: torch.dtype) -> torch.Tensor:
    """The final tensor for an output entry (only called for modified tensors or dtype casts)."""
    t = o.replacement.tensor if o.replacement is not None else reader.read(o.src)
    if o.lora is not None or o.bias_lora is not None:
        w = t.to(torch.float32, copy=True)
        if o.lora is not None:
            w = _apply_lora(w, o.lora)
        if o.bias_lora is not None:
            w += o.bias_lora.B_bias.float() * o.bias_lora.scaling
        # NaN/inf make the sum non-finite; the exact elementwise check (4x slower) only runs when it is
        if not math.isfinite(w.sum().item()) and not torch.isfinite(w).all():
            raise RuntimeFailure(f"{o.name}: merging the adapter produced NaN/inf values; the adapter is broken")
        t = w
    if o.st_dtype in _FLOAT_ST:
        t = t.to(st.ST_DTYPES[o.st_dtype][0])
    if tuple(t.shape) != o.shape:  # guarded by planning; never write a header that lies
        raise RuntimeError(f"internal error: {o.name} has shape {tuple(t.shape)}, planned {o.shape}")
    return t


def _write_model(plan: _Plan, base: _BaseCheckpoint, folder: Path, log: Callable[[str], None]) -> None:
    reader = st.Reader()
    weight_map: dict[str, str] = {}
    try:
        for i, (shard, fname) in enumerate(zip(plan.shards, plan.shard_names, strict=True)):
            items = []
            for o in shard:
                weight_map[o.name] = fname
                if not o.modified and o.src is not None and o.src.dtype == o.st_dtype:
                    writer = lambda f, e=o.src: reader.copy_to(e, f)  # noqa: E731
                else:
                    writer = lambda f, o=o: f.write(st.tensor_bytes(_produce(o, reader, plan.out_dtype)))  # noqa: E731
                items.append((o.name, o.st_dtype, o.shape, writer))
            try:
                st.write_shard(folder / fname, items, {"format": "pt"})
            except OSError as e:
                raise RuntimeFailure(f"writing {folder / fname} failed: {e.strerror or e}") from None
            merged = sum(1 for o in shard if o.lora is not None or o.bias_lora is not None)
            replaced = sum(1 for o in shard if o.replacement is not None)
            extra = f", {replaced} replaced" if replaced else ""
            log(
                f"shard {i + 1}/{len(plan.shards)}: {fname} ({len(shard)} tensors, {merged} merged{extra}, "
                f"{_fmt_bytes(sum(o.nbytes for o in shard))})"
            )
            gc.collect()
    finally:
        reader.close()
    if len(plan.shards) > 1:
        params = sum(math.prod(o.shape) for o in plan.outputs)
        index = {"metadata": {"total_parameters": params, "total_size": plan.total_bytes}, "weight_map": weight_map}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_side_files(plan: _Plan, base: _BaseCheckpoint, adapter_dir: Path, given: Path, folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    if (base.path / "generation_config.json").is_file():
        shutil.copyfile(base.path / "generation_config.json", folder / "generation_config.json")
    if plan.config.get("auto_map"):  # custom modeling code travels with the model
        for py in base.path.glob("*.py"):
            shutil.copyfile(py, folder / py.name)
    candidates = [adapter_dir, given, base.path]
    src = next((d for d in candidates if any((d / m).is_file() for m in TOKENIZER_MARKERS)), None)
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    for name in TOKENIZER_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, folder / name)


# --------------------------------------------------------------------------------------------------------------------
# verification


def _probe_ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.randint(0, vocab, _PROBE_SHAPE, generator=g)


def _verify(base_dir: Path, adapter_dir: Path, merged_dir: Path, device: str, plan: _Plan, log) -> float:
    """Max |logit diff| between base+adapter (peft, fp32) and the merged model (fp32) on a fixed probe batch."""
    import warnings

    import transformers
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from peft import PeftModel

                model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
                if plan.new_vocab is not None:
                    model.resize_token_embeddings(plan.new_vocab, mean_resizing=False)
                model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
                model.to(device).eval()
                vocab = model.get_input_embeddings().weight.shape[0]
                ids = _probe_ids(vocab).to(device)
                with torch.no_grad():
                    ref = model(input_ids=ids).logits.float().cpu()
            except Exception as e:  # noqa: BLE001
                raise RuntimeFailure(
                    f"verification could not run base+adapter with peft ({type(e).__name__}: {_first_line(e)}); "
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
                    f"({type(e).__name__}: {_first_line(e)})"
                ) from None
            finally:
                merged = None
                gc.collect()
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
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
    return diff


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
