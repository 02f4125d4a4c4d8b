"""Property-based tests (hypothesis) of one ThinK layer driven with random tensors, against a dense reference.

Random batch sizes, left padding, head counts, GQA groups, head_dim, ratios, windows, budgets and decode lengths.
Every step, the compact attention must equal stock attention over the full history with the evicted tokens
masked out per head and the pruned channels of compact tokens zeroed; the layer must never hold more than a
policy's budget, and never keep a padded token while a real one was dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from think_cache import H2O, SnapKV, StreamingLLM
from think_cache.compact import compact_attention
from think_cache.layer import ThinKLayer


@st.composite
def scenarios(draw):
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    batch = draw(st.integers(1, 3))
    prompt = draw(st.integers(2, 40))
    pads = [draw(st.integers(0, prompt - 1)) for _ in range(batch)]
    window = draw(st.integers(1, 12))
    policy_kind = draw(st.sampled_from(["none", "snapkv", "h2o", "streaming"]))
    budget = draw(st.integers(window, 48))
    policy = {
        "none": None,
        "snapkv": SnapKV(budget=budget, window=window, kernel=draw(st.sampled_from([1, 3, 5]))),
        "h2o": H2O(budget=budget + 1, recent=draw(st.integers(0, budget))),
        "streaming": StreamingLLM(sink=draw(st.integers(0, 4)), recent=draw(st.integers(1, budget))),
    }[policy_kind]
    max_recent = window if policy is None else min(window, policy.budget)
    return dict(
        kv_heads=kv_heads,
        group=group,
        head_dim=head_dim,
        batch=batch,
        prompt=prompt,
        pads=pads,
        window=window,
        recent=draw(st.integers(0, max_recent)),
        key_ratio=draw(st.sampled_from([0.0, 0.25, 0.5, 0.75])),
        value_ratio=draw(st.sampled_from([0.0, 0.0, 0.5])),
        policy=policy,
        steps=draw(st.integers(1, 40)),
        seed=draw(st.integers(0, 2**16)),
    )


def _visible_and_compact(layer, seen):
    batch, heads = layer.keys.shape[:2]
    n_recent = layer.keys.shape[-2]
    visible = torch.zeros(batch, heads, seen, dtype=torch.bool)
    visible[..., seen - n_recent :] = True
    compact = torch.zeros_like(visible)
    if layer.compact_positions is None:
        compact[..., : seen - n_recent] = True
    else:
        compact.scatter_(-1, layer.compact_positions.long(), True)
    return visible | compact, compact


def _keep(channels, dim):
    return torch.zeros(*channels.shape[:-1], dim).scatter_(-1, channels.long(), 1.0)[:, :, None, :]


# found by hypothesis: sinks + the policy's newest tokens + the full-width part outnumber the budget; the
# full-width part must win (it is the newest tokens by construction)
_CROWDED = dict(
    kv_heads=1,
    group=1,
    head_dim=4,
    batch=1,
    prompt=3,
    pads=[0],
    window=2,
    recent=2,
    key_ratio=0.0,
    value_ratio=0.0,
    policy=StreamingLLM(sink=1, recent=1),
    steps=1,
    seed=0,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
@example(_CROWDED)
def test_layer_equals_dense_reference(s):
    g = torch.Generator().manual_seed(s["seed"])
    b, h, d, grp = s["batch"], s["kv_heads"], s["head_dim"], s["group"]
    scale = d**-0.5
    layer = ThinKLayer(s["key_ratio"], s["value_ratio"], s["window"], s["recent"], s["policy"])

    real = torch.ones(b, s["prompt"], dtype=torch.bool)
    for row, pad in enumerate(s["pads"]):
        real[row, :pad] = False
    keys = torch.randn(b, h, s["prompt"], d, generator=g)
    values = torch.randn(b, h, s["prompt"], d, generator=g)
    query = torch.randn(b, h * grp, s["prompt"], d, generator=g)
    causal = torch.ones(s["prompt"], s["prompt"], dtype=torch.bool).tril()
    prompt_mask = (causal[None] & real[:, None, :])[:, None]  # (B, 1, T, T)
    layer.update(keys, values)
    layer.observe(query, prompt_mask, scale)
    layer.compact()  # the prompt ends here (what a ThinKCache does when generate tells it the prompt's end)

    all_k, all_v = keys, values
    for _ in range(s["steps"]):
        k = torch.randn(b, h, 1, d, generator=g)
        v = torch.randn(b, h, 1, d, generator=g)
        q = torch.randn(b, h * grp, 1, d, generator=g)
        all_k, all_v = torch.cat([all_k, k], 2), torch.cat([all_v, v], 2)
        real = torch.cat([real, torch.ones(b, 1, dtype=torch.bool)], 1)
        mask = real[:, None, None, :]  # (B, 1, 1, seen)
        recent_k, recent_v = layer.update(k, v)
        seen = layer.seen_tokens
        if not layer.is_compacted:  # nothing pruned: stock attention is what runs
            continue

        out = compact_attention(
            q,
            layer.store,
            recent_k,
            recent_v,
            layer.attention_mask(mask, 1),
            scale,
            return_token_weights=layer.token_scores is not None,
        )
        out, weights = out if isinstance(out, tuple) else (out, None)

        visible, compact = _visible_and_compact(layer, seen)
        ref_k = torch.where(compact[..., None], all_k * _keep(layer.key_channels, d), all_k)
        ref_v = all_v
        if layer.value_channels is not None:
            ref_v = torch.where(compact[..., None], all_v * _keep(layer.value_channels, d), all_v)
        allowed = (visible & real[:, None, :])[:, :, None, :]
        if not allowed.any(-1).all():
            continue  # a row with no real visible token has no defined answer
        ref = F.scaled_dot_product_attention(
            q,
            ref_k.repeat_interleave(grp, 1),
            ref_v.repeat_interleave(grp, 1),
            attn_mask=allowed.repeat_interleave(grp, 1),
            scale=scale,
        ).transpose(1, 2)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

        layer.after_attention(mask, weights)
        policy = s["policy"]
        if policy is not None and policy.evicts_while_decoding:
            # the full-width part is kept whole; the rest fits the budget and its slack of one fold block
            assert layer.stored_tokens <= max(policy.budget + layer.fold_block, layer.keys.shape[-2])
        if layer.compact_positions is not None:
            # padding only fills slots no real token could take: the kept real tokens are as many as possible
            candidates = real[:, : seen - layer.keys.shape[-2]].sum(-1)  # real tokens older than the recent part
            slots = layer.compact_positions.shape[-1]
            for head in range(h):
                kept_real = real.gather(1, layer.compact_positions[:, head].long()).sum(-1)
                assert torch.equal(kept_real, torch.clamp(candidates, max=slots))


@settings(max_examples=40, deadline=None)
@given(
    budget=st.integers(8, 40),
    prompt=st.integers(10, 80),
    pad=st.integers(0, 60),
    policy_kind=st.sampled_from(["snapkv", "h2o", "streaming"]),
)
def test_prompt_selection_prefers_real_tokens(budget, prompt, pad, policy_kind):
    pad = min(pad, prompt - 1)
    policy = {
        "snapkv": SnapKV(budget=budget, window=4),
        "h2o": H2O(budget=budget, recent=4),
        "streaming": StreamingLLM(sink=2, recent=budget - 2),
    }[policy_kind]
    g = torch.Generator().manual_seed(budget * 1000 + prompt)
    layer = ThinKLayer(0.5, 0.0, 4, 0, policy)
    real = torch.ones(1, prompt, dtype=torch.bool)
    real[0, :pad] = False
    layer.update(torch.randn(1, 2, prompt, 8, generator=g), torch.randn(1, 2, prompt, 8, generator=g))
    mask = (torch.ones(prompt, prompt, dtype=torch.bool).tril()[None] & real[:, None])[:, None]
    layer.observe(torch.randn(1, 4, prompt, 8, generator=g), mask, 0.35)
    layer.compact()
    kept = layer.compact_positions.long()
    assert kept.shape[-1] == min(budget, prompt)
    n_real = prompt - pad
    kept_real = real[0][kept[0]]  # (heads, kept)
    assert torch.all(kept_real.sum(-1) == min(n_real, kept.shape[-1]))
