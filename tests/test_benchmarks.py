"""The benchmarks' shared prefill rebuilds each method's cache exactly (so accuracy tables are honest)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model

from benchmarks.common import cache_from_prefill, greedy_decode, make_cache, record_prefill
from think_cache import H2O, SnapKV, StreamingLLM, ThinKCache, held_bytes


@pytest.mark.parametrize(
    "method", ["dynamic", "think-0.5", "snapkv-32+think-0.5", "think-0.4+value-0.5", "h2o-48+think-0.5"]
)
def test_replayed_prefill_equals_a_real_run(method):
    model = make_model("llama")
    ids, _ = make_batch([90], seed=21)
    real_cache = make_cache(method)
    real = model.generate(input_ids=ids, past_key_values=real_cache, max_new_tokens=12, do_sample=False)
    prefill = record_prefill(model, ids, keep_queries=None if "h2o" in method else 64)
    cache = cache_from_prefill(model, method, prefill)
    assert held_bytes(cache) > 0
    tokens = greedy_decode(model, cache, prefill.logits.argmax(-1), 12, eos=set())
    assert tokens == real[0, 90:].tolist()
    if method != "dynamic":
        for a, b in zip(cache.layers, real_cache.layers, strict=True):
            assert torch.equal(a.key_channels, b.key_channels)


def test_method_names():
    assert isinstance(make_cache("think-0.4"), ThinKCache) and make_cache("think-0.4").key_ratio == 0.4
    c = make_cache("snapkv-256+think-0.5+value-0.25")
    assert isinstance(c.policy, SnapKV) and c.policy.budget == 256 and c.value_ratio == 0.25
    assert isinstance(make_cache("h2o-128").policy, H2O)
    assert make_cache("streaming-64").policy == StreamingLLM(sink=4, recent=60)
    with pytest.raises(ValueError, match="unknown method part 'pyramid-3'"):
        make_cache("pyramid-3")
