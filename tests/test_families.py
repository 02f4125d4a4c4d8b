"""Every supported family beyond Llama, Mistral, Qwen2 and Qwen3 on tiny random-weight models (fp32), against the
model's own attention.

Gemma 2, Gemma 3, Phi-3 and Mixtral have sliding-window layers with a window (16) shorter than the prompts, and
decode past it: Gemma 2 alternates sliding and global layers, caps its attention logits (``attn_logit_softcapping``,
5 here so that it bites) and scales by ``query_pre_attn_scalar``; Gemma 3 has sliding and global layers, q/k norms
and, on the small models, head_dim 256 with a single KV head; Phi-3 has a fused qkv projection and a sliding window
on every layer, as Mixtral has. Qwen2-MoE and Qwen3-MoE attend to every token (Qwen2-MoE's config carries a
``sliding_window`` of 0 that no layer uses; Qwen3-MoE has q/k norms); their experts do not touch the cache. The
families of ``conftest._BY_MODEL_TYPE`` (OLMo 2/3, Granite, GLM-4, Cohere 2, SmolLM3, EXAONE 4) each bring what the
comments there say; those with sliding layers have two sliding and one global layer. Gemma 3 with images
(`Gemma3ForConditionalGeneration`) has its own tests at the end.

The references run an unpatched copy of the model (same weights) with transformers' own attention, so softcapping
and scaling are the model's code, not think_cache's: eager for Gemma 2 (sdpa has no softcapping: transformers 4.56
defaults Gemma 2 to sdpa and then drops the cap), sdpa for the others. key_ratio=0 is compared with the
``DynamicCache`` that ``generate`` builds for the model (sliding layers keep their window; a plain ``DynamicCache()``
keeps every token and lets sdpa sum over more masked keys, which moves fp32 logits by up to 1e-5 on 4.56), and
key_ratio > 0 with a ``DynamicCache`` of `ZeroedLayer`s (full-size keys whose pruned channels are zeroed once
thinned, with the channels the ThinK run chose).
"""

from __future__ import annotations

import pytest
import torch
from conftest import COMMON_CONFIG, chat, generate, make_batch, make_config, make_model, prefill, zeroed_reference
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

import think_cache
from think_cache import H2O, SnapKV, ThinKCache, kernels
from think_cache import _compat as compat
from think_cache.compact import cap_logits
from think_cache.policies import window_attention
from think_cache.scoring import value_channel_scores
from think_cache.storage import FullStore

ATOL_EXACT = 1e-5
ATOL_REFERENCE = 1e-4

#: Test models: (architecture, config overrides). Larger initial weights than transformers' 0.02 make attention
#: peaked, so that Gemma 2's cap and the pruned channels change the logits well above the tolerances.
FAMILIES = {
    "gemma2": ("gemma2", dict(initializer_range=0.2)),
    "gemma3-gqa": ("gemma3", dict(initializer_range=0.2)),
    "gemma3-head256-1kv": (
        "gemma3",
        dict(initializer_range=0.2, head_dim=256, query_pre_attn_scalar=256, num_key_value_heads=1),
    ),
    "phi3": ("phi3", dict(initializer_range=0.2, hidden_size=128)),
    "mixtral": ("mixtral", dict(initializer_range=0.2)),
    # full attention on every layer, though the config carries a sliding_window (0) that applies to none of them
    "qwen2_moe": ("qwen2_moe", dict(initializer_range=0.2)),
    "qwen3_moe": ("qwen3_moe", dict(initializer_range=0.2)),
    # conftest._BY_MODEL_TYPE: built by model type (skipped where this transformers lacks the family)
    "olmo2": ("olmo2", dict(initializer_range=0.2)),
    "olmo3": ("olmo3", dict(initializer_range=0.2)),
    "granite": ("granite", dict(initializer_range=0.2)),
    "glm4": ("glm4", dict(initializer_range=0.2)),
    "cohere2": ("cohere2", dict(initializer_range=0.2)),
    "smollm3": ("smollm3", dict(initializer_range=0.2)),
    "exaone4": ("exaone4", dict(initializer_range=0.2)),
    "llama4_text": ("llama4_text", dict(initializer_range=0.2)),
    # 0.1: at 0.2 the eager reference's own float32 sums (repeat_kv, a cat of the sinks) move logits of 6 by 3e-5
    "gpt_oss": ("gpt_oss", dict(initializer_range=0.1)),
    "gemma4_text": ("gemma4_text", dict(initializer_range=0.2)),
    "gemma4_text-k-eq-v": (
        "gemma4_text",
        dict(initializer_range=0.2, attention_k_eq_v=True, num_global_key_value_heads=1),
    ),
    "gemma3n_text": ("gemma3n_text", dict(initializer_range=0.2)),  # KV sharing too (conftest._BY_MODEL_TYPE)
    # E2B/E4B: the last two layers (one of each kind) reuse the keys and values of the two before them
    "gemma4_text-shared": (
        "gemma4_text",
        dict(
            initializer_range=0.2,
            num_hidden_layers=4,
            num_kv_shared_layers=2,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
    ),
}


#: Families checked once each (`test_more_families`): key_ratio 0 is the model's attention, 0.5 its attention over
#: zeroed channels. Built by model type (`conftest._BY_MODEL_TYPE`, whose comments say what each brings); those
#: with sliding layers have a window of 16, on every layer or on two of three.
MORE_FAMILIES = {
    name: (name, dict(initializer_range=0.2))
    for name in (
        "gemma", "cohere", "starcoder2", "phimoe", "ministral3", "seed_oss", "apertus", "arcee", "ernie4_5",
        "ernie4_5_moe", "glm4_moe", "granitemoe", "internlm3", "olmoe", "flex_olmo", "vaultgemma", "exaone_moe",
        "cohere2_moe", "afmoe",
        "granitemoeshared", "minimax_m2",
        "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "jamba", "granitemoehybrid",  # hybrids
        "falcon_h1",
    )
}  # fmt: skip


#: The families without sliding-window layers.
FULL_ATTENTION = ("qwen2_moe", "qwen3_moe", "olmo2", "granite", "glm4", "smollm3")


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def _models(family: str, **overrides):
    """The patched model and its unpatched twin (same weights) running transformers' attention: eager where the
    logits are capped, else sdpa."""
    arch, settings = {**FAMILIES, **MORE_FAMILIES}[family]
    settings = {**settings, **overrides}
    unpatched = make_model(arch, patch=False)
    hybrid = compat.state_layer_indices(unpatched.config)  # they leave the flag unset for their linear layers
    if not (unpatched._supports_attention_backend or hybrid and compat.LinearAttentionLayer is not None):
        pytest.skip(f"{family} does not use transformers' attention interface in this transformers version")
    patched = make_model(arch, **settings)
    reference = make_model(arch, patch=False, **settings)
    capped = getattr(reference.config, "attn_logit_softcapping", None) is not None
    sinks = any(hasattr(module, "sinks") for module in reference.modules())  # GPT-OSS: eager only
    compat.set_attn_implementation(reference, "eager" if capped or sinks else "sdpa")
    return patched, reference


def _dynamic(model) -> DynamicCache:
    """The DynamicCache ``generate`` builds for ``model``: transformers' sliding layers where the model has them."""
    return DynamicCache(config=model.config)


def _uncapped(model):
    """``model`` with Gemma 2's attention logit softcapping switched off (read by its attention at every forward)."""
    for module in model.modules():
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = None
    return model


def _assert_same(out, ref, atol: float):
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _max_logit_gap(out, ref) -> float:
    return max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True))


