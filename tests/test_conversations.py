"""Everything that feeds several tokens into a cache at once: chunked prompts, chat turns on one cache, prefix
caching with copies, assisted decoding. Each answers as one prefill would (issue: conversations and long prompts)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import chat, generate, make_batch, make_model, zeroed_reference

import think_cache
from think_cache import H2O, SnapKV, StreamingLLM, ThinKCache
from think_cache import _compat as compat

ATOL = 1e-4


def _repetitive_prompt(n: int, seed: int = 0) -> torch.Tensor:
    """A prompt that repeats a 12-token phrase, so prompt lookup finds drafts in it."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, 200, (12,), generator=g)
    return phrase.repeat(n // 12 + 1)[:n][None]


# ------------------------------------------------------------------------------------------- chunked prompts
@pytest.mark.parametrize("chunk", [7, 16, 50])
@pytest.mark.parametrize(
    "settings",
    [
        dict(key_ratio=0.5),
        dict(key_ratio=0.5, value_ratio=0.25),
        dict(key_ratio=0.5, policy=SnapKV(budget=30, window=8)),
        dict(key_ratio=0.5, policy=H2O(budget=30, recent=4)),
        dict(key_ratio=0.5, policy=StreamingLLM(sink=2, recent=28)),
    ],
    ids=["think", "think+values", "snapkv", "h2o", "streaming"],
)
def test_chunked_prefill_equals_one_prefill(arch, chunk, settings):
    """Channels (and SnapKV's tokens) are chosen at the prompt's real end, not on the first chunk. (With a policy:
    for a prompt within CHUNKED_PROMPT_HOLD times the budget, 60 tokens here; a longer one is bounded, below.)"""
    model = make_model(arch)
    ids, mask = make_batch([60], seed=3)
    whole = ThinKCache(**settings)
    chunked = ThinKCache(**settings)
    a = generate(model, ids, mask, whole, 20)
    b = generate(model, ids, mask, chunked, 20, prefill_chunk_size=chunk)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    for la, lb in zip(whole.layers, chunked.layers, strict=True):
        assert torch.equal(la.key_channels, lb.key_channels)
        if la.compact_positions is not None:
            assert torch.equal(la.compact_positions[..., :10], lb.compact_positions[..., :10])


def test_chunked_prefill_keeps_snapkv_budget():
    """SnapKV(B) holds at most B prompt tokens per head however the prompt is chunked (it kept every later chunk)."""
    model = make_model("llama")
    ids, mask = make_batch([200], seed=4)
    for chunk in (None, 32, 50, 64):
        cache = ThinKCache(key_ratio=0.5, policy=SnapKV(budget=32, window=8))
        generate(model, ids, mask, cache, 4, prefill_chunk_size=chunk)
        for layer in cache.layers:
            prompt_tokens = (layer.compact_positions < 200).sum(-1)
            assert int(prompt_tokens.max()) <= 32, chunk
            assert layer.stored_tokens <= 32 + 3, chunk


def _held_after_each_update(monkeypatch) -> dict[int, list[tuple[int, int, int]]]:
    """Per layer (by id), right after each `update`: its full-width tokens, its tokens waiting as codes, and the
    bytes of those codes (with their scales and zero points)."""
    from think_cache.layer import ThinKLayer

    held: dict[int, list[int]] = {}
    update = ThinKLayer.update

    def counted(self, *args, **kwargs):
        out = update(self, *args, **kwargs)
        held.setdefault(id(self), []).append(
            (
                self.keys.shape[-2],
                self.waiting_tokens,
                sum(t.nbytes for t in self.waiting.tensors()) if self.waiting else 0,
            )
        )
        return out

    monkeypatch.setattr(ThinKLayer, "update", counted)
    return held


@pytest.mark.parametrize(
    "policy", [SnapKV(budget=32, window=8), H2O(budget=32, recent=4), StreamingLLM(sink=2, recent=30)]
)
@pytest.mark.parametrize("chunk", [16, 50])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # (Mistral's sliding layers hold their window)
def test_a_long_chunked_prompt_waits_as_codes(arch, policy, chunk, monkeypatch):
    """Regression: under a budget, a prompt fed in chunks waited whole at full width until its end (SnapKV(512) on
    SmolLM2 at 2k: 113 MiB peak in generate with chunks of 32, 80 MiB in one prefill). Past CHUNKED_PROMPT_HOLD
    times the budget its earlier chunks wait as 8-bit codes; the answer stays that of one prefill."""
    from think_cache.layer import CHUNKED_PROMPT_HOLD, ThinKLayer

    model = make_model(arch)
    ids, mask = make_batch([200, 170], seed=4)  # left padding too
    whole = generate(model, ids, mask, ThinKCache(key_ratio=0.5, policy=policy), 8)
    cache = ThinKCache(key_ratio=0.5, policy=policy)
    held = _held_after_each_update(monkeypatch)
    wait_coded, left = ThinKLayer.wait_coded, []

    def coded(self):
        wait_coded(self)
        if self.waiting is not None:  # what the full-width part still holds in memory, not just its shape
            left.append(self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes())

    monkeypatch.setattr(ThinKLayer, "wait_coded", coded)
    chunked = generate(model, ids, mask, cache, 8, prefill_chunk_size=chunk)
    hold = CHUNKED_PROMPT_HOLD * 32
    n_chunks = -(-200 // chunk)
    head_dim = cache.layers[0].head_dim
    assert len(held) == len(cache.layers)
    for during in held.values():
        full, waiting, nbytes = zip(*during[:n_chunks], strict=True)
        assert max(full) <= hold + chunk  # at full width: at most the hold and the chunk arriving
        assert waiting[-1] >= 200 - hold - chunk  # the rest as codes
        dense = 2 * 2 * 2 * head_dim * 4 * waiting[-1]  # k and v, 2 rows, 2 KV heads, float32
        assert nbytes[-1] <= 0.375 * dense  # 8-bit codes, a float32 scale and zero point per 16 or 32 channels
    assert left and max(left) == 0  # the coded tokens' full-width buffers are freed
    for layer in cache.layers:  # the policy's budget after the prompt, per head
        assert layer.waiting is None and int((layer.compact_positions < 200).sum(-1).max()) <= 32
    # the prompt's next-token logits, which every coded token feeds (later steps may part at a near-tie of these
    # random-weight models' flat distributions: qwen3 with H2O after 5 equal tokens)
    assert torch.equal(whole.sequences[:, :201], chunked.sequences[:, :201])
    torch.testing.assert_close(whole.logits[0], chunked.logits[0], atol=0.1, rtol=0)  # SnapKV on llama: 0.03


def test_a_long_chunked_prompt_keeps_the_tokens_streaming_keeps():
    """Position-based choices do not depend on the codes: StreamingLLM keeps the same tokens as in one prefill."""
    model = make_model("llama")
    ids, mask = make_batch([120], seed=6)
    caches = [ThinKCache(key_ratio=0.5, policy=StreamingLLM(sink=4, recent=20)) for _ in range(2)]
    generate(model, ids, mask, caches[0], 2)
    generate(model, ids, mask, caches[1], 2, prefill_chunk_size=10)
    for whole, chunked in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(whole.compact_positions, chunked.compact_positions)
        assert chunked.compact_positions[0, 0, :4].tolist() == [0, 1, 2, 3]


def test_prompt_tokens_attend_each_other_at_full_width():
    """Regression: a forward's tokens were folded into the compact part before that forward's own attention."""
    model = make_model("llama")
    ids, mask = make_batch([40], seed=5)
    cache = ThinKCache(key_ratio=0.75, window=8)
    first = generate(model, ids, mask, cache, 3)
    follow = torch.randint(3, 200, (1, 60))
    ids2 = torch.cat([first.sequences, follow], dim=-1)
    # the second call's prompt forward: its 61 new tokens see each other at full width
    dense = think_cache.patch(make_model("llama"))
    dense_cache = zeroed_reference(cache, model)
    generate(dense, ids, mask, dense_cache, 3)
    with torch.no_grad():
        out = model(input_ids=ids2[:, -61:], past_key_values=cache, use_cache=True).logits
        ref = dense(input_ids=ids2[:, -61:], past_key_values=dense_cache, use_cache=True).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ chat turns
def test_chat_turns_on_one_cache_follow_the_reference(arch):
    """Three turns on one cache: each turn's prompt attends itself at full width, then folds with the channels of
    the first turn. The dense reference with those channels zeroed gives the same logits."""
    model = make_model(arch)
    ids, _ = make_batch([50], seed=6)
    user_turns = [torch.randint(3, 200, (1, 25 + 10 * t), generator=torch.Generator().manual_seed(t)) for t in (1, 2)]

    cache = ThinKCache(key_ratio=0.5, window=8)
    turns = chat(model, cache, ids, user_turns)
    assert all(layer.is_compacted for layer in cache.layers)
    ref_turns = chat(model, zeroed_reference(cache, model), ids, user_turns)
    for a, b in zip(turns, ref_turns, strict=True):
        assert torch.equal(a.sequences, b.sequences)
        for x, y in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def _two_turns(model, cache, first_len=50, second_len=30, new_tokens=8):
    """A prompt, a reply, a second user turn on the same cache; returns the two prompts' ends."""
    ids, _ = make_batch([first_len], seed=6)
    first = generate(model, ids, torch.ones_like(ids), cache, new_tokens)
    turn2 = torch.randint(3, 200, (1, second_len), generator=torch.Generator().manual_seed(2))
    sequence = torch.cat([first.sequences, turn2], dim=-1)
    generate(model, sequence, torch.ones_like(sequence), cache, new_tokens)
    return first_len, sequence.shape[1]


@pytest.mark.parametrize(
    "policy", [None, SnapKV(budget=24, window=8), H2O(budget=40, recent=4)], ids=["none", "snapkv", "h2o"]
)
def test_a_later_prompt_sees_the_earlier_questions_whole(policy):
    """Regression: a chat's next turn attended the first question through the pruned channels only (SmolLM2 at
    key ratio 0.4 then answered 3 of 12 second turns, a fresh cache 8). Each prompt's last `window` tokens keep
    their pruned key channels aside; a later prompt's rows, and only those, see them whole."""
    model = make_model("llama")
    cache = ThinKCache(key_ratio=0.5, window=8, policy=policy)
    end1, end2 = _two_turns(model, cache)
    for layer in cache.layers:
        questions = list(range(end1 - 8, end1)) + list(range(end2 - 8, end2))
        if isinstance(policy, H2O):  # those every head evicted are forgotten
            assert set(layer.spare_positions) <= set(questions) and layer.spare_positions == sorted(
                layer.spare_positions
            )
        else:
            assert layer.spare_positions == questions
        n = len(layer.spare_positions)
        assert layer.spare.keys(layer.dtype).shape[-2:] == (n, layer.head_dim - layer.key_channels.shape[-1])
        assert layer.restored(1, 2) is None  # a decoding row sees them thinned
        layer.prompt_end = layer.seen_tokens + 5  # as if a third turn's forward of 5 tokens had just been fed
        restored = layer.restored(5, 2)
        layer.prompt_end = end2
        assert restored.rows.all()
        if not isinstance(policy, H2O):  # H2O may have evicted them
            assert int(restored.present.sum(-1).min()) >= 8  # the first question; the second may be full-width
        if layer.compact_positions is None:
            found = restored.columns + (layer.full_from - layer.compact_tokens)
        else:
            found = layer.compact_positions.long().gather(-1, restored.columns)
        wanted = torch.tensor(layer.spare_positions).expand_as(found)
        assert torch.equal(found[restored.present], wanted[restored.present])


def test_spare_keys_are_bounded():
    """Keeping the questions aside stays bounded: the newest SPARE_PROMPTS prompts; sliding layers keep none."""
    from think_cache.layer import SPARE_PROMPTS

    model = make_model("llama")
    cache = ThinKCache(key_ratio=0.5, window=8)
    sequence, _ = make_batch([40], seed=8)
    for turn in range(SPARE_PROMPTS + 2):
        out = generate(model, sequence, torch.ones_like(sequence), cache, 3)
        user = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(turn))
        sequence = torch.cat([out.sequences, user], dim=-1)
    layer = cache.layers[0]
    assert len(layer.spare_positions) == layer.spare.tokens == SPARE_PROMPTS * 8
    sliding = make_model("mistral", sliding_window=40)
    cache = ThinKCache(key_ratio=0.5, window=8)
    _two_turns(sliding, cache)
    assert all(layer.is_sliding and layer.spare is None for layer in cache.layers)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_later_turn_in_chunks_equals_it_in_one_forward(arch):
    """A second turn fed with prefill_chunk_size: its chunks see each other at full width, as in one forward."""
    model = make_model(arch, sliding_window=40) if arch == "mistral" else make_model(arch)
    ids, _ = make_batch([50], seed=11)
    turn2 = torch.randint(3, 200, (1, 70), generator=torch.Generator().manual_seed(11))
    runs = []
    for chunk in (None, 16):
        cache = ThinKCache(key_ratio=0.5, window=8)
        first = generate(model, ids, torch.ones_like(ids), cache, 40)  # 39 generated tokens wait full-width
        sequence = torch.cat([first.sequences, turn2], dim=-1)
        runs.append(generate(model, sequence, torch.ones_like(sequence), cache, 6, prefill_chunk_size=chunk))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for x, y in zip(runs[0].logits, runs[1].logits, strict=True):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def test_chat_turns_at_ratio_zero_equal_dynamic_cache():
    from transformers import DynamicCache

    model = make_model("llama")
    ids, _ = make_batch([30], seed=7)
    turns = [torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(t)) for t in range(2)]
    ours, theirs = chat(model, ThinKCache(key_ratio=0), ids, turns, 6), chat(model, DynamicCache(), ids, turns, 6)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.sequences, b.sequences)
        for x, y in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------- prefix caching
