"""The static, compileable ThinK cache (``ThinKCache(max_cache_len=N)``, issue 15): the same answers as the dynamic
ThinKCache, eager and compiled (no graph break), the bytes it holds, and the errors where N is too small."""

from __future__ import annotations

import pytest
import torch
from conftest import generate, held_bytes, make_batch, make_model, prefill
from transformers.cache_utils import DynamicCache, StaticCache

import think_cache
from think_cache import H2O, SnapKV, StreamingLLM, ThinKCache
from think_cache import _compat as compat

torch.set_num_threads(1)

NEEDS_5X = pytest.mark.skipif(
    compat.TRANSFORMERS_VERSION.major < 5,
    reason="transformers 4.x builds cache_position with torch.arange(cache.get_seq_length(), ...) in the forward, "
    "which a 0-d tensor length makes data-dependent under fullgraph compile (tried on 4.56.2); compiled static "
    "ThinK steps are tested on 5.x",
)


def decode(model, cache, ids, mask, steps: int, forward=None) -> torch.Tensor:
    """Prefill eagerly, then ``steps`` greedy single-token forwards through ``forward``: ``(batch, steps, vocab)``."""
    prefill(model, cache, ids, mask)
    forward = forward or model.forward
    token, logits = ids[:, -1:].clone(), []
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = mask.cumsum(-1)[:, -1:] - 1
            out = forward(
                input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True,
                **{compat.CACHE_ARGUMENT: cache},
            )  # fmt: skip
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits, dim=1)


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.fixture(scope="module")
def batch():
    return make_batch([50, 37])  # left-padded batch of 2


@pytest.mark.parametrize(
    "settings",
    [{}, {"recent": 8}, {"value_ratio": 0.5}, {"policy": SnapKV(budget=40, window=8)}, {"key_ratio": 0.0}],
    ids=["plain", "recent", "value_ratio", "snapkv", "no-pruning"],
)
def test_eager_static_equals_dynamic(model, batch, settings):
    settings = {"key_ratio": 0.5, **settings}
    ids, mask = batch
    dynamic = decode(model, ThinKCache(**settings), ids, mask, 40)
    cache = ThinKCache(**settings, max_cache_len=96)
    static = decode(model, cache, ids, mask, 40)
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=0)
    assert int(cache.get_seq_length()) == 90


@NEEDS_5X
def test_compiled_fullgraph_equals_eager_without_graph_breaks(model, batch):
    """40 steps crossing a fold block (the prompt ends at 50, the first fold is at 82), inductor, fullgraph."""
    ids, mask = batch
    expected = decode(model, ThinKCache(0.5), ids, mask, 40)
    cache = ThinKCache(0.5, max_cache_len=96)
    compiled = torch.compile(model.forward, fullgraph=True)
    torch._dynamo.reset()
    got = decode(model, cache, ids, mask, 40, forward=compiled)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert_next_step_is_one_graph(model, cache, mask, got[:, -1].argmax(-1, keepdim=True))


