"""LoRA on raw parameters (peft's ``target_parameters``): the fused MoE experts and routers of transformers 5.

peft adapts a parameter such as ``experts.gate_up_proj`` (experts, out, in) with one LoRA pair whose rank holds all
experts, and nests one wrapper per adapted parameter of a module (the ``base_layer`` levels of the adapter keys).
Which parameter each level adapts, its rank and its scaling are read off peft itself, applied to the model built on
the meta device, not re-derived: the nesting order follows the model's parameter order and the fused gate/up
projection gets its own rank pattern. The checkpoint holds those parameters the way transformers saves them (for
Mixtral, Qwen-MoE and OLMoE one tensor per expert and projection), so each delta is split with transformers' own
reverse weight conversion into the tensors it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from neftune_cli.io.errors import UsageError, first_line
from neftune_cli.merge.adapter import AdapterState, LoraModule
from neftune_cli.merge.base import BaseCheckpoint, meta_model
from neftune_cli.merge.common import fmt_shape


@dataclass
class ParamLora:
    """One peft ParamWrapper: a LoRA pair on the model parameter ``param`` and the checkpoint tensors it lands in."""

    lora: LoraModule
    param: str  # the model's parameter, e.g. model.layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, ...]
    num_experts: int
    swapped: bool  # stored (experts, out, in), as transformers' MoE experts are; peft swaps in/out for those
    pieces: dict[str, tuple[str, tuple[int, ...]]]  # checkpoint tensor -> (the name transformers saves, shape)
    model: torch.nn.Module = field(repr=False)  # the meta model, whose conversion mapping splits the delta
    _split: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def delta(self) -> torch.Tensor:
        """scaling * the LoRA product laid out like ``param``, in float32 (peft's ParamWrapper.get_delta_weight)."""
        A, B = self.lora.A.float(), self.lora.B.float()
        if self.num_experts == 1:
            return (B @ A).mul_(self.lora.scaling)
        A = A.reshape(self.num_experts, -1, A.shape[-1])  # experts x rank x in
        B = B.reshape(B.shape[0], -1, self.num_experts)  # out x rank x experts
        layout = "o r e, e r i -> e o i" if self.swapped else "o r e, e r i -> e i o"
        return torch.einsum(layout, B, A).mul_(self.lora.scaling)

    def piece(self, name: str) -> torch.Tensor:
        """The part of the delta that lands in checkpoint tensor ``name``.

        The whole delta is computed and split once, when its first piece is asked for, and each piece is dropped
        once handed out: a merge holds the split delta of one parameter at a time (written in checkpoint order, the
        pieces of a layer's experts come together)."""
        if name not in self._split:
            self._split = self._pieces_of(self.delta())
        return self._split.pop(name)

    def _pieces_of(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        saved = {self.param: delta} if self.param in {s for s, _ in self.pieces.values()} else \
            _revert(self.model, self.param, delta)
        return {name: saved[s] for name, (s, _) in self.pieces.items()}


def locate_param_loras(
    state: AdapterState, base: BaseCheckpoint, loras: dict[str, LoraModule], mismatch: str
) -> list[ParamLora]:
    """Take the LoRA modules that peft put on raw parameters out of ``loras`` and say where each one lands."""
    if not state.config.get("target_parameters"):
        return []
    wfile = state.weights_file.name
    model = meta_model(base.path)
    if model is None:
        raise UsageError(
            f"{state.dir}: the adapter adapts raw parameters (target_parameters), and merging it needs the model "
            f"built from {base.path}/config.json, which this transformers cannot build"
        )
    wrappers = _param_wrappers(model, state)
    found: list[ParamLora] = []
    for module, (param, shape, num_experts, swapped, r, scaling, in_out) in wrappers.items():
        lm = loras.pop(module, None)
        if lm is None:
            continue  # peft saves every wrapper it made; a missing one is reported below as not in the adapter
        want_a, want_b = (r * num_experts, in_out[0]), (in_out[1], r * num_experts)
        if tuple(lm.A.shape) != want_a or tuple(lm.B.shape) != want_b:
            raise UsageError(
                f"{wfile}: {lm.keys['A']} {fmt_shape(tuple(lm.A.shape))} and {lm.keys['B']} "
                f"{fmt_shape(tuple(lm.B.shape))} do not fit {param} {fmt_shape(shape)} - {mismatch}"
            )
        lm.r, lm.scaling = r, scaling
        pieces = _checkpoint_pieces(model, base, param, shape, lm.keys["A"], wfile, mismatch)
        found.append(ParamLora(lm, param, shape, num_experts, swapped, pieces, model))
    return found


def _param_wrappers(model: torch.nn.Module, state: AdapterState) -> dict[str, tuple]:
    """peft's ParamWrappers on the meta model, by adapter module name: (param, shape, experts, swapped, r, scaling,
    (in, out))."""
    import peft
    from peft.tuners.lora.layer import ParamWrapper

    try:
        config = peft.LoraConfig.from_pretrained(str(state.dir))
        config.inference_mode = True
        peft.inject_adapter_in_model(config, model, adapter_name="default")
    except Exception as e:  # noqa: BLE001 - whatever peft refuses about this config on this model
        raise UsageError(f"{state.dir}: peft cannot apply this adapter to the base model ({first_line(e)})") from None
    wrappers = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, ParamWrapper):
            continue
        owner = name
        while owner.endswith(".base_layer"):
            owner = owner[: -len(".base_layer")]
        param = mod.get_param()
        wrappers[name] = (
            f"{owner}.{mod.parameter_name}",
            tuple(param.shape),
            mod.num_experts,
            _swapped(mod, param),
            mod.r["default"],
            mod.scaling["default"],
            (mod.in_features, mod.out_features),
        )
    return wrappers


def _checkpoint_pieces(
    model: torch.nn.Module, base: BaseCheckpoint, param: str, shape: tuple[int, ...], key: str, wfile: str,
    mismatch: str,
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The checkpoint tensors ``param`` is stored as: itself, or what transformers' save conversion makes of it."""
    stored = base.resolve(param)
    if stored is not None:
        saved_shapes = {param: shape}
    else:
        saved_shapes = {s: tuple(t.shape) for s, t in _revert(model, param, torch.empty(shape, device="meta")).items()}
    pieces = {}
    for saved, want in saved_shapes.items():
        name = base.resolve(saved)
        if name is None:
            raise UsageError(f"{wfile}: {key} adapts {param}, saved as {saved}, which is not in the base model "
                             f"{base.path} - {mismatch}")
        have = base.entries[name].shape
        if have != want:
            raise UsageError(f"{name}: adapter expects {fmt_shape(want)} but base has {fmt_shape(have)} - {mismatch}")
        pieces[name] = (saved, want)
    return pieces


def _revert(model: torch.nn.Module, param: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x keeps MoE experts as separate modules: no fused parameters to split
        raise UsageError(f"{param} is not stored under that name in the base model, and this transformers "
                         "version cannot say how it is saved (transformers >= 5 can)") from None
    return revert_weight_conversion(model, {param: tensor})


def _swapped(wrapper, param: torch.Tensor) -> bool:
    """Whether peft reads ``param`` as (experts, out, in): its own flag where it has one, else its rule."""
    if hasattr(wrapper, "_did_swap_in_out_features"):
        return bool(wrapper._did_swap_in_out_features)
    return param.dim() == 3 and not getattr(wrapper.get_base_layer(), "is_transposed", False)