# ------------------------------------------------------------------------------------------------ key_ratio=0
def test_families_are_supported():
    assert {"gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"} <= set(
        think_cache.SUPPORTED_MODEL_TYPES
    )
    for family in [*FAMILIES, *MORE_FAMILIES]:
        try:
            patched, _ = _models(family)
        except pytest.skip.Exception:  # a family this transformers does not have
            continue
        assert patched.config.model_type in think_cache.SUPPORTED_MODEL_TYPES
        assert think_cache.is_patched(patched)


def test_key_ratio_zero_is_the_models_attention(family):
    """Greedy decoding past the sliding window, a left-padded batch: the same tokens, logits within 1e-5."""
    model, reference = _models(family)
    ids, mask = make_batch([64, 41], seed=1)
    think = ThinKCache(key_ratio=0)
    out = generate(model, ids, mask, think, steps=24)
    _assert_same(out, generate(reference, ids, mask, _dynamic(reference), steps=24), ATOL_EXACT)
    sliding = [layer.is_sliding for layer in think.layers]
    if family in FULL_ATTENTION:
        assert not any(sliding)
        return
    assert any(sliding)  # the window (16) is shorter than the prompts: sliding layers really trim
    # 15 past tokens and the last forward's own (trimmed at the next update)
    assert all(layer.stored_tokens <= 16 for layer, is_sliding in zip(think.layers, sliding, strict=True) if is_sliding)
    if family not in ("phi3", "mixtral"):
        assert not all(sliding)  # and global layers keep everything


@pytest.mark.parametrize("family", list(MORE_FAMILIES))
def test_more_families(family):
    """One check each, on a left-padded batch decoding past any sliding window: key_ratio 0 gives the model's own
    tokens and logits (within 1e-5), key_ratio 0.5 those of its attention over keys with the same channels zeroed
    (within 1e-4), and holds fewer bytes."""
    model, reference = _models(family)
    ids, mask = make_batch([48, 29], seed=12)
    zero = ThinKCache(key_ratio=0)
    _assert_same(
        generate(model, ids, mask, zero, steps=20),
        generate(reference, ids, mask, _dynamic(reference), steps=20),
        ATOL_EXACT,
    )
    window = getattr(model.config, "sliding_window", None)
    if window:  # the window (16) is shorter than the prompts: sliding layers really trim
        assert any(layer.is_sliding and layer.stored_tokens <= window for layer in zero.attention_layers)
    think = ThinKCache(key_ratio=0.5, window=8)
    out = generate(model, ids, mask, think, steps=20)
    assert think.attention_layers
    assert all(layer.store.keys.shape[-1] < layer.head_dim for layer in think.attention_layers)
    _assert_same(out, generate(reference, ids, mask, zeroed_reference(think, model), steps=20), ATOL_REFERENCE)
    assert think.stats().ratio < 0.9


def test_key_ratio_zero_beam_search(family):
    model, reference = _models(family)
    ids, mask = make_batch([40, 27], seed=2)
    settings = dict(num_beams=3, num_return_sequences=3, output_scores=True)
    out = generate(model, ids, mask, ThinKCache(key_ratio=0), steps=20, **settings)
    ref = generate(reference, ids, mask, _dynamic(reference), steps=20, **settings)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=ATOL_EXACT, rtol=0)


