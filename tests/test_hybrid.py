"""Hybrid models: linear-attention (recurrent) layers beside attention layers (Qwen3-Next, Qwen3.5, OLMo Hybrid,
Jamba, Granite 4.0-H; transformers 5). ThinK serves the attention layers; the linear layers keep transformers' own
``LinearAttentionLayer``, built where the model first asks for its state. Falcon-H1 runs Mamba beside attention in
every layer: its states sit beside the ThinK layers.

The test models (`conftest._BY_MODEL_TYPE`) have a linear layer at 0 and 2 and attention at 1 and 3, so that the
first layer a forward meets holds no tokens. `test_families.test_more_families` checks each family's tokens and
logits against the model's own attention (key_ratio 0) and its attention over zeroed channels (0.5); here, what a
hybrid changes in the cache: the layers it builds, what it counts, chat turns, chunked prompts, copies, beams,
policies and what it refuses.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import chat, continue_after, generate, make_batch, make_model, zeroed_reference
from transformers import DynamicCache

import think_cache
from think_cache import H2O, SnapKV, StreamingLLM, ThinKCache, held_bytes
from think_cache import _compat as compat
from think_cache.layer import ThinKLayer
from think_cache.patch import _attention_modules, _linear_modules
from think_cache.plotting import channel_map

ATOL = 1e-4

pytestmark = pytest.mark.skipif(
    compat.LinearAttentionLayer is None,
    reason="hybrid models need a transformers whose linear-attention cache layers keep their states by index",
)

HYBRIDS = ["qwen3_5_text", "qwen3_next", "jamba", "granitemoehybrid"]


@pytest.fixture(params=HYBRIDS)
def hybrid(request) -> str:
    return request.param


def _model(family: str = "qwen3_5_text", patch: bool = True):
    return make_model(family, patch=patch, initializer_range=0.2)


def _assert_same(a, b, atol: float = ATOL):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def test_linear_layers_keep_transformers_state(hybrid):
    """The cache's layers follow the model's: transformers' LinearAttentionLayer where it has linear attention, a
    ThinK layer where it has attention. At key_ratio 0 the recurrent states are DynamicCache's, and so are the bytes
    held; at 0.5 only the attention layers shrink, and `stats` counts them alone."""
    model = _model(hybrid)
    ids, mask = make_batch([40, 27], seed=3)
    dynamic, zero, half = DynamicCache(config=model.config), ThinKCache(key_ratio=0), ThinKCache(0.5, window=8)
    for cache in (dynamic, zero, half):
        generate(model, ids, mask, cache, 10)
    kinds = [type(layer).__name__ for layer in zero.layers]
    assert kinds == ["LinearAttentionLayer", "ThinKLayer"] * 2
    assert zero.attention_layers == [zero.layers[1], zero.layers[3]]
    for ours, stock in zip(zero.layers[::2], dynamic.layers[::2], strict=True):
        states = [(ours.conv_states[0], stock.conv_states[0]), (ours.recurrent_states[0], stock.recurrent_states[0])]
        for a, b in states:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert held_bytes(zero) == held_bytes(dynamic)  # the linear states counted on both sides
    linear_bytes = held_bytes(dynamic) - zero.stats().dense_bytes
    assert linear_bytes > 0
    assert [s.layer_idx for s in half.stats().layers] == [1, 3]
    assert held_bytes(half) == half.stats().stored_bytes + linear_bytes
    assert half.stats().state_bytes == zero.stats().state_bytes == linear_bytes
    assert "of recurrent states" in str(half.stats()) and half.stats().to_dict()["state_bytes"] == linear_bytes
    assert half.stats().ratio < 0.9
    assert zero.get_seq_length() == half.get_seq_length() == 40 + 10 - 1
    assert "2 layers" in repr(half)
    kv_heads, head_dim = model.config.num_key_value_heads, half.attention_layers[0].head_dim
    assert channel_map(half).shape == (2 * kv_heads, head_dim)
    assert channel_map(half).sum() == 2 * kv_heads * head_dim // 2


def test_falcon_h1_keeps_a_state_beside_each_attention_layer():
    """Falcon-H1 runs Mamba beside attention in every layer: each ThinK layer gets transformers' recurrent state
    beside it (at key_ratio 0 the states and bytes are DynamicCache's), stats count the ThinK layers, a copy
    carries the states and `reset` drops them."""
    model = _model("falcon_h1")
    ids, mask = make_batch([40, 27], seed=3)
    dynamic, zero, half = DynamicCache(config=model.config), ThinKCache(key_ratio=0), ThinKCache(0.5, window=8)
    for cache in (dynamic, zero, half):
        generate(model, ids, mask, cache, 10)
    assert all(isinstance(layer, ThinKLayer) for layer in zero.layers) and len(zero.layers) == 2
    assert sorted(zero._hybrid_states) == [0, 1]
    for index, stock in enumerate(dynamic.layers):
        ours = zero._hybrid_states[index]
        torch.testing.assert_close(ours.conv_states[0], stock.conv_states[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.recurrent_states[0], stock.recurrent_states[0], atol=1e-5, rtol=0)
    assert held_bytes(zero) == held_bytes(dynamic)
    linear_bytes = held_bytes(dynamic) - zero.stats().dense_bytes
    assert linear_bytes > 0 and held_bytes(half) == half.stats().stored_bytes + linear_bytes
    assert half.stats().state_bytes == linear_bytes
    assert [s.layer_idx for s in half.stats().layers] == [0, 1] and half.stats().ratio < 0.9
    copied = copy.deepcopy(half)
    assert copied._hybrid_states[0].recurrent_states[0] is not half._hybrid_states[0].recurrent_states[0]
    half.reset()
    assert half._hybrid_states == {} and held_bytes(half) == 0


@pytest.mark.parametrize("hybrid", [*HYBRIDS, "falcon_h1"])
def test_chat_turns_follow_the_reference(hybrid):
    """Three turns on one cache: the model's attention over zeroed channels gives the same tokens and logits, and
    the linear layers carry their state from turn to turn."""
    model = _model(hybrid)
    ids, _ = make_batch([40], seed=6)
    user_turns = [torch.randint(3, 200, (1, 15 + 10 * t), generator=torch.Generator().manual_seed(t)) for t in (1, 2)]

    cache = ThinKCache(key_ratio=0.5, window=8)
    turns = chat(model, cache, ids, user_turns)
    assert all(layer.is_compacted for layer in cache.attention_layers)
    for a, b in zip(turns, chat(model, zeroed_reference(cache, model), ids, user_turns), strict=True):
        _assert_same(a, b)


@pytest.mark.parametrize("family", ["qwen3_5_text", "falcon_h1"])
def test_chat_turns_at_ratio_zero_equal_dynamic_cache(family):
    model = _model(family)
    ids, _ = make_batch([30], seed=7)
    turns = [torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(t)) for t in range(2)]
    ours = chat(model, ThinKCache(key_ratio=0), ids, turns, 6)
    for a, b in zip(ours, chat(model, DynamicCache(config=model.config), ids, turns, 6), strict=True):
        _assert_same(a, b, atol=1e-5)


def test_a_prompt_in_chunks_equals_it_in_one_forward():
    """``prefill_chunk_size``: the linear layers carry their state across chunks, the attention layers compact at
    the prompt's end, as in one forward."""
    model = _model()
    ids, _ = make_batch([70], seed=11)
    runs = []
    for chunk in (None, 16):
        cache = ThinKCache(key_ratio=0.5, window=8)
        runs.append(generate(model, ids, torch.ones_like(ids), cache, 8, prefill_chunk_size=chunk))
    _assert_same(runs[0], runs[1])


def test_a_copied_prefix_serves_two_continuations():
    """A prompt's cache, deep-copied, continues as the original does (the linear states are copied, not shared)."""
    model = _model()
    ids, _ = make_batch([40], seed=12)
    cache = ThinKCache(key_ratio=0.5, window=8)
    first = generate(model, ids, torch.ones_like(ids), cache, 4)
    copied = copy.deepcopy(cache)
    assert copied.layers[0].recurrent_states[0] is not cache.layers[0].recurrent_states[0]
    follow = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(3))
    sequence = torch.cat([first.sequences, follow], dim=-1)
    _assert_same(
        generate(model, sequence, torch.ones_like(sequence), cache, 6),
        generate(model, sequence, torch.ones_like(sequence), copied, 6),
        atol=0,
    )


