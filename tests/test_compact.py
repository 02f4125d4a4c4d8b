"""`compact_attention` equals stock attention over a full-size cache whose pruned channels are zero."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from think_cache.compact import compact_attention, gather_channels, key_padding, scatter_channels
from think_cache.storage import FullStore


def _store(keys, key_channels, values, value_channels=None):
    """A full-precision compact part holding full-width ``keys``/``values`` at the given channels."""
    store = FullStore()
    store.start(key_channels, value_channels)
    store.append(keys, values)
    return store


def _dense_reference(query, keys_full, values_full, key_keep, value_keep, n_compact, mask, scaling):
    """Zero pruned channels of the first n_compact tokens, then torch's sdpa with repeat_kv."""
    k = keys_full.clone()
    v = values_full.clone()
    k[:, :, :n_compact] *= key_keep[:, :, None, :]
    if value_keep is not None:
        v[:, :, :n_compact] *= value_keep[:, :, None, :]
    group = query.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def _keep(channels, dim):
    keep = torch.zeros(*channels.shape[:-1], dim)
    return keep.scatter_(-1, channels, 1.0)


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("prune_values", [False, True])
@pytest.mark.parametrize("kv_heads,group", [(2, 3), (1, 4), (4, 1)])
def test_matches_zeroed_dense(q_len, prune_values, kv_heads, group):
    torch.manual_seed(q_len * 7 + kv_heads)
    batch, dim, n_compact, n_recent = 2, 16, 25, 7
    query = torch.randn(batch, kv_heads * group, q_len, dim)
    keys_full = torch.randn(batch, kv_heads, n_compact + n_recent, dim)
    values_full = torch.randn(batch, kv_heads, n_compact + n_recent, dim)
    key_channels = torch.stack([torch.randperm(dim)[:6].sort().values for _ in range(batch * kv_heads)]).view(
        batch, kv_heads, 6
    )
    value_channels = None
    if prune_values:
        value_channels = torch.stack([torch.randperm(dim)[:9].sort().values for _ in range(batch * kv_heads)]).view(
            batch, kv_heads, 9
        )

    # padding in row 1 and causal structure among the queries
    mask = torch.ones(batch, 1, q_len, n_compact + n_recent, dtype=torch.bool)
    mask[1, :, :, :4] = False
    mask &= torch.ones(q_len, n_compact + n_recent, dtype=torch.bool).tril(n_compact + n_recent - q_len)

    store = _store(keys_full[:, :, :n_compact], key_channels.to(torch.int16), values_full[:, :, :n_compact])
    if prune_values:
        store = _store(keys_full[:, :, :n_compact], key_channels, values_full[:, :, :n_compact], value_channels)
        assert store.values.shape[-1] == 9
    out = compact_attention(
        query,
        store,
        keys_full[:, :, n_compact:],
        values_full[:, :, n_compact:],
        mask,
        dim**-0.5,
    )
    ref = _dense_reference(
        query,
        keys_full,
        values_full,
        _keep(key_channels, dim),
        None if value_channels is None else _keep(value_channels, dim),
        n_compact,
        mask,
        dim**-0.5,
    )
    assert out.shape == (batch, q_len, kv_heads * group, dim)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_no_mask_means_causal():
    torch.manual_seed(3)
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 10, 8)
    v = torch.randn(1, 2, 10, 8)
    ch = torch.arange(8).expand(1, 2, 8)
    causal = torch.ones(4, 10, dtype=torch.bool).tril(6)[None, None]
    store = _store(k[:, :, :3], ch, v[:, :, :3])
    a = compact_attention(q, store, k[:, :, 3:], v[:, :, 3:], None, 0.3)
    b = compact_attention(q, store, k[:, :, 3:], v[:, :, 3:], causal, 0.3)
    torch.testing.assert_close(a, b)


def test_fully_masked_row_is_finite():
    q = torch.randn(1, 2, 2, 8)
    k = torch.randn(1, 2, 6, 8)
    mask = torch.zeros(1, 1, 2, 6, dtype=torch.bool)
    mask[:, :, 1] = True
    ch = torch.arange(4).expand(1, 2, 4)
    out = compact_attention(q, _store(k[:, :, :3], ch, k[:, :, :3]), k[:, :, 3:], k[:, :, 3:], mask, 0.3)
    assert torch.isfinite(out).all()


def test_mask_width_mismatch_is_a_clear_error():
    q = torch.randn(1, 2, 1, 8)
    k = torch.randn(1, 2, 6, 8)
    ch = torch.arange(8).expand(1, 2, 8)
    with pytest.raises(RuntimeError, match="mask covers 5 keys but the cache holds 6"):
        compact_attention(
            q,
            _store(k[:, :, :3], ch, k[:, :, :3]),
            k[:, :, 3:],
            k[:, :, 3:],
            torch.ones(1, 1, 1, 5, dtype=torch.bool),
            0.3,
        )