# ------------------------------------------------------------------------------------------------ key_ratio>0
@pytest.mark.parametrize("key_ratio", [0.25, 0.5, 0.75])
def test_pruned_equals_zeroed_reference(family, key_ratio):
    """Channels thinned at the end of the prompt and while decoding (folds), sliding layers trimming: the model's
    own attention over full-size keys with the same channels zeroed gives the same tokens and logits."""
    model, reference = _models(family)
    ids, mask = make_batch([60, 37], seed=3)
    think = ThinKCache(key_ratio=key_ratio, window=8, recent=4)
    out = generate(model, ids, mask, think, steps=30)
    assert all(layer.is_compacted for layer in think.layers)
    assert all(layer.store.keys.shape[-1] < layer.head_dim for layer in think.layers)
    _assert_same(out, generate(reference, ids, mask, zeroed_reference(think, model), steps=30), ATOL_REFERENCE)


def test_values_pruned_too_equal_zeroed_reference():
    """Value channels as well (chosen from attention weights, which Gemma 2 caps)."""
    model, reference = _models("gemma2")
    ids, mask = make_batch([52, 30], seed=4)
    think = ThinKCache(key_ratio=0.5, value_ratio=0.5, window=8)
    out = generate(model, ids, mask, think, steps=20)
    assert all(layer.value_channels is not None for layer in think.layers)
    _assert_same(out, generate(reference, ids, mask, zeroed_reference(think, model), steps=20), ATOL_REFERENCE)


@pytest.mark.parametrize("key_ratio", [0, 0.5])
def test_gemma2_softcap_bites(key_ratio):
    """Guard against a reference the cap does not reach: with the cap switched off in the reference, its logits are
    far from ThinK's (which match the capped reference in the tests above)."""
    model, reference = _models("gemma2")
    ids, mask = make_batch([48], seed=5)
    think = ThinKCache(key_ratio=key_ratio, window=8)
    out = generate(model, ids, mask, think, steps=10)
    ref_cache = _dynamic(reference) if key_ratio == 0 else zeroed_reference(think, model)
    capped = generate(reference, ids, mask, ref_cache, steps=10)
    _assert_same(out, capped, ATOL_REFERENCE)
    ref_cache = _dynamic(reference) if key_ratio == 0 else zeroed_reference(think, model)
    uncapped = generate(_uncapped(reference), ids, mask, ref_cache, steps=10)
    assert _max_logit_gap(out, uncapped) > 0.1


def test_pruning_changes_the_output():
    """Guard against a trivially equal zeroed reference: at 0.75 the logits are far from the unpruned run's."""
    model, _ = _models("gemma3-head256-1kv")
    ids, mask = make_batch([48], seed=6)
    pruned = generate(model, ids, mask, ThinKCache(key_ratio=0.75, window=8), steps=10)
    full = generate(model, ids, mask, ThinKCache(key_ratio=0), steps=10)
    assert _max_logit_gap(pruned, full) > 1e-2


def _prompt_and_one_step(model, cache, ids):
    prefill(model, cache, ids)
    with torch.no_grad():
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    return cache


def test_half_the_key_channels_saves_memory(family):
    """A 700-token prompt at key_ratio 0.5 holds at most 0.80x of a DynamicCache built for the model, whose sliding
    layers keep only their window as ThinK's do. Measured after one decoding step: right after the prompt a
    transformers sliding layer's window is still a view of the whole prompt's keys (freed at its next update)."""
    model, _ = _models(family, hidden_size=64, intermediate_size=64)
    ids, _ = make_batch([700], seed=7)
    dense = _prompt_and_one_step(model, _dynamic(model), ids)
    think = _prompt_and_one_step(model, ThinKCache(key_ratio=0.5), ids)
    ratio = think_cache.held_bytes(think) / think_cache.held_bytes(dense)
    assert 0.70 <= ratio <= 0.80, ratio


def test_static_cache_caps_too():
    """A static ThinKCache (global layers only: it refuses sliding ones) on a Gemma 2 model with every layer global:
    the same tokens and logits as the dynamic one, which equals the capped eager reference."""
    model, reference = _models("gemma2", layer_types=["full_attention", "full_attention"])
    ids, mask = make_batch([40, 26], seed=11)
    think = ThinKCache(key_ratio=0.5, window=8)
    dynamic = generate(model, ids, mask, think, steps=12)
    _assert_same(dynamic, generate(reference, ids, mask, zeroed_reference(think, model), steps=12), ATOL_REFERENCE)
    _assert_same(
        generate(model, ids, mask, ThinKCache(key_ratio=0.5, window=8, max_cache_len=64), steps=12), dynamic, ATOL_EXACT
    )


# ------------------------------------------------------------------------------------------- attention sinks
def _sinkless(model):
    """``model`` with GPT-OSS's attention sinks pushed to -1e4 (no share of any softmax)."""
    for module in model.modules():
        if hasattr(module, "sinks"):
            module.sinks.data.fill_(-1e4)
    return model


@pytest.mark.parametrize("key_ratio", [0, 0.5])
def test_gpt_oss_sinks_bite(key_ratio):
    """Guard against a reference the sinks do not reach: without them the reference's logits are far from ThinK's
    (which match the model's own eager attention, with sinks, in the tests above)."""
    model, reference = _models("gpt_oss")
    ids, mask = make_batch([48, 30], seed=13)
    think = ThinKCache(key_ratio=key_ratio, window=8)
    out = generate(model, ids, mask, think, steps=10)
    ref_cache = _dynamic(reference) if key_ratio == 0 else zeroed_reference(think, model)
    _assert_same(out, generate(reference, ids, mask, ref_cache, steps=10), ATOL_REFERENCE)
    ref_cache = _dynamic(reference) if key_ratio == 0 else zeroed_reference(think, model)
    assert _max_logit_gap(out, generate(_sinkless(reference), ids, mask, ref_cache, steps=10)) > 0.1


