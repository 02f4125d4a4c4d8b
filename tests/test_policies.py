"""Token eviction policies under ThinK: equal to a dense masked reference, bounded memory, clear errors."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import generate, held_bytes, make_batch, make_model, prefill
from transformers import AttentionInterface, DynamicCache, LogitsProcessor, LogitsProcessorList

import think_cache
from think_cache import H2O, Policy, SnapKV, StreamingLLM, ThinKCache
from think_cache import attention as think_attention_module
from think_cache.policies import top_tokens, window_attention

ATOL = 1e-4


def _policies():
    return {
        "snapkv": SnapKV(budget=24, window=6, kernel=3),
        "h2o": H2O(budget=24, recent=6),
        "streaming": StreamingLLM(sink=3, recent=18),
    }


# ------------------------------------------------------------------------------------- the reference
@dataclass
class _Seen:
    """What one ThinK attention call could see: per head, visible and compact logical positions."""

    visible: torch.Tensor  # (B, H, T) bool
    compact: torch.Tensor  # (B, H, T) bool
    key_channels: torch.Tensor | None
    value_channels: torch.Tensor | None


def _record(layer, compacted: bool | None = None) -> _Seen:
    """What an attention over ``layer`` sees; ``compacted``: whether it attends the layer compacted (default: as the
    layer is now; a layer that reuses another's keys says what that one was when it returned them)."""
    batch, heads = layer.keys.shape[:2]
    seen = layer.seen_tokens
    visible = torch.zeros(batch, heads, seen, dtype=torch.bool)
    compact = torch.zeros_like(visible)
    if not (layer.is_compacted if compacted is None else compacted):
        visible[:] = True
        return _Seen(visible, compact, None, None)
    visible[..., seen - layer.keys.shape[-2] :] = True
    if layer.compact_positions is None:
        compact[..., : seen - layer.keys.shape[-2]] = True
    else:
        compact.scatter_(-1, layer.compact_positions.long(), True)
    visible |= compact
    return _Seen(
        visible,
        compact,
        layer.key_channels.clone(),
        None if layer.value_channels is None else layer.value_channels.clone(),
    )


def _keep_mask(channels, dim):
    keep = torch.zeros(*channels.shape[:-1], dim)
    return keep.scatter_(-1, channels.long(), 1.0)[:, :, None, :]


def run_with_reference(model, ids, mask, steps, **settings):
    """Generate with ThinK while recording what each attention saw; replay on a full cache with stock sdpa,
    masking unseen tokens per head and zeroing pruned channels. Returns both generate outputs and the cache."""
    original = AttentionInterface._global_mapping[think_cache.ATTENTION_NAME]
    records = defaultdict(list)

    def spy(module, query, key, value, attention_mask, **kwargs):
        handoff = think_attention_module._state.handoff
        if handoff is not None and handoff.key is key:
            records[module.layer_idx].append(_record(handoff.layer))
        elif (shared := think_attention_module._shared_layer(key)) is not None:  # a layer reusing keys (Gemma 4)
            records[module.layer_idx].append(_record(*shared))
        return original(module, query, key, value, attention_mask, **kwargs)

    calls = defaultdict(int)

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        seen = records[module.layer_idx][calls[module.layer_idx]]
        calls[module.layer_idx] += 1
        k, v = key.clone(), value.clone()
        if seen.key_channels is not None:
            zero_k = _keep_mask(seen.key_channels, k.shape[-1])
            k = torch.where(seen.compact[..., None], k * zero_k, k)
            if seen.value_channels is not None:
                v = torch.where(seen.compact[..., None], v * _keep_mask(seen.value_channels, v.shape[-1]), v)
        q_len, kv_len = query.shape[2], k.shape[2]
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()
        allowed = allowed & seen.visible[:, :, None, :]
        group = query.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            query,
            k.repeat_interleave(group, 1),
            v.repeat_interleave(group, 1),
            attn_mask=allowed.repeat_interleave(group, 1),
            scale=scaling,
        )
        return out.transpose(1, 2), None

    cache = ThinKCache(**settings)
    try:
        AttentionInterface.register(think_cache.ATTENTION_NAME, spy)
        think = generate(model, ids, mask, cache, steps)
        AttentionInterface.register(think_cache.ATTENTION_NAME, reference)
        ref = generate(model, ids, mask, DynamicCache(), steps)
    finally:
        AttentionInterface.register(think_cache.ATTENTION_NAME, original)
    assert all(calls[i] == len(records[i]) for i in records)
    return think, ref, cache


