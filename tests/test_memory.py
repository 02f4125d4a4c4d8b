"""Pruned channels are really not stored: bytes held, measured from the tensors' storages."""

from __future__ import annotations

import pytest
import torch
from conftest import held_bytes, make_batch, make_model, prefill
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from think_cache import ThinKCache
from think_cache.layer import FOLD_BLOCK


def test_half_the_key_channels_saves_a_quarter():
    # head_dim 64 (hidden 256 / 4 heads), 2 KV heads, a 1k-token prompt
    model = make_model("llama", hidden_size=256, intermediate_size=256)
    ids, _ = make_batch([1024])
    dense = prefill(model, DynamicCache(), ids)
    think = prefill(model, ThinKCache(key_ratio=0.5), ids)
    ratio = held_bytes(think) / held_bytes(dense)
    assert ratio <= 0.76, ratio
    assert ratio >= 0.75  # sanity: values and the channel indices are still there
    # the cache's own report agrees with the walk over its tensors
    assert think.stats().stored_bytes == held_bytes(think)
    assert think.stats().dense_bytes == held_bytes(dense)


def test_memory_stays_bounded_relative_while_decoding():
    model = make_model("llama")
    ids, _ = make_batch([200])
    cache = ThinKCache(key_ratio=0.75, recent=16)
    steps = []

    class Watch(LogitsProcessor):
        def __call__(self, input_ids, scores):
            steps.append([layer.keys.shape[-2] for layer in cache.layers])
            return scores

    model.generate(
        input_ids=ids,
        past_key_values=cache,
        max_new_tokens=80,
        do_sample=False,
        logits_processor=LogitsProcessorList([Watch()]),
    )
    # between forwards the full-width part holds `recent` and at most FOLD_BLOCK generated tokens; it folds back to
    # `recent` before the forward that would make it more (so the newest forward's token is there too)
    assert all(16 <= n <= 16 + FOLD_BLOCK for row in steps for n in row)
    assert steps[0] == [16, 16] and 17 in [row[0] for row in steps[1:]]
    n_full = cache.layers[0].keys.shape[-2]
    n_compact = 200 + 79 - n_full
    assert cache.layers[0].compact_tokens == n_compact
    # keys at a quarter width except the full-width ones, the 12 pruned channels of the prompt's last 32 tokens
    # kept aside for a later prompt (`ThinKLayer.restored`), plus full values
    assert cache.layers[0].spare_positions == list(range(168, 200))
    expected = ((n_compact * 4 + n_full * 16 + 32 * 12) + 279 * 16) / (2 * 279 * 16)
    assert abs(cache.stats().ratio - expected) < 0.005


def test_no_hidden_views_of_large_buffers():
    """Every tensor a layer holds owns a storage of exactly its own size."""
    model = make_model("qwen3")
    ids, _ = make_batch([120])
    cache = ThinKCache(key_ratio=0.5, value_ratio=0.5, recent=8)
    model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    for layer in cache.layers:
        for t in layer.tensors():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_stats_and_repr():
    model = make_model("llama")
    ids, _ = make_batch([100])
    cache = ThinKCache(key_ratio=0.5, recent=32)
    assert "empty" in repr(cache)
    prefill(model, cache, ids)
    s = cache.stats()
    assert len(s.layers) == 2 and s.tokens == 100
    layer = s.layers[0]
    assert (layer.key_channels, layer.value_channels, layer.head_dim) == (8, 16, 16)
    assert (layer.stored_tokens, layer.compact_tokens) == (100, 68)
    assert 0.5 < s.ratio < 1 and s.saved_bytes > 0
    text = repr(cache)
    assert "key_ratio=0.5" in text and "recent=32" in text and "2 layers" in text and "100 tokens" in text
    assert "KiB" in text
    assert "total:" in str(s) and "DynamicCache" in str(s)
    d = s.to_dict()
    assert d["stored_bytes"] == s.stored_bytes and len(d["layers"]) == 2
    assert s.static_bytes is None and d["static_bytes"] is None and "static" not in str(s)


def test_stats_table_stays_aligned_with_wide_heads():
    """128-channel heads ("64/128") and a thousand tokens do not push the table's columns out of line."""
    model = make_model("llama", head_dim=128)
    cache = prefill(model, ThinKCache(key_ratio=0.5), make_batch([1000])[0])
    header, *rows, total = str(cache.stats()).splitlines()
    assert "64/128" in rows[0] and "1000" in rows[0] and total.startswith("total:")
    table = [header, *rows]
    assert len({len(line) for line in table}) == 1, "\n".join(table)  # right-aligned cells: one width a column


def test_channel_map_needs_the_channels_chosen():
    """A plain forward over a prompt does not compact (generate marks the prompt's end): mapping its channels then
    would show every channel kept, so it is refused with what to do; after ``compact()`` half are kept."""
    from think_cache.plotting import channel_map

    model = make_model("llama")
    cache = ThinKCache(key_ratio=0.5)
    with torch.no_grad():
        model(input_ids=make_batch([60])[0], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"has not chosen its channels yet .* call cache.compact\(\)"):
        channel_map(cache)
    cache.compact()
    assert channel_map(cache).mean().item() == 0.5


@pytest.mark.parametrize("key_ratio", [0.5, 0.0])
def test_channel_map_checks_its_batch_row(key_ratio):
    """A row past the batch is named, not an IndexError (nor, at key ratio 0, a map of a row that is not there)."""
    from think_cache.plotting import channel_map

    model = make_model("llama")
    cache = ThinKCache(key_ratio=key_ratio)
    generate_ids, mask = make_batch([30, 20])
    model.generate(input_ids=generate_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2)
    assert channel_map(cache, -2).shape == channel_map(cache, 1).shape
    for bad in (2, -3, 1.0, True):
        with pytest.raises(ValueError, match=r"batch_index must be an int in \[-2, 2\) \(the cache holds 2 rows\)"):
            channel_map(cache, bad)


def test_held_bytes_names_what_it_takes():
    from think_cache import held_bytes

    with pytest.raises(TypeError, match=r"takes a transformers Cache .* got NoneType \(a generate output without"):
        held_bytes(None)
    assert held_bytes(DynamicCache()) == 0