def _copies(cache: ThinKCache) -> dict[str, ThinKCache]:
    buffer = io.BytesIO()
    torch.save(cache, buffer)
    buffer.seek(0)
    return {
        "deepcopy": copy.deepcopy(cache),
        "pickle": pickle.loads(pickle.dumps(cache)),
        "torch.save": torch.load(buffer, weights_only=False),
    }


@pytest.mark.parametrize("policy", [None, SnapKV(budget=24, window=8)], ids=["think", "snapkv"])
def test_prefix_cache_copies_answer_like_one_prefill(policy):
    """Prefill a document once with a plain forward, copy the cache, ask questions from the copies: each copy is
    compacted at the end of its own question, as document + question in one prefill would be."""
    model = make_model("llama")
    doc, _ = make_batch([60], seed=8)
    prefix = ThinKCache(key_ratio=0.5, window=8, policy=policy)
    with torch.no_grad():
        model(input_ids=doc, use_cache=True, **{compat.CACHE_ARGUMENT: prefix})
    assert not any(layer.is_compacted for layer in prefix.layers)  # a plain forward leaves the document full-width
    for i, (how, filled) in enumerate(_copies(prefix).items()):
        question = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(i))
        full = torch.cat([doc, question], dim=-1)
        from_copy = generate(model, full, torch.ones_like(full), filled, 10)
        fresh = generate(model, full, torch.ones_like(full), ThinKCache(key_ratio=0.5, window=8, policy=policy), 10)
        assert torch.equal(from_copy.sequences, fresh.sequences), how
        for x, y in zip(from_copy.logits, fresh.logits, strict=True):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    assert prefix.get_seq_length() == 60  # the copies took nothing from the original