def _assert_same(think, ref):
    assert torch.equal(think.sequences, ref.sequences)
    for a, b in zip(think.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# -------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("name", ["snapkv", "h2o", "streaming"])
def test_policy_alone_equals_masked_reference(arch, name):
    model = make_model(arch)
    ids, mask = make_batch([40, 29, 17], seed=11)
    think, ref, cache = run_with_reference(model, ids, mask, 20, key_ratio=0, policy=_policies()[name], window=6)
    _assert_same(think, ref)
    layer = cache.layers[0]
    assert layer.is_compacted and layer.compact_positions is not None
    assert layer.store.keys.shape[-1] == layer.head_dim  # key_ratio 0 keeps every channel


@pytest.mark.parametrize("name", ["snapkv", "h2o", "streaming"])
@pytest.mark.parametrize("ratios", [(0.5, 0.0), (0.0, 0.5), (0.5, 0.5)], ids=["keys", "values", "both"])
def test_policy_with_channel_pruning_equals_reference(arch, name, ratios):
    model = make_model(arch)
    ids, mask = make_batch([38, 21], seed=12)
    key_ratio, value_ratio = ratios
    think, ref, cache = run_with_reference(
        model, ids, mask, 16, key_ratio=key_ratio, value_ratio=value_ratio, policy=_policies()[name], window=6
    )
    _assert_same(think, ref)
    layer = cache.layers[-1]
    if key_ratio:
        assert layer.store.keys.shape[-1] < layer.head_dim
    if value_ratio:
        assert layer.store.values.shape[-1] < layer.head_dim


def test_recent_full_width_tokens_under_a_policy(arch):
    model = make_model(arch)
    ids, mask = make_batch([37, 25], seed=13)
    think, ref, cache = run_with_reference(
        model, ids, mask, 14, key_ratio=0.5, policy=H2O(budget=30, recent=4), window=6, recent=5
    )
    _assert_same(think, ref)
    # recent, and the 13 generated tokens fed so far: under a fold block, they wait at full width
    assert cache.layers[0].keys.shape[-2] == 5 + 13 < 5 + cache.layers[0].fold_block


class _BudgetWatch(LogitsProcessor):
    """Asserts, after every forward, that no layer holds more than the budget and its slack (a policy that evicts
    while decoding evicts a fold block at a time: at most ``budget + fold_block`` tokens)."""

    def __init__(self, cache, budget):
        self.cache, self.budget, self.steps, self.most = cache, budget, 0, 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        for layer in self.cache.layers:
            assert layer.stored_tokens <= self.budget + layer.fold_block, (self.steps, layer.stored_tokens)
            self.most = max(self.most, layer.stored_tokens)
            if layer.compact_positions is not None:
                assert layer.compact_positions.shape[-1] + layer.keys.shape[-2] == layer.stored_tokens
        return scores


@pytest.mark.parametrize(
    "policy", [H2O(budget=64, recent=16), StreamingLLM(sink=4, recent=60)], ids=["h2o", "streaming"]
)
@pytest.mark.parametrize("key_ratio", [0.0, 0.5])
def test_memory_bounded_while_generating(policy, key_ratio):
    model = make_model("llama")
    ids, mask = make_batch([90, 40], seed=14)
    cache = ThinKCache(key_ratio=key_ratio, policy=policy)
    watch = _BudgetWatch(cache, policy.budget)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=300,
        do_sample=False,
        logits_processor=LogitsProcessorList([watch]),
    )
    assert watch.steps == 300 and out.shape[1] == 390
    assert cache.get_seq_length() == 389  # logical length goes on growing
    fold = cache.layers[0].fold_block
    assert watch.most == policy.budget + fold  # the slack is used, and bounded
    # evicted back to the budget in the forward that folds a block: 299 tokens fed after the prompt, the last
    # eviction at the 289th
    assert all(layer.stored_tokens == policy.budget + (299 - 1) % fold for layer in cache.layers)


