"""Inspecting the base: resolve a folder or hub id, read every shard's safetensors header, find the embeddings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from neftune_cli.io import safetensors_io as st
from neftune_cli.io.errors import UsageError
from neftune_cli.merge.common import (
    BIN_FILES,
    IN_EMBEDDING_SUFFIXES,
    OUT_DTYPES,
    OUT_EMBEDDING_MODULES,
    SAFE_INDEX,
    SAFE_SINGLE,
    sub_configs,
)


def resolve_base(spec: str, revision: str | None, *, explicit: bool) -> Path:
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


def same_base(given: str, recorded: str) -> bool:
    """Whether ``--base`` names the base recorded in adapter_config.json (base_model_name_or_path).

    Two local folders are the same when they resolve to the same folder; two hub ids when they are equal (hub ids
    ignore case). A local folder and a name that is not a local folder here (a hub id, or a path on the machine
    the adapter was trained on) are taken as the same when the folder is that repo's hub-cache snapshot or has the
    same last name (``/models/Llama-2-7b-hf`` for ``meta-llama/Llama-2-7b-hf``): a local copy, not another model.
    """
    g, r = Path(given).expanduser(), Path(recorded).expanduser()
    g_dir, r_dir = g.is_dir(), r.is_dir()
    if g_dir and r_dir:
        return g.resolve() == r.resolve()
    if not g_dir and not r_dir:
        return given.strip().rstrip("/").casefold() == recorded.strip().rstrip("/").casefold()
    local, name = (g.resolve(), recorded) if g_dir else (r.resolve(), given)
    name = name.strip().rstrip("/")
    if "models--" + name.replace("/", "--") in local.parts:  # huggingface_hub cache: models--org--name/snapshots/..
        return True
    return local.name.casefold() == Path(name).name.casefold()


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


class BaseCheckpoint:
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
        return sub_configs(self.config)

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
            and k.rsplit(".", 2)[-2] in OUT_EMBEDDING_MODULES
            and len(e.shape) == 2
            and (vocab is None or e.shape[0] == vocab)
        ]
        return hits[0] if len(hits) == 1 else None

    def input_embedding(self) -> str | None:
        vocab = self.config_value("vocab_size")
        for suffix in IN_EMBEDDING_SUFFIXES:
            hits = [k for k in self.entries if k == suffix or k.endswith("." + suffix)]
            if len(hits) == 1:
                return hits[0]
        hits = [
            k
            for k, e in self.entries.items()
            if len(e.shape) == 2 and e.shape[0] == vocab and k.rsplit(".", 2)[-2] not in OUT_EMBEDDING_MODULES
        ]
        return hits[0] if len(hits) == 1 else None


def auto_dtype(base: BaseCheckpoint) -> torch.dtype:
    """The base's config dtype, else the most common stored floating dtype."""
    name = str(base.config_value("dtype") or base.config_value("torch_dtype") or "").replace("torch.", "")
    if name in OUT_DTYPES:
        return OUT_DTYPES[name]
    stored = [e.dtype for e in base.entries.values() if e.dtype in ("F16", "BF16", "F32")]
    common = max(set(stored), key=stored.count) if stored else "F32"
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(common, torch.float32)


def meta_model(base_dir: Path):
    """The model built on the meta device (no weights, no memory); None when that is not possible."""
    try:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(str(base_dir))
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 - custom architectures: callers fall back to conventions
        return None


def output_embedding_name(base_dir: Path) -> str | None:
    model = meta_model(base_dir)
    out = model.get_output_embeddings() if model is not None else None
    if out is None:
        return None
    return next((f"{name}.weight" for name, mod in model.named_modules() if mod is out), None)


def module_kinds(base_dir: Path) -> dict[str, str]:
    """Layer class per module name, from the meta-device model; {} if it cannot be built."""
    model = meta_model(base_dir)
    return {name: type(mod).__name__ for name, mod in model.named_modules()} if model is not None else {}