@pytest.mark.parametrize("family", ["gpt_oss", "gemma2"])
def test_eager_prompt_in_row_chunks(family, monkeypatch):
    """A prompt that takes the eager formula (sinks, a cap) builds its logits a chunk of query rows at a time when
    no weights are asked for: the same tokens and logits as in one block."""
    from think_cache import attention

    model, _ = _models(family)
    ids, mask = make_batch([60, 37], seed=14)
    whole = generate(model, ids, mask, ThinKCache(key_ratio=0.5, window=8), steps=6)
    monkeypatch.setattr(attention, "ROW_CHUNK_ELEMENTS", 2 * 4 * 60 * 7)  # 7 rows a chunk (batch 2, 4 heads)
    calls = []
    real = attention.compact_probs
    monkeypatch.setattr(
        attention, "compact_probs", lambda query, *a, **k: calls.append(query.shape[2]) or real(query, *a, **k)
    )
    chunked = generate(model, ids, mask, ThinKCache(key_ratio=0.5, window=8), steps=6)
    assert max(calls) <= 7 and calls.count(7) >= 8  # the 60-token prompt went 7 rows at a time, per layer
    _assert_same(chunked, whole, ATOL_EXACT)


def test_a_static_cache_refuses_sinks():
    """Where its first layer is built (the sliding layers of a real GPT-OSS would be refused there too)."""
    model, _ = _models("gpt_oss", num_hidden_layers=2, layer_types=["full_attention"] * 2)
    ids, mask = make_batch([30], seed=15)
    with pytest.raises(ValueError, match="no attention sinks"):
        generate(model, ids, mask, ThinKCache(key_ratio=0.5, max_cache_len=64), steps=3)
    assert not kernels.use_kernel(FullStore(), torch.device("cpu"), sinks=torch.zeros(4))


@pytest.mark.parametrize("policy", [SnapKV(budget=8, window=4), H2O(budget=16, recent=4)])
def test_a_policy_on_chunked_layers_is_refused(policy):
    """Llama 4's chunked layers: a later query sees only its own chunk, which a policy's choice of tokens (made as
    for a sliding window) does not follow: it kept tokens of the previous chunk and evicted live ones."""
    model, _ = _models("llama4_text")
    ids, mask = make_batch([40], seed=16)
    with pytest.raises(ValueError, match=r"does not support chunked-attention layers yet \(Llama 4"):
        generate(model, ids, mask, ThinKCache(key_ratio=0.5, policy=policy), steps=2)


# ------------------------------------------------------------------------------------------- softcap plumbing
def test_kernel_dispatch_falls_back_under_softcap(monkeypatch):
    """The fused kernel has no softcap: even when asked for, a capped model takes the torch path."""
    monkeypatch.setenv(kernels.KERNEL_ENV, "triton")
    assert not kernels.use_kernel(FullStore(), torch.device("cpu"), softcap=5.0)
    if kernels.kernel_available("cpu"):  # uncapped, the same request does pick the (interpreted) kernel
        assert kernels.use_kernel(FullStore(), torch.device("cpu"))

    def no_kernel(*args, **kwargs):
        raise AssertionError("the fused kernel ran on a softcapped model")

    monkeypatch.setattr(kernels, "store_attention", no_kernel)
    model, reference = _models("gemma2")
    ids, mask = make_batch([40], seed=8)
    think = ThinKCache(key_ratio=0.5, window=8)
    out = generate(model, ids, mask, think, steps=6)
    _assert_same(out, generate(reference, ids, mask, zeroed_reference(think, model), steps=6), ATOL_REFERENCE)


def test_scores_see_the_cap():
    """Value-channel scores and token-scoring attention use capped logits, as the model's attention does."""
    g = torch.Generator().manual_seed(9)
    query, keys, values = (torch.randn(1, 2, n, 8, generator=g) * 3 for n in (4, 10, 10))
    real = torch.ones(1, 10, dtype=torch.bool)
    logits = cap_logits(query @ keys.transpose(-1, -2) * 0.5, 2.0)
    probs = torch.softmax(logits, dim=-1)
    expected = torch.linalg.vector_norm(probs @ values, dim=-2)
    torch.testing.assert_close(value_channel_scores(query, keys, values, 0.5, softcap=2.0), expected)
    assert not torch.allclose(value_channel_scores(query, keys, values, 0.5), expected)
    # the last 4 keys are the queries' own positions: causal
    causal = torch.ones(4, 10, dtype=torch.bool).tril(diagonal=6)
    weights = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).sum(dim=-2)
    torch.testing.assert_close(window_attention(query, keys, real, 0.5, softcap=2.0), weights)