def test_streaming_keeps_sinks_and_the_newest_tokens():
    model = make_model("qwen2")
    ids, mask = make_batch([50, 30], seed=15)
    cache = ThinKCache(key_ratio=0.5, policy=StreamingLLM(sink=3, recent=10))
    model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=80, do_sample=False)
    seen = cache.get_seq_length()
    for layer in cache.layers:
        full = layer.keys.shape[-2]
        # row 0 is unpadded: sinks 0, 1, 2; row 1 is padded by 20: its sinks are positions 20, 21, 22
        for row, first in ((0, 0), (1, 20)):
            stored = layer.compact_positions[row, 0].tolist() + list(range(seen - full, seen))
            sinks, rest = stored[:3], stored[3:]
            assert sinks == [first, first + 1, first + 2]
            # then the newest tokens without a gap: at least `recent`, at most a fold block more (the slack)
            assert rest == list(range(seen - len(rest), seen))
            assert 10 <= len(rest) <= 10 + layer.fold_block


def test_memory_on_top_of_snapkv():
    """1k+ prompt, head_dim 64: ThinK thins what SnapKV keeps."""
    model = make_model("llama", hidden_size=256, intermediate_size=256)
    ids, _ = make_batch([1100], seed=16)

    def held(**settings):
        """Bytes held, and those of the question's pruned channels kept aside for a later prompt."""
        cache = ThinKCache(policy=SnapKV(budget=256), **settings)
        prefill(model, cache, ids)
        assert all(layer.stored_tokens == 256 for layer in cache.layers)
        assert cache.stats().stored_bytes == held_bytes(cache)
        spare = sum(layer.spare.nbytes for layer in cache.layers if layer.spare is not None)
        return held_bytes(cache), spare

    snapkv, none = held(key_ratio=0)
    keys, spare = held(key_ratio=0.5)
    both, _ = held(key_ratio=0.5, value_ratio=0.5)
    assert none == 0 and 0 < spare / snapkv <= 0.045  # 32 tokens at 32 of 64 key channels, next to 256 whole
    assert (keys - spare) / snapkv <= 0.76, keys / snapkv
    assert (both - spare) / snapkv <= 0.51, both / snapkv
    assert keys / snapkv <= 0.80  # ThinK still saves a fifth of what SnapKV keeps
    dense = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=dense)
    assert snapkv / held_bytes(dense) < 0.25  # 256 of 1100 tokens


def test_no_spare_channels_for_tokens_the_policy_evicted():
    """A ThinK window longer than what SnapKV keeps: the question's pruned channels are kept aside only for tokens
    some head still holds (they were kept for all 300 window tokens, 0.42x instead of 0.22x of DynamicCache)."""
    model = make_model("llama", hidden_size=256, intermediate_size=256)
    ids, _ = make_batch([300], seed=17)
    cache = prefill(model, ThinKCache(key_ratio=0.5, window=300, policy=SnapKV(budget=64, window=32)), ids)
    for layer in cache.layers:
        held = set(layer.compact_positions.flatten().tolist()) | set(range(layer.full_from, layer.seen_tokens))
        assert layer.spare_positions and set(layer.spare_positions) <= held
        assert layer.spare.tokens == len(layer.spare_positions) <= 3 * 64  # at most what the heads keep
    assert cache.stats().ratio < 0.3


def test_stats_report_tokens_and_channels():
    model = make_model("llama")
    ids, _ = make_batch([100])
    cache = ThinKCache(key_ratio=0.5, value_ratio=0.25, policy=SnapKV(budget=40, window=8))
    prefill(model, cache, ids)
    s = cache.stats().layers[0]
    assert (s.tokens, s.stored_tokens, s.compact_tokens) == (100, 40, 40)
    assert (s.key_channels, s.value_channels, s.head_dim) == (8, 12, 16)
    assert "SnapKV(budget=40" in repr(cache)


# ------------------------------------------------------------------------------------------- the math
def test_top_tokens_never_prefers_padding():
    scores = torch.tensor([[[9.0, 8.0, 1.0, 2.0, 3.0]]])
    real = torch.tensor([[[False, False, True, True, True]]])
    assert top_tokens(scores, 2, never=~real).tolist() == [[[3, 4]]]
    assert top_tokens(scores, 4, never=~real).tolist()[0][0][1:] == [2, 3, 4]  # one pad only when needed
    always = torch.tensor([[[False, False, True, False, False]]])
    assert top_tokens(scores, 2, always=always, never=~real).tolist() == [[[2, 4]]]


