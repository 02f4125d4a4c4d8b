"""The channel scores and selection, as pure tensor functions."""

from __future__ import annotations

import math

import pytest
import torch

from think_cache.scoring import (
    channel_index_dtype,
    kept_channel_count,
    key_channel_scores,
    select_channels,
    value_channel_scores,
)


def test_kept_channel_count_is_ceil():
    assert kept_channel_count(64, 0.5) == 32
    assert kept_channel_count(64, 0.4) == math.ceil(0.6 * 64) == 39
    assert kept_channel_count(64, 0.6) == 26  # (1 - 0.6) * 64 = 25.6 -> 26, not 25.599999 -> 26 by luck
    assert kept_channel_count(128, 0.0) == 128
    assert kept_channel_count(16, 0.99) == 1


def test_scores_are_norm_products():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 10, 8)
    k = torch.randn(2, 3, 50, 8)
    scores = key_channel_scores(q, k)
    # the Frobenius norm of each channel's rank-one share of the logits
    for c in range(8):
        share = q[..., c : c + 1] @ k[..., c : c + 1].transpose(-1, -2)
        torch.testing.assert_close(scores[..., c], torch.linalg.matrix_norm(share))


def test_planted_channel_is_always_kept():
    for seed in range(20):
        torch.manual_seed(seed)
        q = torch.randn(1, 2, 12, 16)
        k = torch.randn(1, 2, 40, 16)
        planted = seed % 16
        q[..., planted] *= 8
        k[..., planted] *= 8
        chosen = select_channels(key_channel_scores(q, k), 2)
        assert (chosen == planted).any(dim=-1).all()


def test_padded_keys_do_not_change_the_choice():
    torch.manual_seed(1)
    q = torch.randn(2, 2, 8, 16)
    k = torch.randn(2, 2, 30, 16)
    real = torch.ones(2, 30, dtype=torch.bool)
    real[0, :11] = False  # row 0 left-padded by 11
    before = select_channels(key_channel_scores(q, k, real), 6)
    k2 = k.clone()
    k2[0, :, :11] = torch.randn(2, 11, 16) * 1000
    after = select_channels(key_channel_scores(q, k2, real), 6)
    assert torch.equal(before, after)
    # and without the mask the garbage would have mattered
    assert not torch.equal(before, select_channels(key_channel_scores(q, k2), 6))


def test_scores_are_float32_for_low_precision_inputs():
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 9, 8, dtype=torch.bfloat16)
    assert key_channel_scores(q, k).dtype == torch.float32
    v = torch.randn(1, 1, 9, 8, dtype=torch.bfloat16)
    assert value_channel_scores(q, k, v, 8**-0.5).dtype == torch.float32


def test_value_scores_are_norms_of_the_output_share():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    mask = torch.rand(1, 1, 5, 20) > 0.3
    mask[..., 0] = True
    weights = torch.softmax((q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf")), -1)
    expected = torch.linalg.vector_norm(weights @ v, dim=-2)
    torch.testing.assert_close(value_channel_scores(q, k, v, 0.3, mask), expected)


def test_select_channels_sorted_and_validated():
    scores = torch.tensor([[[0.1, 5.0, 0.3, 4.0, 0.2]]])
    assert select_channels(scores, 2).tolist() == [[[1, 3]]]
    with pytest.raises(ValueError, match=r"n_keep must be in \[1, 5\]"):
        select_channels(scores, 6)
    assert channel_index_dtype(128) == torch.int16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_prompts_are_normed_in_slices(dtype, monkeypatch):
    """A long prompt's channel norms are summed a slice of tokens at a time (`NORM_CHUNK_ELEMENTS`, no float32 copy
    of the whole layer): the one-pass scores within float32 rounding, masks followed, the keys left as they were."""
    from think_cache import scoring

    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 500, 16, generator=generator).to(dtype)
    queries = torch.randn(2, 3, 8, 16, generator=generator).to(dtype)
    mask = torch.rand(2, 3, 500, generator=generator) > 0.2
    whole = [key_channel_scores(queries, keys), key_channel_scores(queries, keys, mask)]
    before = keys.clone()
    monkeypatch.setattr(scoring, "NORM_CHUNK_ELEMENTS", 2 * 3 * 16 * 37)
    sliced = [key_channel_scores(queries, keys), key_channel_scores(queries, keys, mask)]
    assert torch.equal(keys, before)
    for a, b in zip(whole, sliced, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=0)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_value_scores_of_long_prompts_run_the_softmax_in_slices(softcap, monkeypatch):
    """A long prompt's value scores come from an online softmax over slices of tokens (`NORM_CHUNK_ELEMENTS`): the
    one-pass scores within float32 rounding, with causal and padding masks, a row that may attend nothing (it
    counts nothing), and a slice that a row cannot see at all."""
    from think_cache import scoring

    generator = torch.Generator().manual_seed(4)
    batch, heads, rows, tokens, dim = 2, 2, 6, 300, 8
    queries = torch.randn(batch, heads, rows, dim, generator=generator)
    keys = torch.randn(batch, heads, tokens, dim, generator=generator) * 2
    values = torch.randn(batch, heads, tokens, dim, generator=generator)
    mask = torch.ones(batch, 1, rows, tokens, dtype=torch.bool)
    mask[0, :, :, :120] = False  # row 0's first slices are all padding
    mask[1, :, 2] = False  # a row that may attend nothing
    mask[..., -rows:] &= torch.ones(rows, rows, dtype=torch.bool).tril()  # causal over the window
    whole = [value_channel_scores(queries, keys, values, 0.3, m, softcap) for m in (None, mask)]
    monkeypatch.setattr(scoring, "NORM_CHUNK_ELEMENTS", batch * heads * rows * 37)
    sliced = [value_channel_scores(queries, keys, values, 0.3, m, softcap) for m in (None, mask)]
    for a, b in zip(whole, sliced, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