@pytest.mark.parametrize("policy", [SnapKV(budget=24, window=6, kernel=3), H2O(budget=24, recent=6)])
def test_token_policies_score_with_the_cap(policy, monkeypatch):
    """SnapKV and H2O score tokens by attention: on Gemma 2 with the model's cap (a policy written without a softcap
    parameter is called without it: tests/test_policies.py, test_a_user_policy_by_subclassing)."""
    received = []
    original = type(policy).prompt_scores

    def spy(self, *args, **kwargs):
        received.append(kwargs.get("softcap"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(policy), "prompt_scores", spy)
    model, _ = _models("gemma2")
    ids, mask = make_batch([50, 33], seed=10)
    cache = ThinKCache(key_ratio=0.5, policy=policy, window=6)
    generate(model, ids, mask, cache, steps=40)  # H2O evicts while decoding, past a fold block
    assert received == [5.0] * len(cache.layers)
    assert all(layer.compact_positions is not None for layer in cache.layers)


@pytest.mark.parametrize(
    "arch, window", [("mistral", 16), ("mistral", 200), ("gemma3", None), ("phi3", None), ("cohere2", None)]
)
@pytest.mark.skipif(
    not hasattr(DynamicSlidingWindowLayer, "activate_past_recording"),
    reason="this transformers' own sliding layers cannot crop past the window (the draft's DynamicCache)",
)
def test_assisted_and_prompt_lookup_on_sliding_layers(arch, window):
    """Prompt lookup sends the prompt and its guesses in one forward, and assisted decoding crops the guesses
    back: a sliding layer compacted at the prompt's end inside a forward keeps what its window still shows (it used
    to drop as many of the oldest tokens as guesses followed, and to mask the tail rows over the dropped ones). Both
    give plain greedy's tokens, with a window the prompt passes and one it never reaches."""
    overrides = {} if window is None else dict(sliding_window=window)
    model, draft = make_model(arch, **overrides), make_model(arch, seed=7, **overrides)
    ids = torch.randint(3, 250, (1, 15), generator=torch.Generator().manual_seed(1)).repeat(1, 3)  # guessable

    def run(**how):
        return model.generate(
            input_ids=ids, past_key_values=ThinKCache(key_ratio=0.5), max_new_tokens=30, do_sample=False,
            eos_token_id=2, **how,  # transformers 4.56's prompt lookup needs an eos token
        )  # fmt: skip

    plain = run()
    # transformers 5.0's prompt lookup may run a token or two past max_new_tokens (with DynamicCache too)
    assert torch.equal(run(prompt_lookup_num_tokens=4)[:, : plain.shape[1]], plain)
    assert torch.equal(run(assistant_model=draft), plain)


# --------------------------------------------------------------------------------- models that see images
IMAGE, START, END = 250, 251, 252  # token ids of an image's soft tokens and of the markers around them
_TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
_QWEN_VIT = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)

#: Vision-language models: (model_type, text config, vision config, settings), each with a one-layer vision tower
#: and four soft tokens per 28x28 image. Gemma 3's soft tokens attend to each other both ways in the prompt; Qwen's
#: positions are 3-D (M-RoPE); Mistral 3's text model is Mistral's; Qwen3.5's text models are hybrids.
VISION = {
    "gemma3": (
        "gemma3",
        lambda: make_config("gemma3", initializer_range=0.2).to_dict(),
        dict(model_type="siglip_vision_model", image_size=28, patch_size=7, **_TINY_VIT),
        dict(mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=START, eoi_token_index=END),
    ),
    "mistral3": (
        "mistral3",
        lambda: dict(COMMON_CONFIG, model_type="mistral", initializer_range=0.2, sliding_window=None),
        dict(model_type="pixtral", image_size=28, patch_size=7, head_dim=16, **_TINY_VIT),
        dict(image_token_index=IMAGE, spatial_merge_size=2),
    ),
    "qwen2_5_vl": (
        "qwen2_5_vl",
        lambda: dict(COMMON_CONFIG, initializer_range=0.2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        _QWEN_VIT,
        dict(image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END),
    ),
    "qwen3_vl": (
        "qwen3_vl",
        lambda: dict(
            COMMON_CONFIG, initializer_range=0.2, head_dim=16,
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        ),
        dict(num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=14, **_QWEN_VIT),
        dict(image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END),
    ),
    "gemma4": (  # Gemma4ForConditionalGeneration: 4x4 patches of 4x4 pixels, pooled 2x2 into four soft tokens
        "gemma4",
        lambda: make_config("gemma4_text", initializer_range=0.2, use_bidirectional_attention="vision").to_dict(),
        dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=64,
        ),
        dict(image_token_id=IMAGE, boi_token_id=START, eoi_token_id=END, audio_config=None),
    ),
    **{
        name: (  # hybrids: linear-attention layers 0 and 2, attention 1 and 3
            name,
            lambda name=name: dict(
                make_config(f"{name}_text").to_dict(), initializer_range=0.2, head_dim=32,
                rope_parameters={
                    "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                    "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                },
            ),
            dict(num_position_embeddings=16, patch_size=14, **_QWEN_VIT),
            dict(image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END),
        )
        for name in ("qwen3_5", "qwen3_5_moe")
    },
}  # fmt: skip


@pytest.fixture(params=list(VISION))
def vision(request) -> str:
    return request.param