def test_snapkv_scores_match_a_direct_computation():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 12, 8)
    k = torch.randn(1, 2, 12, 8)
    real = torch.ones(1, 12, dtype=torch.bool)
    policy = SnapKV(budget=6, window=4, kernel=1)
    scores = policy.prompt_scores(q, k, real, 0.35)
    expected = torch.zeros(1, 2, 12)
    for h in range(4):
        logits = q[0, h, -4:] @ k[0, h // 2].T * 0.35
        causal = torch.ones(4, 12, dtype=torch.bool).tril(8)
        expected[0, h // 2] += torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).sum(0)
    torch.testing.assert_close(scores, expected)
    # pooling spreads a spike to its neighbours
    pooled = SnapKV(budget=6, window=4, kernel=3, pooling="max").prompt_scores(q, k, real, 0.35)
    assert (pooled >= scores - 1e-6).all()


def test_window_attention_ignores_padding():
    torch.manual_seed(1)
    q, k = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, :4] = False
    w = window_attention(q, k, real, 0.3)
    assert torch.all(w[1, :, :4] == 0)
    torch.testing.assert_close(w.sum(-1), torch.tensor([[10.0, 10.0], [6.0, 6.0]]))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("block_elements", [2**6, 2**20])
def test_one_pass_attention_equals_sdpa_and_window_attention(monkeypatch, mask_kind, block_elements):
    """H2O's prompt forward takes its output and its token scores from one softmax: the same as sdpa's output and
    `window_attention`'s sums (and the dense formula's), with padding, GQA and blocks of any size (2**6 elements: a
    block of one query row per KV head, 2**20: the whole prompt in one block per KV head)."""
    from think_cache import policies

    monkeypatch.setattr(policies, "QUERY_CHUNK_ELEMENTS", block_elements)
    g = torch.Generator().manual_seed(7)
    batch, q_heads, kv_heads, tokens, q_len, dim = 2, 6, 2, 23, 17, 8
    q = torch.randn(batch, q_heads, q_len, dim, generator=g)
    k, v = torch.randn(batch, kv_heads, tokens, dim, generator=g), torch.randn(batch, kv_heads, tokens, 5, generator=g)
    real = torch.ones(batch, tokens, dtype=torch.bool)
    if mask_kind != "none":
        real[1, :9] = False  # left padding in the second row
    causal = torch.ones(q_len, tokens, dtype=torch.bool).tril(tokens - q_len)
    bool_mask = causal[None, None] & real[:, None, None, :]
    mask = {
        "none": None,
        "bool": bool_mask,
        "additive": torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min),
    }
    out, sums = policies.attention_and_token_weights(
        q, k, v, think_cache.compact.as_bool_mask(mask[mask_kind]), real, 0.3
    )
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=bool_mask, scale=0.3
    )
    rows = real[:, tokens - q_len :]  # padded query rows give no defined output
    torch.testing.assert_close(
        out.transpose(1, 2)[rows[:, None].expand(-1, q_heads, -1)], expected[rows[:, None].expand(-1, q_heads, -1)]
    )
    torch.testing.assert_close(sums, window_attention(q, k, real, 0.3))
    # and both equal the dense formula: the softmax over all keys, summed over each group's real query rows
    logits = (q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2) * 0.3).masked_fill(
        ~bool_mask, -torch.inf
    )
    dense = (logits.softmax(-1).nan_to_num(0.0) * rows[:, None, :, None]).sum(2).view(batch, kv_heads, 3, tokens)
    torch.testing.assert_close(sums, dense.sum(2).float())
    assert out.shape == (batch, q_len, q_heads, 5) and out.is_contiguous()


