"""Reading the adapter: find its folder, load adapter_config.json and the weights, group the LoRA tensors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neftune_cli.io import safetensors_io as st
from neftune_cli.io.errors import UsageError, first_line
from neftune_cli.merge.common import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# LoraConfig fields whose non-default value means the adapter is not a plain (mergeable) LoRA.
_UNSUPPORTED_FIELDS = {
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


def resolve_adapter_dir(adapter: Path) -> Path:
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
    if not final.exists():
        _refuse_unfinished_run(adapter)
    where = f"{adapter}" + (f" (nor in {final})" if final.is_dir() else "")
    raise UsageError(f"missing {ADAPTER_CONFIG} in {where}: not a PEFT adapter directory")


_RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "neftune-run.json")  # what only a `neftune train` run dir holds


def _refuse_unfinished_run(run: Path) -> None:
    """A training run dir without final/ (stopped early, or still training): point at its latest checkpoint."""
    from neftune_cli.train.checkpoint import RunDir

    rd = RunDir(run)
    if not any((run / name).exists() for name in _RUN_ENTRIES):
        return  # not one of our runs: the caller says what is missing
    latest = rd.latest_checkpoint()
    if latest is None:
        raise UsageError(f"{run} is a training run with no final/ and no complete checkpoint yet: nothing to merge")
    if not (latest / ADAPTER_CONFIG).is_file():
        raise UsageError(
            f"{run} is a training run with no final/ yet, and its latest checkpoint {latest} holds no LoRA adapter "
            "(finetune: full?): nothing to merge"
        )
    raise UsageError(
        f"{run} is a training run with no final/ yet (stopped early?); merge its latest checkpoint instead: "
        f"neftune merge {latest} --out ..."
    )


@dataclass
class AdapterState:
    dir: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    weights_file: Path


def read_adapter(adapter_dir: Path) -> AdapterState:
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
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        st.read_header(weights)  # the format checks, naming the file
        try:
            tensors = load_file(str(weights))
        except Exception:  # noqa: BLE001 - what the structural check cannot see (a dtype this build lacks, ...)
            raise UsageError(f"{weights}: not a valid safetensors file (truncated or corrupt)") from None
    else:
        try:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - corrupt or foreign file
            raise UsageError(f"{weights}: cannot read adapter weights ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UsageError(f"{weights}: expected a mapping of tensor names to tensors")
    if not tensors:
        raise UsageError(f"{weights}: the adapter holds no tensors")
    return AdapterState(adapter_dir, config, tensors, weights)


_LORA_RE = re.compile(
    r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<name>(?!(?:weight|bias)$)[^.]+))?(?:\.(?P<param>weight|bias))?$"
)


@dataclass
class LoraModule:
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
class Replacement:
    tensor: torch.Tensor
    key: str  # adapter key
    kind: str  # "modules_to_save" | "base_layer" | "plain"


def _strip_prefix(key: str) -> str:
    for p in ("base_model.model.", "base_model."):
        if key.startswith(p):
            return key[len(p) :]
    return key


def parse_adapter_keys(state: AdapterState) -> tuple[dict[str, LoraModule], dict[str, Replacement]]:
    loras: dict[str, LoraModule] = {}
    repl: dict[str, Replacement] = {}
    names: set[str] = set()
    wfile = state.weights_file.name
    for key, tensor in state.tensors.items():
        k = _strip_prefix(key)
        m = _LORA_RE.match(k)
        if m and not (m.group("kind").startswith("lora_embedding") and m.group("param")):
            kind, param = m.group("kind"), m.group("param")
            if m.group("name"):
                names.add(m.group("name"))
            lm = loras.setdefault(m.group("mod"), LoraModule(m.group("mod")))
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
        repl[target] = Replacement(tensor, key, kind)
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


def pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key: the first pattern key matching the end of the module name wins."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default
