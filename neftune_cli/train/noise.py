"""NEFTune noise on input embeddings (Jain et al., 2023, arXiv 2310.05914).

During training each example's embeddings get ``alpha / sqrt(L * d) * U(-1, 1)`` added, where L is the
example's own token count and d the hidden size, so the noise norm per example is about alpha / sqrt(3)
whatever its length.

transformers' ``neftune_post_forward_hook`` instead uses the padded row length for L, one scale for the whole
batch, and puts noise on padding too; with packed rows every example gets far less noise than intended
(transformers issue #34659). ``scale="paper"`` follows the paper's code, ``scale="hf"`` reproduces the hook.
"""

import torch

SCALES = ("paper", "hf")


def _check_layout(name, tensor, shape):
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape (batch, seq) = {tuple(shape)}, got {tuple(tensor.shape)}")


def example_lengths(attention_mask=None, position_ids=None, shape=None):
    """Split (batch, seq) token positions into examples.

    Args:
        attention_mask: optional (batch, seq), nonzero for real tokens and 0 for padding (left or right).
        position_ids: optional (batch, seq); in packed rows a 0 starts a new example. The first token of every
            row always starts one, so without position_ids each row is one example.
        shape: (batch, seq), needed only when neither tensor is given.

    Returns:
        ``(seg_ids, lengths, real)``: ``seg_ids`` (batch, seq) long, the example each position belongs to,
        numbered row-major from 0; ``lengths`` (batch * seq,) long, the number of real tokens of example k at
        index k (0 for unused ids and all-padding examples); ``real`` (batch, seq) bool, the non-padding mask.
    """
    if shape is None:
        given = attention_mask if attention_mask is not None else position_ids
        if given is None:
            raise ValueError("example_lengths needs attention_mask, position_ids or shape")
        shape = given.shape
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"shape must be (batch, seq), got {shape}")
    _check_layout("attention_mask", attention_mask, shape)
    _check_layout("position_ids", position_ids, shape)
    device = next((t.device for t in (attention_mask, position_ids) if t is not None), None)

    starts = torch.zeros(shape, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None:
        starts |= position_ids == 0
    seg_ids = starts.flatten().cumsum(0).view(shape) - 1
    if attention_mask is None:
        real = torch.ones(shape, dtype=torch.bool, device=device)
    else:
        real = attention_mask.bool()
    # A fixed-size scatter_add instead of bincount: no host sync on GPU, since the number of examples is
    # never read back.
    lengths = torch.zeros(seg_ids.numel(), dtype=torch.long, device=device)
    lengths.scatter_add_(0, seg_ids.flatten(), real.flatten().long())
    return seg_ids, lengths, real


def add_noise(embeds, alpha, *, attention_mask=None, position_ids=None, scale="paper", generator=None):
    """Return ``embeds`` plus NEFTune noise, as a new tensor of the same shape and dtype.

    Args:
        embeds: (batch, seq, d) input embeddings, any float dtype; gradients flow through them.
        alpha: noise strength; None or 0 returns ``embeds`` itself.
        attention_mask: optional (batch, seq), 1 for real tokens and 0 for padding. Padding gets no noise and
            does not count in an example's length. Ignored by ``scale="hf"``.
        position_ids: optional (batch, seq); in packed rows each restart at 0 begins a new example with its
            own length. Ignored by ``scale="hf"``.
        scale: ``"paper"``: each example gets noise in +-alpha/sqrt(L_i*d), L_i its own real token count.
            ``"hf"``: transformers' hook, bit for bit in every dtype: +-alpha/sqrt(seq*d) everywhere, padding
            included, drawn and added in the embeddings' dtype.
        generator: optional ``torch.Generator`` (on ``embeds.device``) to draw from; default the global RNG.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown NEFTune scale {scale!r}; expected one of {', '.join(SCALES)}")
    if embeds.dim() != 3:
        raise ValueError(f"embeds must have shape (batch, seq, d), got {tuple(embeds.shape)}")
    batch, seq, d = embeds.shape
    _check_layout("attention_mask", attention_mask, (batch, seq))
    _check_layout("position_ids", position_ids, (batch, seq))
    if alpha is None or alpha == 0:
        return embeds
    if alpha < 0:
        raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}")

    if scale == "hf":
        # transformers' hook op for op (a 0-dim fp32 magnitude, one uniform_ over the whole output, drawn and added
        # in the embeddings' dtype), so that it consumes the RNG identically and matches it bit for bit in any dtype.
        mag = alpha / torch.sqrt(torch.tensor(seq * d))
        return embeds + torch.zeros_like(embeds).uniform_(-mag, mag, generator=generator)
    # Draw and add in (at least) fp32, then cast back: in bf16 the draw itself would be quantised, not just the sum.
    x = embeds.to(torch.promote_types(embeds.dtype, torch.float32))
    seg_ids, lengths, real = example_lengths(attention_mask, position_ids, shape=(batch, seq))
    token_len = lengths[seg_ids].clamp(min=1).float()  # clamp: all-padding examples are zeroed below
    mag = torch.where(real, alpha / torch.sqrt(token_len * d), 0.0)
    noise = torch.zeros_like(embeds, dtype=torch.float32).uniform_(-1.0, 1.0, generator=generator) * mag.unsqueeze(-1)
    return (x + noise).to(embeds.dtype)


@torch.no_grad()
def noise_norms(noisy, clean, *, attention_mask=None, position_ids=None):
    """L2 norm of the noise that survived the cast, one per example (fp32, 1-D).

    Args:
        noisy: (batch, seq, d) output of :func:`add_noise`.
        clean: the (batch, seq, d) embeddings it was given.
        attention_mask, position_ids: the same example layout that was passed to :func:`add_noise`; padding
            is not counted and examples with no real tokens are left out.
    """
    if noisy.shape != clean.shape or noisy.dim() != 3:
        raise ValueError(
            f"noisy and clean must be the same (batch, seq, d) shape, got "
            f"{tuple(noisy.shape)} and {tuple(clean.shape)}"
        )
    seg_ids, lengths, real = example_lengths(attention_mask, position_ids, shape=noisy.shape[:2])
    sq = (noisy.float() - clean.float()).pow(2).sum(-1) * real
    per_example = torch.zeros(seg_ids.numel(), dtype=torch.float32, device=noisy.device)
    per_example.scatter_add_(0, seg_ids.flatten(), sq.flatten())
    return per_example[lengths > 0].sqrt()
