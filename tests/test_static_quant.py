"""The static cache with quantized storage (``ThinKCache(bits=..., max_cache_len=N)``): the eager quantized
ThinKCache's answers (the same tokens quantized at the same steps, in the same blocks), eager and compiled (no graph
break), its bytes against transformers' ``StaticCache``, and what it refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import generate, held_bytes, make_batch, make_model, prefill
from test_static import NEEDS_5X, assert_next_step_is_one_graph, decode
from transformers.cache_utils import StaticCache

from think_cache import H2O, SnapKV, StreamingLLM, ThinKCache
from think_cache import _compat as compat
from think_cache.static_quant import QuantizedStaticThinKLayer, masked_index_copy, ring_positions

torch.set_num_threads(1)

#: 40 steps after a 50-token prompt (a left-padded batch of 2): the first decoded block folds at position 82.
STEPS = 40


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.fixture(scope="module")
def batch():
    return make_batch([50, 37])


# ----------------------------------------------------------------------------------------- pure functions
def test_ring_positions():
    assert ring_positions(torch.tensor(9), 4).tolist() == [8, 9, 6, 7]
    assert ring_positions(torch.tensor(1), 4).tolist() == [0, 1, -2, -1]  # never written: negative


@pytest.mark.parametrize("write", [True, False])
def test_masked_index_copy(write):
    buffer = torch.arange(12.0).view(1, 6, 2)
    before = buffer.clone()
    rows = -torch.ones(1, 2, 2)
    masked_index_copy(buffer, 1, torch.tensor([2, 3]), rows, torch.tensor(write))
    expected = before.clone()
    if write:
        expected[:, 2:4] = -1
    assert buffer.equal(expected)


# ------------------------------------------------------------------------------------------------ eager
SETTINGS = {
    "4bit": {"bits": 4},
    "2bit": {"bits": 2},
    "8bit": {"bits": 8},
    "4bit-values": {"bits": 4, "value_ratio": 0.5},
    "2bit-values-group8": {"bits": 2, "value_ratio": 0.25, "group_size": 8},
    "4bit-snapkv": {"bits": 4, "policy": SnapKV(budget=40, window=8)},
    "2bit-snapkv-recent-values": {"bits": 2, "policy": SnapKV(budget=40, window=8), "recent": 4, "value_ratio": 0.5},
    "8bit-recent": {"bits": 8, "recent": 8},
    "4bit-keep-all": {"bits": 4, "key_ratio": 0.0},
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_eager_static_equals_eager_quantized(model, batch, name):
    settings = {"key_ratio": 0.5, **SETTINGS[name]}
    ids, mask = batch
    eager = ThinKCache(**settings)
    expected = decode(model, eager, ids, mask, STEPS)
    cache = ThinKCache(**settings, max_cache_len=96)
    got = decode(model, cache, ids, mask, STEPS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    layer = cache.layers[0]
    assert isinstance(layer, QuantizedStaticThinKLayer)
    assert int(cache.get_seq_length()) == 50 + STEPS
    # the decoded block folded (its scales were written), as in the eager layer
    folded = layer.compact_keys.scale[:, :, layer.slot_base // layer.compact_keys.block]
    assert folded.abs().amax() > 0
    assert layer.compact_tokens == eager.layers[0].compact_tokens + eager.layers[0].keys.shape[-2]
    unquantized = {k: v for k, v in settings.items() if k not in ("bits", "group_size")}
    full = decode(model, ThinKCache(**unquantized, max_cache_len=96), ids, mask, STEPS)
    assert (got - full).abs().max() > 1e-4  # the codes did change the answers


@pytest.mark.parametrize("name", ["4bit-values", "2bit"])
def test_the_same_codes_as_the_eager_store(model, batch, name):
    """Without a policy the slots hold the eager store's codes, scales and zero points: the prompt's block copied at
    compaction bit for bit (two 16-token key blocks at 2 bits, four of 8 at 4); the block decoded from 50 to 81,
    quantized by the static step at 82, with the same codes and scales within float rounding (its keys come out of a
    static decode, whose attention sums in another order; one-byte scales, at 4 bits, compare exactly: a rounding
    that crossed a code boundary would fail this)."""
    settings = {"key_ratio": 0.5, **SETTINGS[name]}
    ids, mask = batch
    cache = ThinKCache(**settings, max_cache_len=96)
    decode(model, cache, ids, mask, STEPS)
    eager_cache = ThinKCache(**settings)
    decode(model, eager_cache, ids, mask, STEPS)
    for mine, theirs in zip(cache.layers, eager_cache.layers, strict=True):
        keys, values = theirs.store.keys, theirs.store.values
        assert keys.is_regular and keys.tokens == 64  # the prompt's block and the one folded at 82
        for ours, eager, per_block in ((mine.compact_keys, keys, True), (mine.compact_values, values, False)):
            assert ours.codes[:, :, :64].equal(eager.codes)
            assert (getattr(ours, "symmetric", False), getattr(eager, "symmetric", False)) == (
                (False, False) if per_block else (settings["bits"] == 4,) * 2  # 4-bit values: no zero points
            )
            for field in ("scale",) if getattr(eager, "symmetric", False) else ("scale", "zero"):
                got, expected = getattr(ours, field), getattr(eager, field)
                prompt = 32 // ours.block if per_block else 32  # the prompt's key blocks (16 tokens at 2 bits, 8 at 4)
                assert got[:, :, :prompt].equal(expected[:, :, :prompt])
                torch.testing.assert_close(got[:, :, prompt : 2 * prompt], expected[:, :, prompt:], atol=1e-6, rtol=0)


@NEEDS_5X
def test_generate_gives_the_eager_quantized_tokens(model, batch):
    """``generate`` eagerly and through transformers' automatic compile (the eager backend: the route), and beam
    search, which reorders the packed buffers in place."""
    from transformers import CompileConfig

    ids, mask = batch
    settings = {"key_ratio": 0.5, "bits": 4, "value_ratio": 0.5}
    expected = generate(model, ids, mask, ThinKCache(**settings), steps=36).sequences
    assert generate(model, ids, mask, ThinKCache(**settings, max_cache_len=90), steps=36).sequences.equal(expected)

    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True  # transformers compiles on CPU only when told
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = generate(model, ids, mask, ThinKCache(**settings, max_cache_len=90), steps=36, compile_config=config)
    assert got.sequences.equal(expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode steps did run compiled

    beams = generate(model, ids, mask, ThinKCache(**settings), steps=8, num_beams=2).sequences
    assert generate(model, ids, mask, ThinKCache(**settings, max_cache_len=60), steps=8, num_beams=2).sequences.equal(
        beams
    )


# --------------------------------------------------------------------------------------------- compiled
@NEEDS_5X
def test_compiled_fullgraph_equals_eager_without_graph_breaks(model, batch):
    """Inductor, fullgraph: 40 steps through the fold at 82 give the eager quantized ThinKCache's logits. Two value
    groups (12 kept value channels in groups of 8): the value scales folded into the weights once failed inductor's
    compile there."""
    settings = {"key_ratio": 0.5, "bits": 4, "value_ratio": 0.25, "group_size": 8}
    ids, mask = batch
    expected = decode(model, ThinKCache(**settings), ids, mask, STEPS)
    cache = ThinKCache(**settings, max_cache_len=96)
    compiled = torch.compile(model.forward, fullgraph=True)
    torch._dynamo.reset()
    got = decode(model, cache, ids, mask, STEPS, forward=compiled)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert_next_step_is_one_graph(model, cache, mask, got[:, -1].argmax(-1, keepdim=True))


@NEEDS_5X
def test_compiled_snapkv_traces_whole(model, batch):
    """SnapKV's partial prompt block and 2-bit codes through dynamo's tracing (fullgraph; the eager backend, the
    inductor one is checked above)."""
    settings = {"key_ratio": 0.5, "bits": 2, "policy": SnapKV(budget=40, window=8), "recent": 4}
    ids, mask = batch
    expected = decode(model, ThinKCache(**settings), ids, mask, STEPS)
    cache = ThinKCache(**settings, max_cache_len=96)
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    got = decode(model, cache, ids, mask, STEPS, forward=compiled)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@NEEDS_5X
def test_prompts_of_other_lengths_reuse_the_compiled_graphs(model):
    """The prompt's tokens short of a whole block wait at full width, so how many depends on its length (18, 13 and
    29 here): that count is a tensor and the ring is sized for the most, so a new prompt length compiles nothing new
    (it once did)."""
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []
    for n in (50, 45, 61):
        ids, mask = make_batch([n, n - 7])
        cache = ThinKCache(0.5, bits=4, max_cache_len=128)
        decode(model, cache, ids, mask, 4, forward=compiled)
        assert int(cache.layers[0].fold_held) == (n - 32) % 32
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] == graphs[2], graphs


# ------------------------------------------------------------------------------------------------ bytes
@pytest.mark.parametrize(("dtype", "bits", "at_most"), [(torch.float32, 4, 0.22), (torch.bfloat16, 4, 0.32)])
def test_bytes_against_static_cache(dtype, bits, at_most):
    """Key ratio 0.5, head_dim 64, N = 1024: measured 0.202x (float32) and 0.312x (bfloat16) of ``StaticCache``
    (8-token key blocks with one-byte scales), the eager 4-bit cache's share of ``DynamicCache`` plus the
    full-precision ring of 63 tokens; the full-precision static ThinK cache holds 0.76x."""
    model = make_model("llama", head_dim=64).to(dtype)
    ids, mask = make_batch([40])
    n = 1024
    ours = prefill(model, ThinKCache(0.5, bits=bits, max_cache_len=n), ids, mask)
    theirs = prefill(model, StaticCache(config=model.config, max_cache_len=n), ids, mask)
    ratio = held_bytes(ours) / held_bytes(theirs)
    assert ratio <= at_most, ratio
    assert ours.stats().stored_bytes == held_bytes(ours)
    layer = ours.layers[0]
    keys, values = layer.compact_keys, layer.compact_values
    assert keys.codes.dtype == values.codes.dtype == torch.uint8
    assert keys.codes.shape[-1] == 32 * bits // 8 and values.codes.shape[-1] == 64 * bits // 8  # really packed
    assert keys.zero.dtype == keys.dtype == values.dtype == dtype
    assert keys.scale.dtype == values.scale.dtype == (torch.uint8 if bits == 4 else dtype)  # one-byte scales at 4
    assert values.zero is None  # 4-bit values are symmetric: no zero points held
    assert keys.scale.shape[2] == keys.codes.shape[2] // keys.block  # a scale per key block of slots, not per token


# --------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("policy", [StreamingLLM(sink=4, recent=28), H2O(budget=40, recent=8)], ids=repr)
def test_refuses_evicting_policies_with_bits(policy):
    with pytest.raises(ValueError, match=f"does not support {type(policy).__name__}"):
        ThinKCache(0.5, bits=4, policy=policy, max_cache_len=128)
    ThinKCache(0.5, bits=4, policy=policy)  # each alone is fine
    ThinKCache(0.5, policy=policy, max_cache_len=128)


def test_too_small_max_cache_len_raises(model, batch):
    ids, mask = batch
    with pytest.raises(ValueError, match="max_cache_len=40"):
        prefill(model, ThinKCache(0.5, bits=4, max_cache_len=40), ids, mask)
    with pytest.raises(ValueError, match=r"prompt \(50\) \+ max_new_tokens \(20\) = 70 tokens"):
        generate(model, ids, mask, ThinKCache(0.5, bits=4, max_cache_len=60), steps=20)
    cache = ThinKCache(0.5, bits=4, max_cache_len=52)
    decode(model, cache, ids, mask, 2)
    with pytest.raises(ValueError, match="max_cache_len=52"), torch.no_grad():
        model(input_ids=ids[:, :1], use_cache=True, **{compat.CACHE_ARGUMENT: cache})