def test_one_pass_attention_does_not_overflow_in_float16():
    """Rows are normalised before the float16 matmul: unnormalised weights sum to the number of keys (4000 here)
    and times values of 20 would pass float16's largest finite number."""
    from think_cache import policies

    tokens = 4000
    q = torch.zeros(1, 2, 2, 8, dtype=torch.float16)  # uniform attention over every visible key
    k = torch.randn(1, 1, tokens, 8).half()
    v = torch.full((1, 1, tokens, 4), 20.0, dtype=torch.float16)
    out, _ = policies.attention_and_token_weights(q, k, v, None, torch.ones(1, tokens, dtype=torch.bool), 0.3)
    torch.testing.assert_close(out.float(), torch.full_like(out.float(), 20.0), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize(
    "arch, layer_idx", [("llama", 0), ("gemma2", 1)], ids=["llama", "gemma2-global-layer-without-softcap-parameter"]
)
def test_a_user_policy_by_subclassing(arch, layer_idx):
    """A policy of one's own; on Gemma 2, which caps its logits, one without a ``softcap`` parameter is called
    without it."""

    @dataclass
    class KeepFirst(Policy):
        budget: int = 20

        def prompt_scores(self, query, keys, real_keys, scaling):
            return -torch.arange(keys.shape[-2], dtype=torch.float32).expand(*keys.shape[:2], -1)

    model = make_model(arch)
    ids, _ = make_batch([50])
    cache = ThinKCache(key_ratio=0.5, policy=KeepFirst())
    model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=3)
    layer = cache.layers[layer_idx]
    assert layer.compact_positions[0, 0].tolist() == list(range(20))
    assert layer.keys.shape[-2] == 2  # the two generated tokens wait in the recent part (no eviction, block folds)


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "policy, field, value",
    [
        (SnapKV(budget=64), "kernel", 4),
        (H2O(budget=64), "budget", 10),
        (StreamingLLM(sink=4, recent=60), "recent", 120),
    ],
)
def test_policy_settings_are_fixed_once_built(policy, field, value):
    """A field changed after the checks would skip them (SnapKV's even kernel failed deep in torch, H2O kept more
    than its budget) or leave derived values stale (StreamingLLM's budget): refused, pointing at replace()."""
    with pytest.raises(
        dataclasses.FrozenInstanceError, match=rf"make a new one, e.g. dataclasses.replace\(policy, {field}="
    ):
        setattr(policy, field, value)
    if field == "recent":
        assert policy.budget == 64 and dataclasses.replace(policy, recent=120).budget == 124
        with pytest.raises(dataclasses.FrozenInstanceError, match=r"budget follows from its settings \(sink, recent\)"):
            policy.budget = 10  # derived: replace() cannot take it, so the message names what sets it
    else:
        with pytest.raises(ValueError):  # replace() runs the checks again
            dataclasses.replace(policy, **{field: value})
    copied = copy.deepcopy(policy)
    assert copied == policy and pickle.loads(pickle.dumps(policy)) == policy


def test_a_subclass_sets_its_own_fields_before_they_are_fixed():
    """A user's subclass may set fields in its own ``__post_init__`` after the built-in checks; then they are fixed."""

    @dataclass
    class WiderSnapKV(SnapKV):
        extra: int = 3

        def __post_init__(self):
            super().__post_init__()
            self.kernel = self.kernel + 2 * self.extra  # a built-in field, set after SnapKV's checks

    policy = WiderSnapKV(budget=64)
    assert policy.kernel == 13
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.extra = 1
    assert copy.deepcopy(policy) == policy


def test_policy_errors():
    with pytest.raises(ValueError, match=r"SnapKV: budget \(16\) is smaller than the window \(32\)"):
        SnapKV(budget=16)
    with pytest.raises(ValueError, match="SnapKV: kernel must be odd"):
        SnapKV(kernel=4)
    with pytest.raises(ValueError, match="SnapKV: kernel must be an int >= 1, got 0"):
        SnapKV(kernel=0)
    with pytest.raises(ValueError, match="SnapKV: pooling must be 'avg' or 'max', got 'mean'"):
        SnapKV(pooling="mean")
    with pytest.raises(ValueError, match="StreamingLLM: sink must be an int >= 0, got -1"):
        StreamingLLM(sink=-1)
    with pytest.raises(ValueError, match="StreamingLLM: recent must be an int >= 1, got -5"):
        StreamingLLM(recent=-5)
    with pytest.raises(ValueError, match="H2O: recent must be an int >= 0, got -2"):
        H2O(recent=-2)
    with pytest.raises(ValueError, match=r"H2O: budget \(16\) must be larger than recent \(16\)"):
        H2O(budget=16, recent=16)
    with pytest.raises(TypeError, match="SnapKV: budget must be an int"):
        SnapKV(budget=256.0)


