"""Regression tests for defects an adversarial review found in the layer: value pruning under padding, policies on
sliding-window layers, a custom policy without a budget, small sliding windows that never folded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import generate, held_bytes, make_batch, make_model
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from think_cache import H2O, Policy, SnapKV, StreamingLLM, ThinKCache
from think_cache.scoring import value_channel_scores


# ------------------------------------------------------------------------------ value pruning under padding
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_value_pruning_does_not_depend_on_batch_mates(arch):
    """A 10-token row (window 32) chose other value channels batched than alone: padded query rows spread an even
    softmax over the keys into the value score."""
    model = make_model(arch)
    ids, mask = make_batch([40, 10], seed=21)
    settings = dict(key_ratio=0.5, value_ratio=0.5, window=32)
    batched = ThinKCache(**settings)
    out = generate(model, ids, mask, batched, 6)
    alone = ThinKCache(**settings)
    single = generate(model, ids[1:, 30:], mask[1:, 30:], alone, 6)
    for la, lb in zip(batched.layers, alone.layers, strict=True):
        assert torch.equal(la.value_channels[1], lb.value_channels[0])
        assert torch.equal(la.key_channels[1], lb.key_channels[0])
    assert torch.equal(out.sequences[1, 30:], single.sequences[0])
    for x, y in zip(out.logits, single.logits, strict=True):
        torch.testing.assert_close(x[1:], y, atol=1e-5, rtol=0)


def test_value_scores_ignore_rows_with_no_key():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., :2, :] = False  # two padded query rows
    scores = value_channel_scores(q, k, v, 0.35, mask)
    expected = value_channel_scores(q[:, :, 2:], k, v, 0.35, mask[:, :, 2:])
    torch.testing.assert_close(scores, expected)


# ------------------------------------------------------------------------- policies on sliding-window layers
class _Bytes(LogitsProcessor):
    def __init__(self, cache):
        self.cache, self.bytes, self.tokens = cache, [], []

    def __call__(self, input_ids, scores):
        self.bytes.append(held_bytes(self.cache))
        if isinstance(self.cache, ThinKCache):
            self.tokens.append(max(layer.stored_tokens for layer in self.cache.layers))
        return scores


def _run(model, ids, cache, steps):
    watch = _Bytes(cache)
    dense = DynamicCache(config=model.config)  # with transformers' sliding layers
    dense_watch = _Bytes(dense)
    for c, w in ((cache, watch), (dense, dense_watch)):
        model.generate(
            input_ids=ids,
            past_key_values=c,
            max_new_tokens=steps,
            do_sample=False,
            logits_processor=LogitsProcessorList([w]),
        )
    return watch, dense_watch


@pytest.mark.parametrize(
    "policy",
    [None, SnapKV(budget=32, window=8), H2O(budget=200, recent=8), StreamingLLM(sink=4, recent=100)],
    ids=["none", "snapkv", "h2o", "streaming"],
)
def test_sliding_layers_keep_at_most_their_window_under_any_policy(policy):
    """Mistral, window 48, 60-token prompt, 300 steps: SnapKV(32) kept 332 tokens a layer (5.6x DynamicCache's
    bytes), H2O(200) 200: tokens out of the window were kept that no query can see."""
    model = make_model("mistral", sliding_window=48)
    ids, _ = make_batch([60], seed=22)
    think, dense = _run(model, ids, ThinKCache(key_ratio=0.5, policy=policy, window=8), 300)
    assert max(think.tokens) <= 47 + 1  # the window, and the newest forward's token
    for step, (a, b) in enumerate(zip(think.bytes, dense.bytes, strict=True)):
        assert a <= b, (step, a, b)
    assert think.bytes[-1] < 0.95 * dense.bytes[-1]  # thinned, not just bounded
    # at key_ratio 0 the token bound holds too (positions and scores add a few bytes per token there)
    think0, _ = _run(model, ids, ThinKCache(key_ratio=0.0, policy=policy, window=8), 120)
    assert max(think0.tokens) <= 48


def test_snapkv_on_a_sliding_layer_picks_tokens_inside_the_window():
    model = make_model("mistral", sliding_window=48)
    ids, mask = make_batch([200], seed=23)
    cache = ThinKCache(key_ratio=0.5, policy=SnapKV(budget=40, window=8))
    generate(model, ids, mask, cache, 1)
    for layer in cache.layers:
        kept = layer.compact_positions.long()
        assert kept.shape[-1] == 40
        assert int(kept.min()) >= 200 - 47  # every kept token is one the next query can see


def test_small_sliding_window_folds_generated_tokens():
    """A window of 16 (<= 32 + recent): generated tokens never folded, so sliding layers held 1.008x DynamicCache."""
    model = make_model("mistral", sliding_window=16)
    ids, _ = make_batch([40], seed=24)
    think, dense = _run(model, ids, ThinKCache(key_ratio=0.5), 60)
    assert think.bytes[-1] < 0.9 * dense.bytes[-1]
    assert all(a <= b for a, b in zip(think.bytes, dense.bytes, strict=True))


# -------------------------------------------------------------------------------- a custom policy's budget
@dataclass
class _EveryStepNoBudget(Policy):
    budget: int | None = None
    evicts_while_decoding: ClassVar[bool] = True

    def prompt_scores(self, query, keys, real_keys, scaling):
        return torch.zeros(keys.shape[:3])

    def decode_scores(self, positions, accumulated):
        return positions.float()


def test_custom_policy_without_a_budget_keeps_everything():
    """A Policy with budget=None that evicts while decoding crashed with a TypeError (int - None)."""
    model = make_model("llama")
    ids, mask = make_batch([30], seed=25)
    cache = ThinKCache(key_ratio=0.5, policy=_EveryStepNoBudget())
    generate(model, ids, mask, cache, 8)
    assert cache.layers[0].stored_tokens == 30 + 7
