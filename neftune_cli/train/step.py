"""The training forward: embeddings, NEFTune noise, decoder, and a token-summed cross-entropy; and the eval loss.

We compute the input embeddings ourselves and pass ``inputs_embeds`` (as the paper's code does) instead of
hooking the embedding layer: the noise needs each example's length, which only the batch knows, and there is
no hook to forget to remove. Being one nn.Module, it is what DDP/FSDP wrap, so gradients sync as usual.

Two things the model's own forward does are re-done here, so both are checked against it at start-up
(``check_forward``): the output head with the family's logit transform (Granite divides the logits by
``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma-2/3 soft-cap them), and whatever the model does to
``inputs_embeds`` before its first layer (Granite multiplies by ``embedding_multiplier``; Gemma-2 on transformers 4.x
by sqrt(d), on 5.x its embedding module does). The noise is scaled by the inverse of that gain (``first_layer_gain``),
so the first decoder layer receives the paper's noise, alpha / sqrt(3) per example, on every family and version.

Mixture-of-experts models add their router's load-balancing loss in their own forward when asked for router logits;
here it is the model's own ``load_balancing_loss_func`` on the decoder's router logits, returned apart from the
token loss (it is a mean per forward, the token loss a sum) so the loop weighs each the way the model's forward does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neftune_cli.io.errors import UsageError
from neftune_cli.models.loading import no_router, router_loss_of
from neftune_cli.train import parallel
from neftune_cli.train.noise import add_noise, noise_norms
from neftune_cli.train.precision import FLOAT32, Precision

# Tokens per chunk of the output head + loss: the fp32 logits of one chunk exist at a time (recomputed in
# backward), instead of (tokens x vocab) for the whole micro-batch.
LOSS_CHUNK = 4096
# How far our logits may be from the model's own at start-up, relative to the largest logit (float32 sums in
# another order; half precision rounds each op).
FORWARD_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


class Losses(NamedTuple):
    loss: torch.Tensor  # token cross-entropy, summed over the trained tokens
    trained: int  # trained tokens
    noise_norms: torch.Tensor | None  # per example, as the first decoder layer receives it
    router_aux: torch.Tensor | None  # the router's load-balancing loss (a mean), in training when it is on


class CausalLMLoss(nn.Module):
    """Wraps a causal LM (plain or peft) and returns its Losses on a batch.

    ``router_aux_coef``: None takes the model's own ``router_aux_loss_coef`` (MoE models), 0 turns the router's
    load-balancing loss off; ``router_aux`` is computed (in training) only where the coefficient is not 0.
    ``precision``: the forward runs under its autocast (train/precision.py); by default none.
    ``probe``: a start-up check run as this module's forward, ``probe(self)``, so that FSDP gathers the weights for
    it the way it does for a training forward (train/parallel.py: probe)."""

    def __init__(self, model: nn.Module, noise_alpha: float | None, noise_scale: str,
                 router_aux_coef: float | None = None, precision: Precision = FLOAT32, measure: bool = True):
        super().__init__()
        self.model = model
        self.precision = precision
        self.noise_alpha = noise_alpha or 0.0
        self.noise_scale = noise_scale
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = causal.get_decoder()  # e.g. LlamaModel: everything but the output head
        # transformers 4.x answers with the model itself for GPT-2/NeoX/Falcon, and its base_model is the CausalLM
        # for Gemma-3 text: each version's get_decoder or base_model, whichever is the inner model
        self.decoder = causal.base_model if decoder is causal else decoder
        self.head = causal.get_output_embeddings()
        config = causal.config
        self.logit_divisor = getattr(config, "logits_scaling", None)  # Granite, GraniteMoE
        self.logit_scale = getattr(config, "logit_scale", None)  # Cohere, Cohere2
        self.softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2/3
        # the model's own balancing loss and what its forward passes it (Mixtral, Qwen-MoE, OLMoE, GraniteMoE, ...)
        self.balancing_loss = router_loss_of(type(causal))
        self.num_experts = getattr(causal, "num_experts", None)
        self.experts_per_token = getattr(causal, "num_experts_per_tok", None)
        has_router = None not in (self.balancing_loss, self.num_experts, self.experts_per_token)
        if router_aux_coef and not has_router:
            raise no_router(type(causal).__name__)
        own = getattr(config, "router_aux_loss_coef", None) if has_router else None
        self.router_aux_coef = float(own or 0.0) if router_aux_coef is None else float(router_aux_coef)
        # Measured once: only the noise needs it, and the measurement is a (tiny) decoder forward. measure=False:
        # the model has no weights yet (FSDP's meta-device build); training measures it once they are in.
        self.first_layer_gain = first_layer_gain(self) if self.noise_alpha > 0 and measure else 1.0

    def forward(self, input_ids=None, targets=None, attention_mask=None, position_ids=None, generator=None, probe=None):
        if probe is not None:
            return probe(self)
        with self.precision.autocast(input_ids.device):
            return self._forward(input_ids, targets, attention_mask, position_ids, generator)

    def _forward(self, input_ids, targets, attention_mask, position_ids, generator):
        embeds = self.model.get_input_embeddings()(input_ids)
        norms = None
        if self.training and self.noise_alpha > 0:
            gain = self.first_layer_gain or 1.0
            # paper: what reaches the first layer is the paper's noise; hf: the hook's noise, gain and all
            alpha = self.noise_alpha / gain if self.noise_scale == "paper" else self.noise_alpha
            noisy = add_noise(embeds, alpha, attention_mask=attention_mask, position_ids=position_ids,
                              scale=self.noise_scale, generator=generator)
            norms = noise_norms(noisy, embeds, attention_mask=attention_mask, position_ids=position_ids) * abs(gain)
            embeds = noisy
        with_router = self.training and self.router_aux_coef > 0
        outputs = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False, **({"output_router_logits": True} if with_router else {}))
        hidden = outputs.last_hidden_state
        router_aux = None
        if with_router:
            router_aux = self.balancing_loss(outputs.router_logits, self.num_experts, self.experts_per_token,
                                             attention_mask).float()
        # Only positions with a target need logits: prompts and pads never reach the output head.
        keep = targets != -100
        hidden, targets = hidden[keep], targets[keep]
        loss = hidden.sum().float() * 0.0  # keeps the graph whole when a micro-batch has nothing to train
        for start in range(0, targets.numel(), LOSS_CHUNK):
            h, y = hidden[start:start + LOSS_CHUNK], targets[start:start + LOSS_CHUNK]
            loss = loss + checkpoint(self._chunk_loss, h, y, use_reentrant=False)
        return Losses(loss, targets.numel(), norms, router_aux)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head and the family's logit transform, in float32, as the model's own forward computes them."""
        logits = self.head(hidden).float()
        if self.logit_divisor:
            logits = logits / self.logit_divisor
        if self.logit_scale:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(hidden), targets, reduction="sum")


