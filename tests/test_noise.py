import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neftune_cli.train.noise import add_noise, example_lengths, noise_norms

# Examples are described independently of neftune_cli.train.noise, as (row, positions of its real tokens), so the
# statistics below do not rely on the segmentation they are testing.


def padded(lengths, seq, side="right", reps=1):
    """One example per row, padded to seq on the given side; the batch repeated reps times."""
    mask = torch.zeros(reps * len(lengths), seq, dtype=torch.long)
    examples = []
    for row, n in enumerate(lengths * reps):
        idx = torch.arange(n) if side == "right" else torch.arange(seq - n, seq)
        mask[row, idx] = 1
        examples.append((row, idx))
    return {"attention_mask": mask}, examples


def packed(lengths, pad=0, offset=0, reps=1):
    """Segments packed into one row (position_ids restart at 0), then pad trailing pad tokens.

    offset: the first segment is the tail of an earlier one, so its positions start at offset, not 0.
    Padding continues the last segment's positions, so only the mask can tell it apart.
    """
    pos = torch.cat([torch.arange(n) + (offset if i == 0 else 0) for i, n in enumerate(lengths)])
    pos = torch.cat([pos, torch.arange(pad) + pos[-1] + 1])
    mask = torch.ones_like(pos)
    mask[len(pos) - pad :] = 0
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    examples = [(r, torch.arange(s, s + n)) for r in range(reps) for s, n in zip(starts, lengths, strict=True)]
    return {"attention_mask": mask.repeat(reps, 1), "position_ids": pos.repeat(reps, 1)}, examples


def draw(layout, d, alpha, scale="paper", seed=0):
    """Noise added to zero embeddings, so the output is the noise itself, exactly."""
    batch, seq = next(iter(layout.values())).shape
    gen = torch.Generator().manual_seed(seed)
    return add_noise(torch.zeros(batch, seq, d), alpha, scale=scale, generator=gen, **layout)


def per_example(noise, examples, reduce):
    """Reduce each example's real tokens: "norm" (L2 norm) or "amax" (largest |noise|)."""
    owner = torch.full(noise.shape[:2], -1)
    for k, (r, idx) in enumerate(examples):
        owner[r, idx] = k
    keep = owner >= 0
    if reduce == "norm":
        sq = noise.pow(2).sum(-1)[keep]
        return torch.zeros(len(examples)).index_add_(0, owner[keep], sq).sqrt()
    peak = noise.abs().amax(-1)[keep]
    return torch.zeros(len(examples)).scatter_reduce_(0, owner[keep], peak, "amax")


def mean_norms(noise, examples, per_rep):
    """Each example's noise norm, averaged over the reps copies of the layout."""
    return per_example(noise, examples, "norm").view(-1, per_rep).mean(0)


LAYOUTS = {
    "right_padded": lambda reps: padded([3, 17, 40, 64], 64, "right", reps),
    "left_padded": lambda reps: padded([3, 17, 40, 64], 64, "left", reps),
    "packed": lambda reps: packed([10, 37, 300, 5], reps=reps),
    "packed_padded": lambda reps: packed([10, 37, 120, 5], pad=30, reps=reps),
    "packed_mid_start": lambda reps: packed([7, 50, 21], pad=3, offset=12, reps=reps),
}
PER_REP = {"right_padded": 4, "left_padded": 4, "packed": 4, "packed_padded": 4, "packed_mid_start": 3}


@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("d, reps", [(64, 16), (4096, 2)])
@pytest.mark.parametrize("alpha", [1.0, 5.0, 15.0])
def test_paper_noise_norm_is_alpha_over_sqrt3_per_example(layout_name, d, reps, alpha):
    layout, examples = LAYOUTS[layout_name](reps)
    norms = mean_norms(draw(layout, d, alpha), examples, PER_REP[layout_name])
    torch.testing.assert_close(norms, torch.full_like(norms, alpha / math.sqrt(3)), rtol=0.05, atol=0)


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_noise_bounded_per_example_and_reaches_the_bound(layout_name):
    d, alpha = 64, 5.0
    layout, examples = LAYOUTS[layout_name](32)
    noise = draw(layout, d, alpha)
    peaks = per_example(noise, examples, "amax").view(32, PER_REP[layout_name])
    peaks = peaks.max(0).values  # each example's peak over its 32 draws
    for (_, idx), peak in zip(examples[: len(peaks)], peaks, strict=True):
        bound = alpha / math.sqrt(len(idx) * d)
        assert bound * 0.99 < peak.item() <= bound * (1 + 1e-6)


