"""key_ratio > 0 equals a dense reference: full-size stock cache with the pruned channels zeroed, stock attention."""

from __future__ import annotations

import pytest
import torch
from conftest import generate, make_batch, make_model, named_tensors, zeroed_reference

from think_cache import ThinKCache

ATOL = 1e-4


def _compare(model, ids, mask, steps, **settings):
    think = ThinKCache(**settings)
    out = generate(model, ids, mask, think, steps)
    assert all(layer.is_compacted for layer in think.layers)
    ref = generate(model, ids, mask, zeroed_reference(think, model), steps)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    return think, out


@pytest.mark.parametrize("key_ratio", [0.25, 0.5, 0.75])
def test_single_prompt_with_folding(arch, key_ratio):
    """Decoding 40 tokens past a recent part of 8: the recent part folds into the compact part in blocks."""
    model = make_model(arch)
    ids, mask = make_batch([36])
    think, _ = _compare(model, ids, mask, 40, key_ratio=key_ratio, window=8, recent=8)
    layer = think.layers[0]
    assert 8 <= layer.keys.shape[-2] < 8 + layer.fold_block
    assert layer.compact_tokens > 36 - 8  # a block was folded while decoding
    assert layer.store.keys.shape[-1] == layer.key_channels.shape[-1] < layer.head_dim


def test_defaults_thin_every_prompt_token(arch):
    """The defaults (recent=0): the whole prompt is compacted; generated tokens wait full-width, then fold."""
    model = make_model(arch)
    ids, mask = make_batch([40, 25], seed=5)
    think, _ = _compare(model, ids, mask, 36, key_ratio=0.5, window=8)
    layer = think.layers[0]
    assert layer.recent == 0
    # 35 generated tokens reached the cache (the last one is not fed back): one block of 32 folded
    assert layer.keys.shape[-2] == 35 - layer.fold_block
    if not layer.is_sliding:  # a sliding layer (mistral's window of 48) trims the oldest compact tokens
        assert layer.compact_tokens == 40 + layer.fold_block


@pytest.mark.parametrize("key_ratio", [0.25, 0.5, 0.75])
def test_batch_with_left_padding(arch, key_ratio):
    model = make_model(arch)
    ids, mask = make_batch([41, 23, 12], seed=7)
    think, _ = _compare(model, ids, mask, 30, key_ratio=key_ratio, window=6, recent=10)
    # rows choose their own channels
    channels = think.layers[0].key_channels
    assert channels.shape[0] == 3


def test_continued_generation_folds_long_input(arch):
    """A second, longer input on a compacted cache folds many tokens at once (multi-token compact attention)."""
    model = make_model(arch)
    ids, mask = make_batch([30], seed=8)
    think = ThinKCache(key_ratio=0.5, window=8, recent=8)
    first = generate(model, ids, mask, think, 6)
    ids2 = torch.cat([first.sequences, torch.randint(3, 200, (1, 20))], dim=-1)
    second = generate(model, ids2, torch.ones_like(ids2), think, 10)

    ref_cache = zeroed_reference(think, model)
    ref_first = generate(model, ids, mask, ref_cache, 6)
    ref_second = generate(model, ids2, torch.ones_like(ids2), ref_cache, 10)
    assert torch.equal(first.sequences, ref_first.sequences)
    assert torch.equal(second.sequences, ref_second.sequences)
    for a, b in zip(second.logits, ref_second.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_pruning_changes_the_output_at_high_ratio():
    """Guard against a reference that is trivially equal: at 0.75 the logits differ from the unpruned run."""
    model = make_model("llama")
    ids, mask = make_batch([36])
    pruned = generate(model, ids, mask, ThinKCache(key_ratio=0.75, window=8, recent=8), 10)
    full = generate(model, ids, mask, ThinKCache(key_ratio=0), 10)
    assert not torch.allclose(pruned.logits[-1], full.logits[-1], atol=1e-4)


def test_beam_search_with_pruning(arch):
    """Beams reorder every per-row tensor (channels, compact and recent parts) at each step."""
    model = make_model(arch)
    ids, mask = make_batch([34, 20], seed=9)
    settings = dict(key_ratio=0.5, window=6, recent=6)
    think = ThinKCache(**settings)
    kwargs = dict(
        num_beams=3,
        num_return_sequences=3,
        max_new_tokens=40,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=think, **kwargs)
    assert think.layers[0].store.keys.shape[0] == 6  # 2 prompts x 3 beams
    ref = model.generate(input_ids=ids, attention_mask=mask, past_key_values=zeroed_reference(think, model), **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bits", [None, 4])
def test_reorder_and_select_move_every_row_tensor(bits):
    from think_cache import H2O

    model = make_model("llama")
    ids, mask = make_batch([40, 30, 20], seed=10)
    cache = ThinKCache(key_ratio=0.5, value_ratio=0.5, policy=H2O(budget=24, recent=4), window=6, bits=bits)
    generate(model, ids, mask, cache, 40)  # past a fold block: H2O has evicted from the compact part
    layer = cache.layers[0]
    before = {name: t.clone() for name, t in named_tensors(layer).items()}
    # every per-row tensor this cache (compacted, values pruned, H2O scores) holds must follow the beams
    held = "store.key_channels store.value_channels compact_positions token_scores".split()
    if bits is None:
        held += ["store.keys", "store.values"]
    else:  # codes, scales, key zero points (4-bit values are symmetric: none), the block index eviction made
        held += [f"store.keys.{name}" for name in ("codes", "scale", "zero", "block_index")]
        held += ["store.values.codes", "store.values.scale"]
        assert "store.values.zero" not in before
    assert set(held) <= set(before)

    def now():
        return named_tensors(layer)

    order = torch.tensor([2, 0, 1])
    cache.reorder_cache(order)
    for name, t in before.items():
        assert torch.equal(now()[name], t[order]), name
    cache.batch_select_indices(torch.tensor([1]))
    for name, t in before.items():
        assert torch.equal(now()[name], t[order][1:2]), name
    cache.batch_repeat_interleave(2)
    assert all(now()[name].shape[0] == 2 for name in before)