def _vision_model(family: str, patch: bool = True):
    """A tiny ``family`` model that sees images, patched unless ``patch=False`` (skips where this transformers
    lacks the family)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, text, vision, settings = VISION[family]
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type!r} models")
    config = AutoConfig.for_model(model_type, text_config=text(), vision_config=vision, **settings)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    hybrid = compat.state_layer_indices(model.config.get_text_config(decoder=True))
    if not (model._supports_attention_backend or hybrid and compat.LinearAttentionLayer is not None):
        pytest.skip(f"{family} does not use transformers' attention interface in this transformers version")
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return think_cache.patch(model) if patch else model


def _with_images(family: str, ids: torch.Tensor, at: list[int | None], seed: int) -> dict:
    """``ids`` with an image at column ``at[row]`` of each row (None: no image in that row), and the inputs that go
    with them, as the family's processor would make them."""
    ids = ids.masked_fill(ids >= IMAGE, 5)
    rows = [row for row, column in enumerate(at) if column is not None]
    soft = [IMAGE] * 4 if family == "mistral3" else [START, *[IMAGE] * 4, END]
    for row in rows:
        ids[row, at[row] : at[row] + len(soft)] = torch.tensor(soft)
    g = torch.Generator().manual_seed(seed)
    inputs = dict(input_ids=ids)
    if not rows:
        return inputs
    if family == "gemma4":  # 16 patches of 4x4 pixels at (x, y) positions; its image tokens see each other
        inputs["pixel_values"] = torch.rand(len(rows), 16, 3 * 4 * 4, generator=g)
        grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), dim=-1).reshape(16, 2)
        inputs["image_position_ids"] = grid.expand(len(rows), 16, 2).clone()
        inputs["mm_token_type_ids"] = (ids == IMAGE).long()
    elif family.startswith("qwen"):  # 4x4 patches of 2x14x14 pixels, merged 2x2 into four tokens
        inputs["pixel_values"] = torch.randn(16 * len(rows), 3 * 2 * 14 * 14, generator=g)
        inputs["image_grid_thw"] = torch.tensor([[1, 4, 4]] * len(rows))
    else:
        inputs["pixel_values"] = torch.randn(len(rows), 3, 28, 28, generator=g)
    if family == "gemma3":
        inputs["token_type_ids"] = (ids == IMAGE).long()
    if family == "mistral3":
        inputs["image_sizes"] = torch.tensor([[28, 28]] * len(rows))
    return inputs


def _generate_with(model, inputs: dict, mask, cache, steps: int):
    return model.generate(
        **inputs, attention_mask=mask, past_key_values=cache, max_new_tokens=steps, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip


def test_models_that_see_images(vision):
    """A left-padded batch with an image in each prompt: key_ratio=0 is the model's own attention; key_ratio=0.5
    equals the zeroed reference; the image changes the answer."""
    model, reference = _vision_model(vision), _vision_model(vision, patch=False)
    assert model.config.model_type in think_cache.SUPPORTED_MODEL_TYPES
    ids, mask = make_batch([50, 37], seed=3)
    inputs = _with_images(vision, ids, [20, 30], seed=1)
    out = _generate_with(model, inputs, mask, ThinKCache(key_ratio=0), 20)
    _assert_same(out, _generate_with(reference, inputs, mask, DynamicCache(config=reference.config), 20), ATOL_EXACT)
    think = ThinKCache(key_ratio=0.5, window=8, recent=4)
    out = _generate_with(model, inputs, mask, think, 20)
    assert think.attention_layers
    assert all(layer.store.keys.shape[-1] < layer.head_dim for layer in think.attention_layers)
    ref = _generate_with(reference, inputs, mask, zeroed_reference(think, model), 20)
    _assert_same(out, ref, ATOL_REFERENCE)
    text_only = _generate_with(model, dict(input_ids=inputs["input_ids"]), mask, ThinKCache(key_ratio=0.5), 20)
    assert _max_logit_gap(out, text_only) > 1e-2  # the image is seen


@pytest.mark.parametrize("image_turn", [0, 1], ids=["image-then-text", "text-then-image"])
def test_a_chat_with_an_image(vision, image_turn):
    """Two turns on one cache, an image in one of them (the second call gets the whole conversation, and pixels only
    for an image that is not in the cache yet): as the model's own attention at key_ratio=0, and as the zeroed
    reference at 0.5."""
    model, reference = _vision_model(vision), _vision_model(vision, patch=False)
    turns = [torch.randint(3, IMAGE, (1, n), generator=torch.Generator().manual_seed(4 + n)) for n in (40, 30)]

    def chat(m, cache):
        first = _with_images(vision, turns[0], [5 if image_turn == 0 else None], seed=2)
        one = _generate_with(m, first, torch.ones_like(turns[0]), cache, 10)
        ids = torch.cat([one.sequences, turns[1]], dim=1)
        if image_turn == 0:  # the first turn's image is in the cache: the second call brings no pixels
            second = dict(input_ids=ids)
        else:
            second = _with_images(vision, ids, [one.sequences.shape[1] + 5], seed=2)
        two = _generate_with(m, second, torch.ones_like(ids), cache, 10)
        two.logits = one.logits + two.logits
        return two

    try:
        expected = chat(reference, DynamicCache(config=reference.config))
    except IndexError as error:  # transformers 4.56's Gemma 3 cannot take an image in a later turn
        if vision != "gemma3" or image_turn != 1:
            raise
        pytest.skip(
            f"this transformers' own Gemma 3 cannot take an image in a later turn, with a DynamicCache too: {error}"
        )
    _assert_same(chat(model, ThinKCache(key_ratio=0)), expected, ATOL_EXACT)
    think = ThinKCache(key_ratio=0.5, window=8)
    out = chat(model, think)
    _assert_same(out, chat(reference, zeroed_reference(think, model)), ATOL_REFERENCE)


def test_a_model_outside_the_attention_interface_is_refused(monkeypatch):
    """A model whose attention does not go through transformers' attention functions (Qwen2-MoE before 4.57) would
    store a ThinKCache's pruned keys but attend as if nothing were pruned: refused at patch time."""
    model = make_model("qwen3_moe", patch=False)
    monkeypatch.setattr(type(model), "_supports_attention_backend", False)
    with pytest.raises(ValueError, match="does not go through transformers' attention interface"):
        think_cache.patch(model)


def test_other_families_still_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    # DeepSeek-V3's multi-head latent attention compresses its keys: not tested, refused
    config = AutoConfig.for_model("deepseek_v3", **{**COMMON_CONFIG, "n_routed_experts": 4, "num_experts_per_tok": 2})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="does not support model type 'deepseek_v3'; supported: .*gemma2, gemma3_text"):
        think_cache.patch(model)