@pytest.mark.parametrize("family", ["qwen3_5_text", "falcon_h1"])
def test_beam_search_at_ratio_zero_equals_dynamic_cache(family):
    model = _model(family)
    ids, mask = make_batch([36, 22], seed=2)
    settings = dict(num_beams=3, num_return_sequences=3, output_scores=True)
    out = generate(model, ids, mask, ThinKCache(key_ratio=0), 12, **settings)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), 12, **settings)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "policy",
    [SnapKV(budget=24, window=8), H2O(budget=24, recent=8), StreamingLLM(sink=4, recent=20)],
    ids=["snapkv", "h2o", "streaming"],
)
def test_policies_keep_their_budget_on_the_attention_layers(policy):
    model = _model()
    ids, mask = make_batch([60, 41], seed=4)
    cache = ThinKCache(key_ratio=0.5, window=8, policy=policy)
    generate(model, ids, mask, cache, 12)
    for layer in cache.attention_layers:
        assert layer.compact_tokens <= policy.budget
    assert isinstance(cache.layers[0], compat.LinearAttentionLayer)
    assert cache.stats().ratio < 0.5


def test_a_static_cache_at_ratio_zero_gives_the_dynamic_tokens():
    model = _model()
    ids, mask = make_batch([40, 27], seed=5)
    static = generate(model, ids, mask, ThinKCache(key_ratio=0, max_cache_len=64), 12)
    _assert_same(static, generate(model, ids, mask, DynamicCache(config=model.config), 12), atol=1e-5)