def test_short_and_long_example_in_one_row_get_their_own_scales():
    layout, examples = packed([10, 300], reps=16)
    noise = draw(layout, 64, 5.0)
    short, long = per_example(noise, examples, "amax").view(16, 2).amax(0)
    assert (short / long).item() == pytest.approx(math.sqrt(300 / 10), rel=0.01)


@pytest.mark.parametrize("layout_name", ["right_padded", "left_padded", "packed_padded", "packed_mid_start"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_gets_exactly_zero_noise(layout_name, dtype):
    layout, _ = LAYOUTS[layout_name](2)
    pads = layout["attention_mask"] == 0
    embeds = torch.randn(*pads.shape, 32).to(dtype)
    out = add_noise(embeds, 5.0, generator=torch.Generator().manual_seed(0), **layout)
    assert pads.any()
    assert torch.equal(out[pads], embeds[pads])
    assert (out[~pads] != embeds[~pads]).float().mean() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("alpha", [5.0, 0.1])
def test_hf_scale_matches_transformers_hook_bit_for_bit(with_mask, alpha, dtype):
    try:
        from transformers.integrations.neftune import neftune_post_forward_hook
    except ImportError:  # transformers 4.x keeps it in trainer_utils
        from transformers.trainer_utils import neftune_post_forward_hook

    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 48, dtype=dtype)
    emb.neftune_noise_alpha = alpha
    emb.train()
    ids = torch.randint(0, 100, (3, 20))
    clean = emb(ids)
    mask = padded([20, 7, 1], 20)[0] if with_mask else {}  # the hook ignores padding, so hf must too

    torch.manual_seed(123)
    expected = neftune_post_forward_hook(emb, (ids,), clean)
    after_hook = torch.rand(4)
    torch.manual_seed(123)
    got = add_noise(clean, alpha, scale="hf", **mask)
    after_ours = torch.rand(4)

    assert not torch.equal(got, clean)
    assert torch.equal(got, expected)
    assert torch.equal(after_ours, after_hook)  # consumed the global RNG exactly like the hook


def test_hf_scale_starves_packed_examples_of_noise():
    lengths, alpha, reps = [16, 48, 100, 92], 5.0, 32
    layout, examples = packed(lengths, reps=reps)
    target = alpha / math.sqrt(3)
    hf = mean_norms(draw(layout, 64, alpha, scale="hf"), examples, len(lengths))
    paper = mean_norms(draw(layout, 64, alpha), examples, len(lengths))
    starved = torch.tensor([target * math.sqrt(n / sum(lengths)) for n in lengths])
    torch.testing.assert_close(hf, starved, rtol=0.05, atol=0)
    torch.testing.assert_close(paper, torch.full_like(paper, target), rtol=0.05, atol=0)


@pytest.mark.parametrize("alpha", [None, 0, 0.0])
@pytest.mark.parametrize("scale", ["paper", "hf"])
def test_alpha_zero_or_none_is_a_no_op(alpha, scale):
    embeds = torch.randn(2, 5, 8)
    state = torch.get_rng_state()
    out = add_noise(embeds, alpha, scale=scale, attention_mask=torch.ones(2, 5))
    assert torch.equal(out, embeds)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("scale", ["paper"])  # hf draws in the embeddings' dtype, as the hook does
def test_low_precision_noise_is_drawn_in_fp32_then_rounded(scale):
    layout, _ = padded([30, 12], 30)
    embeds = (torch.randn(2, 30, 64) * 4).to(torch.bfloat16)
    out = add_noise(embeds, 1.0, scale=scale, generator=torch.Generator().manual_seed(3), **layout)
    noise32 = add_noise(torch.zeros(2, 30, 64), 1.0, scale=scale, generator=torch.Generator().manual_seed(3), **layout)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (embeds.float() + noise32).to(torch.bfloat16))
    lost = (out == embeds) & (noise32 != 0)  # noise below half an ulp of the embedding is rounded away
    assert lost.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", ["paper", "hf"])
