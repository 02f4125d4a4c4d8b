"""ThinKCache(bits=2/4/8): the compact part as KIVI-style codes (issue 13).

The reference replays a ThinK run on a full-size stock cache with stock attention. It takes from the run only what the
other references take (which tokens each head saw at full width and which thinned, the chosen channels) and writes the
quantization itself: key blocks are runs of 16 tokens, 8 at 4 bits, 32 at 8 (a head's prompt tokens in order, then every
block's length of positions from where the full-width part began at the end of the prompt), ranges over real tokens
only; values per token in groups of ``group_size`` kept channels, symmetric at 4 bits, scales one byte at 4 bits. Each
compact token is quantized and dequantized in float, its kept channels written into a zero-filled full-size key (and
value) row, and torch's sdpa runs on that. Which tokens a query sees thinned it computes from the schedule
(everything before ``P - recent + 32 * ((t - P) // 32)`` for a query at ``t`` after a prompt of ``P``): those the store
has not taken yet (short of a whole block) it writes thinned in full precision.
"""

from __future__ import annotations

import copy
import pickle
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LOG_SCALE_BITS,
    fake_quant,
    fake_quant_value_group,
    generate,
    held_bytes,
    make_batch,
    make_model,
    named_tensors,
    prefill,
)
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface, DynamicCache

import think_cache
from think_cache import H2O, SnapKV, StreamingLLM, ThinKCache, quant
from think_cache import attention as think_attention_module
from think_cache.compact import compact_attention
from think_cache.plotting import channel_map
from think_cache.storage import FullStore, QuantizedStore

ATOL = 1e-4
BLOCK = 32  # the fold block
KEY_BLOCK = {2: 16, 4: 8, 8: 32}  # tokens per key scale and zero point, by bits