def test_a_copy_still_refuses_another_model():
    model = make_model("llama")
    other = make_model("qwen2")
    ids, mask = make_batch([20])
    cache = ThinKCache(key_ratio=0.5)
    generate(model, ids, mask, cache, 2)
    clone = copy.deepcopy(cache)
    with pytest.raises(ValueError, match="filled by another model"), torch.no_grad():
        other(input_ids=ids[:, :3], past_key_values=clone)


# ----------------------------------------------------------------------------------------- assisted decoding
@pytest.mark.parametrize(
    "settings",
    [
        dict(key_ratio=0.5),
        dict(key_ratio=0.5, value_ratio=0.5),
        dict(key_ratio=0.5, policy=SnapKV(budget=32, window=8)),
    ],
    ids=["think", "think+values", "snapkv"],
)
@pytest.mark.parametrize("drafts", ["prompt_lookup", "assistant"])
def test_assisted_decoding_gives_plain_greedy_tokens(settings, drafts):
    model = make_model("llama")
    ids = _repetitive_prompt(70)
    mask = torch.ones_like(ids)
    plain = generate(model, ids, mask, ThinKCache(window=8, **settings), 50)
    if drafts == "prompt_lookup":
        extra = dict(prompt_lookup_num_tokens=6)
    else:
        extra = dict(assistant_model=make_model("llama", patch=False), num_assistant_tokens=5)
    assisted = generate(model, ids, mask, ThinKCache(window=8, **settings), 50, **extra)
    assert torch.equal(plain.sequences, assisted.sequences)
    for x, y in zip(plain.logits, assisted.logits, strict=True):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def test_assisted_decoding_crosses_fold_blocks_exactly():
    """Drafts verified in one forward that crosses a fold boundary: each row sees what it would one at a time."""
    model = make_model("qwen3")
    ids = _repetitive_prompt(40, seed=2)
    mask = torch.ones_like(ids)
    settings = dict(key_ratio=0.5, window=8, recent=3)
    plain = generate(model, ids, mask, ThinKCache(**settings), 90)
    assisted = generate(model, ids, mask, ThinKCache(**settings), 90, prompt_lookup_num_tokens=10)
    assert torch.equal(plain.sequences, assisted.sequences)