def first_layer(decoder: nn.Module) -> nn.Module | None:
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers[0]
    return None


@torch.no_grad()
def first_layer_input(lm_loss: CausalLMLoss, embeds: torch.Tensor) -> torch.Tensor | None:
    """The hidden states the first decoder layer receives when the decoder is given ``embeds``."""
    layer = first_layer(lm_loss.decoder)
    if layer is None:
        return None
    seen = []

    def capture(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    # the whole (tiny) forward runs: ending it early from a hook would leave FSDP's per-layer state mid-forward
    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        lm_loss.decoder(inputs_embeds=embeds, use_cache=False)
    finally:
        handle.remove()
    return seen[0] if seen else None


@torch.no_grad()
def first_layer_gain(lm_loss: CausalLMLoss) -> float | None:
    """g such that the first decoder layer sees g * inputs_embeds + (something independent of them), e.g. Granite's
    embedding_multiplier or Gemma's sqrt(d) where the model applies it after the embedding module; 1.0 for most.
    None where the map is not affine (Bloom normalises the embeddings): there the noise stays on the embeddings."""
    was_training = lm_loss.training
    lm_loss.eval()
    try:
        embed = lm_loss.model.get_input_embeddings()
        vocab = embed.weight.shape[0]
        ids = torch.arange(1, 9, device=embed.weight.device).clamp(max=vocab - 1).unsqueeze(0)
        embeds = embed(ids)
        once, twice = first_layer_input(lm_loss, embeds), first_layer_input(lm_loss, embeds * 2)
    finally:
        lm_loss.train(was_training)
    if once is None:
        return None
    delta, e = (twice.float() - once.float()), embeds.float()
    gain = float((delta * e).sum() / (e * e).sum().clamp(min=1e-30))
    tolerance = FORWARD_TOLERANCE.get(embeds.dtype, 3e-2)
    affine = (delta - gain * e).norm() <= tolerance * max(abs(gain), 1e-6) * e.norm()
    return gain if affine and gain != 0 else None


@torch.no_grad()
def forward_gap(lm_loss: CausalLMLoss) -> float:
    """Largest difference between our logits (embeddings in, our head) and the model's own forward(...).logits, noise
    off, on a small padded batch, relative to the largest logit."""
    was_training = lm_loss.training
    lm_loss.eval()
    try:
        embed = lm_loss.model.get_input_embeddings()
        vocab, device = embed.weight.shape[0], embed.weight.device
        ids = (torch.arange(16, device=device).view(2, 8) * 7 + 3) % max(vocab - 1, 1) + 1
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # a padded row: the mask takes the path training's pad batches take
        hidden = lm_loss.decoder(inputs_embeds=embed(ids), attention_mask=mask, use_cache=False).last_hidden_state
        ours = lm_loss.logits(hidden)[mask.bool()]
        theirs = lm_loss.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()[mask.bool()]
    finally:
        lm_loss.train(was_training)
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1.0))