def test_returns_new_tensor_same_dtype_and_gradients_flow(dtype, scale):
    layout, _ = packed([4, 9], pad=3)
    embeds = torch.randn(1, 16, 8, dtype=dtype, requires_grad=True)
    before = embeds.detach().clone()
    out = add_noise(embeds, 5.0, scale=scale, **layout)
    assert out.dtype == dtype and out.shape == embeds.shape
    assert torch.equal(embeds.detach(), before)  # not in place
    out.float().sum().backward()
    assert torch.equal(embeds.grad, torch.ones_like(embeds))
    noise = (out - before).detach()
    assert noise.abs().max() < 1 and noise.abs().sum() > 0  # noise was added, and in fp64 nothing was lost
    if dtype == torch.float64:
        assert not torch.equal(out.detach(), out.detach().float().double())


def test_generator_makes_noise_reproducible_and_leaves_global_rng_alone():
    layout, _ = packed([5, 11], pad=4)
    embeds = torch.randn(1, 20, 16)
    state = torch.get_rng_state()
    first = add_noise(embeds, 5.0, generator=torch.Generator().manual_seed(7), **layout)
    again = add_noise(embeds, 5.0, generator=torch.Generator().manual_seed(7), **layout)
    other = add_noise(embeds, 5.0, generator=torch.Generator().manual_seed(8), **layout)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_noise_norms_per_example_excludes_empty_examples():
    # Row 0: packed [6, 20] then 6 pads that restart at position 0 (each an empty example).
    # Row 1: entirely padding. Row 2: one example of 9 tokens.
    pos = torch.tensor([list(range(6)) + list(range(20)) + [0] * 6, list(range(32)), list(range(32))])
    mask = torch.zeros(3, 32, dtype=torch.long)
    mask[0, :26] = 1
    mask[2, 23:] = 1
    layout = {"attention_mask": mask, "position_ids": pos}
    clean = torch.randn(3, 32, 64)
    noisy = add_noise(clean, 5.0, generator=torch.Generator().manual_seed(0), **layout)

    norms = noise_norms(noisy, clean, **layout)
    diff = noisy - clean
    expected = torch.stack([diff[0, :6].norm(), diff[0, 6:26].norm(), diff[2, 23:].norm()])
    assert norms.dtype == torch.float32 and norms.shape == (3,)
    torch.testing.assert_close(norms, expected)
    torch.testing.assert_close(norms, torch.full((3,), 5.0 / math.sqrt(3)), rtol=0.15, atol=0)


def test_noise_norms_ignores_noise_on_padding():
    layout, _ = padded([10, 4], 10)
    clean = torch.zeros(2, 10, 32)
    noisy = add_noise(clean, 5.0, scale="hf", **layout)  # hf noises the padding too
    expected = torch.stack([noisy[0].norm(), noisy[1, :4].norm()])
    torch.testing.assert_close(noise_norms(noisy, clean, **layout), expected)


def test_noise_norms_measures_what_survived_a_bf16_cast():
    clean = torch.randn(4, 16, 64).to(torch.bfloat16)
    noisy = add_noise(clean, 5.0, generator=torch.Generator().manual_seed(0))
    norms = noise_norms(noisy, clean)
    expected = (noisy.float() - clean.float()).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, expected)
    noisy32 = add_noise(clean.float(), 5.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(norms, noise_norms(noisy32, clean.float()))  # rounding changed what survived


def test_bad_inputs_raise_value_error():
    embeds = torch.zeros(2, 5, 8)
    with pytest.raises(ValueError, match="unknown NEFTune scale"):
        add_noise(embeds, 5.0, scale="transformers")
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        add_noise(embeds, 5.0, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        add_noise(embeds, 5.0, position_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="embeds must have shape"):
        add_noise(torch.zeros(5, 8), 5.0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        add_noise(embeds, -1.0)
    with pytest.raises(ValueError, match="same"):
        noise_norms(embeds, torch.zeros(2, 6, 8))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=6, max_size=6), min_size=1, max_size=3))
def test_example_lengths_matches_a_token_loop(rows):
    # Each token is (position_id, is_real); position ids are small so restarts are frequent.
    pos = torch.tensor([[p for p, _ in row] for row in rows])
    mask = torch.tensor([[int(m) for _, m in row] for row in rows])
    seg_ids, lengths, real = example_lengths(mask, pos)

    seg, want_ids, want_lengths = -1, [], []
    for row in rows:
        for col, (p, m) in enumerate(row):
            if col == 0 or p == 0:
                seg += 1
                want_lengths.append(0)
            want_ids.append(seg)
            want_lengths[seg] += m
    assert seg_ids.flatten().tolist() == want_ids
    assert lengths[: len(want_lengths)].tolist() == want_lengths
    assert not lengths[len(want_lengths) :].any()
    assert torch.equal(real, mask.bool())