def test_gemma4_shared_layers_attend_over_the_compacted_layer():
    """The layers that reuse keys (E2B/E4B) attend with their own queries over the ThinK layer that stores them,
    compacted once, which they leave as is: no ThinK layer of their own, and the shared layer thinned once."""
    model, reference = _models("gemma4_text-shared")
    ids, mask = make_batch([50, 33], seed=4)
    think = ThinKCache(key_ratio=0.5, window=8)
    out = generate(model, ids, mask, think, 20)
    assert len(think.layers) == 2  # layers 2 and 3 store nothing
    assert all(layer.is_compacted for layer in think.layers)
    assert think.layers[0].is_sliding and think.layers[1].stored_tokens == 50 + 20 - 1
    _assert_same(out, generate(reference, ids, mask, zeroed_reference(think, model), 20), ATOL_REFERENCE)
    unshared = ThinKCache(key_ratio=0.5, window=8)  # the same model, had its last layers keys of their own
    plain = make_model("gemma4_text", **{**FAMILIES["gemma4_text-shared"][1], "num_kv_shared_layers": 0})
    generate(plain, ids, mask, unshared, 20)
    assert think.stats().stored_bytes < 0.6 * unshared.stats().stored_bytes


def test_gemma4_shared_layers_over_chunked_chat_turns():
    """Three turns, each fed in chunks of 16: the zeroed reference's tokens and logits (SnapKV's masked reference:
    `test_policies.test_snapkv_on_layers_that_reuse_keys`)."""
    model, reference = _models("gemma4_text-shared")
    ids, _ = make_batch([40], seed=6)
    turns = [torch.randint(3, 200, (1, 20 + 10 * t), generator=torch.Generator().manual_seed(t)) for t in (1, 2)]

    think = ThinKCache(key_ratio=0.5, window=8)
    ours = chat(model, think, ids, turns, 6, prefill_chunk_size=16)
    theirs = chat(reference, zeroed_reference(think, model), ids, turns, 6)  # one prefill a turn
    for a, b in zip(ours, theirs, strict=True):
        _assert_same(a, b, ATOL_REFERENCE)


@pytest.mark.parametrize(
    "settings", [dict(policy=H2O(budget=24, recent=8)), dict(max_cache_len=128)], ids=["h2o", "static"]
)
def test_gemma4_shared_layers_refuse_what_would_change_shared_keys(settings):
    model, _ = _models("gemma4_text-shared")
    with pytest.raises(ValueError, match="reuse an earlier layer's keys and values"):
        generate(model, *make_batch([30], seed=1), ThinKCache(key_ratio=0.5, window=8, **settings), 4)
    with pytest.raises(ValueError, match="for layers that reuse an earlier layer's keys"):
        generate(model, *make_batch([30], seed=1), ThinKCache(key_ratio=0.5), 4, prompt_lookup_num_tokens=3)


def test_gemma4_copied_cache_keeps_serving():
    """A heterogeneous config (head sizes per layer) reads no global head_dim: a copied cache, which recognises its
    model by the config's values, still does (and refuses a Gemma 4 of other head sizes)."""
    import copy

    model = make_model("gemma4_text")
    ids, mask = make_batch([40], seed=3)
    cache = ThinKCache(key_ratio=0.5, window=8)
    first = generate(model, ids, mask, cache, 4)
    sequence = torch.cat([first.sequences, torch.randint(3, 200, (1, 6))], dim=-1)
    copied = copy.deepcopy(cache)
    _assert_same(
        generate(model, sequence, torch.ones_like(sequence), copied, 4),
        generate(model, sequence, torch.ones_like(sequence), cache, 4),
        atol=0,
    )
    other = make_model("gemma4_text", global_head_dim=128)
    with pytest.raises(ValueError, match="filled by another model"):
        generate(other, sequence, torch.ones_like(sequence), copy.deepcopy(copied), 2)


def test_gemma4_channel_map_spans_both_head_sizes():
    """Sliding layers of 32 channels and 2 KV heads, a global one of 64 and 1 (attention_k_eq_v): one map, as wide
    as the widest layer, the narrower rows ending in NaN; the plot marks each layer where its rows start."""
    from think_cache.plotting import channel_map

    model = make_model("gemma4_text", attention_k_eq_v=True, num_global_key_value_heads=1)
    pytest.importorskip("matplotlib").use("Agg")  # an extra (think-cache[plot]); the compat venvs lack it
    cache = ThinKCache(key_ratio=0.5, window=8)
    generate(model, *make_batch([30], seed=1), cache, 4)
    kept = channel_map(cache)
    assert kept.shape == (2 + 2 + 1, 64)
    assert torch.isnan(kept[:4, 32:]).all() and not torch.isnan(kept[:4, :32]).any() and not torch.isnan(kept[4]).any()
    assert kept[:4, :32].sum() == 4 * 16 and kept[4].sum() == 32  # half of each layer's channels
    axis = cache.plot_channels().axes[0]
    assert list(axis.get_yticks()) == [0, 2, 4]
    assert [label.get_text() for label in axis.get_yticklabels()] == ["0", "1", "2"]