def test_one_liner_with_an_assistant():
    model = make_model("llama")
    think_cache.patch(model, key_ratio=0.5, window=8)
    ids = _repetitive_prompt(50, seed=3)
    mask = torch.ones_like(ids)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    for drafts in (dict(prompt_lookup_num_tokens=8), dict(assistant_model=make_model("llama", seed=1, patch=False))):
        assisted = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, **drafts)
        assert torch.equal(plain, assisted), drafts


@pytest.mark.parametrize("policy", [H2O(budget=32, recent=4), StreamingLLM(sink=2, recent=30)])
def test_assisted_decoding_refused_under_evicting_policies(policy):
    model = make_model("llama")
    ids = _repetitive_prompt(50)
    with pytest.raises(ValueError, match="roll back rejected draft tokens"):
        generate(
            model, ids, torch.ones_like(ids), ThinKCache(key_ratio=0.5, policy=policy), 10, prompt_lookup_num_tokens=5
        )
    cache = ThinKCache(key_ratio=0.5, policy=policy)
    generate(model, ids, torch.ones_like(ids), cache, 3)
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="evicts tokens while decoding"):
        cache.crop(-1)


@pytest.mark.parametrize(
    "arch, overrides, bits",
    [("mistral", dict(sliding_window=16), None), ("llama", {}, 4)],
    ids=["sliding", "quantized"],
)
def test_crop_undoes_the_newest_forward_exactly(arch, overrides, bits):
    """After a forward of several tokens on a compacted cache, crop restores the state: re-feeding gives the
    same logits (a sliding-window layer, and a quantized compact part)."""
    model = make_model(arch, **overrides)
    ids, mask = make_batch([60], seed=9)
    cache = ThinKCache(key_ratio=0.5, window=8, bits=bits)
    generate(model, ids, mask, cache, 2)
    extra = torch.randint(3, 200, (1, 7))
    with torch.no_grad():
        first = model(input_ids=extra, use_cache=True, past_key_values=cache).logits
        cache.crop(-5)
        again = model(input_ids=extra[:, 2:], use_cache=True, past_key_values=cache).logits
    torch.testing.assert_close(first[:, 2:], again, atol=ATOL, rtol=0)