# ------------------------------------------------------------------------------------------ the reference
def key_blocks(compact: torch.Tensor, prompt: torch.Tensor, full_from: int, size: int) -> torch.Tensor:
    """``(B, H, T)`` the key block of every token that went into the compact part (-1: none).

    ``prompt`` ``(B, H, T0)``: the tokens each head compacted at the end of the prompt, ``full_from``: where the
    full-width part began then. A head's prompt tokens form blocks of ``size`` in order (the last one shorter);
    from ``full_from`` on, blocks of ``size`` consecutive positions.
    """
    batch, heads, tokens = compact.shape
    in_prompt = torch.zeros_like(compact)
    in_prompt[..., : prompt.shape[-1]] = prompt
    rank = in_prompt.long().cumsum(-1) - 1
    prompt_blocks = (in_prompt.sum(-1, keepdim=True) + size - 1) // size
    pos = torch.arange(tokens)
    later = pos >= full_from
    assert not (compact & ~in_prompt & ~later).any(), "a thinned token is neither a prompt token nor folded later"
    block = torch.where(in_prompt, rank // size, prompt_blocks + (pos - full_from).clamp(min=0) // size)
    return torch.where(in_prompt | later, block, -1)


def fake_quant_keys(keys, block, real, bits):
    """Keys ``(B, H, T, C)`` float32 quantized per channel over the tokens of each block (ranges over real ones)."""
    batch, heads, tokens, channels = keys.shape
    n = int(block.max()) + 1
    out = keys.clone()
    for b in range(batch):
        for h in range(heads):
            for k in range(n):
                members = block[b, h] == k
                if members.any():
                    x = keys[b, h, members].T  # (C, members)
                    valid = real[b, members][None].expand_as(x)
                    log_scales = bits in LOG_SCALE_BITS
                    out[b, h, members] = fake_quant(x, bits, torch.float32, valid, True, log_scales).T
    return out


def fake_quant_values(values, bits, group_size):
    """Values ``(..., C)`` quantized per token in consecutive groups of ``group_size`` channels."""
    groups = values.split(group_size, dim=-1)
    return torch.cat([fake_quant_value_group(g, bits, torch.float32) for g in groups], dim=-1)


def _record(layer):
    """What one ThinK attention saw: per head, visible and thinned logical positions; channels; full_from."""
    batch, heads = layer.keys.shape[:2]
    seen = layer.seen_tokens
    visible = torch.zeros(batch, heads, seen, dtype=torch.bool)
    compact = torch.zeros_like(visible)
    full_from = seen - layer.keys.shape[-2]
    visible[..., full_from:] = True
    if not layer.is_compacted:
        visible[:] = True
        return dict(visible=visible, compact=compact, key_channels=None)
    if layer.compact_positions is None:
        compact[..., :full_from] = True
    else:
        compact.scatter_(-1, layer.compact_positions.long(), True)
    return dict(
        visible=visible | compact,
        compact=compact,
        key_channels=layer.key_channels.clone(),
        value_channels=None if layer.value_channels is None else layer.value_channels.clone(),
        full_from=full_from,
    )


def run_with_reference(model, ids, mask, steps, bits, group_size, generate_kwargs=None, **settings):
    """Generate with ``ThinKCache(bits=...)`` while recording what each attention saw, then replay on a
    DynamicCache with stock sdpa over fake-quantized thinned tokens. Returns both outputs and the cache."""
    original = AttentionInterface._global_mapping[think_cache.ATTENTION_NAME]
    records = defaultdict(list)
    prompt_sets = {}  # layer -> (tokens compacted at the end of the prompt, full_from then)

    def spy(module, query, key, value, attention_mask, **kwargs):
        handoff = think_attention_module._state.handoff
        if handoff is not None and handoff.key is key:
            records[module.layer_idx].append(_record(handoff.layer))
        return original(module, query, key, value, attention_mask, **kwargs)

    calls = defaultdict(int)
    prompt_length, recent = ids.shape[1], settings.get("recent", 0)

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        i = module.layer_idx
        seen = records[i][calls[i]]
        calls[i] += 1
        k, v = key.clone(), value.clone()
        allowed_mask = None if attention_mask is None else attention_mask.bool()
        real = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)
        if allowed_mask is not None:
            real = allowed_mask.any(-2).any(1).expand(k.shape[0], -1)
        if seen["key_channels"] is not None:
            compact = seen["compact"]
            assert query.shape[2] == 1, "the reference replays one token at a time after the prompt"
            t = k.shape[2] - 1
            fold = prompt_length - recent + BLOCK * ((t - prompt_length) // BLOCK)
            thinned = seen["visible"] & (torch.arange(k.shape[2]) < fold)
            assert not (compact & ~thinned).any(), "a compact token after the fold point"
            if i not in prompt_sets:
                prompt_sets[i] = (compact.clone(), seen["full_from"])
            block = key_blocks(compact, *prompt_sets[i], KEY_BLOCK[bits])
            kc = seen["key_channels"].long()[:, :, None, :].expand(-1, -1, k.shape[2], -1)
            kept_k = k.gather(-1, kc)  # compact tokens quantized, the others thinned in full precision
            q_keys = torch.where(compact[..., None], fake_quant_keys(kept_k, block, real, bits), kept_k)
            thinned_k = torch.zeros_like(k).scatter_(-1, kc, q_keys)
            k = torch.where(thinned[..., None], thinned_k, k)
            vc = seen["value_channels"]
            vc = torch.arange(v.shape[-1]).expand(*v.shape[:2], -1) if vc is None else vc.long()
            vc = vc[:, :, None, :].expand(-1, -1, v.shape[2], -1)
            kept_v = v.gather(-1, vc)
            q_values = torch.where(compact[..., None], fake_quant_values(kept_v, bits, group_size), kept_v)
            thinned_v = torch.zeros_like(v).scatter_(-1, vc, q_values)
            v = torch.where(thinned[..., None], thinned_v, v)
        q_len, kv_len = query.shape[2], k.shape[2]
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)[None, None]
        if allowed_mask is not None:
            allowed = allowed & allowed_mask
        allowed = allowed & seen["visible"][:, :, None, :]
        group = query.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            query,
            k.repeat_interleave(group, 1),
            v.repeat_interleave(group, 1),
            attn_mask=allowed.repeat_interleave(group, 1),
            scale=scaling,
        )
        return out.transpose(1, 2), None

    cache = ThinKCache(bits=bits, group_size=group_size, **settings)
    try:
        AttentionInterface.register(think_cache.ATTENTION_NAME, spy)
        think = generate(model, ids, mask, cache, steps, **(generate_kwargs or {}))
        AttentionInterface.register(think_cache.ATTENTION_NAME, reference)
        ref = generate(model, ids, mask, DynamicCache(), steps, **(generate_kwargs or {}))
    finally:
        AttentionInterface.register(think_cache.ATTENTION_NAME, original)
    assert all(calls[i] == len(records[i]) for i in records)
    assert prompt_sets, "no layer was compacted"
    return think, ref, cache


