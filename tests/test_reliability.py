"""Reliability: dtypes, devices (accelerate device_map), threads, long decodes, and paths that must fail loudly."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import continue_after, generate, make_batch, make_model
from test_policies import run_with_reference
from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList

import think_cache
from think_cache import H2O, SnapKV, StreamingLLM, ThinKCache

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


# ------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_key_ratio_zero_is_exact_in_every_dtype(arch, dtype):
    model = make_model(arch).to(dtype)
    ids, mask = make_batch([33, 18], seed=31)
    a = generate(model, ids, mask, ThinKCache(key_ratio=0))
    b = generate(model, ids, mask, DynamicCache())
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_channels_are_deterministic_and_scored_in_float32(dtype):
    model = make_model("qwen3").to(dtype)
    ids, mask = make_batch([60, 41], seed=32)
    chosen = []
    for _ in range(3):
        cache = ThinKCache(key_ratio=0.5, value_ratio=0.5)
        out = generate(model, ids, mask, cache, steps=6)
        chosen.append(
            torch.stack([torch.cat([layer.key_channels, layer.value_channels], -1) for layer in cache.layers])
        )
        assert all(torch.isfinite(logits.float()).all() for logits in out.logits)
        assert cache.layers[0].store.keys.dtype == dtype
    assert torch.equal(chosen[0], chosen[1]) and torch.equal(chosen[1], chosen[2])


def test_bfloat16_compact_attention_tracks_float32():
    """The same pruned cache in bf16 and fp32 gives close logits: softmax runs in float32."""
    model = make_model("llama")
    ids, mask = make_batch([50], seed=33)
    fp32 = generate(model, ids, mask, ThinKCache(key_ratio=0.5, window=8), steps=4)
    bf16 = generate(model.to(torch.bfloat16), ids, mask, ThinKCache(key_ratio=0.5, window=8), steps=4)
    assert torch.equal(fp32.sequences, bf16.sequences)
    torch.testing.assert_close(bf16.logits[-1].float(), fp32.logits[-1], atol=0.05, rtol=0)


# ----------------------------------------------------------------------------------------------- devices
def test_accelerate_device_map_with_disk_offload(tmp_path):
    """A model spread by accelerate (a layer offloaded to disk, moved in by hooks) works; the cache lives on the
    device of each layer's keys."""
    pytest.importorskip("accelerate")
    base = make_model("llama", patch=False)
    base.save_pretrained(tmp_path / "model")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload", dtype=torch.float32
    )
    assert getattr(model.model.layers[1], "_hf_hook", None) is not None  # accelerate really moves that layer
    model.generation_config.eos_token_id = None
    think_cache.patch(model)
    think_cache.patch(base)
    ids, mask = make_batch([40], seed=34)
    a = generate(model, ids, mask, ThinKCache(key_ratio=0.5, window=8), steps=8)
    cache = ThinKCache(key_ratio=0.5, window=8)
    b = generate(base, ids, mask, cache, steps=8)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logits[-1], b.logits[-1], atol=1e-5, rtol=0)
    assert all(t.device.type == "cpu" for layer in cache.layers for t in layer.tensors())


# ------------------------------------------------------------------------------------------------ threads
def test_two_models_in_two_threads_match_running_alone():
    models = {"llama": make_model("llama", seed=1), "qwen2": make_model("qwen2", seed=2)}
    inputs = {"llama": make_batch([70, 45], seed=35), "qwen2": make_batch([52], seed=36)}
    settings = {"llama": dict(key_ratio=0.5, window=8), "qwen2": dict(key_ratio=0.25, policy=H2O(budget=40, recent=8))}

    def run(name):
        ids, mask = inputs[name]
        return generate(models[name], ids, mask, ThinKCache(**settings[name]), steps=40).sequences

    alone = {name: run(name) for name in models}
    together, errors = {}, []
    barrier = threading.Barrier(len(models))

    def worker(name):
        try:
            barrier.wait()
            together[name] = run(name)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,)) for name in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in models:
        assert torch.equal(alone[name], together[name])


# ------------------------------------------------------------------------------------------- long decodes
class _FlatMemory(LogitsProcessor):
    """Records the bytes held after every step."""

    def __init__(self, cache):
        self.cache, self.bytes, self.stored = cache, [], []

    def __call__(self, input_ids, scores):
        stats = self.cache.stats()
        self.bytes.append(stats.stored_bytes)
        self.stored.append(max(layer.stored_tokens for layer in stats.layers))
        return scores


@pytest.mark.parametrize(
    "policy", [H2O(budget=48, recent=8), StreamingLLM(sink=4, recent=44)], ids=["h2o", "streaming"]
)
def test_two_thousand_tokens_stay_flat_and_exact(policy):
    model = make_model("llama")
    ids, mask = make_batch([60], seed=37)
    cache = ThinKCache(key_ratio=0.5, policy=policy)
    watch = _FlatMemory(cache)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=2000,
        do_sample=False,
        logits_processor=LogitsProcessorList([watch]),
    )
    assert out.shape[1] == 2060 and cache.get_seq_length() == 2059
    # evicting a fold block at a time, a layer holds between the budget and one block more, in cycles
    fold = cache.layers[0].fold_block
    assert max(watch.stored) == policy.budget + fold and min(watch.stored[fold:]) == policy.budget
    warm = watch.stored.index(policy.budget) + 1  # from the first decoding step on (the prompt's own state differs)
    first_cycles, last_cycles = watch.bytes[warm : warm + 3 * fold], watch.bytes[-3 * fold :]
    assert max(last_cycles) <= max(first_cycles), "memory grew after warm-up"
    # the first 200 tokens equal the dense reference (full cache, evicted tokens masked, pruned channels zeroed)
    think, ref, _ = run_with_reference(model, ids, mask, 200, key_ratio=0.5, policy=policy)
    assert torch.equal(think.sequences, ref.sequences)
    assert torch.equal(out[:, :260], think.sequences)


