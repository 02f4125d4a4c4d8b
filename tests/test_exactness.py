"""key_ratio=0 with no policy is DynamicCache: same logits (fp32, 1e-5) and the same tokens, in every mode."""

from __future__ import annotations

import pytest
import torch
from conftest import generate, make_batch, make_model
from transformers import DynamicCache

from think_cache import ThinKCache

ATOL = 1e-5


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def test_single_prompt(arch):
    model = make_model(arch)
    ids, mask = make_batch([40])
    _assert_same(generate(model, ids, mask, ThinKCache(key_ratio=0)), generate(model, ids, mask, DynamicCache()))


def test_batch_with_left_padding(arch):
    model = make_model(arch)
    ids, mask = make_batch([37, 20, 9], seed=1)
    think = generate(model, ids, mask, ThinKCache(key_ratio=0), steps=60)
    _assert_same(think, generate(model, ids, mask, DynamicCache(), steps=60))
    # the padded run agrees with the same prompts run one by one
    for row, n in enumerate((37, 20, 9)):
        alone = generate(model, ids[row : row + 1, -n:], mask[row : row + 1, -n:], ThinKCache(key_ratio=0), steps=60)
        assert torch.equal(alone.sequences[0, n:], think.sequences[row, ids.shape[1] :])


def test_beam_search(arch):
    model = make_model(arch)
    ids, mask = make_batch([30, 22], seed=2)
    a = generate(model, ids, mask, ThinKCache(key_ratio=0), num_beams=3, num_return_sequences=3)
    b = generate(model, ids, mask, DynamicCache(), num_beams=3, num_return_sequences=3)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=ATOL, rtol=0)


def test_sampling_with_seed(arch):
    model = make_model(arch)
    ids, mask = make_batch([33, 25], seed=3)
    torch.manual_seed(123)
    a = generate(model, ids, mask, ThinKCache(key_ratio=0), do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(123)
    b = generate(model, ids, mask, DynamicCache(), do_sample=True, top_k=20, temperature=0.9)
    _assert_same(a, b)


def test_continued_generation(arch):
    """A second generate call on the same cache, with the first output plus new text, reuses the cache."""
    model = make_model(arch)
    ids, mask = make_batch([28], seed=4)
    runs = []
    for cache in (ThinKCache(key_ratio=0), DynamicCache()):
        first = generate(model, ids, mask, cache)
        extra = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(5))
        ids2 = torch.cat([first.sequences, extra], dim=-1)
        second = generate(model, ids2, torch.ones_like(ids2), cache)
        assert cache.get_seq_length() == ids2.shape[1] + 12 - 1
        runs.append((first, second))
    _assert_same(runs[0][0], runs[1][0])
    _assert_same(runs[0][1], runs[1][1])


@pytest.mark.parametrize("spelling", ["past_key_values", "cache"])
def test_forward_loop(arch, spelling):
    """A hand-written greedy loop calling ``model(...)`` directly."""
    import think_cache._compat as compat

    if spelling not in compat.CACHE_ARGUMENTS:
        pytest.skip(f"transformers {compat.TRANSFORMERS_VERSION} has no `{spelling}=` argument")
    model = make_model(arch)
    ids, mask = make_batch([26, 19], seed=6)
    outs = []
    for cache in (ThinKCache(key_ratio=0), DynamicCache()):
        tokens, attn, logits = ids, mask, []
        with torch.no_grad():
            for _ in range(10):
                position_ids = (attn.cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1] :]
                out = model(input_ids=tokens, attention_mask=attn, position_ids=position_ids, **{spelling: cache})
                logits.append(out.logits[:, -1])
                tokens = out.logits[:, -1].argmax(-1, keepdim=True)
                attn = torch.cat([attn, torch.ones_like(tokens)], dim=-1)
        outs.append(torch.stack(logits))
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
