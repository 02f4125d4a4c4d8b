"""Regression tests for the defects of issue 12, one section per defect."""

from __future__ import annotations

import pytest
import torch
from conftest import generate, make_batch, make_model

from think_cache import ThinKCache, ThinKLayer, ThinKSlidingLayer


# ------------------------------------------------------------------- 1. reset() forgets the model's layers
@pytest.mark.parametrize("key_ratio", [0, 0.5])
@pytest.mark.parametrize("first, second", [("mistral", "llama"), ("llama", "mistral")])
def test_reset_cache_serves_another_model_like_a_fresh_one(first, second, key_ratio):
    """After `reset()`, a cache filled by a model with sliding layers (or without) gives the next model the layer
    kinds that model needs: the same logits as a fresh cache."""
    models = {"mistral": make_model("mistral", sliding_window=16), "llama": make_model("llama")}
    ids, mask = make_batch([40, 27], seed=120)
    cache = ThinKCache(key_ratio=key_ratio, window=8)
    generate(models[first], ids, mask, cache, steps=3)
    cache.reset()
    reused = generate(models[second], ids, mask, cache, steps=6)
    fresh = generate(models[second], ids, mask, ThinKCache(key_ratio=key_ratio, window=8), steps=6)
    for a, b in zip(reused.logits, fresh.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(reused.sequences, fresh.sequences)
    expected = ThinKSlidingLayer if second == "mistral" else ThinKLayer
    assert all(type(layer) is expected for layer in cache.layers)