def assert_next_step_is_one_graph(model, cache, mask, token):
    """`torch._dynamo.explain` over the next decoding step of ``cache`` (``mask``: its prompt's): one graph, no
    break."""
    seen = int(cache.get_seq_length())
    step_mask = torch.cat([mask, torch.ones(mask.shape[0], seen + 1 - mask.shape[1], dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model.forward)(
            input_ids=token, attention_mask=step_mask, position_ids=step_mask.cumsum(-1)[:, -1:] - 1,
            use_cache=True, **{compat.CACHE_ARGUMENT: cache},
        )  # fmt: skip
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


#: Policies that evict while decoding, with a budget (32 tokens, 40 for H2O) below the 50-token prompt.
EVICTING = {
    "streaming": {"policy": StreamingLLM(sink=4, recent=28)},
    "streaming-recent-values": {"policy": StreamingLLM(sink=2, recent=30), "recent": 8, "value_ratio": 0.5},
    "h2o": {"policy": H2O(budget=40, recent=8)},
    "h2o-recent-values": {"policy": H2O(budget=40, recent=8), "recent": 4, "value_ratio": 0.25},
}


@pytest.mark.parametrize("name", list(EVICTING))
def test_evicting_policies_give_the_eager_logits(model, batch, name):
    """110 steps from a 50-token prompt (a left-padded batch of 2): the eager layer evicts to the budget at the
    prompt, then a block at a time at 82, 114 and 146; the static one frees the same slots by masks."""
    settings = {"key_ratio": 0.5, **EVICTING[name]}
    ids, mask = batch
    eager = ThinKCache(**settings)
    expected = decode(model, eager, ids, mask, 110)
    cache = ThinKCache(**settings, max_cache_len=160)
    got = decode(model, cache, ids, mask, 110)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    layer = cache.layers[0]
    assert layer.stored_tokens == eager.layers[0].stored_tokens
    assert layer.compact_keys.shape[2] == layer.evicting_capacity() < 160  # the budget bounds the buffers
    without = {k: v for k, v in settings.items() if k != "policy"}
    unbounded = decode(model, ThinKCache(**without, max_cache_len=160), ids, mask, 110)
    assert (got - unbounded).abs().max() > 1e-2  # the evictions did change the answers


def test_an_evicting_policy_bounds_the_buffers():
    """StreamingLLM(4 + 60) in a cache for 1024 tokens holds 97 slots (the budget, a fold block and one), not
    1024."""
    model = make_model("llama", head_dim=64)
    ids, mask = make_batch([40])
    n = 1024
    ours = prefill(model, ThinKCache(0.5, policy=StreamingLLM(sink=4, recent=60), max_cache_len=n), ids, mask)
    theirs = prefill(model, StaticCache(config=model.config, max_cache_len=n), ids, mask)
    assert ours.layers[0].compact_keys.shape[2] == 64 + 32 + 1
    ratio = held_bytes(ours) / held_bytes(theirs)
    assert ratio <= 0.77 * 97 / n + 0.03, ratio  # the ring and the slot bookkeeping are the 0.03


@NEEDS_5X
@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_an_evicting_decode_step_is_one_graph(model, batch, name):
    """A decoding step after two evictions, under `torch._dynamo.explain`: one graph, no break."""
    ids, mask = batch
    cache = ThinKCache(0.5, **EVICTING[name], max_cache_len=160)
    logits = decode(model, cache, ids, mask, 80)
    assert_next_step_is_one_graph(model, cache, mask, logits[:, -1].argmax(-1, keepdim=True))


@NEEDS_5X
@pytest.mark.parametrize(
    "name, backend",
    [
        ("streaming", "eager"),
        pytest.param("h2o", "eager", marks=pytest.mark.slow),
        pytest.param("streaming", "inductor", marks=pytest.mark.slow),
        pytest.param("h2o", "inductor", marks=pytest.mark.slow),
    ],
)
def test_compiled_evicting_policies_give_the_eager_logits(model, batch, name, backend):
    """100 compiled steps (fullgraph: a graph break raises) through three evictions give the eager ThinKCache's
    logits. Dynamo's tracing (the "eager" backend) is where a static layer can go wrong: the in-place slot writes
    and frees replayed, the hand-off. Inductor (measured within 2.1e-7 of eager for both policies) compiles the
    eviction step in one to three minutes on a shared CPU with a cold cache, so it runs with ``-m slow``."""
    settings = {"key_ratio": 0.5, **EVICTING[name]}
    ids, mask = batch
    expected = decode(model, ThinKCache(**settings), ids, mask, 100)
    cache = ThinKCache(**settings, max_cache_len=160)
    compiled = torch.compile(model.forward, fullgraph=True, backend=backend)
    torch._dynamo.reset()
    got = decode(model, cache, ids, mask, 100, forward=compiled)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@NEEDS_5X
def test_generate_gives_the_dynamic_greedy_tokens(model, batch):
    """``generate`` with a static ThinKCache: eager, and through transformers' automatic compile."""
    from transformers import CompileConfig

    ids, mask = batch
    expected = generate(model, ids, mask, ThinKCache(0.5), steps=36).sequences
    cache = ThinKCache(0.5, max_cache_len=90)
    assert generate(model, ids, mask, cache, steps=36).sequences.equal(expected)

    config = CompileConfig(fullgraph=True, backend="eager")  # inductor is checked above; this checks the route
    config._compile_all_devices = True  # transformers compiles on CPU only when told
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cache = ThinKCache(0.5, max_cache_len=90)
    assert cache.is_compileable and model._valid_auto_compile_criteria({"cache": cache}, _config(model, config))
    got = generate(model, ids, mask, cache, steps=36, compile_config=config).sequences
    assert got.equal(expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode steps did run compiled


def _config(model, compile_config):
    config = model.generation_config.__class__(**model.generation_config.to_dict())
    config.compile_config = compile_config
    return config


def test_beam_search_reorders_the_buffers(model, batch):
    ids, mask = batch
    expected = generate(model, ids, mask, ThinKCache(0.5), steps=8, num_beams=2).sequences
    got = generate(model, ids, mask, ThinKCache(0.5, max_cache_len=60), steps=8, num_beams=2).sequences
    assert got.equal(expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_holds_at_most_077_of_static_cache(dtype):
    model = make_model("llama", head_dim=64).to(dtype)
    ids, mask = make_batch([40])
    n = 1024
    ours = prefill(model, ThinKCache(0.5, max_cache_len=n), ids, mask)
    theirs = prefill(model, StaticCache(config=model.config, max_cache_len=n), ids, mask)
    ratio = held_bytes(ours) / held_bytes(theirs)
    assert ratio <= 0.77, ratio
    stats = ours.stats()
    assert stats.stored_bytes == held_bytes(ours)  # stats() counts the whole capacity, as held
    assert stats.tokens == 40 and stats.layers[0].key_channels == 32
    static_kv = sum(t.numel() * t.element_size() for layer in theirs.layers for t in (layer.keys, layer.values))
    assert stats.static_bytes == static_kv  # the comparison a static cache's user makes
    assert stats.saved_bytes < 0 and "more" in str(stats)  # 1024 slots against DynamicCache's 40 tokens
    assert f"({ratio:.3f}x; both allocate" in str(stats) and "for StaticCache" in repr(ours)


def test_too_small_max_cache_len_raises(model, batch):
    ids, mask = batch
    with pytest.raises(ValueError, match="max_cache_len=40"):
        prefill(model, ThinKCache(0.5, max_cache_len=40), ids, mask)
    with pytest.raises(ValueError, match=r"prompt \(50\) \+ max_new_tokens \(20\) = 70 tokens"):
        generate(model, ids, mask, ThinKCache(0.5, max_cache_len=60), steps=20)
    cache = ThinKCache(0.5, max_cache_len=52)
    decode(model, cache, ids, mask, 2)  # the prompt (50) and 2 tokens: full
    with pytest.raises(ValueError, match="max_cache_len=52"), torch.no_grad():
        model(input_ids=ids[:, :1], use_cache=True, **{compat.CACHE_ARGUMENT: cache})


def test_refuses_what_it_cannot_do_yet(model, batch):
    with pytest.raises(ValueError, match="does not support StreamingLLM"):  # bits alone works: test_static_quant.py
        ThinKCache(0.5, max_cache_len=64, bits=4, policy=StreamingLLM(sink=4, recent=28))
    mistral = make_model("mistral")
    ids, mask = batch
    with pytest.raises(ValueError, match="sliding-window"):
        prefill(mistral, ThinKCache(0.5, max_cache_len=64), ids, mask)
    cache = prefill(model, ThinKCache(0.5, max_cache_len=64), ids, mask)
    with pytest.raises(NotImplementedError, match="one token per forward"):
        prefill(model, cache, ids[:, :2], mask[:, :2])
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(-1)


def test_cache_api(model, batch):
    ids, mask = batch
    cache = ThinKCache(0.5, max_cache_len=64)
    assert "max_cache_len=64" in repr(cache) and cache.is_compileable and not cache.is_croppable
    assert cache.get_max_cache_shape() == 64
    prefill(model, cache, ids, mask)
    length = cache.get_seq_length()
    assert isinstance(length, torch.Tensor) and int(length) == 50  # a tensor, as StaticCache's
    assert cache.get_mask_sizes(1, 0) == (64, 0)
    assert "max_cache_len=64" in repr(cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.is_compileable
    assert not ThinKCache(0.5).is_compileable


def test_patch_default_allows_compile_config_for_a_static_cache(batch):
    from transformers import CompileConfig

    model = make_model("llama")
    ids, mask = batch
    think_cache.patch(model, key_ratio=0.5, max_cache_len=64)
    config = CompileConfig(backend="eager")  # not _compile_all_devices: on CPU generate runs it eagerly
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, compile_config=config)
    assert out.shape == (2, 54)
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, cache_implementation="static")
    with pytest.raises(ValueError, match="do not fit"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20)
    think_cache.patch(model, key_ratio=0.5, max_cache_len=None)
    with pytest.raises(ValueError, match="compile_config"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, compile_config=config)


def test_generate_default_length_is_checked_before_any_work(model):
    """No max_new_tokens nor max_length: transformers generates 20 new tokens (on every version), which a static
    cache too small for them refuses before the prompt runs (found in review: it filled and failed mid-decode)."""
    ids, _ = make_batch([40], seed=3)
    cache = ThinKCache(key_ratio=0.5, max_cache_len=50)
    with pytest.raises(ValueError, match=r"the prompt \(40\) \+ generate's default of 20 new tokens = 60 tokens"):
        model.generate(input_ids=ids, past_key_values=cache, do_sample=False)
    assert cache.get_seq_length() == 0  # nothing ran
    out = model.generate(input_ids=ids, past_key_values=ThinKCache(key_ratio=0.5, max_cache_len=60), do_sample=False)
    assert out.shape == (1, 60)
    out = model.generate(input_ids=ids, past_key_values=ThinKCache(key_ratio=0.5, max_cache_len=50), max_length=50)
    assert out.shape == (1, 50)  # a max_length passed is the whole length


def test_a_prompt_ending_inside_a_forward_is_refused_clearly():
    """Assisted decoding's first forward holds the prompt and drafts: a static cache refuses it where it enters
    (found in review: it used to fail deep inside attention)."""
    model = make_model("llama")
    ids, _ = make_batch([40], seed=5)
    cache = ThinKCache(key_ratio=0.5, max_cache_len=64)
    cache.mark_prompt_end(30)
    with pytest.raises(NotImplementedError, match="compacts at the end of a forward"), torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="static ThinKCache"):
        model.generate(
            input_ids=ids,
            past_key_values=ThinKCache(key_ratio=0.5, max_cache_len=128),
            prompt_lookup_num_tokens=4,
            max_new_tokens=8,
        )


def _collecting_backend(graph, example_inputs):
    """A compile backend that collects garbage between tracing and guard building, as inductor's long compile
    can (and in benchmarks/speed.py did): the eager backend never does, so it alone cannot show the bug below."""
    import gc

    gc.collect()
    return graph.forward


@NEEDS_5X
def test_a_cache_dying_during_a_compile_does_not_break_it(model, batch):
    """A static ThinKCache dropped in a reference cycle is still alive when the next compiled step (here with
    transformers' StaticCache) is traced, and collected before that step's guards are built. The attention once
    read its layer through a weak reference left on the module, so dynamo guarded on that cache and crashed on the
    dead reference (benchmarks/speed.py, inductor, on its second repeat). Now the layer comes from the cache passed
    to the call, and nothing outside it is guarded."""
    ids, mask = batch
    compiled = torch.compile(model.forward, fullgraph=True, backend=_collecting_backend)
    torch._dynamo.reset()
    cache = ThinKCache(0.5, max_cache_len=96)
    decode(model, cache, ids, mask, 2, forward=compiled)
    cycle = [cache]
    cycle.append(cycle)  # alive until the collector runs: inside the next compile
    del cache, cycle
    got = decode(model, StaticCache(config=model.config, max_cache_len=96), ids, mask, 4, forward=compiled)
    expected = decode(model, DynamicCache(), ids, mask, 4)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    got = decode(model, ThinKCache(0.5, max_cache_len=96), ids, mask, 4, forward=compiled)
    torch.testing.assert_close(got, decode(model, ThinKCache(0.5), ids, mask, 4), atol=1e-4, rtol=0)


@pytest.mark.parametrize("policy", [StreamingLLM(sink=2, recent=10), H2O(budget=16, recent=6)], ids=repr)
def test_a_hand_written_loop_need_not_mark_the_prompt_end_under_eviction(policy):
    """The first single-token forward marks the prompt's end, and that forward, which makes the layer static, still
    has a mask over the positions so far (it raised from inside torch under a policy that evicts)."""
    model = make_model("llama")
    ids = torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(0))

    def loop(mark: bool) -> list[torch.Tensor]:
        cache = ThinKCache(key_ratio=0.5, policy=policy, max_cache_len=64)
        if mark:
            cache.mark_prompt_end(ids.shape[1])
        logits, step = [], ids
        with torch.no_grad():
            for _ in range(20):
                out = model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]
                logits.append(out)
                step = out.argmax(-1, keepdim=True)
        return logits

    for a, b in zip(loop(mark=False), loop(mark=True), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["forward", "module", "inner"])
