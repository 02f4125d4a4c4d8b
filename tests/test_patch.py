"""patch / unpatch and the one-liner."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model, prefill
from transformers import DynamicCache

import think_cache
from think_cache import ThinKCache
from think_cache import _compat as compat


def test_patch_is_idempotent_and_unpatch_restores():
    model = make_model("llama", patch=False)
    original = model.config._attn_implementation
    hooks_before = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert think_cache.patch(model) is model
    think_cache.patch(model)
    assert model.config._attn_implementation == think_cache.ATTENTION_NAME
    n_attn = sum(1 for m in model.modules() if hasattr(m, "k_proj"))
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks_before + n_attn
    assert think_cache.unpatch(model) is model
    assert model.config._attn_implementation == original
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert not think_cache.is_patched(model)
    assert think_cache.unpatch(model) is model  # a no-op the second time


def test_unpatched_outputs_are_unchanged():
    model = make_model("qwen2", patch=False)
    ids, mask = make_batch([25, 14])
    before = model(input_ids=ids, attention_mask=mask).logits
    think_cache.patch(model, key_ratio=0.5)
    think_cache.unpatch(model)
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert "generate" not in vars(model)


def test_other_caches_still_work_on_a_patched_model():
    patched, plain = make_model("llama"), make_model("llama", patch=False)
    ids, mask = make_batch([30, 12])
    a = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    b = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_one_liner_defaults():
    model = make_model("llama", patch=False)
    think_cache.patch(model, key_ratio=0.5, window=8)
    ids, _ = make_batch([40])
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, ThinKCache)
    assert cache.key_ratio == 0.5 and cache.window == 8
    assert cache.stats().ratio < 1
    # an explicit cache still wins, and use_cache=False still means no cache
    mine = DynamicCache()
    model.generate(input_ids=ids, max_new_tokens=2, past_key_values=mine)
    assert mine.get_seq_length() == 41
    model.generate(input_ids=ids, max_new_tokens=2, use_cache=False)
    # patching again replaces the defaults
    think_cache.patch(model, key_ratio=0.25)
    out = model.generate(input_ids=ids, max_new_tokens=2, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert cache.key_ratio == 0.25


@pytest.mark.parametrize("spelling", ["cache", "past_key_values"])
def test_both_cache_spellings_in_generate(spelling):
    if spelling not in compat.CACHE_ARGUMENTS:
        pytest.skip(f"transformers {compat.TRANSFORMERS_VERSION} has no `{spelling}=` argument")
    model = make_model("llama")
    ids, _ = make_batch([40])
    cache = ThinKCache(key_ratio=0.5, window=8)
    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, **{spelling: cache})
    assert cache.get_seq_length() == 45
    assert all(layer.is_compacted for layer in cache.layers)
    assert out.shape == (1, 46)


def test_channels_match_an_independent_computation():
    """The chosen channels are the top ||Q_win[:,c]||*||K[:,c]|| computed from queries captured by hooks."""
    model = make_model("llama")
    attn = model.model.layers[1].self_attn
    captured = {}
    # capture q and k after RoPE by wrapping the registered attention
    from transformers import AttentionInterface

    original = AttentionInterface._global_mapping[think_cache.ATTENTION_NAME]

    def spy(module, query, key, value, mask, **kw):
        if module is attn and "q" not in captured:
            captured["q"], captured["k"] = query.clone(), key.clone()
        return original(module, query, key, value, mask, **kw)

    AttentionInterface.register(think_cache.ATTENTION_NAME, spy)
    try:
        ids, mask = make_batch([50, 35], seed=3)
        cache = ThinKCache(key_ratio=0.5, window=8)
        prefill(model, cache, ids, mask)
    finally:
        AttentionInterface.register(think_cache.ATTENTION_NAME, original)
    q, k = captured["q"], captured["k"]  # (B, 4, 50, 16), (B, 2, 50, 16)
    for row in range(2):
        real = mask[row].bool()
        for h in range(2):
            qw = q[row, 2 * h : 2 * h + 2, -8:].reshape(-1, 16)
            kh = k[row, h][real]
            score = qw.norm(dim=0) * kh.norm(dim=0)
            expected = score.topk(8).indices.sort().values
            assert torch.equal(cache.layers[1].key_channels[row, h].long(), expected)


def test_padding_values_do_not_change_channels():
    model = make_model("mistral")
    ids, mask = make_batch([60, 30], seed=4)
    ids2 = ids.clone()
    ids2[1, :30] = torch.randint(3, 200, (30,))  # different tokens under the padding
    chosen = []
    for x in (ids, ids2):
        cache = ThinKCache(key_ratio=0.5, window=8)
        prefill(model, cache, x, mask)
        chosen.append(torch.stack([layer.key_channels for layer in cache.layers]))
    assert torch.equal(chosen[0], chosen[1])


def test_a_deepcopy_of_a_patched_model_generates_with_its_own_weights_and_settings():
    """``generate`` is bound to the model as a method: a copy's is the copy's (it was a closure over the original,
    which then answered for the copy)."""
    import copy

    model = make_model("llama")
    think_cache.patch(model, key_ratio=0.5)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(-1.0)
    think_cache.patch(clone, key_ratio=0.25)
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(1))
    seen = []
    original_init = think_cache.ThinKCache.__init__

    def record(self, *args, **kwargs):
        seen.append(kwargs.get("key_ratio", args[0] if args else None))
        original_init(self, *args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as m:
        m.setattr(think_cache.ThinKCache, "__init__", record)
        out = clone.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert seen == [0.25]  # the clone's settings
    with torch.no_grad():  # the clone's weights: its own forward's greedy token
        first = clone(input_ids=ids, past_key_values=think_cache.ThinKCache(key_ratio=0.25)).logits[:, -1].argmax(-1)
    assert out[0, 40] == first[0]
    assert model.generate.__self__ is model and clone.generate.__self__ is clone


def test_a_base_model_is_patched_without_a_generate():
    """A base model (``LlamaModel``: no LM head, no ``generate``) takes a ThinKCache in its forwards."""
    model = make_model("llama", patch=False).model
    think_cache.patch(model)
    assert think_cache.is_patched(model) and "generate" not in vars(model)
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = think_cache.ThinKCache(key_ratio=0.5)
    cache.mark_prompt_end(40)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert all(layer.is_compacted for layer in cache.layers)
    think_cache.unpatch(model)
    assert not think_cache.is_patched(model)


def test_a_draft_model_patched_with_settings_keeps_transformers_cache():
    """Assisted decoding crops the draft's cache back into tokens just compacted every round: the one-liner leaves
    a draft's calls (``generation_config.is_assistant``) to transformers' cache, and the answer is plain greedy's."""
    model, draft = make_model("llama"), make_model("llama", seed=5)
    think_cache.patch(model, key_ratio=0.5)
    think_cache.patch(draft, key_ratio=0.5)
    ids = torch.randint(3, 250, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False)
        assisted = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False, assistant_model=draft)
        alone = draft.generate(input_ids=ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(assisted, plain)
    assert isinstance(alone.past_key_values, ThinKCache)  # the draft's own calls still get the one-liner's cache


def test_a_pickled_patched_model_keeps_its_generate(tmp_path):
    """Pickled (``torch.save`` too) and loaded, a patched model's ``generate`` is still the patched one, with its
    settings (a bound method came back as the class's plain ``generate``)."""
    import pickle

    model = make_model("llama")
    think_cache.patch(model, key_ratio=0.5)
    torch.save(model, tmp_path / "model.pt")
    for loaded in (pickle.loads(pickle.dumps(model)), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert loaded.generate.__self__ is loaded and think_cache.is_patched(loaded)
        ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = loaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert isinstance(out.past_key_values, ThinKCache) and out.past_key_values.key_ratio == 0.5