# ------------------------------------------------------------------------------------- fail loudly
def test_static_cache_request_with_a_thinkcache():
    model = make_model("llama")
    ids, _ = make_batch([20])
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(input_ids=ids, past_key_values=ThinKCache(), cache_implementation="static", max_new_tokens=2)


def test_one_liner_refuses_a_static_or_compiled_request():
    model = make_model("llama", patch=False)
    think_cache.patch(model, key_ratio=0.5)
    ids, _ = make_batch([20])
    with pytest.raises(ValueError, match=r"cache_implementation='static'.*think_cache.unpatch"):
        model.generate(input_ids=ids, cache_implementation="static", max_new_tokens=2)
    from transformers import CompileConfig

    with pytest.raises(ValueError, match="compile_config"):
        model.generate(input_ids=ids, compile_config=CompileConfig(), max_new_tokens=2)
    # a cache of the user's own is not ThinK's business: transformers decides (here it skips compiling)
    mine = DynamicCache()
    model.generate(input_ids=ids, compile_config=CompileConfig(), past_key_values=mine, max_new_tokens=2)
    assert mine.get_seq_length() == 21


@pytest.mark.parametrize("fullgraph", [True, False])
def test_torch_compile_is_refused(fullgraph):
    model = make_model("llama")
    ids, _ = make_batch([20])
    compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)
    with pytest.raises(Exception, match="ThinKCache cannot run under torch.compile"):
        compiled(input_ids=ids, past_key_values=ThinKCache())
    assert ThinKCache().is_compileable is False


def test_crop_only_in_the_recent_part():
    model = make_model("llama")
    ids, _ = make_batch([60])
    cache = ThinKCache(key_ratio=0.5, window=8)
    model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    n_recent = cache.layers[0].keys.shape[-2]
    seen = cache.get_seq_length()
    cache.crop(-2)
    assert cache.get_seq_length() == seen - 2 and cache.layers[0].keys.shape[-2] == n_recent - 2
    with pytest.raises(ValueError, match=r"cannot crop 20 tokens: only the newest \d+ tokens are stored at full width"):
        cache.crop(-20)


def test_cross_attention_models_are_refused():
    from transformers import BartConfig, BartForConditionalGeneration

    model = BartForConditionalGeneration(
        BartConfig(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            vocab_size=64,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
        )
    )
    with pytest.raises(ValueError, match="does not support encoder-decoder models"):
        think_cache.patch(model)


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(policy=SnapKV(budget=24, window=8)),
        dict(policy=H2O(budget=24, recent=4)),
        dict(policy=StreamingLLM(sink=2, recent=22)),
        dict(bits=4, value_ratio=0.25),
        dict(bits=2, policy=H2O(budget=24, recent=4)),
        dict(max_cache_len=80),
    ],
    ids=["think", "snapkv", "h2o", "streaming", "int4", "int2-h2o", "static"],
)
def test_forward_loop_with_gradients_on(settings):
    """A hand-written loop that forgets ``torch.no_grad()`` (weights require grad, as ``from_pretrained`` leaves
    them) gives the logits it gives without gradients, and a loss over them back-propagates into the attention:
    no ``out=`` buffer or in-place softmax in its way, no kernel without a backward chosen."""
    model = make_model("llama")
    ids, _ = make_batch([40], seed=2)
    steps = [torch.tensor([[5 + i]]) for i in range(40)]  # past a fold block, and past the budget

    def run(grad: bool):
        cache = ThinKCache(key_ratio=0.5, window=8, **settings)
        with torch.set_grad_enabled(grad):
            logits = [model(input_ids=ids, past_key_values=cache).logits[:, -1]]
            for token in steps:
                logits.append(model(input_ids=token, past_key_values=cache).logits[:, -1])
        return torch.stack(logits), cache

    expected, _ = run(False)
    logits, cache = run(True)
    assert cache.layers[0].is_compacted
    torch.testing.assert_close(logits.detach(), expected, atol=1e-5, rtol=1e-5)
    if "max_cache_len" in settings:
        return  # its buffers change in place from step to step, as transformers' StaticCache's: no backward
    model.zero_grad()
    logits[-1].square().sum().backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # finite everywhere (2-bit codes once sent NaN back from a block's unused rows through their float scales)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attention_dropout_in_training_is_refused_before_anything_is_stored():
    """Refused at the cache's update, not after it (found by a helper's audit: the refused step's token stayed in the
    first layer, and the next step failed): back in eval mode the conversation goes on as if nothing happened."""
    model = make_model("llama", attention_dropout=0.1)

    def train(cache, token):
        model.train()
        with pytest.raises(NotImplementedError, match="attention dropout in training mode"), torch.no_grad():
            model(input_ids=token, past_key_values=cache)
        model.eval()
        assert [layer.seen_tokens for layer in cache.layers] == [30, 30]

    expected, got = continue_after(model, *make_batch([30], seed=4), train)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