@pytest.mark.parametrize("recent", [0, 4])
def test_short_turns_keep_each_question_once(recent):
    """Regression: a later prompt shorter than `window` (with the reply before it) kept aside again the tokens of the
    question before it, still at full width; once folded, a later prompt's rows got their pruned share twice."""
    model = make_model("llama")
    ids, _ = make_batch([50], seed=6)
    turns = [
        torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(i)) for i, n in enumerate([30, 3, 3, 20])
    ]
    new_tokens = [8, 3, 3, 40, 4] if recent == 0 else [3, 3, 3, 40, 4]

    cache = ThinKCache(key_ratio=0.5, window=8, recent=recent)
    outs = chat(model, cache, ids, turns, new_tokens)
    for layer in cache.layers:
        assert layer.spare_positions == sorted(set(layer.spare_positions))
    for a, b in zip(outs, chat(model, zeroed_reference(cache, model), ids, turns, new_tokens), strict=True):
        for x, y in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "policy", [H2O(budget=24, recent=4), StreamingLLM(sink=2, recent=22)], ids=["h2o", "streaming"]
)
def test_evicted_questions_are_not_kept_aside(policy):
    """Under a policy that evicts while decoding, a question every head evicted keeps no channels aside (they held
    half the bytes of an 8-turn StreamingLLM chat)."""
    model = make_model("llama")
    cache = ThinKCache(key_ratio=0.5, window=8, policy=policy)
    _two_turns(model, cache, new_tokens=40)
    for layer in cache.layers:
        positions = torch.tensor(layer.spare_positions, dtype=torch.long)
        held = torch.isin(positions, layer.compact_positions) | (positions >= layer.full_from)
        assert bool(held.all())
        assert layer.spare is None or layer.spare.tokens == len(layer.spare_positions)
        assert min(layer.spare_positions, default=50) >= 50  # the first question went 40 tokens later: forgotten


