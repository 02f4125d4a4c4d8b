"""Bad input fails where it enters, with a message that says what to do."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from conftest import make_batch, make_model
from transformers import GPT2Config, GPT2LMHeadModel

import think_cache
from think_cache import Policy, ThinKCache
from think_cache import _compat as compat


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_key_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match=r"key_ratio must be in \[0, 1\)"):
        ThinKCache(key_ratio=ratio)


@pytest.mark.parametrize("ratio", [-0.5, 1.0])
def test_value_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match=r"value_ratio must be in \[0, 1\)"):
        ThinKCache(value_ratio=ratio)


@pytest.mark.parametrize("ratio", ["0.5", None, True, torch.tensor(0.5)])
def test_ratio_wrong_type(ratio):
    with pytest.raises(TypeError, match="key_ratio must be a float in"):
        ThinKCache(key_ratio=ratio)


def test_window_and_recent():
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        ThinKCache(window=0)
    with pytest.raises(TypeError, match="window must be an int >= 1, got float 8.0"):
        ThinKCache(window=8.0)
    with pytest.raises(ValueError, match="recent must be an int >= 0, got -1"):
        ThinKCache(recent=-1)
    assert ThinKCache(window=16).recent == 0  # recent does not follow the window
    assert ThinKCache(recent=0).recent == 0


def test_key_ratio_is_keyword_or_first_positional():
    assert ThinKCache(0.4).key_ratio == 0.4
    with pytest.raises(TypeError):
        ThinKCache(0.4, 0.2)  # value_ratio is keyword-only


def test_unpatched_model_names_patch():
    model = make_model("llama", patch=False)
    ids, _ = make_batch([20])
    with pytest.raises(RuntimeError, match=r"call `think_cache.patch\(model\)`"):
        model.generate(input_ids=ids, past_key_values=ThinKCache(), max_new_tokens=2)


def test_attention_switched_after_patch():
    model = make_model("llama")
    model.set_attn_implementation("eager")
    ids, _ = make_batch([20])
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        model.generate(input_ids=ids, past_key_values=ThinKCache(), max_new_tokens=2)


def test_unsupported_model_type():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    supported = ", ".join(think_cache.SUPPORTED_MODEL_TYPES)
    with pytest.raises(ValueError, match=f"does not support model type 'gpt2'; supported: {supported}$"):
        think_cache.patch(model)


def test_not_a_model():
    with pytest.raises(TypeError, match="expects a transformers model"):
        think_cache.patch(torch.nn.Linear(2, 2))


def test_encoder_decoder_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64, d_kv=16))
    with pytest.raises(ValueError, match="does not support encoder-decoder models"):
        think_cache.patch(model)


def test_patch_defaults_are_validated():
    model = make_model("llama", patch=False)
    with pytest.raises(ValueError, match=r"key_ratio must be in \[0, 1\)"):
        think_cache.patch(model, key_ratio=2)
    with pytest.raises(TypeError, match="invalid ThinKCache setting"):
        think_cache.patch(model, key_ratoi=0.5)
    assert not think_cache.is_patched(model)


def test_cache_reused_with_another_batch_or_model():
    model = make_model("llama")
    cache = ThinKCache()
    ids, _ = make_batch([20, 20])
    model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="holds a batch of 2 but the model was called with a batch of 1"):
        model(input_ids=ids[:1, :5], past_key_values=cache)
    other = make_model("llama", seed=1)
    with pytest.raises(ValueError, match="filled by another model"):
        other(input_ids=ids, past_key_values=cache)
    cache.reset()
    other(input_ids=ids, past_key_values=cache)  # fine after reset


def test_a_bidirectional_model_is_refused():
    """Gemma 3 as an embedding model attends both ways: ThinK's prompt scoring and H2O's one-pass attention assume
    a causal decoder, so patch refuses it up front."""
    model = make_model("gemma3", patch=False)
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False  # what use_bidirectional_attention=True sets
    with pytest.raises(ValueError, match="bidirectionally"):
        think_cache.patch(model)


def test_numpy_ints_are_ints():
    """Settings read from a numpy array or a sweep's grid: numpy's ints are taken as ints, not refused."""
    import numpy as np

    cache = ThinKCache(key_ratio=0.5, window=np.int64(16), recent=np.int32(0), bits=np.int64(4), group_size=np.int8(16))
    assert (cache.window, cache.bits, cache.group_size) == (16, 4, 16) and type(cache.window) is int
    with pytest.raises(TypeError, match="window must be an int"):
        ThinKCache(window=np.float64(16))


def test_mark_prompt_end_shorter_than_the_cache_is_refused():
    """The prompt's length counts the cached tokens too: a length below them (the new tokens alone, say) would
    compact at the wrong token, so it is refused with what to pass."""
    model = make_model("llama")
    ids, _ = make_batch([40])
    cache = ThinKCache(key_ratio=0.5)
    cache.mark_prompt_end(40)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"prompt's length \(10\) is less than the 40 tokens already in the cache"):
        cache.mark_prompt_end(10)
    cache.mark_prompt_end(50)  # cached + new: accepted
    cache.reset()
    cache.mark_prompt_end(10)  # a fresh start


def test_a_filled_cache_is_checked_before_generate_runs():
    """generate refuses a filled cache's misuse before any forward, naming the real mistake: another model's cache
    (not a prompt 'shorter than the cache'), inputs shorter than what the cache holds, a second prompt on a static
    cache, a policy passed as the cache."""
    model, other = make_model("llama"), make_model("llama", seed=1)
    ids, _ = make_batch([30])
    cache = ThinKCache(key_ratio=0.5)
    model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=3)
    for prompt in (ids[:, :12], ids):
        with pytest.raises(ValueError, match="filled by another model"):
            other.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache)
    with pytest.raises(ValueError, match="generate was given 12 tokens .* but the cache already holds 32"):
        model.generate(input_ids=ids[:, :12], attention_mask=torch.ones_like(ids[:, :12]), past_key_values=cache)
    held = torch.cat([ids, torch.ones(1, 2, dtype=ids.dtype)], dim=1)  # exactly the 32 cached: transformers would
    with pytest.raises(ValueError, match="holds 32: nothing new to feed"):  # feed all 32 again after them
        model.generate(input_ids=held, past_key_values=cache, max_new_tokens=2)
    static = ThinKCache(key_ratio=0.5, max_cache_len=80)
    out = model.generate(input_ids=ids, past_key_values=static, max_new_tokens=3)
    out = model.generate(input_ids=out, past_key_values=static, max_new_tokens=2)  # continuing: one new token
    longer = torch.cat([out, ids[:, :10]], dim=1)  # 35 + 10 tokens after 34 cached
    with pytest.raises(NotImplementedError, match="got a forward of 11 tokens"):
        model.generate(input_ids=longer, past_key_values=static, max_new_tokens=2)
    assert static.get_seq_length() == 34  # refused before any forward: the cache is intact
    prefix = ThinKCache(key_ratio=0.5, max_cache_len=80)  # a static cache's prompt begun by hand: still a prompt
    with torch.no_grad():
        model(input_ids=ids[:, :14], past_key_values=prefix, use_cache=True)
    whole = model.generate(input_ids=ids, past_key_values=prefix, max_new_tokens=3)
    assert torch.equal(whole, out[:, :33])
    with pytest.raises(TypeError, match=r"SnapKV is a token policy, not a cache: pass \w+=ThinKCache\("):
        model.generate(input_ids=ids, past_key_values=think_cache.SnapKV(budget=64), max_new_tokens=2)


def test_a_cache_class_passed_for_a_cache_is_named():
    model = make_model("llama")
    ids, _ = make_batch([12])
    with pytest.raises(TypeError, match=r"\w+=ThinKCache is a class: pass a cache, \w+=ThinKCache\(\.\.\.\)"):
        model.generate(input_ids=ids, **{compat.CACHE_ARGUMENT: ThinKCache}, max_new_tokens=2)


@pytest.mark.skipif(compat.CACHE_ARGUMENT == "past_key_values", reason="transformers < 5.24: no other name")
def test_the_deprecated_cache_argument_is_passed_on_and_blamed_on_the_callers_line():
    model = make_model("llama")
    ids, mask = make_batch([12])
    cache = ThinKCache(key_ratio=0.5)
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated") as record:
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2)
    assert cache.get_seq_length() == 13  # the cache was used
    assert {w.filename for w in record if issubclass(w.category, FutureWarning)} == {__file__}
    # both names: as transformers does, `cache` is used (here None: a cache of its own) and the other ignored
    ignored, used = ThinKCache(key_ratio=0.5), ThinKCache(key_ratio=0.5)
    with pytest.warns(Warning):
        model.generate(input_ids=ids, attention_mask=mask, cache=used, past_key_values=ignored, max_new_tokens=2)
    assert used.get_seq_length() == 13 and ignored.get_seq_length() == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "5"], "--tokens must be at least 100"),
        (["--key-ratio", "1.5"], r"--key-ratio must be in \[0, 1\)"),
    ],
)
def test_demo_refuses_bad_options_before_loading_the_model(argv, message, capsys, monkeypatch):
    from think_cache import demo

    monkeypatch.setattr(demo, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert re.search(message, capsys.readouterr().err)


@dataclass
class _KeepNewest(Policy):
    """The policies module's example of a policy of one's own."""

    budget: object = 16

    def prompt_scores(self, query, keys, real_keys, scaling):
        return torch.arange(keys.shape[-2], dtype=torch.float32).expand(*keys.shape[:2], -1)


@dataclass
class _FlatScores(_KeepNewest):
    """A mistake: one score per token for the whole batch row, not per KV head."""

    def prompt_scores(self, query, keys, real_keys, scaling):
        return torch.arange(keys.shape[-2], dtype=torch.float32).expand(keys.shape[0], -1)


@pytest.mark.parametrize(
    "budget, error, message",
    [(16.0, TypeError, "_KeepNewest: budget must be an int >= 1, got float"), ("16", TypeError, "got str"),
     (-3, ValueError, "_KeepNewest: budget must be an int >= 1, got -3")],
)  # fmt: skip
def test_a_policy_of_ones_own_is_checked_where_it_enters(budget, error, message):
    with pytest.raises(error, match=message):
        ThinKCache(key_ratio=0.5, policy=_KeepNewest(budget=budget))
    ThinKCache(key_ratio=0.5, policy=_KeepNewest(budget=None))  # no limit


def test_a_policy_whose_scores_miss_the_heads_is_named():
    """(batch, tokens) scores broadcast over the heads when the batch equals the KV heads: named, not used."""
    model = make_model("llama")  # 2 KV heads
    ids, _ = make_batch([40, 40])
    out = model.generate(input_ids=ids, past_key_values=ThinKCache(0.5, policy=_KeepNewest()), max_new_tokens=2)
    assert out.shape == (2, 42)
    with pytest.raises(ValueError, match=r"_FlatScores.prompt_scores returned shape \(2, 40\); .* = \(2, 2, 40\)"):
        model.generate(input_ids=ids, past_key_values=ThinKCache(0.5, policy=_FlatScores()), max_new_tokens=2)


def test_a_cache_filled_in_one_dtype_is_refused_in_another():
    """A model converted after its cache was filled: named where it enters, not a dtype error inside attention."""
    model = make_model("llama")
    ids, _ = make_batch([40])
    for settings in (dict(), dict(max_cache_len=64)):
        cache = ThinKCache(key_ratio=0.5, **settings)
        model.float()
        out = model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=3)
        model.to(torch.bfloat16)
        with pytest.raises(ValueError, match="holds torch.float32 keys but the model now computes torch.bfloat16"):
            model.generate(input_ids=out, past_key_values=cache, max_new_tokens=2)
    model.float()


def test_two_models_of_one_config_object_are_told_apart():
    """Models built from one config object share it: the cache knows its model by its first attention module too
    (found by a helper's audit: a cache filled by one was used by the other, at every key ratio)."""
    from transformers import LlamaForCausalLM

    config = make_model("llama").config
    first, second = (think_cache.patch(LlamaForCausalLM(config).eval()) for _ in range(2))
    ids, _ = make_batch([20])
    cache = ThinKCache(key_ratio=0)
    with torch.no_grad():
        first(input_ids=ids, past_key_values=cache)
        with pytest.raises(ValueError, match="filled by another model"):
            second(input_ids=ids[:, -1:], past_key_values=cache)
        assert cache.get_seq_length() == 20  # refused before anything was stored


def test_an_interrupted_forward_leaves_no_module_behind():
    """Ctrl-C inside a patched attention skips torch's exit hooks (they run for Exception only): the module it left
    in the thread's state is not taken for the caller of an unpatched copy (found by a helper's audit)."""
    import copy

    model = make_model("llama", patch=False)
    unpatched = copy.deepcopy(model)
    think_cache.patch(model)

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    handle = model.model.layers[0].self_attn.o_proj.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(input_ids=make_batch([12])[0], past_key_values=ThinKCache())
    handle.remove()
    with pytest.raises(RuntimeError, match="has not been patched"), torch.no_grad():
        unpatched(input_ids=make_batch([12])[0], past_key_values=ThinKCache())
    think_cache.unpatch(model)
