"""Planning: map every adapter tensor onto a base tensor, check shapes, and lay out the output tensors and shards."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from neftune_cli.io import safetensors_io as st
from neftune_cli.io.errors import UsageError
from neftune_cli.merge.adapter import AdapterState, LoraModule, Replacement, parse_adapter_keys, pattern_value
from neftune_cli.merge.base import BaseCheckpoint, auto_dtype, module_kinds, output_embedding_name
from neftune_cli.merge.common import (
    FLOAT_ST,
    OUT_EMBEDDING_MODULES,
    SAFE_SINGLE,
    ST_TO_NAME,
    TORCH_TO_ST,
    fmt_shape,
    set_config,
    sub_configs,
)
from neftune_cli.merge.experts import ParamLora, locate_param_loras
from neftune_cli.merge.tensors import OutputTensor, produce


@dataclass
class Plan:
    outputs: list[OutputTensor]
    shards: list[list[OutputTensor]]
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


_MISMATCH = "is --base the model this adapter was trained on?"
_INIT_NOTE_METHODS = ("pissa", "olora", "corda", "loftq")


@dataclass
class _Targets:
    """Where each adapter tensor lands in the base: replacements, LoRA weights and lora_bias biases, by base name.

    The output embedding of a tied model is usually not stored: a target there becomes a "virtual" tensor derived
    from the input embedding (``virtual`` maps it to that embedding's name).
    """

    base: BaseCheckpoint
    wfile: str
    embed_key: str | None
    vocab: int | None
    stored_out: str | None
    tied: bool
    virtual: dict[str, str] = field(default_factory=dict)
    repl: dict[str, Replacement] = field(default_factory=dict)
    loras: dict[str, LoraModule] = field(default_factory=dict)
    biases: dict[str, LoraModule] = field(default_factory=dict)
    params: dict[str, ParamLora] = field(default_factory=dict)  # pieces of LoRA-adapted raw parameters
    out_name: str | None = None  # the virtual output embedding, if any

    def target(self, param: str, adapter_key: str) -> str:
        found = self.base.resolve(param)
        if found is not None:
            return found
        module = param.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if self.tied and self.stored_out is None and param.endswith(".weight") and module in OUT_EMBEDDING_MODULES:
            self.virtual[param] = self.embed_key
            return param
        raise UsageError(
            f"{self.wfile}: {adapter_key} targets {param}, which is not in the base model {self.base.path} - "
            f"{_MISMATCH}"
        )

    def base_shape(self, name: str) -> tuple[int, ...]:
        return self.base.entries[self.virtual.get(name, name)].shape

    def effective_shape(self, name: str) -> tuple[int, ...]:
        r = self.repl.get(name)
        return tuple(r.tensor.shape) if r is not None else self.base_shape(name)


def build_plan(state: AdapterState, base: BaseCheckpoint, out_dtype: torch.dtype | None, shard_limit: int) -> Plan:
    cfg = state.config
    loras, repl = parse_adapter_keys(state)
    n_lora = len(loras)
    notes = _init_notes(cfg)
    out_dtype = out_dtype or auto_dtype(base)
    out_st = TORCH_TO_ST[out_dtype]

    param_loras = locate_param_loras(state, base, loras, _MISMATCH)
    t = _assign_targets(base, state.weights_file.name, loras, repl)
    _assign_param_pieces(t, param_loras)
    _follow_tied_embeddings(t)
    resized = _check_replacement_shapes(t)
    _check_loras(cfg, t.wfile, t.loras, t.biases, base, t.effective_shape, _MISMATCH)
    _check_floating(t)

    outputs = [_make_output(t, name, entry, out_st) for name, entry in base.entries.items()]  # in base order
    by_name = {o.name: o for o in outputs}
    out_key = t.out_name or t.stored_out
    untie = _resolve_ties(t, outputs, by_name, out_key, out_st, out_dtype, notes)
    config = json.loads(json.dumps(base.config))
    new_vocab = _new_vocab(t, resized, by_name, out_key, config, notes)
    dtype_name = _output_config(config, untie, out_st)
    shards, shard_names = _shard(outputs, shard_limit)

    return Plan(
        outputs=outputs,
        shards=shards,
        shard_names=shard_names,
        out_dtype=out_dtype,
        dtype_name=dtype_name,
        config=config,
        n_lora=n_lora,
        n_merged=sum(1 for o in outputs if o.merged),
        n_replaced=sum(1 for o in outputs if o.replacement is not None),
        total_bytes=sum(o.nbytes for o in outputs),
        new_vocab=new_vocab,
        notes=notes,
    )


def _init_notes(cfg: dict) -> list[str]:
    notes: list[str] = []
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().split("_")[0] in _INIT_NOTE_METHODS:
        notes.append(
            f"note: the adapter was initialised with {init!r}: merging is only right into the base it was trained on "
            "(for PiSSA/OLoRA/CorDA the residual base saved at init, unless the adapter was converted to plain LoRA)"
        )
    return notes


def _assign_targets(
    base: BaseCheckpoint, wfile: str, loras: dict[str, LoraModule], repl: dict[str, Replacement]
) -> _Targets:
    """Assign every adapter target to a base tensor."""
    embed_key = base.input_embedding()
    vocab = base.config_value("vocab_size") or (base.entries[embed_key].shape[0] if embed_key else None)
    stored_out = base.output_embedding(vocab, embed_key)
    t = _Targets(base, wfile, embed_key, vocab, stored_out, tied=base.tied() and embed_key is not None)
    for param, r in repl.items():
        name = t.target(param, r.key)
        if name in t.repl:
            raise UsageError(f"{wfile}: {r.key} and {t.repl[name].key} both replace {name}")
        t.repl[name] = r
    for module, lm in loras.items():
        name = t.target(module + ".weight", lm.keys["A"])
        if name in t.loras:
            raise UsageError(f"{wfile}: {lm.keys['A']} and {t.loras[name].keys['A']} both target {name}")
        t.loras[name] = lm
        if lm.B_bias is not None:
            bias_key = base.resolve(module + ".bias")
            if bias_key is None:
                raise UsageError(
                    f"{wfile}: {lm.keys['B_bias']} (lora_bias) needs {module}.bias, which the base model does not have"
                )
            t.biases[bias_key] = lm
    if len(t.virtual) > 1:
        raise UsageError(f"{wfile}: targets several output embeddings ({', '.join(t.virtual)}) of a tied model")
    return t


def _assign_param_pieces(t: _Targets, param_loras: list[ParamLora]) -> None:
    for pl in param_loras:
        for name in pl.pieces:
            other = t.loras.get(name) or t.repl.get(name)
            if other is not None or name in t.params:
                raise UsageError(f"{t.wfile}: {pl.lora.keys['A']} and another adapter tensor both change {name}")
            t.params[name] = pl


def _follow_tied_embeddings(t: _Targets) -> None:
    """Tied model whose output embedding is not stored: when the adapter touches either embedding, follow what the
    PeftModel computes. Plain copies (peft's saved resized embeddings, LoRA base_layer copies) load into the one
    shared matrix; modules_to_save copies and LoRA layers act on one side only."""
    embed_key = t.embed_key
    out_name = next(iter(t.virtual), None)
    if t.tied and t.stored_out is None and out_name is None and (embed_key in t.repl or embed_key in t.loras):
        out_name = output_embedding_name(t.base.path) or "lm_head.weight"
        t.virtual[out_name] = embed_key
    t.out_name = out_name
    if out_name is not None:
        e_r, o_r = t.repl.get(embed_key), t.repl.get(out_name)
        shared = next((r for r in (e_r, o_r) if r is not None and r.kind != "modules_to_save"), None)
        if shared is not None:
            for name, r in ((embed_key, e_r), (out_name, o_r)):
                if r is None or r.kind != "modules_to_save":
                    t.repl[name] = shared


def _check_replacement_shapes(t: _Targets) -> dict[str, int]:
    """Replacement shapes: equal to the base, or a resized vocabulary (first dim) of an embedding / output layer.
    Returns the resized ones: base name -> new first dimension."""
    resized: dict[str, int] = {}
    for name, r in t.repl.items():
        want, have = tuple(r.tensor.shape), t.base_shape(name)
        if want == have:
            continue
        vocab_like = len(want) == len(have) >= 1 and want[1:] == have[1:] and have[0] == t.vocab
        if vocab_like and r.kind == "base_layer":
            # a frozen copy of a LoRA-targeted embedding: a resize keeps the old rows, another base does not
            n = min(want[0], have[0])
            reader = st.Reader()
            try:
                base_rows = reader.read(t.base.entries[t.virtual.get(name, name)])[:n]
            finally:
                reader.close()
            vocab_like = torch.equal(base_rows.to(r.tensor.dtype), r.tensor[:n])
        if not vocab_like:
            raise UsageError(f"{name}: adapter expects {fmt_shape(want)} but base has {fmt_shape(have)} - {_MISMATCH}")
        resized[name] = want[0]
    return resized


def _check_floating(t: _Targets) -> None:
    for name in list(t.loras) + list(t.repl) + list(t.params):
        src = t.base.entries.get(t.virtual.get(name, name))
        if src is not None and src.dtype not in FLOAT_ST:
            raise UsageError(f"{name}: base tensor is {src.dtype}, not floating point (a quantized base?)")


def _make_output(t: _Targets, name: str, src: st.TensorEntry, out_st: str) -> OutputTensor:
    o = OutputTensor(name, out_st if src.dtype in FLOAT_ST else src.dtype, t.effective_shape(name), src)
    o.replacement, o.lora, o.bias_lora = t.repl.get(name), t.loras.get(name), t.biases.get(name)
    o.param_lora = t.params.get(name)
    return o


def _resolve_ties(
    t: _Targets,
    outputs: list[OutputTensor],
    by_name: dict[str, OutputTensor],
    out_key: str | None,
    out_st: str,
    out_dtype: torch.dtype,
    notes: list[str],
) -> bool:
    """Tied embeddings: keep them tied when both sides end up equal, else write both and untie (peft's own
    merge_and_unload would fold a one-sided LoRA into the shared matrix, changing the other side too).
    Returns whether to untie; a virtual output embedding that must be written is inserted into ``outputs``."""
    embed_key, out_name = t.embed_key, t.out_name
    if not (t.tied and out_key is not None and (by_name[embed_key].modified or out_name or by_name[out_key].modified)):
        return False
    out_o = _make_output(t, out_name, t.base.entries[embed_key], out_st) if out_name else by_name[out_key]
    reader = st.Reader()
    try:
        e_t = produce(by_name[embed_key], reader, out_dtype)
        o_t = produce(out_o, reader, out_dtype)
    finally:
        reader.close()
    same = _nearly_equal(e_t, o_t)
    del e_t, o_t
    if same:
        notes.append(f"tied embeddings: {embed_key} and {out_key} stay tied (the adapter changes both alike)")
        return False
    if out_name:
        outputs.insert(outputs.index(by_name[embed_key]) + 1, out_o)
        by_name[out_name] = out_o
    notes.append(
        f"tied embeddings: the adapter changes {embed_key} and {out_key} differently; writing both and "
        "setting tie_word_embeddings=false"
    )
    return True


def _new_vocab(
    t: _Targets,
    resized: dict[str, int],
    by_name: dict[str, OutputTensor],
    out_key: str | None,
    config: dict,
    notes: list[str],
) -> int | None:
    """Vocabulary: every vocabulary-sized tensor must agree after the merge. Returns the new size, if it changed."""
    if not resized:
        return None
    vocab_names = set(resized) | {n for n in (t.embed_key, out_key) if n in by_name}
    sizes = {n: by_name[n].shape[0] for n in vocab_names if n in by_name}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{k} has {v} rows" for k, v in sorted(sizes.items()))
        raise UsageError(f"the adapter resizes the vocabulary inconsistently ({detail}) - {_MISMATCH}")
    size = next(iter(sizes.values()))
    if size == t.vocab:
        return None
    set_config(config, "vocab_size", size)
    notes.append(f"vocabulary resized by the adapter: vocab_size {t.vocab} -> {size}")
    return size


def _output_config(config: dict, untie: bool, out_st: str) -> str:
    """Edit the copied base config for the merged model (ties, no quantization, dtype); returns the dtype name."""
    if untie:
        set_config(config, "tie_word_embeddings", False)
    for c in sub_configs(config):
        c.pop("quantization_config", None)
    dtype_name = ST_TO_NAME[out_st]
    for c in [c for c in sub_configs(config) if "dtype" in c or "torch_dtype" in c] or [config]:
        if "torch_dtype" in c:
            c["torch_dtype"] = dtype_name
        if "dtype" in c or "torch_dtype" not in c:
            c["dtype"] = dtype_name
    return dtype_name


def _shard(outputs: list[OutputTensor], shard_limit: int) -> tuple[list[list[OutputTensor]], list[str]]:
    """Greedy in base order, like transformers (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[OutputTensor]] = []
    size = 0
    for o in outputs:
        if not shards or (size + o.nbytes > shard_limit and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    n = len(shards)
    shard_names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return shards, shard_names


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


def _check_loras(cfg, wfile, lora_by_base, bias_by_base, base, effective_shape, mismatch) -> None:
    """Shapes, ranks, scalings and layouts of the LoRA modules against the (effective) base tensors."""
    fif_cfg = bool(cfg.get("fan_in_fan_out"))
    kinds: dict[str, str] | None = None
    for name, lm in lora_by_base.items():
        have = effective_shape(name)
        r_default = cfg.get("r") if cfg.get("r") is not None else lm.A.shape[0]
        r = int(pattern_value(cfg.get("rank_pattern"), lm.module, r_default))
        alpha_default = cfg.get("lora_alpha") if cfg.get("lora_alpha") is not None else 8  # LoraConfig's default
        alpha = pattern_value(cfg.get("alpha_pattern"), lm.module, alpha_default)
        if lm.A.shape[0] != r:
            raise UsageError(
                f"{wfile}: {lm.keys['A']} has rank {lm.A.shape[0]} but adapter_config.json says r={r} for {lm.module}"
            )
        lm.r = r
        lm.scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if len(have) != 2:
            raise UsageError(f"{name}: LoRA target is not a 2-D weight (base has {fmt_shape(have)})")
        if lm.embedding:
            want = (lm.A.shape[1], lm.B.shape[0])
            if have != want:
                raise UsageError(
                    f"{name}: adapter expects {fmt_shape(want)} but base has {fmt_shape(have)} - {mismatch}")
            mag_len = want[1]
        else:
            want = (lm.B.shape[0], lm.A.shape[1])
            direct, transposed = have == want, have == want[::-1]
            if direct and transposed:  # square: ask the model which layer type it is (Conv1D stores (in, out))
                if kinds is None:
                    kinds = module_kinds(base.path) if (fif_cfg or _any_transposed(lora_by_base, base)) else {}
                kind = kinds.get(lm.module)
                lm.fan_in_fan_out = (kind == "Conv1D") if kind else fif_cfg
            elif direct or transposed:
                lm.fan_in_fan_out = transposed
            else:
                shown = want[::-1] if fif_cfg else want
                raise UsageError(
                    f"{name}: adapter expects {fmt_shape(shown)} but base has {fmt_shape(have)} - {mismatch}")
            mag_len = want[0]
        if lm.magnitude is not None and tuple(lm.magnitude.shape) != (mag_len,):
            raise UsageError(
                f"{name}: DoRA magnitude {lm.keys['mag']} has shape {fmt_shape(tuple(lm.magnitude.shape))}, "
                f"expected ({mag_len},) - {mismatch}"
            )
    for name, lm in bias_by_base.items():
        if base.entries[name].shape != tuple(lm.B_bias.shape):
            raise UsageError(
                f"{name}: adapter expects {fmt_shape(tuple(lm.B_bias.shape))} but base has "
                f"{fmt_shape(base.entries[name].shape)} - {mismatch}"
            )


def _any_transposed(loras: dict[str, LoraModule], base: BaseCheckpoint) -> bool:
    for name, lm in loras.items():
        if not lm.embedding and name in base.entries:
            have, want = base.entries[name].shape, (lm.B.shape[0], lm.A.shape[1])
            if have != want and have == want[::-1]:
                return True
    return False
