"""Regression tests for the defects of issue 12, one section per defect."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import generate, make_batch, make_model, peak_allocated_bytes
from transformers import GenerationConfig

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


# ------------------------------------------------------------------- 2. window_attention's memory is bounded
def _window_attention_reference(query, keys, real_keys, scaling, rows):
    """The unchunked formula, one query head at a time: softmax over the causal, unpadded keys, real rows summed."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads, tokens = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    total = torch.zeros(batch, kv_heads, tokens)
    q_pos = torch.arange(tokens - q_len, tokens)
    allowed = (torch.arange(tokens)[None, :] <= q_pos[:, None])[None] & real_keys[:, None, :]  # (B, q_len, T)
    for h in range(q_heads):
        logits = query[:, h].double() @ keys[:, h // group].double().transpose(-1, -2) * scaling
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        weights = weights * real_keys[:, tokens - q_len :, None]
        total[:, h // group] += weights[:, q_len - rows :].sum(1).float()
    return total


@pytest.mark.parametrize("budget", [None, 300])
@pytest.mark.parametrize("rows", [None, 1, 7, 19])
@pytest.mark.parametrize("q_len", [19, 6])
def test_window_attention_equals_the_unchunked_formula(monkeypatch, budget, rows, q_len):
    from think_cache import policies

    if budget is not None:  # force many small chunks
        monkeypatch.setattr(policies, "QUERY_CHUNK_ELEMENTS", budget, raising=False)
    g = torch.Generator().manual_seed(121)
    batch, kv_heads, group, tokens, head_dim = 3, 2, 3, 19, 8
    query = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=g)
    keys = torch.randn(batch, kv_heads, tokens, head_dim, generator=g)
    real = torch.ones(batch, tokens, dtype=torch.bool)
    real[1, :5] = False  # left padding
    real[2, :16] = False  # padding reaching into the queries
    got = policies.window_attention(query, keys, real, 0.4, rows=rows)
    expected = _window_attention_reference(query, keys, real, 0.4, q_len if rows is None else min(rows, q_len))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.all(got[1, :, :5] == 0) and torch.all(got[2, :, :16] == 0)


def test_window_attention_chunks_stay_within_a_fixed_budget():
    """The largest logits block does not grow with the prompt (H2O scores every prompt query)."""
    from think_cache.policies import QUERY_CHUNK_ELEMENTS, _query_chunk

    for batch, group in [(1, 1), (2, 4), (1, 8), (4, 8)]:
        for tokens in (4096, 8192, 32768):
            chunk = _query_chunk(tokens, tokens, batch, group)  # one KV head's block
            assert 1 <= chunk <= tokens
            assert chunk == 1 or chunk * batch * group * tokens <= QUERY_CHUNK_ELEMENTS
    assert _query_chunk(3, 10, 1, 1) == 3  # never more rows than asked for
    assert _query_chunk(100, 2**22, 1, 4) == 1  # at least one row


def test_window_attention_peak_memory_is_one_block(monkeypatch):
    """Measured: scoring every query of a 2k prompt holds one block of the budget, not a tokens x tokens matrix."""
    from think_cache import policies

    budget = 2**18
    monkeypatch.setattr(policies, "QUERY_CHUNK_ELEMENTS", budget, raising=False)
    g = torch.Generator().manual_seed(123)
    query, keys = torch.randn(1, 4, 2048, 16, generator=g), torch.randn(1, 2, 2048, 16, generator=g)
    real = torch.ones(1, 2048, dtype=torch.bool)
    peak = peak_allocated_bytes(lambda: policies.window_attention(query, keys, real, 0.25))
    assert peak <= 1.25 * 4 * budget  # the float32 block, plus a mask and sums of a few rows


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [4096, 8192])
def test_h2o_prefill_peak_memory_is_close_to_dynamic_cache(tokens):
    """H2O scores every prompt query: its prefill's peak extra memory stays within 1.2x DynamicCache's (8 KV heads,
    float32), where the whole tokens x tokens attention used to be materialised."""
    from transformers import DynamicCache

    from think_cache import H2O

    model = make_model(
        "llama", hidden_size=256, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=tokens
    )
    ids, _ = make_batch([tokens], seed=122)
    peaks = {}
    for name, new_cache in [("dynamic", DynamicCache), ("h2o", lambda: ThinKCache(policy=H2O(budget=1024)))]:

        def prefill(new_cache=new_cache):
            cache = new_cache()
            if isinstance(cache, ThinKCache):
                cache.mark_prompt_end(tokens)  # compacted (H2O's selection) at the prompt's end, as generate does
            with torch.no_grad():
                model(input_ids=ids, past_key_values=cache)
            assert not isinstance(cache, ThinKCache) or cache.layers[0].is_compacted

        prefill()  # warm up
        peaks[name] = peak_allocated_bytes(prefill)
    print(f"prefill peak at {tokens} tokens: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in peaks.items()))
    assert peaks["h2o"] <= 1.2 * peaks["dynamic"]


# -------------------------------------------------- 3. an exception in a patched attention leaks no state
def test_state_does_not_leak_past_an_attention_that_raised():
    """The batch-size error raised inside a patched Mistral's attention must not leave that module recorded as
    running: a ThinKCache on an unpatched Llama is then refused, not served with Mistral's sliding layers."""
    mistral = make_model("mistral", sliding_window=16)
    ids, mask = make_batch([30, 30], seed=124)
    cache = ThinKCache(key_ratio=0.5)
    mistral(input_ids=ids, attention_mask=mask, past_key_values=cache)
    with pytest.raises(ValueError, match="holds a batch of 2"):
        mistral(input_ids=ids[:1, :4], past_key_values=cache)
    llama = make_model("llama", patch=False)
    with pytest.raises(RuntimeError, match="has not been patched"):
        llama(input_ids=ids, attention_mask=mask, past_key_values=ThinKCache(key_ratio=0.5))


# ------------------------------------------------ 4. the one-liner reads GenerationConfig like generate does
def _returned_cache(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


def test_one_liner_respects_use_cache_false_in_a_generation_config():
    import think_cache

    plain = make_model("llama", patch=False)
    patched = think_cache.patch(make_model("llama", patch=False), key_ratio=0.5, window=8)
    ids, mask = make_batch([40], seed=125)
    config = GenerationConfig(use_cache=False, max_new_tokens=4, do_sample=False)
    kwargs = dict(input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True)
    expected = plain.generate(generation_config=config, **kwargs)
    for out in (
        patched.generate(generation_config=config, **kwargs),
        patched.generate(ids, config, attention_mask=mask, output_logits=True, return_dict_in_generate=True),
    ):
        assert _returned_cache(out) is None
        for a, b in zip(out.logits, expected.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # an explicit keyword wins over the passed config, as in generate
    out = patched.generate(generation_config=config, use_cache=True, **kwargs)
    assert isinstance(_returned_cache(out), ThinKCache)
    # and model.generation_config is read when nothing else says
    patched.generation_config.use_cache = False
    out = patched.generate(max_new_tokens=2, **kwargs)
    assert _returned_cache(out) is None


@pytest.mark.parametrize("option, value", [("cache_implementation", "static"), ("compile_config", "compile")])
def test_one_liner_refuses_a_cache_implementation_set_in_a_generation_config(option, value):
    import think_cache

    if value == "compile":
        from transformers import CompileConfig

        value = CompileConfig()
    model = think_cache.patch(make_model("llama", patch=False), key_ratio=0.5)
    ids, _ = make_batch([20], seed=126)
    with pytest.raises(ValueError, match=rf"generation_config passed to generate \({option}="):
        model.generate(input_ids=ids, max_new_tokens=2, generation_config=GenerationConfig(**{option: value}))
    with pytest.raises(ValueError, match=rf"generation_config passed to generate \({option}="):
        model.generate(ids, GenerationConfig(**{option: value}), max_new_tokens=2)
    setattr(model.generation_config, option, value)
    with pytest.raises(ValueError, match=rf"model.generation_config.{option} = "):
        model.generate(input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"generate\(\.\.\., {option}="):
        model.generate(input_ids=ids, max_new_tokens=2, **{option: value})
    if option == "cache_implementation":  # with a cache passed, the user chose: transformers' own check speaks
        with pytest.raises(ValueError) as error:
            model.generate(input_ids=ids, max_new_tokens=2, past_key_values=ThinKCache(key_ratio=0.5))
        assert "think_cache.patch" not in str(error.value)


def test_one_liner_ignores_the_legacy_hybrid_default_of_a_model_generation_config():
    """transformers drops ``cache_implementation="hybrid"`` coming from a model's generation config (the old default
    of sliding-window models): the one-liner must not refuse it either."""
    import think_cache

    model = think_cache.patch(make_model("mistral", patch=False), key_ratio=0.5)
    model.generation_config.cache_implementation = "hybrid"
    ids, _ = make_batch([30], seed=127)
    out = model.generate(input_ids=ids, max_new_tokens=2, return_dict_in_generate=True)
    assert isinstance(_returned_cache(out), ThinKCache)


def test_patching_again_without_settings_keeps_the_defaults():
    import think_cache

    model = think_cache.patch(make_model("llama", patch=False), key_ratio=0.5, window=8)
    think_cache.patch(model)
    ids, _ = make_batch([30], seed=128)
    out = model.generate(input_ids=ids, max_new_tokens=2, return_dict_in_generate=True)
    cache = _returned_cache(out)
    assert isinstance(cache, ThinKCache) and cache.key_ratio == 0.5 and cache.window == 8
    think_cache.unpatch(model)
    out = model.generate(input_ids=ids, max_new_tokens=2, return_dict_in_generate=True)
    assert not isinstance(_returned_cache(out), ThinKCache)


# ------------------------------------- 5. output_attentions gives real weights; continuous batching is refused
def _attentions(out):
    """Per step, per layer attention weights of a generate output; fails on an empty step."""
    assert len(out.attentions) == len(out.logits)
    for step in out.attentions:
        assert len(step) > 0 and all(w is not None for w in step), "no attention weights were returned"
    return out.attentions


def _assert_same_attentions(a, b, atol):
    for step_a, step_b in zip(_attentions(a), _attentions(b), strict=True):
        for x, y in zip(step_a, step_b, strict=True):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_output_attentions_equal_the_eager_model(arch):
    """key_ratio=0 (and any other cache on a patched model) returns the weights an unpatched eager model returns,
    whether the patched model was loaded with sdpa or eager."""
    from transformers import DynamicCache

    eager = make_model(arch, patch=False, sliding_window=16, attn_implementation="eager")
    ids, mask = make_batch([40, 27], seed=129)
    expected = generate(eager, ids, mask, DynamicCache(config=eager.config), steps=4, output_attentions=True)
    for attn_implementation in ("sdpa", "eager"):
        patched = make_model(arch, sliding_window=16, attn_implementation=attn_implementation)
        for cache in (ThinKCache(key_ratio=0), DynamicCache(config=patched.config)):
            out = generate(patched, ids, mask, cache, steps=4, output_attentions=True)
            _assert_same_attentions(out, expected, atol=1e-5)
            for a, b in zip(out.logits, expected.logits, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_output_attentions_of_a_pruned_cache_equal_the_dense_reference(arch):
    """Once compacted, the weights are those of the dense reference (pruned channels zeroed) on an eager model."""
    from conftest import zeroed_reference

    model = make_model(arch, sliding_window=16)
    eager = make_model(arch, patch=False, sliding_window=16, attn_implementation="eager")
    ids, mask = make_batch([40, 27], seed=130)
    think = ThinKCache(key_ratio=0.5, window=8, recent=4)
    out = generate(model, ids, mask, think, steps=6, output_attentions=True)
    assert all(layer.is_compacted for layer in think.layers)
    ref = generate(eager, ids, mask, zeroed_reference(think, model), steps=6, output_attentions=True)
    _assert_same_attentions(out, ref, atol=1e-4)


def test_output_attentions_under_a_policy_are_per_logical_token():
    """With eviction, each head keeps other tokens: the weights are spread back over the tokens seen, evicted ones 0."""
    from think_cache import H2O

    model = make_model("llama")
    ids, mask = make_batch([40, 27], seed=131)
    policy = H2O(budget=16, recent=4)
    cache = ThinKCache(key_ratio=0.5, policy=policy)
    out = generate(model, ids, mask, cache, steps=40, output_attentions=True)
    slack = cache.layers[0].fold_block  # H2O evicts a fold block at a time
    seen = []
    for step, weights in enumerate(_attentions(out)[1:], start=1):
        for w in weights:
            assert w.shape == (2, 4, 1, 40 + step)
            torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 1), atol=1e-5, rtol=0)
            # the budget and its slack, plus this step's token
            assert ((w != 0).sum(-1) <= policy.budget + slack + 1).all()
        seen.append(int((weights[0] != 0).sum(-1).max()))
    assert min(seen[slack:]) < max(seen)  # evictions happened: evicted tokens weigh 0


def test_continuous_batching_on_a_patched_model_names_unpatch():
    import think_cache

    model = make_model("llama")
    ids, _ = make_batch([12], seed=132)
    with pytest.raises(ValueError, match=r"think_cache.unpatch\(model\)"):
        model.generate_batch([ids[0].tolist()], max_new_tokens=2)
    if "paged" in inspect.getsource(type(model).generate):  # 4.x refuses the name; 5.x runs continuous batching
        with pytest.raises(ValueError, match=r"think_cache.unpatch\(model\)"):
            model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="paged")
    think_cache.unpatch(model)
    assert "init_continuous_batching" not in vars(model)