def check_forward(lm_loss: CausalLMLoss, name: str) -> None:
    """Never train on a loss the model would not compute: our forward must give the model's logits."""
    dtype = lm_loss.head.weight.dtype
    gap = forward_gap(lm_loss)
    if gap > FORWARD_TOLERANCE.get(dtype, 3e-2):
        architecture = type(lm_loss.decoder).__name__.removesuffix("Model") or "this"
        raise UsageError(f"{name}: the {architecture} architecture computes its logits in a way our training forward "
                         f"does not reproduce (max difference {gap:.2g} of the largest logit); it cannot be trained "
                         "here yet")


@torch.no_grad()
def attention_stays_within_examples(lm_loss: CausalLMLoss) -> bool:
    """Does the decoder keep packed examples apart? (transformers derives the segments from position_ids;
    remote model code or an old version may not, and then examples would silently attend to each other.)

    Asked the way training asks it, of every kernel alike: one packed row of two examples against the second
    example run alone (flash-attn's path treats position_ids as packed only in a batch of one row).
    """
    was_training = lm_loss.training
    lm_loss.eval()
    device = lm_loss.head.weight.device
    first, second = torch.tensor([[5, 6, 7, 8, 9]], device=device), torch.tensor([[13, 14, 15, 16]], device=device)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(4)]).to(device).unsqueeze(0)
    try:
        together = lm_loss.decoder(input_ids=packed, position_ids=positions, use_cache=False).last_hidden_state
        alone = lm_loss.decoder(input_ids=second, position_ids=positions[:, 5:], use_cache=False).last_hidden_state
    finally:
        lm_loss.train(was_training)
    gap = (together[0, 5:].float() - alone[0].float()).abs().max()
    return bool(gap <= FORWARD_TOLERANCE.get(alone.dtype, 3e-2) * max(1.0, float(alone.float().abs().max())))


def evaluate(lm_loss: CausalLMLoss, dataset, batch_of, batch_size: int, dist: parallel.Dist = parallel.SINGLE
             ) -> float:
    """Mean token loss over the eval set: eval mode (no dropout, no noise), no gradients; ranks share the batches."""
    lm_loss.train(False)
    total, count = 0.0, 0
    # FSDP: every rank runs every forward (they gather the shards together), a stand-in where its share is short
    starts = parallel.my_share(list(range(0, len(dataset), batch_size)), dist, pad=dist.fsdp)
    with torch.no_grad():
        for start in starts:
            indices = list(range(start or 0, min((start or 0) + batch_size, len(dataset))))
            losses = lm_loss(**batch_of(dataset, indices))
            if start is not None:
                total, count = total + losses.loss.item(), count + losses.trained
    lm_loss.train(True)
    total, count = parallel.sum_all([total, count], dist)
    return total / max(count, 1)