def test_gather_scatter_roundtrip_and_padding_helper():
    x = torch.randn(2, 3, 5, 8)
    ch = torch.tensor([1, 4, 6]).expand(2, 3, 3)
    back = scatter_channels(gather_channels(x, ch), ch, 8)
    assert torch.equal(back[..., [1, 4, 6]], x[..., [1, 4, 6]])
    assert back[..., [0, 2, 3, 5, 7]].abs().sum() == 0
    additive = torch.zeros(2, 1, 3, 5)
    additive[0, :, :, :2] = torch.finfo(torch.float32).min
    real = key_padding(additive, 2, 5)
    assert real.tolist() == [[False, False, True, True, True], [True] * 5]


def test_restored_rows_see_those_tokens_whole():
    """`Restored.add_to`: the chosen rows get the full-width logits at the restored tokens' columns; other rows,
    other columns and absent tokens keep the thinned logits."""
    from think_cache.compact import Restored, pruned_channels

    g = torch.Generator().manual_seed(5)
    batch, heads, rows, tokens, dim = 2, 3, 6, 20, 16
    q = torch.randn(batch, heads, rows, dim, generator=g)
    keys = torch.randn(batch, heads, tokens, dim, generator=g)
    kept = torch.stack([torch.randperm(dim, generator=g)[:6].sort().values for _ in range(batch * heads)])
    kept = kept.view(batch, heads, 6)
    pruned = pruned_channels(kept, dim)
    assert pruned.shape == (batch, heads, 10) and not bool((pruned[..., None] == kept[..., None, :]).any())
    scaling = 0.25
    thinned = torch.matmul(gather_channels(q, kept), gather_channels(keys, kept).transpose(-1, -2)) * scaling
    full = torch.matmul(q, keys.transpose(-1, -2)) * scaling
    columns = torch.tensor([3, 7, 11]).expand(batch, heads, 3).clone()
    present = torch.ones(batch, heads, 3, dtype=torch.bool)
    present[1, 2, 1] = False  # an evicted token: its column keeps the thinned logit
    row_mask = torch.tensor([True, True, False, True, False, False])
    spare = gather_channels(keys, pruned).gather(2, columns[..., None].expand(-1, -1, -1, 10))
    logits = thinned.clone()
    Restored(keys=spare, channels=pruned, columns=columns, present=present, rows=row_mask).add_to(logits, q, scaling)
    expected = thinned.clone()
    for b in range(batch):
        for h in range(heads):
            for i, c in enumerate(columns[b, h].tolist()):
                if present[b, h, i]:
                    expected[b, h, row_mask, c] = full[b, h, row_mask, c]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits, thinned)


@pytest.mark.parametrize("q_len", [1, 4])
def test_sinks_join_the_softmax_without_a_value(q_len):
    """GPT-OSS's sinks: one logit per query head in every row's softmax, with no value. Against the formula spelled
    out (a column of sink logits concatenated, softmax, the column dropped) over the zeroed dense keys; a padded
    key stays masked, and a row whose every key is masked gives all its weight to the sink (an output of 0)."""
    g = torch.Generator().manual_seed(3)
    batch, kv_heads, group, n_compact, n_recent, dim = 2, 2, 3, 9, 4, 8
    query = torch.randn(batch, kv_heads * group, q_len, dim, generator=g)
    keys = torch.randn(batch, kv_heads, n_compact + n_recent, dim, generator=g)
    values = torch.randn(batch, kv_heads, n_compact + n_recent, dim, generator=g)
    sinks = torch.randn(kv_heads * group, generator=g) * 2
    channels = torch.randperm(dim, generator=g)[:5].sort().values.expand(batch, kv_heads, 5).contiguous()
    store = _store(keys[:, :, :n_compact], channels, values[:, :, :n_compact])
    mask = torch.ones(batch, 1, q_len, n_compact + n_recent, dtype=torch.bool)
    mask[1, :, :, :3] = False  # row 1's first three keys are padding
    if q_len > 1:
        mask[1, :, 0, :] = False  # and its first row sees none
    out = compact_attention(query, store, keys[:, :, n_compact:], values[:, :, n_compact:], mask, 0.3, sinks=sinks)

    k = keys.clone()
    k[:, :, :n_compact] *= _keep(channels, dim)[:, :, None, :]
    k, v = k.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    logits = (query @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, -torch.inf)
    combined = torch.cat([logits, sinks.view(1, -1, 1, 1).expand(batch, -1, q_len, 1)], dim=-1)
    expected = (torch.softmax(combined, dim=-1)[..., :-1] @ v).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    without = compact_attention(query, store, keys[:, :, n_compact:], values[:, :, n_compact:], mask, 0.3)
    assert (out - without).abs().max() > 0.05  # the sinks take a share
    if q_len > 1:
        assert out[1, 0].abs().max() == 0  # a row with no key: everything went to the sink