def test_assisted_decoding_is_refused():
    """The recurrent state cannot roll back rejected drafts: refused before any forward, as transformers refuses it
    with DynamicCache after the prompt."""
    model = _model()
    ids, mask = make_batch([20], seed=1)
    with pytest.raises(ValueError, match="linear-attention layers of this hybrid model"):
        generate(model, ids, mask, ThinKCache(key_ratio=0.5), 4, prompt_lookup_num_tokens=3)


@pytest.mark.parametrize("family", ["qwen3_5_text", "falcon_h1"])
def test_crop_is_refused_before_any_layer_is_cut(family):
    model = _model(family)
    cache = ThinKCache(key_ratio=0.5, window=8)
    generate(model, *make_batch([30], seed=2), cache, 4)
    stored = [layer.stored_tokens for layer in cache.attention_layers]
    with pytest.raises(ValueError, match="recurrent state that cannot be cut back"):
        cache.crop(-1)
    assert [layer.stored_tokens for layer in cache.attention_layers] == stored


def test_a_cache_of_another_model_is_refused():
    """Filled by a Llama, fed to a hybrid in plain forwards (generate's own check comes first), and the reverse:
    refused at the first layer, linear or attention."""
    llama = make_model("llama")
    ids, mask = make_batch([20], seed=1)
    cache = ThinKCache(key_ratio=0.5)
    generate(llama, ids, mask, cache, 2)
    with pytest.raises(ValueError, match="filled by another model"), torch.no_grad():
        _model()(input_ids=ids[:, -1:], past_key_values=cache)
    hybrid_cache = ThinKCache(key_ratio=0.5)
    generate(_model(), ids, mask, hybrid_cache, 2)
    with pytest.raises(ValueError, match="filled by another model"), torch.no_grad():
        llama(input_ids=ids[:, -1:], past_key_values=hybrid_cache)


@pytest.mark.parametrize("other", ["jamba", "qwen3_5_text-other-weights"])
def test_another_hybrid_cannot_touch_the_states(other):
    """A hybrid's cache fed to another hybrid in plain forwards (generate checks earlier): refused at the first
    linear layer, before it reads or overwrites a state (even a model of the same config but other weights), and
    the right model then continues as from an untouched copy."""
    model = _model()
    ids, mask = make_batch([30], seed=4)
    cache = ThinKCache(key_ratio=0.5, window=8)
    first = generate(model, ids, mask, cache, 4)
    untouched = copy.deepcopy(cache)
    intruder = make_model("qwen3_5_text", seed=1, initializer_range=0.2) if other.endswith("weights") else _model(other)
    with pytest.raises(ValueError, match="filled by another model"), torch.no_grad():
        intruder(input_ids=first.sequences[:, -1:], past_key_values=cache)
    for layer, copied in zip(cache.layers[::2], untouched.layers[::2], strict=True):
        assert torch.equal(layer.recurrent_states[0], copied.recurrent_states[0])
        assert torch.equal(layer.conv_states[0], copied.conv_states[0])
    sequence = torch.cat([first.sequences, torch.randint(3, 200, (1, 5))], dim=-1)
    _assert_same(
        generate(model, sequence, torch.ones_like(sequence), cache, 4),
        generate(model, sequence, torch.ones_like(sequence), untouched, 4),
        atol=0,
    )


@pytest.mark.parametrize("unpatched", [False, True], ids=["never-patched", "unpatched"])
def test_an_unpatched_hybrid_is_told_to_patch(unpatched):
    model = _model(patch=unpatched)
    if unpatched:
        assert all(m._forward_pre_hooks for m in _linear_modules(model, _attention_modules(model)))
        think_cache.unpatch(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in _linear_modules(model, _attention_modules(model)))
    ids, mask = make_batch([20], seed=1)
    with pytest.raises(RuntimeError, match="has not been patched"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=ThinKCache(key_ratio=0.5))