def test_cache_rejects_bad_policy_settings():
    with pytest.raises(TypeError, match="policy must be a think_cache Policy"):
        ThinKCache(policy="snapkv")
    with pytest.raises(ValueError, match=r"recent \(64\) is larger than the policy's budget \(48\)"):
        ThinKCache(policy=H2O(budget=48, recent=8), recent=64)
    assert ThinKCache(policy=SnapKV(budget=256)).recent == 0
    assert ThinKCache().recent == 0


@pytest.mark.parametrize("decoded", [31, 32])
def test_a_later_prompt_on_a_fold_boundary_keeps_the_earlier_turns(decoded):
    """H2O evicts in the forward that folds a block; a multi-token forward (a later turn's prompt) waits, so the
    earlier turns are not all evicted when that prompt starts exactly on a fold boundary (found in review)."""
    model = make_model("llama")
    ids, _ = make_batch([100], seed=41)
    cache = ThinKCache(key_ratio=0.5, policy=H2O(budget=64, recent=8))
    prefill(model, cache, ids)
    token = ids[:, -1:]
    with torch.no_grad():
        for _ in range(decoded):  # the turn's reply, one token a forward
            model(input_ids=token, past_key_values=cache, use_cache=True)
        turn, _ = make_batch([80], seed=42)
        model(input_ids=turn, past_key_values=cache, use_cache=True)
        kept_before = [layer.compact_tokens for layer in cache.layers]
        model(input_ids=turn[:, -1:], past_key_values=cache, use_cache=True)  # decoding: the prompt folds, H2O evicts
    assert min(kept_before) >= 64 - 8  # nothing of the earlier turns was evicted by the multi-token forward
    layer = cache.layers[0]
    assert layer.stored_tokens <= 64 + layer.fold_block
    old = (layer.compact_positions < 100 + decoded).sum(-1)  # earlier turns' tokens still held, per head
    assert (old > 0).all()


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_scores_ignore_left_padding(pooling):
    """A left-padded row's tokens score as the same row alone: the pooling averages over real neighbours only (with
    padding counted, a padded row's first tokens scored 4/7, 5/7 and 6/7 of their scores alone)."""
    g = torch.Generator().manual_seed(0)
    policy = SnapKV(budget=8, window=4, kernel=7, pooling=pooling)
    keys, query = torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 4, 4, 16, generator=g)
    alone = policy.prompt_scores(query, keys, torch.ones(1, 20, dtype=torch.bool), 0.25)
    padded_keys = torch.cat([torch.randn(1, 2, 5, 16, generator=g), keys], dim=2)
    real = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 20, dtype=torch.bool)], dim=1)
    padded = policy.prompt_scores(query, padded_keys, real, 0.25)
    torch.testing.assert_close(padded[..., 5:], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "policy", [SnapKV(budget=64, window=8), H2O(budget=64, recent=16), StreamingLLM(sink=2, recent=60)], ids=repr
)
def test_a_policys_repr_builds_it_again(policy):
    assert eval(repr(policy), {"SnapKV": SnapKV, "H2O": H2O, "StreamingLLM": StreamingLLM}) == policy


def test_snapkv_on_layers_that_reuse_keys():
    """Gemma 4's KV sharing (layers 2 and 3 reuse layer 1's keys and values): those layers see what layer 1 kept,
    its evicted tokens and pruned channels too, as the masked reference says; they store nothing of their own."""
    model = make_model(
        "gemma4_text", initializer_range=0.2, num_hidden_layers=4, num_kv_shared_layers=2,
        layer_types=["full_attention"] * 4,
    )  # fmt: skip
    ids, mask = make_batch([60, 41], seed=5)
    settings = dict(key_ratio=0.5, window=6, policy=SnapKV(budget=24, window=6, kernel=3))
    think, ref, cache = run_with_reference(model, ids, mask, 16, **settings)
    _assert_same(think, ref)
    assert len(cache.layers) == 2 and all(layer.compact_tokens <= 24 for layer in cache.layers)