def test_every_supported_type_is_tested_and_documented():
    """Each of SUPPORTED_MODEL_TYPES is built by a test here or by the core tests (Llama, Mistral, Qwen2, Qwen3),
    and named in the README's table, whose count up front is right."""
    from pathlib import Path

    if compat.LinearAttentionLayer is None:
        pytest.skip("the newest families need transformers 5")
    tested = {"llama", "mistral", "qwen2", "qwen3", *VISION}
    for arch, settings in [*FAMILIES.values(), *MORE_FAMILIES.values()]:
        tested.add(make_config(arch, **settings).model_type)
    assert set(think_cache.SUPPORTED_MODEL_TYPES) <= tested
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert all(f"`{model_type}`" in readme for model_type in think_cache.SUPPORTED_MODEL_TYPES)
    assert f"It serves {len(think_cache.SUPPORTED_MODEL_TYPES)} model types" in readme


def test_gemma4_reusing_layers_with_their_queries_cut():
    """Gemma 4 cuts its reusing layers' queries to the last ``logits_to_keep`` rows: without a padding mask they
    still attend as the forward's last rows (key_ratio 0 = the model's own attention), and a later turn fed by
    plain forwards sees the earlier question whole whatever ``logits_to_keep`` is (a review found both wrong)."""
    model, reference = _models("gemma4_text-shared")
    ids, _ = make_batch([40], seed=2)
    with torch.no_grad():
        for keep in (4, 1):
            ours = model(input_ids=ids, past_key_values=ThinKCache(key_ratio=0), logits_to_keep=keep).logits
            theirs = reference(input_ids=ids, past_key_values=_dynamic(reference), logits_to_keep=keep).logits
            torch.testing.assert_close(ours, theirs, atol=ATOL_EXACT, rtol=0)
        last = []
        turn = torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(1))
        for keep in (1, 0):
            cache = ThinKCache(key_ratio=0.5, window=8)
            model(input_ids=ids, past_key_values=cache)
            token = ids[:, -1:]
            for _ in range(4):  # decoding compacts the layers
                token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
            last.append(model(input_ids=turn, past_key_values=cache, logits_to_keep=keep).logits[:, -1])
    torch.testing.assert_close(last[0], last[1], atol=ATOL_EXACT, rtol=0)


def test_gemma3n_shared_layers_refuse_what_would_change_shared_keys():
    model, _ = _models("gemma3n_text")
    with pytest.raises(ValueError, match="reuse an earlier layer's keys and values"):
        cache = ThinKCache(key_ratio=0.5, window=8, policy=H2O(budget=24, recent=8))
        generate(model, *make_batch([30], seed=1), cache, 4)


@pytest.mark.parametrize("family", ["gemma4_text-shared", "gemma3n_text"])
def test_layers_that_reuse_keys_take_an_assistant_when_nothing_is_pruned(family):
    """An assistant or prompt lookup ends the prompt inside a forward, which is refused where layers reuse keys and
    the cache compacts; at key_ratio 0 it never compacts, and gives DynamicCache's tokens."""
    if not hasattr(DynamicSlidingWindowLayer, "activate_past_recording"):
        pytest.skip("this transformers' DynamicCache cannot crop a sliding layer past its window (the reference)")
    model, reference = _models(family)
    ids = torch.randint(3, 200, (12,), generator=torch.Generator().manual_seed(0)).repeat(4)[None]
    mask = torch.ones_like(ids)
    for drafts in (dict(prompt_lookup_num_tokens=4), dict(assistant_model=make_model("llama", seed=1, patch=False))):
        drafts["eos_token_id"] = 2  # transformers 4.56's prompt lookup needs an eos token
        ours = generate(model, ids, mask, ThinKCache(key_ratio=0), 10, **drafts)
        theirs = generate(reference, ids, mask, _dynamic(reference), 10, **drafts)
        assert torch.equal(ours.sequences, theirs.sequences)


@pytest.mark.parametrize(
    "family, settings, match",
    [
        ("gemma3-gqa", dict(max_cache_len=256), "does not support sliding-window layers"),
        ("gpt_oss", dict(max_cache_len=256), "has no attention sinks"),
        ("llama4_text", dict(policy=SnapKV(budget=64)), "does not support chunked-attention layers"),
        ("gemma4_text-shared", dict(policy=H2O(budget=64)), "reuse an earlier layer's keys"),
    ],
)
def test_the_one_liner_refuses_settings_the_model_cannot_serve(family, settings, match):
    """``patch(model, **settings)`` checks them against the model's layers where they enter (found in review: they
    were accepted and refused at the first generate), and leaves the model unpatched."""
    arch, overrides = FAMILIES[family]
    model = make_model(arch, patch=False, **overrides)
    with pytest.raises(ValueError, match=f"think_cache.patch: .*{match}"):
        think_cache.patch(model, key_ratio=0.5, **settings)
    assert not think_cache.is_patched(model)


def test_a_static_cache_names_chunked_layers_as_such():
    model = make_model("llama4_text", initializer_range=0.2)
    with pytest.raises(ValueError, match="chunked-attention layers yet .* sees chunks of 16"):
        generate(model, *make_batch([30], seed=1), ThinKCache(key_ratio=0.5, max_cache_len=64), 4)


def test_gemma4_is_refused_where_configs_are_not_per_layer(monkeypatch):
    """transformers 5.12's Gemma 4 config keeps one head_dim for layers of two sizes: refused, not served wrongly."""
    model = make_model("gemma4_text", patch=False)
    monkeypatch.setattr(compat, "PER_LAYER_CONFIGS", False)
    with pytest.raises(ValueError, match=r"serves 'gemma4_text' on a transformers whose configs give each layer"):
        think_cache.patch(model)