def test_linear_modules_are_not_taken_for_attention():
    """OLMo Hybrid's linear-attention modules have q/k/v projections and a layer index too: only the attention
    layers get the ThinK hooks."""
    model = make_model("olmo_hybrid", patch=False)
    hooked = _attention_modules(model)
    assert [m.layer_idx for m in hooked] == [1, 3]
    cache = ThinKCache(key_ratio=0.5)
    generate(think_cache.patch(model), *make_batch([30], seed=2), cache, 4)
    assert all(isinstance(layer, ThinKLayer) for layer in cache.layers[1::2])


def test_refused_without_linear_attention_layers(monkeypatch):
    """transformers 4.x: hybrid models bring their own caches, which a ThinKCache cannot stand in for (5.12: its
    cache layers keep one state each, read another way)."""
    model = _model(patch=False)
    monkeypatch.setattr(compat, "LinearAttentionLayer", None)
    with pytest.raises(ValueError, match=r"hybrid models .* by index \(5.24; tested there\)"):
        think_cache.patch(model)


def test_value_pruning_equals_the_zeroed_reference():
    model = _model()
    ids, mask = make_batch([48, 31], seed=8)
    cache = ThinKCache(key_ratio=0.5, value_ratio=0.25, window=8)
    out = generate(model, ids, mask, cache, 16)
    assert all(layer.value_channels is not None for layer in cache.attention_layers)
    _assert_same(out, generate(model, ids, mask, zeroed_reference(cache, model), 16))


def test_quantized_storage_on_the_attention_layers():
    """4-bit codes in the attention layers; the linear layers' states stay as they are."""
    model = _model()
    ids, mask = make_batch([48, 31], seed=9)
    plain, coded = ThinKCache(key_ratio=0.5, window=8), ThinKCache(key_ratio=0.5, window=8, bits=4)
    greedy = [generate(model, ids, mask, cache, 12) for cache in (plain, coded)]
    assert coded.stats().stored_bytes < 0.7 * plain.stats().stored_bytes  # 32 of 59 tokens coded here
    linear = [held_bytes(c) - c.stats().stored_bytes for c in (plain, coded)]
    assert linear[0] == linear[1] > 0
    assert (greedy[0].sequences == greedy[1].sequences).float().mean() > 0.7  # close to the full-precision run


@pytest.mark.parametrize("family", ["qwen3_5_text", "falcon_h1"])
def test_batch_rows_repeat_and_select_with_their_states(family):
    """`batch_repeat_interleave` and `batch_select_indices` (contrastive search, hub decoding loops) move the
    recurrent states with the attention layers: repeated rows continue as the row they copy."""
    model = _model(family)
    ids, mask = make_batch([30, 21], seed=7)
    cache = ThinKCache(key_ratio=0.5, window=8)
    out = generate(model, ids, mask, cache, 4)
    next_tokens = out.sequences[:, -1:]
    single = copy.deepcopy(cache)
    single.batch_select_indices(torch.tensor([1]))
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([2, 3]))  # row 1, twice
    step_mask = torch.cat([mask, torch.ones(2, out.sequences.shape[1] - ids.shape[1])], dim=-1)[1:]
    with torch.no_grad():
        ours = model(
            input_ids=next_tokens[1:].repeat(2, 1), attention_mask=step_mask.repeat(2, 1), past_key_values=cache
        )
        alone = model(input_ids=next_tokens[1:], attention_mask=step_mask, past_key_values=single)
    torch.testing.assert_close(ours.logits[0], alone.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.logits[1], alone.logits[0], atol=1e-5, rtol=0)


def test_the_one_liner_serves_a_hybrid():
    """`think_cache.patch(model, key_ratio=0.5)`: generate without a cache gets a ThinKCache, as an explicit one."""
    model = _model()
    ids, mask = make_batch([36, 25], seed=10)
    explicit = generate(model, ids, mask, ThinKCache(key_ratio=0.5, window=8), 8)
    think_cache.patch(model, key_ratio=0.5, window=8)
    implicit = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    _assert_same(implicit, explicit, atol=0)
    assert isinstance(getattr(implicit, compat.CACHE_ARGUMENT), ThinKCache)  # `cache` from transformers 5.24 on


def test_an_attention_switch_is_refused_before_a_state_moves():
    """A hybrid's first layer is a linear one: the switched attention is refused there, before its state is written
    (found by a helper's audit: patching again and going on gave other tokens)."""
    model = _model()

    def switch(cache, token):
        compat.set_attn_implementation(model, "sdpa")
        with pytest.raises(RuntimeError, match="now uses attn_implementation='sdpa'"), torch.no_grad():
            model(input_ids=token, past_key_values=cache)
        think_cache.patch(model)

    expected, got = continue_after(model, *make_batch([30], seed=5), switch)
    _assert_same(got, expected)