@pytest.mark.parametrize(
    "policy", [None, H2O(budget=40, recent=4), SnapKV(budget=24, window=8)], ids=["none", "h2o", "snapkv"]
)
def test_a_long_later_prompt_attends_in_row_chunks_exactly(policy, monkeypatch):
    """A later prompt's forward over a compacted layer builds its logits a chunk of query rows at a time
    (`attention.ROW_CHUNK_ELEMENTS`): one row per chunk gives the logits, the weights asked for and H2O's scores
    of one pass."""
    from think_cache import attention

    model = make_model("llama")
    ids, _ = make_batch([50], seed=6)
    turn2 = torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(2))

    def run():
        cache = ThinKCache(key_ratio=0.5, window=8, policy=policy)
        first = generate(model, ids, torch.ones_like(ids), cache, 8)
        sequence = torch.cat([first.sequences, turn2], dim=-1)
        with torch.no_grad():
            out = model(input_ids=sequence[:, cache.get_seq_length() :], past_key_values=cache, output_attentions=True)
        scores = [layer.token_scores.clone() for layer in cache.layers if layer.token_scores is not None]
        return out, scores

    whole, whole_scores = run()
    monkeypatch.setattr(attention, "ROW_CHUNK_ELEMENTS", 1)
    chunked, chunked_scores = run()
    torch.testing.assert_close(whole.logits, chunked.logits, atol=1e-5, rtol=0)
    for a, b in zip(whole.attentions, chunked.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(whole_scores, chunked_scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (len(whole_scores) > 0) == isinstance(policy, H2O)


def test_row_chunk_helpers():
    """The pieces of a row chunk: the causal rows of an absent mask, and rows laid out group member by member."""
    from think_cache.attention import _group_rows, _mask_rows, _row_chunk
    from think_cache.compact import causal_mask

    full = causal_mask(7, 20, torch.device("cpu"))
    assert torch.equal(_mask_rows(None, 2, 5, 7, 20, torch.device("cpu")), full[:, :, 2:5])
    assert _mask_rows(None, 0, 7, 7, 20, torch.device("cpu")) is None
    assert torch.equal(_mask_rows(full, 3, 4, 7, 20, None), full[:, :, 3:4])
    rows = torch.arange(2 * 7 * 3).view(2 * 7, 3)  # group 2, 7 rows
    assert torch.equal(_group_rows(rows, 2, 7, 1, 3), torch.cat([rows[1:3], rows[8:10]]))
    assert _row_chunk(batch_x_heads=4, n_total=100, q_len=10**6) == think_cache.attention.ROW_CHUNK_ELEMENTS // 400
    assert _row_chunk(batch_x_heads=4, n_total=100, q_len=3) == 3