def test_generate_refuses_a_compiled_forward_before_any_work(how):
    """README's compile section used to compile ``model.forward`` before ``generate``, which then ran the prompt
    compiled and failed inside dynamo (found by a helper's audit): refused up front, and a hand-written loop that
    compiles its prompt gets the same advice from the cache."""
    model = make_model("llama")
    ids, _ = make_batch([40], seed=3)
    if how == "forward":
        model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
    elif how == "module":
        model.compile(backend="eager")
    else:
        model.model.compile(backend="eager")
    for cache, advice in [(ThinKCache(0.5, max_cache_len=64), "leave it uncompiled"), (ThinKCache(0.5), "runs unc")]:
        with pytest.raises(ValueError, match=f"forward is compiled .* cannot: .*{advice}"):
            model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=4)
        assert cache.get_seq_length() == 0
    compiled = torch.compile(make_model("llama").forward, fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match="compile the decoding step only"), torch.no_grad():
        compiled(input_ids=ids, use_cache=True, **{compat.CACHE_ARGUMENT: ThinKCache(0.5, max_cache_len=64)})


def test_attention_weights_are_refused_before_any_work(model, batch):
    """A static cache returns no attention weights: generate refuses output_attentions before a forward (found by a
    helper's audit: the refusal came after the first layer had stored the step's token)."""
    ids, mask = batch
    cache = ThinKCache(0.5, max_cache_len=96)
    with pytest.raises(NotImplementedError, match="does not return attention weights"):
        generate(model, ids, mask, cache, 4, output_attentions=True)
    assert cache.get_seq_length() == 0