def _assert_same(think, ref):
    assert torch.equal(think.sequences, ref.sequences)
    for a, b in zip(think.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------ reference checks
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_single_prompt_folds_three_blocks(arch, bits):
    """A 70-token prompt: 64 tokens quantized at its end (the last 6 wait at full width), then three folds of 32."""
    model = make_model(arch)
    ids, mask = make_batch([70], seed=21)
    think, ref, cache = run_with_reference(model, ids, mask, 100, bits, 6, key_ratio=0.5, window=8)
    _assert_same(think, ref)
    layer = cache.layers[0]
    assert layer.compact_tokens == 64 + 3 * BLOCK
    assert layer.keys.shape[-2] == 70 + 99 - layer.compact_tokens
    assert layer.store.keys.is_regular  # whole blocks only: no per-token block index
    assert layer.store.keys.scale.shape[-2] == layer.compact_tokens // KEY_BLOCK[bits]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bits_without_pruning_quantize(bits):
    """``ThinKCache(key_ratio=0, bits=...)``: KIVI alone. Quantizing is compaction too: every channel is kept and
    the tokens are still stored as codes (before, a layer with nothing to prune never compacted, and the cache
    silently held DynamicCache's bytes)."""
    model = make_model("llama")
    ids, mask = make_batch([70, 45], seed=25)
    think, ref, cache = run_with_reference(model, ids, mask, 40, bits, 6, key_ratio=0.0, window=6)
    _assert_same(think, ref)
    layer = cache.layers[0]
    assert layer.compact_tokens == 64 + BLOCK
    assert layer.key_channels.shape[-1] == layer.head_dim
    dense = held_bytes(prefill(model, DynamicCache(), ids))
    assert held_bytes(prefill(model, ThinKCache(key_ratio=0.0, bits=bits), ids)) < 0.7 * dense


@pytest.mark.parametrize("value_ratio", [0.0, 0.5], ids=["values", "values-pruned"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_left_padded_batch(bits, value_ratio):
    model = make_model("llama")
    ids, mask = make_batch([70, 45, 23], seed=22)
    think, ref, cache = run_with_reference(
        model, ids, mask, 40, bits, 6, key_ratio=0.5, value_ratio=value_ratio, window=6
    )
    _assert_same(think, ref)
    assert cache.layers[0].compact_tokens == 64 + BLOCK


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_padding_that_folds_later_sets_no_range(bits, static):
    """A short row's padding among the prompt's last tokens waits at full width and folds with the first generated
    tokens (found by a helper's audit: it set that block's key ranges). Wild keys on the padding change nothing, and
    at 8 bits (no clipping search) the logits are the reference's, whose ranges see real tokens only."""
    ids, mask = make_batch([5, 40], seed=3)  # width 40: row 0's pads 32..34 wait at full width after the prompt
    outputs = []
    for wild in (0.0, 30.0):
        model = make_model("llama")

        def hook(module, args, out, wild=wild):
            if out.shape[1] == ids.shape[1]:  # the prompt's forward: keys of row 0's padding only
                out = out.clone()
                out[0, :35] += wild * torch.randn(35, out.shape[-1], generator=torch.Generator().manual_seed(0))
                return out

        for layer in model.model.layers:
            layer.self_attn.k_proj.register_forward_hook(hook)
        if static:
            settings = dict(key_ratio=0.5, window=4, bits=bits, group_size=32, max_cache_len=96)
            outputs.append(generate(model, ids, mask, ThinKCache(**settings), 40))
            continue
        think, ref, _ = run_with_reference(model, ids, mask, 40, bits, 32, key_ratio=0.5, window=4)
        if bits == 8:
            _assert_same(think, ref)
        outputs.append(think)
    tame, wild = outputs
    assert torch.equal(tame.sequences, wild.sequences)
    for a, b in zip(tame.logits, wild.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("value_ratio", [0.0, 0.5], ids=["values", "values-pruned"])
@pytest.mark.parametrize("name", ["snapkv", "h2o"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_policies_fold_three_blocks(bits, name, value_ratio):
    """SnapKV keeps 40 prompt tokens per head (a block and a partial one); H2O evicts a block at a time and
    keeps each survivor's scale. Both fold 32 generated tokens at a time."""
    policy = {"snapkv": SnapKV(budget=40, window=6, kernel=3), "h2o": H2O(budget=64, recent=4)}[name]
    model = make_model("llama")
    ids, mask = make_batch([70, 45, 23], seed=23)
    think, ref, cache = run_with_reference(
        model, ids, mask, 100, bits, 6, key_ratio=0.5, value_ratio=value_ratio, window=6, policy=policy
    )
    _assert_same(think, ref)
    layer = cache.layers[0]
    assert layer.fold_block == BLOCK
    if name == "snapkv":
        assert layer.compact_tokens == 40 + 3 * BLOCK
    else:
        assert layer.stored_tokens <= max(64 + layer.fold_block, layer.keys.shape[-2])
    assert layer.compact_positions.shape[-1] == layer.compact_tokens == layer.store.keys.tokens


def test_beam_search_follows_the_reference():
    """Beams reorder codes, scales and zero points with the rest at every step."""
    model = make_model("llama")
    ids, mask = make_batch([50, 34], seed=24)
    beams = dict(num_beams=3, num_return_sequences=3, output_scores=True)
    think, ref, cache = run_with_reference(model, ids, mask, 40, 4, 6, beams, key_ratio=0.5, window=6)
    assert torch.equal(think.sequences, ref.sequences)
    torch.testing.assert_close(think.sequences_scores, ref.sequences_scores, atol=ATOL, rtol=0)
    assert cache.layers[0].store.keys.codes.shape[0] == 6  # 2 prompts x 3 beams
    assert cache.layers[0].compact_tokens == 32 + BLOCK


def test_quantization_changes_the_output():
    """Guard against a reference that is trivially equal: 2-bit logits differ from full precision."""
    model = make_model("llama")
    ids, mask = make_batch([70], seed=21)
    quantized = generate(model, ids, mask, ThinKCache(key_ratio=0.5, window=8, bits=2), 3)
    full = generate(model, ids, mask, ThinKCache(key_ratio=0.5, window=8), 3)
    assert not torch.allclose(quantized.logits[-1], full.logits[-1], atol=1e-3)


def test_padding_does_not_set_key_ranges():
    """A block shared by padding and real tokens is quantized over the real ones: huge padded keys change
    nothing."""
    torch.manual_seed(0)
    keys = torch.randn(2, 2, 40, 16)
    values = torch.randn(2, 2, 40, 16)
    real = torch.ones(2, 1, 40, dtype=torch.bool)
    real[1, :, :10] = False
    wild = keys.clone()
    wild[1, :, :10] = 1e4
    channels = torch.arange(0, 16, 2).expand(2, 2, 8)
    stores = []
    for k in (keys, wild):
        store = QuantizedStore(4)
        store.start(channels, None)
        store.append(k, values, real=real)
        stores.append(store)
    a, b = (quant.dequantize_keys(s.keys) for s in stores)
    torch.testing.assert_close(a[:, :, 10:], b[:, :, 10:], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- memory
def _tiny_bf16_llama():
    # head_dim 64 (hidden 256 / 4 heads), 2 KV heads
    return make_model("llama", hidden_size=256, intermediate_size=256).to(torch.bfloat16)


@pytest.mark.parametrize(("bits", "limit"), [(4, 0.25), (2, 0.16), (8, 0.45)])
def test_memory_against_dynamic_cache(bits, limit):
    model = _tiny_bf16_llama()
    ids, _ = make_batch([1024])
    dense = held_bytes(prefill(model, DynamicCache(), ids))
    think = prefill(model, ThinKCache(key_ratio=0.5, bits=bits), ids)
    assert all(layer.compact_tokens == 1024 for layer in think.layers)
    ratio = held_bytes(think) / dense
    print(f"key_ratio 0.5 + {bits}-bit: {ratio:.3f}x DynamicCache")
    assert ratio <= limit, ratio
    # the cache's own report (codes, scales, zero points, channel indices) agrees with the walk over its tensors
    stats = think.stats()
    assert stats.stored_bytes == held_bytes(think)
    assert stats.dense_bytes == dense
    assert all(layer.bits == bits for layer in stats.layers)


def test_memory_on_top_of_snapkv():
    model = _tiny_bf16_llama()
    ids, _ = make_batch([1024])
    dense = held_bytes(prefill(model, DynamicCache(), ids))
    snap = held_bytes(prefill(model, ThinKCache(key_ratio=0, policy=SnapKV(budget=256)), ids))
    cache = prefill(model, ThinKCache(key_ratio=0.5, policy=SnapKV(budget=256), bits=4), ids)
    both = held_bytes(cache)
    print(
        f"SnapKV(256): {snap / dense:.3f}x, SnapKV(256) + ThinK 0.5 + 4-bit: {both / dense:.3f}x ({both / snap:.3f}x)"
    )
    # the pruned channels of the question's 32 tokens kept aside for a later prompt: full precision, 3% of SnapKV's
    spare = sum(layer.spare.nbytes for layer in cache.layers)
    assert 0 < spare / snap <= 0.035
    assert (both - spare) / snap <= 0.26


def test_no_hidden_views_and_memory_stays_bounded_while_decoding():
    model = make_model("qwen3")
    ids, _ = make_batch([120])
    cache = ThinKCache(key_ratio=0.5, value_ratio=0.5, bits=2)
    model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=70, do_sample=False)
    for layer in cache.layers:
        assert 0 <= layer.keys.shape[-2] - (120 % BLOCK) < BLOCK  # the prompt's remainder and < 32 generated
        for t in layer.tensors():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


class _LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("bits", [2, 4])
def test_decode_transient_does_not_grow_with_context(bits, torch_path):
    """A decode step over the quantized compact part creates nothing larger at 8k tokens than at 2k: one chunk's
    codes in float32, never a dense copy of the keys or values (the torch path; the CPU loops allocate less:
    `test_cpu_kernels.py`)."""
    batch, heads, group, head_dim = 1, 2, 2, 64
    g = torch.Generator().manual_seed(0)
    channels = torch.arange(0, head_dim, 2).expand(batch, heads, head_dim // 2)
    largest = {}
    for tokens in (2048, 8192):
        store = QuantizedStore(bits)
        store.start(channels, None)
        for _ in range(0, tokens, 1024):  # a prompt of 1024, then folds (the same blocks)
            k = torch.randn(batch, heads, 1024, head_dim, generator=g, dtype=torch.bfloat16)
            store.append(k, torch.randn(batch, heads, 1024, head_dim, generator=g, dtype=torch.bfloat16))
        query = torch.randn(batch, heads * group, 1, head_dim, generator=g, dtype=torch.bfloat16)
        recent = torch.randn(batch, heads, 5, head_dim, generator=g, dtype=torch.bfloat16)
        with _LargestTensor() as seen:
            out = compact_attention(query, store, recent, recent, None, head_dim**-0.5)
        assert out.shape == (batch, 1, heads * group, head_dim) and torch.isfinite(out).all()
        largest[tokens] = seen.largest
    assert largest[8192] == largest[2048]
    # that is one chunk of value codes in float32, what quant.attention_transient_bytes states
    assert largest[8192] == quant.attention_transient_bytes(batch, heads, head_dim, bits, 8192)
    dense_values = batch * heads * 8192 * head_dim * 4
    assert largest[8192] <= dense_values / 4


# ------------------------------------------------------------------------------------ everything else works
@pytest.mark.parametrize(
    "policy", [None, SnapKV(budget=40, window=6), H2O(budget=40, recent=4), StreamingLLM(sink=2, recent=30)]
)
def test_sliding_window_layers_hold_their_window(policy):
    model = make_model("mistral")  # window 48
    ids, mask = make_batch([70, 41], seed=25)
    cache = ThinKCache(key_ratio=0.5, value_ratio=0.5, bits=4, window=6, policy=policy)
    out = generate(model, ids, mask, cache, 120)
    assert all(torch.isfinite(x).all() for x in out.logits)
    for layer in cache.layers:
        assert layer.is_sliding and layer.stored_tokens <= 47 + 1  # the window, and the newest forward's token


def test_sliding_window_8_bit_tracks_full_precision():
    """8 bits change the logits of the step after compaction by a little only (a sliding layer drops tokens)."""
    model = make_model("mistral")
    ids, mask = make_batch([70], seed=26)
    a = generate(model, ids, mask, ThinKCache(key_ratio=0.5, bits=8), 2)
    b = generate(model, ids, mask, ThinKCache(key_ratio=0.5), 2)
    torch.testing.assert_close(a.logits[1], b.logits[1], atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "settings", [dict(key_ratio=0.5), dict(key_ratio=0.5, policy=SnapKV(budget=40, window=8))], ids=["think", "snapkv"]
)
def test_assisted_decoding_gives_plain_greedy_tokens(settings):
    """Drafts verified in one forward across fold blocks: each row sees the tokens one-at-a-time decoding would
    have quantized, quantized the same way."""
    model = make_model("llama")
    phrase = torch.randint(3, 200, (12,), generator=torch.Generator().manual_seed(0))
    ids = phrase.repeat(6)[None, :70]  # repeats, so prompt lookup finds drafts
    mask = torch.ones_like(ids)
    plain = generate(model, ids, mask, ThinKCache(window=8, bits=4, **settings), 80)
    assisted = generate(model, ids, mask, ThinKCache(window=8, bits=4, **settings), 80, prompt_lookup_num_tokens=10)
    assert torch.equal(plain.sequences, assisted.sequences)
    for x, y in zip(plain.logits, assisted.logits, strict=True):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("settings", [dict(bits=4), dict(bits=2, value_ratio=0.5)], ids=["4bit", "2bit+values"])
def test_one_forward_over_generated_positions_sees_what_one_at_a_time_does(settings):
    """75 generated positions in one forward (a long draft) after a 70-token prompt: the prompt's last 6 tokens wait
    thinned in full precision, and the rows past the second fold point see one block quantized that the rows past
    the first see quantized and 6 tokens after it thinned in full precision; every row's logits are those of one
    token at a time."""
    model = make_model("llama")
    ids, _ = make_batch([70], seed=30)
    drafts = torch.randint(3, 200, (1, 75), generator=torch.Generator().manual_seed(31))
    one_at_a_time, whole = (ThinKCache(key_ratio=0.5, window=8, **settings) for _ in range(2))
    rows = []
    prefill(model, one_at_a_time, ids)
    with torch.no_grad():
        for i in range(drafts.shape[1]):
            rows.append(model(input_ids=drafts[:, i : i + 1], past_key_values=one_at_a_time).logits[:, -1])
        prefill(model, whole, ids)
        logits = model(input_ids=drafts, past_key_values=whole).logits
    layer = whole.layers[0]
    assert layer.compact_tokens == 64 and layer.thinned_full == 6  # the prompt's short block waits, thinned
    torch.testing.assert_close(logits[0], torch.cat(rows), atol=ATOL, rtol=0)


def test_chunked_prefill_and_copies_equal_one_prefill():
    model = make_model("llama")
    ids, mask = make_batch([60], seed=3)
    settings = dict(key_ratio=0.5, window=8, bits=4)
    whole = generate(model, ids, mask, ThinKCache(**settings), 20)
    chunked = generate(model, ids, mask, ThinKCache(**settings), 20, prefill_chunk_size=16)
    assert torch.equal(whole.sequences, chunked.sequences)
    # a filled quantized cache survives deepcopy and pickle
    cache = ThinKCache(**settings)
    generate(model, ids, mask, cache, 40)
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        for a, b in zip(cache.layers, clone.layers, strict=True):
            left, right = named_tensors(a), named_tensors(b)
            assert left.keys() == right.keys() and all(torch.equal(left[n], right[n]) for n in left)


def test_reset_and_channel_map():
    model = make_model("llama")
    ids, mask = make_batch([40], seed=4)
    cache = ThinKCache(key_ratio=0.5, bits=2)
    generate(model, ids, mask, cache, 3)
    kept = channel_map(cache)
    assert kept.shape == (2 * 2, 16) and torch.equal(kept.sum(-1), torch.full((4,), 8.0))
    cache.reset()
    assert all(layer.store.keys is None and layer.key_channels is None for layer in cache.layers)
    generate(model, ids, mask, cache, 3)
    assert cache.layers[0].store.bits == 2


def test_full_store_and_quantized_store_share_an_interface():
    """Both kinds hold the same tokens after the same calls; the quantized one within its step size."""
    torch.manual_seed(1)
    keys, values = torch.randn(2, 2, 80, 16), torch.randn(2, 2, 80, 16)
    channels = torch.arange(0, 16, 2).expand(2, 2, 8)
    index = torch.stack([torch.randperm(60)[:40].sort().values for _ in range(4)]).view(2, 2, 40)
    query = torch.randn(2, 2, 3, 8)
    results = []
    for store in (FullStore(), QuantizedStore(8, group_size=4)):
        store.start(channels, channels)
        store.append(keys[:, :, :64], values[:, :, :64])
        store.append(keys[:, :, 64:], values[:, :, 64:])
        store.gather(index)
        store.drop_oldest(5)
        store.map(lambda t: t.index_select(0, torch.tensor([1, 0])))
        assert store.tokens == 35
        weights = torch.softmax(torch.randn(2, 2, 3, 35, generator=torch.Generator().manual_seed(2)), -1)
        results.append((store.logits(query, 0.25), store.output(weights)))
    (la, oa), (lb, ob) = results
    torch.testing.assert_close(la, lb, atol=0.05, rtol=0)
    torch.testing.assert_close(oa, ob, atol=0.05, rtol=0)


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("bits", [3, 16, 0, 1])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"bits must be None \(full precision\) or an int, one of \(2, 4, 8\)"):
        ThinKCache(bits=bits)


@pytest.mark.parametrize("bits", ["4", 4.0, True])
def test_bits_wrong_type(bits):
    with pytest.raises(TypeError, match=r"bits must be None \(full precision\) or an int"):
        ThinKCache(bits=bits)


def test_group_size():
    assert ThinKCache(bits=4).group_size == 32
    assert ThinKCache(bits=4, group_size=16).group_size == 16
    assert ThinKCache().group_size is None
    with pytest.raises(ValueError, match="group_size=16 applies to quantized storage only"):
        ThinKCache(group_size=16)
    with pytest.raises(ValueError, match="group_size must be an int >= 1, got 0"):
        ThinKCache(bits=4, group_size=0)
    with pytest.raises(TypeError, match="group_size must be an int >= 1, got float"):
        ThinKCache(bits=4, group_size=8.0)


def test_patch_defaults_and_repr():
    model = make_model("llama")
    with pytest.raises(ValueError, match="bits must be None"):
        think_cache.patch(model, bits=3)
    with pytest.raises(TypeError, match="think_cache.patch: invalid ThinKCache setting: bits must be"):
        think_cache.patch(model, bits="4")
    think_cache.patch(model, key_ratio=0.5, bits=4, group_size=8)
    ids, mask = make_batch([40])
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    explicit = generate(model, ids, mask, ThinKCache(key_ratio=0.5, bits=4, group_size=8), 5)
    assert torch.equal(plain, explicit.sequences)
    cache = ThinKCache(key_ratio=0.5, bits=4)
    assert "bits=4, group_size=32" in repr(cache)
    prefill(model, cache, ids)
    assert "bits=4" in repr(cache) and "bits" in str(cache.stats())
    assert "bits" not in repr(ThinKCache())


@pytest.mark.parametrize("policy", [None, H2O(budget=48, recent=4)], ids=["think", "h2o"])
def test_output_attentions(policy):
    """The weights over a quantized compact part come back per logical token and sum to one."""
    model = make_model("llama")
    ids, mask = make_batch([70, 45], seed=27)
    cache = ThinKCache(key_ratio=0.5, bits=4, policy=policy)
    out = generate(model, ids, mask, cache, steps=5, output_attentions=True)
    assert cache.layers[0].compact_tokens > 0
    for step, weights in enumerate(out.attentions[1:], start=1):
        for w in weights:
            assert w.shape == (2, 4, 1, 70 + step)
            torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 1), atol=1e-5, rtol=0)


def test_a_later_prompt_sees_a_question_waiting_thinned_whole():
    """A 50-token prompt at 4 bits leaves its last 18 tokens (its question among them) thinned at full width, short
    of a block; the next user turn's rows see that question whole, as they see a compact one, and its logits track
    the full-precision cache's."""

    def second_turn(bits):
        model = make_model("llama")
        cache = ThinKCache(key_ratio=0.5, window=8, bits=bits)
        ids, _ = make_batch([50], seed=6)
        first = generate(model, ids, torch.ones_like(ids), cache, 8)
        turn = torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(2))
        cache.mark_prompt_end(first.sequences.shape[1] + 30)
        with torch.no_grad():
            logits = model(input_ids=turn, past_key_values=cache).logits
        return cache, logits

    cache, logits = second_turn(8)
    for layer in cache.layers:
        assert layer.compact_tokens == 32 and layer.thinned_full == 18
        restored = layer.restored(30, 2)
        assert restored.rows.all() and restored.present.all()
        found = restored.columns + (layer.full_from - layer.compact_tokens)
        assert (found == torch.arange(42, 50)).all()  # the question, in the part thinned in place
    _, full_precision = second_turn(None)
    # 3e-4 apart; with the question seen thinned by the later prompt's rows, 1.1e-3
    torch.testing.assert_close(logits, full_precision, atol=6e-4, rtol=0)


def test_spare_key_channels_are_codes_beside_a_quantized_store():
    """Beside a quantized compact part the question's pruned key channels wait as 8-bit codes (a byte a channel, a
    scale and zero point per 32 channels and token); beside a full-precision one, exact. Both
    hold the same tokens, and the codes stand for the exact keys within half an 8-bit step; beam reordering
    reorders them with the rest."""
    model = make_model("llama")
    ids, mask = make_batch([70, 58], seed=4)
    caches = [ThinKCache(key_ratio=0.5, window=8, bits=bits) for bits in (4, None)]
    for cache in caches:
        prefill(model, cache, ids, mask)
    coded, exact = caches[0].layers[0].spare, caches[1].layers[0].spare
    assert coded.coded and not exact.coded and coded.tokens == exact.tokens == 8
    assert isinstance(exact.rows, torch.Tensor) and coded.rows.codes.dtype == torch.uint8 and coded.rows.bits == 8
    # float32 here, 8 pruned channels (head_dim 16): a byte a code plus a float32 scale and zero point per 8
    assert coded.nbytes == exact.nbytes / 2 and coded.rows.channels == coded.rows.group_size == 8
    assert torch.equal(caches[0].layers[0].key_channels, caches[1].layers[0].key_channels)  # the same prompt
    keys, dense = coded.keys(torch.float32), exact.keys(torch.float32)
    step = coded.rows.scales().repeat_interleave(32, -1)[..., : keys.shape[-1]]
    assert ((keys - dense).abs() <= step / 2 + 1e-6).all() and not torch.equal(keys, dense)
    caches[0].reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(caches[0].layers[0].spare.keys(torch.float32), keys.flip(0))


def _thinned_until(cache):
    return [layer.full_from + getattr(layer, "thinned_full", 0) for layer in cache.layers]


def test_a_short_later_turn_stays_whole():
    """The tokens a quantized layer holds thinned (compact, or thinned in place) are those a full-precision layer
    holds compact, after the prompt and after a later turn shorter than `window` (whose last `window` tokens wait
    whole). Regression: that turn's fold point lies behind the oldest full-width token, which gave `_fold` a
    negative count, and the whole full-width part, the new question included, was thinned."""
    model = make_model("llama")
    caches = [ThinKCache(key_ratio=0.5, window=32, bits=bits) for bits in (4, None)]
    ids, _ = make_batch([100], seed=7)
    outs = [generate(model, ids, torch.ones_like(ids), cache, 8) for cache in caches]
    assert _thinned_until(caches[0]) == _thinned_until(caches[1]) == [100, 100]
    sequence = torch.cat([outs[1].sequences, torch.randint(3, 200, (1, 10))], dim=-1)
    for cache in caches:
        generate(model, sequence, torch.ones_like(sequence), cache, 6)
    assert _thinned_until(caches[0]) == _thinned_until(caches[1])
    assert caches[0].layers[0].keys[:, :, -16:-6].abs().amin() > 0  # the turn, whole


def test_a_sliding_window_past_the_fold_point_thins_nothing_more():
    """A sliding window of 16 drops tokens past the fold point while decoding: no token at or after it is thinned
    (the same negative count thinned one more token a step)."""
    model = make_model("phi3")
    cache = ThinKCache(key_ratio=0.5, window=32, bits=4)
    ids, _ = make_batch([70], seed=7)
    generate(model, ids, torch.ones_like(ids), cache, 25)  # the fold point stays at 70 until position 102
    for layer in cache.layers:
        assert layer.full_from > layer.fold_point(layer.seen_tokens - 1) and layer.thinned_full == 0


def test_crop_refuses_tokens_thinned_in_place():
    model = make_model("llama")
    cache = ThinKCache(key_ratio=0.5, window=8, bits=4)
    ids, _ = make_batch([70], seed=8)
    generate(model, ids, torch.ones_like(ids), cache, 4)
    layer = cache.layers[0]
    assert layer.thinned_full == 6 and layer.keys.shape[-2] == 6 + 3  # the prompt's 6 short of a block, 3 generated
    with pytest.raises(ValueError, match="cannot crop 4 tokens: only the newest 3 tokens are stored at full width"):
        cache.crop(-4)
    with pytest.raises(ValueError, match=r"folded into the compact part \(8 of 16 key channels, 4-bit codes\)"):
        cache.crop(-4)
