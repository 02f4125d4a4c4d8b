"""The benchmarks' shared prefill rebuilds each method's cache exactly (so accuracy tables are honest)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_batch, make_model

from benchmarks.common import (
    Paired,
    answer_log_probs,
    available_methods,
    baseline_of,
    baselines_of,
    cache_from_prefill,
    describe,
    fact_document,
    greedy_decode,
    is_correct,
    kl_divergence,
    kv_retrieval,
    make_cache,
    paired,
    passkey,
    record_prefill,
)
from think_cache import H2O, SnapKV, StreamingLLM, ThinKCache, held_bytes
from think_cache._compat import CACHE_ARGUMENT


class ByteTokenizer:
    """A stand-in tokenizer for the tiny random models: one token per byte, a plain chat template."""

    eos_token_id = None  # the tiny models never stop early
    chat_template = "<role>content</role>"  # what apply_chat_template writes; the prompts' default style is chat

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [3 + b % (VOCAB - 3) for b in text.encode()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_dict=False, **kw):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        if not tokenize:
            return text
        ids = self(text, return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if return_dict else ids

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


@pytest.mark.parametrize(
    "method", ["dynamic", "think-0.5", "snapkv-32+think-0.5", "think-0.4+value-0.5", "h2o-48+think-0.5"]
)
def test_replayed_prefill_equals_a_real_run(method):
    model = make_model("llama")
    ids, _ = make_batch([90], seed=21)
    real_cache = make_cache(method)
    real = model.generate(input_ids=ids, past_key_values=real_cache, max_new_tokens=12, do_sample=False)
    prefill = record_prefill(model, ids, keep_queries=None if "h2o" in method else 64)
    cache = cache_from_prefill(model, method, prefill)
    assert held_bytes(cache) > 0
    tokens = greedy_decode(model, cache, prefill.logits.argmax(-1), 12, eos=set())
    assert tokens == real[0, 90:].tolist()
    if method != "dynamic":
        for a, b in zip(cache.layers, real_cache.layers, strict=True):
            assert torch.equal(a.key_channels, b.key_channels)


def test_dynamic_baseline_on_an_unpatched_model_keeps_the_window_as_generate_does():
    """The ``dynamic`` baseline replays on a model that is not patched (Gemma 3 before ThinK supports it), and its
    DynamicCache is built from the config as ``generate`` builds it: sliding-window layers keep only their window."""
    model = make_model("mistral", patch=False)  # a 48-token window
    ids, _ = make_batch([90], seed=21)
    real = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    prefill = record_prefill(model, ids)
    assert prefill.queries == [] and prefill.logits.shape == (1, VOCAB)
    cache = cache_from_prefill(model, "dynamic", prefill)
    assert all(layer.keys.shape[2] < 48 for layer in cache.layers)
    # and holds only its window: not a view that keeps the whole prompt's storage alive (the bytes it reports)
    window_bytes = sum(t.numel() * t.element_size() for la in cache.layers for t in (la.keys, la.values))
    assert window_bytes <= held_bytes(cache) <= window_bytes + 256  # a layer's small bookkeeping tensors aside
    assert greedy_decode(model, cache, prefill.logits.argmax(-1), 12, eos=set()) == real[0, 90:].tolist()
    with pytest.raises(ValueError, match=r"think_cache.patch\(model\) before record_prefill"):
        cache_from_prefill(model, "think-0.5", prefill)


class PlainTokenizer(ByteTokenizer):
    """A base model's tokenizer: no chat template."""

    chat_template = None


def _text(sample) -> str:
    return ByteTokenizer().decode(sample.inputs["input_ids"][0].tolist())


def test_prompts_are_completions_for_a_model_without_a_chat_template():
    chat, plain = ByteTokenizer(), PlainTokenizer()
    completion = passkey(plain, 400, 0.5, seed=1)
    assert _text(completion).endswith(".\n\nWhat is the pass key? The pass key is")
    assert "<user>" not in _text(completion)
    assert _text(passkey(chat, 400, 0.5, seed=1, style="completion")) == _text(completion)
    asked = _text(passkey(plain, 400, 0.5, seed=1, style="chat"))
    assert asked.startswith("<user>") and asked.endswith("Answer with the number only.</user><assistant>")
    assert _text(passkey(chat, 400, 0.5, seed=1)) == asked  # the chat template's default: the prompts as before
    assert asked.replace("<user>", "").startswith(_text(completion).partition("\n\n")[0])  # the same document
    kv = _text(kv_retrieval(plain, 3000, 0.5, seed=1))  # bytes: 12 keys need some filler
    name = kv.rpartition("What is the number of the ")[2].partition(" box?")[0]
    assert kv.endswith(f"The number of the {name} box is") and kv.count(f"The number of the {name} box is ") == 1
    with pytest.raises(ValueError, match="unknown prompt style 'instruct'"):
        passkey(chat, 400, 0.5, seed=1, style="instruct")


def test_method_names():
    assert isinstance(make_cache("think-0.4"), ThinKCache) and make_cache("think-0.4").key_ratio == 0.4
    c = make_cache("snapkv-256+think-0.5+value-0.25")
    assert isinstance(c.policy, SnapKV) and c.policy.budget == 256 and c.value_ratio == 0.25
    assert isinstance(make_cache("h2o-128").policy, H2O)
    assert make_cache("think-0.4+recent-32").recent == 32 and make_cache("think-0.4").recent == 0
    assert make_cache("streaming-64").policy == StreamingLLM(sink=4, recent=60)
    assert make_cache("think-0.4+int4").bits == 4 and make_cache("snapkv-512+think-0.4+int2").bits == 2
    assert make_cache("think-0.4").bits is None
    assert make_cache("think-0.5+static", max_cache_len=2100).max_cache_len == 2100  # sized by the benchmark
    assert make_cache("think-0.5+static-512").max_cache_len == 512 and make_cache("think-0.5").max_cache_len is None
    assert baseline_of("think-0.5+static") == "static"  # transformers' StaticCache
    with pytest.raises(ValueError, match="unknown method part 'pyramid-3'"):
        make_cache("pyramid-3")


def test_baseline_of_names_the_cache_a_method_thins():
    assert baseline_of("think-0.4") == "dynamic"
    assert (
        baseline_of("think-0.4+int4") == "think-0.4"
        and baseline_of("snapkv-512+think-0.4+int2") == "snapkv-512+think-0.4"
    )
    assert baseline_of("think-0.5+value-0.5") == "dynamic"
    assert baseline_of("think-0.4+recent-0") == "dynamic"
    assert baseline_of("snapkv-512+think-0.4") == "snapkv-512"
    assert baseline_of("h2o-128+value-0.25") == "h2o-128"
    assert baseline_of("snapkv-512") is None and baseline_of("dynamic") is None
    assert baseline_of("quantized-4") == "dynamic" and baseline_of("think-0.4+int2+g-16") == "think-0.4"
    methods = ["dynamic", "think-0.4", "think-0.4+int8"]
    assert baselines_of("think-0.4+int8", methods) == ["think-0.4", "dynamic"]
    assert baselines_of("think-0.4", methods) == ["dynamic"]
    assert baselines_of("think-0.4+int8", ["think-0.4+int8"]) == []
    with pytest.raises(ValueError, match="unknown method part 'blocks'"):
        make_cache("think-0.4+blocks")  # the schedule it isolated is gone: quantized storage thins as full precision


def test_group_size_part():
    assert make_cache("think-0.4+int2+g-16").group_size == 16


def test_quantized_cache_methods(monkeypatch):
    """transformers' QuantizedCache (quanto backend) as a peer; skipped with a message without optimum-quanto."""
    import benchmarks.common as common

    monkeypatch.setattr(common, "quanto_available", lambda: False)
    assert available_methods(["dynamic", "quantized-4"]) == ["dynamic"]
    with pytest.raises(ModuleNotFoundError, match="optimum-quanto"):
        make_cache("quantized-4")
    monkeypatch.undo()
    pytest.importorskip("optimum.quanto")
    model = make_model("llama")
    ids, _ = make_batch([90], seed=21)
    prefill = record_prefill(model, ids)
    cache = cache_from_prefill(model, "quantized-4", prefill)
    dense = held_bytes(cache_from_prefill(model, "dynamic", prefill))
    assert 0 < held_bytes(cache) < 0.5 * dense  # quanto's packed tensors are counted through their inner tensors
    assert len(greedy_decode(model, cache, prefill.logits.argmax(-1), 4, eos=set())) == 4


def _row(method, seed, correct, task="passkey", length=2048):
    return {"method": method, "seed": seed, "correct": correct, "task": task, "length": length}


def test_paired_counts_prompts_where_exactly_one_method_is_right():
    rows = [_row("a", s, c) for s, c in enumerate([1, 1, 0, 0, 1])]
    rows += [_row("b", s, c) for s, c in enumerate([1, 0, 1, 0, 0])]
    rows += [_row("a", 9, 1, task="kv"), _row("a", 10, 1)]  # no partner in b: left out
    p = paired(rows, "a", "b", task="passkey")
    assert (p.n, p.gained, p.lost) == (5, 2, 1)
    assert p.delta == pytest.approx(20.0)
    lo, hi = p.interval
    assert lo < 0 < p.delta < hi  # five prompts cannot settle a one-prompt difference


def test_paired_can_compare_two_ways_of_one_method_over_any_prompt_key():
    rows = [
        {"method": "m", "way": w, "seed": 1, "turn": t, "correct": c}
        for w, t, c in [("reused", 2, 0), ("reused", 3, 1), ("fresh", 2, 1), ("fresh", 3, 1), ("reused", 4, 1)]
    ]
    p = paired(rows, "reused", "fresh", arm="way", prompt=("seed", "turn"), method="m")
    assert (p.n, p.gained, p.lost) == (2, 0, 1)
    assert str(p).startswith("-50.0 points (0 gained / 1 lost of 2; ")


def test_is_correct_takes_whole_numbers_and_whole_words():
    assert is_correct("The pass key is 52445.", "52445") and not is_correct("524451", "52445")
    assert is_correct("He lives in lisbon.", "Lisbon") and not is_correct("Lisbonia", "Lisbon")


def test_fact_document_hides_each_fact_once():
    tokenizer = ByteTokenizer()
    document, facts = fact_document(tokenizer, 600, 0.5, seed=3, n_keys=2)
    assert [f.kind for f in facts] == ["passkey", "kv", "kv", "place"]
    assert all(document.count(f.statement) == 1 and f.answer in f.statement for f in facts)
    assert 500 < len(tokenizer(document)["input_ids"]) < 600 + 300  # filler comes 10 sentences (~300 bytes) at a time
    assert fact_document(tokenizer, 600, 0.5, seed=3, n_keys=2) == (document, facts)


def test_paired_interval_narrows_with_prompts_and_is_never_empty():
    assert Paired(12, 0, 0).interval[0] < -10  # no change on 12 prompts is not proof of "within 2 points"
    wide, narrow = Paired(50, 1, 1).interval, Paired(500, 10, 10).interval
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert narrow[0] < 0 < narrow[1]
    assert Paired(40, 0, 20).interval[1] < 0  # losing half the prompts is a real loss


def test_frontier_draws_one_panel_per_file_and_length(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import json

    from benchmarks import plots

    def rows(length, methods, n):
        return [
            {"method": m, "length": length, "task": "passkey", "seed": s, "correct": s % 2, "held_bytes": b}
            for m, b in methods.items()
            for s in range(n)
        ]

    sweep = {"dynamic": 100, "think-0.25": 88, "think-0.5": 76, "snapkv-256": 25, "snapkv-256+think-0.5": 19}
    a, b = tmp_path / "eval_a.json", tmp_path / "eval_b.json"
    a.write_text(json.dumps({"rows": rows(1024, sweep, 4) + rows(2048, sweep, 4)}))
    b.write_text(json.dumps({"rows": rows(2048, {"dynamic": 100, "think-0.4": 81}, 6)}))
    out = tmp_path / "frontier.png"
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure to look at
    plots.frontier([a, b], out)
    assert out.stat().st_size > 0
    axes = [ax for ax in figures[0].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [  # each panel names its file: two runs at one length look alike
        "1024 tokens (passkey; 4 prompts)\neval_a.json",
        "2048 tokens (passkey; 4 prompts)\neval_a.json",
        "2048 tokens (passkey; 6 prompts)\neval_b.json",
    ]
    think = next(line for line in axes[0].get_lines() if line.get_label() == "ThinK (key_ratio)")
    assert list(think.get_xdata()) == [0.76, 0.88]  # memory ratios to DynamicCache, sorted
    assert plots.family("snapkv-512+think-0.4") == "SnapKV + ThinK 0.4"
    assert plots.family("think-0.4+recent-32") == "ThinK 0.4, recent=32"
    assert plots.family("think-0.5+value-0.5") == "ThinK 0.5 + values 0.5"
    # a line keeps its colour from panel to panel, and no two lines share one
    colour = {(line.get_label(), line.get_color()) for ax in axes for line in ax.get_lines()}
    assert len(colour) == len({label for label, _ in colour}) == len({c for _, c in colour})


def test_frontier_per_model(tmp_path, monkeypatch):
    """Each model gets its own figure, titled by the model; a file with DynamicCache alone draws no panel."""
    pytest.importorskip("matplotlib")
    import json

    from benchmarks import plots

    row = {"length": 4096, "task": "passkey", "seed": 0, "correct": 1, "held_bytes": 10}
    gemma = {"model": "Gemma 3 270M (base)", "rows": [row | {"method": "dynamic"}, row | {"method": "think-0.5"}]}
    (tmp_path / "eval_cpu_gemma3_4k.json").write_text(json.dumps(gemma))
    (tmp_path / "eval_cpu_gemma3_baseline.json").write_text(json.dumps({**gemma, "rows": gemma["rows"][:1]}))
    (tmp_path / "eval_cpu_a.json").write_text(json.dumps({"rows": gemma["rows"]}))  # older files: SmolLM2
    sweep = {"description": "", "script": "", "runs": {"a": {"rows": gemma["rows"]}}}  # several runs: no frontier
    (tmp_path / "eval_cpu_2k_int2_sweep.json").write_text(json.dumps(sweep))
    monkeypatch.setattr(plots, "RESULTS", tmp_path)
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.main([])
    assert (tmp_path / "frontier.png").exists() and (tmp_path / "frontier_gemma3.png").exists()
    titles = sorted(f._suptitle.get_text() for f in figures)
    assert titles == [
        "Gemma 3 270M (base): accuracy against KV memory",
        "SmolLM2-135M-Instruct: accuracy against KV memory",
    ]
    gemma_figure = next(f for f in figures if f._suptitle.get_text().startswith("Gemma"))
    assert len([ax for ax in gemma_figure.axes if ax.get_visible()]) == 1  # the baseline-only file has no panel


def test_answer_divergence_is_zero_for_the_same_cache_and_grows_with_thinning():
    model = make_model("llama")
    ids, _ = make_batch([90], seed=5)
    prefill = record_prefill(model, ids)
    answer = greedy_decode(model, cache_from_prefill(model, "dynamic", prefill), prefill.logits.argmax(-1), 10, set())
    reference = answer_log_probs(model, cache_from_prefill(model, "dynamic", prefill), answer)
    assert reference.shape == (9, VOCAB)
    # teacher forcing in one forward gives the answer its own greedy tokens (the answer was decoded one at a time)
    assert reference.argmax(-1).tolist() == answer[1:]
    same = answer_log_probs(model, cache_from_prefill(model, "think-0", prefill), answer)
    thinned = answer_log_probs(model, cache_from_prefill(model, "think-0.75", prefill), answer)
    assert kl_divergence(reference, reference) == 0.0
    assert abs(kl_divergence(reference, same)) < 1e-9  # key_ratio 0 is DynamicCache
    # a random tiny model predicts nearly uniformly: small divergences, but far above key_ratio 0's rounding
    assert kl_divergence(reference, thinned) > max(1e-7, 100 * abs(kl_divergence(reference, same)))
    assert answer_log_probs(model, cache_from_prefill(model, "dynamic", prefill), answer[:1]).shape == (0, VOCAB)


def test_answer_log_probs_are_those_decoding_sees():
    """The answer goes in a token a step, as decoding feeds it. One forward over the whole answer is a new turn to
    a ThinK cache (the question's pruned channels come back, waiting tokens fold first): its logits differed from
    decoding's by about 2e-3 from the first position on, here as on SmolLM2, where they flipped answers."""
    model = make_model("llama")
    ids, _ = make_batch([40], seed=7)  # 8 prompt tokens wait; with 30 answer tokens a block folds mid-answer
    prefill = record_prefill(model, ids)
    for method in ("think-0.5", "think-0.5+int4"):
        cache = cache_from_prefill(model, method, prefill)
        answer, decoded = [int(prefill.logits.argmax())], []
        with torch.no_grad():
            for _ in range(30):
                logits = model(input_ids=torch.tensor([answer[-1:]]), use_cache=True, **{CACHE_ARGUMENT: cache}).logits
                decoded.append(logits[0, -1].float().log_softmax(-1))
                answer.append(int(logits[0, -1].argmax()))
        forced = answer_log_probs(model, cache_from_prefill(model, method, prefill), answer)
        torch.testing.assert_close(forced, torch.stack(decoded)[: len(answer) - 1], rtol=0, atol=1e-6)
        assert forced.argmax(-1).tolist() == answer[1:], method


def test_eval_with_kl_adds_the_divergence_from_each_baseline(monkeypatch):
    from benchmarks import eval as evaluation

    model = make_model("llama")
    monkeypatch.setattr(evaluation, "load_model", lambda name: (model, ByteTokenizer()))
    monkeypatch.setattr(evaluation, "MAX_NEW_TOKENS", {"passkey": 6, "kv": 6})
    result = evaluation.run(["dynamic", "think-0.5", "think-0.5+int4"], [300], ["passkey"], 2, kl=True)
    rows = {(r["seed"], r["method"]): r for r in result["rows"]}
    assert len(rows) == 6
    for seed in (300_000, 300_001):
        assert "kl" not in rows[seed, "dynamic"]
        assert rows[seed, "think-0.5"]["kl_vs"] == "dynamic" and rows[seed, "think-0.5+int4"]["kl_vs"] == "think-0.5"
        assert rows[seed, "think-0.5"]["kl"] >= 0 and rows[seed, "think-0.5+int4"]["kl"] >= 0
    table = evaluation.kl_summary(result)
    assert "| think-0.5+int4 | think-0.5 | passkey | 300 | 2 |" in table
    assert table in evaluation.report(result)  # printed after a run and by --summarize
    plain = evaluation.run(["dynamic", "think-0.5"], [300], ["passkey"], 1)
    assert "kl" not in plain["rows"][1]
    assert "mean KL" not in evaluation.report(plain) and evaluation.paired_summary(plain) in evaluation.report(plain)


def test_describe_records_each_methods_settings():
    d = describe(["dynamic", "think-0.4", "snapkv-512+think-0.4+recent-8"])
    assert d["dynamic"] == "DynamicCache(config=model.config)"
    assert "key_ratio=0.4" in d["think-0.4"] and "recent=0" in d["think-0.4"]
    stacked = d["snapkv-512+think-0.4+recent-8"]
    assert "recent=8" in stacked and "SnapKV(budget=512" in stacked


# ------------------------------------------------------------------------------------ conversations
ROW_FIELDS = {"task", "length", "seed", "method", "status", "error", "tokens", "answer", "expected", "correct"}


@pytest.fixture
def conversations():
    pytest.importorskip("tqdm")  # the demo extra
    from benchmarks import conversations

    return conversations


def test_conversations_chat_rows_and_key_ratio_zero_reuses_like_dynamic_cache(conversations):
    model, tokenizer = make_model("llama"), ByteTokenizer()
    result = conversations.chat(model, tokenizer, ["dynamic", "think-0", "think-0.5"], 300, 1, 4)
    rows = result["rows"]
    assert len(rows) == 3 * 2 * 3  # methods x ways x turns
    assert all(
        ROW_FIELDS | {"way", "turn", "fact", "empty", "repeats_previous", "cached_tokens"} <= set(r) for r in rows
    )
    assert [r["fact"] for r in rows[:3]] == ["passkey", "kv", "place"]
    reused = [r for r in rows if r["way"] == "reused" and r["status"] == "ok"]
    assert [r["cached_tokens"] > 0 for r in reused if r["method"] == "dynamic"] == [False, True, True]
    assert all(r["cached_tokens"] == 0 for r in rows if r["way"] == "fresh")
    assert "think-0 reused vs dynamic reused: 3 of 3 replies token-identical" in conversations.chat_summary(result)


def test_conversations_chunked_rows_record_memory_and_the_budget(conversations):
    model, tokenizer = make_model("llama"), ByteTokenizer()
    result = conversations.chunked(model, tokenizer, ["dynamic", "snapkv-64+think-0.5"], 200, 1, 3, (None, 32))
    rows = result["rows"]
    assert [(r["method"], r["chunk"]) for r in rows] == [
        ("dynamic", None),
        ("dynamic", 32),
        ("snapkv-64+think-0.5", None),
        ("snapkv-64+think-0.5", 32),
    ]
    assert all(ROW_FIELDS | {"peak_bytes", "held_bytes", "prompt_tokens_held", "within_budget"} <= set(r) for r in rows)
    assert all(r["peak_bytes"] is None or r["peak_bytes"] >= 0 for r in rows)
    snap = [r for r in rows if r["budget"] == 64]
    assert len(snap) == 2 and all(len(r["prompt_tokens_held"]) == 2 for r in snap if r["status"] == "ok")
    assert snap[0]["within_budget"] is True  # one prefill: SnapKV keeps its budget of prompt tokens
    assert "snapkv-64+think-0.5 | 32 |" in conversations.chunked_summary(result)


def test_conversations_prefix_copies_the_cache_three_ways_and_records_refusals(conversations):
    model, tokenizer = make_model("llama"), ByteTokenizer()
    result = conversations.prefix(model, tokenizer, ["dynamic", "think-0.5"], 300, 1, 3)
    rows = result["rows"]
    cached = [r for r in rows if r["way"] == "prefix"]
    assert [r["copy"] for r in cached] == list(conversations.COPIES) * 2
    assert len([r for r in rows if r["way"] == "one-prefill"]) == 6
    assert all(ROW_FIELDS | {"question", "prefix_tokens", "copy"} <= set(r) for r in rows)
    assert 250 < rows[0]["prefix_tokens"] < rows[0]["prompt_tokens"]
    # a copied DynamicCache of the document continues exactly as one prefill of document and question
    assert all(r["same_as_one_prefill"] for r in cached if r["method"] == "dynamic")
    assert all(r["status"] in ("ok", "error") for r in cached)
    assert "| think-0.5 |" in conversations.prefix_summary(result)


def test_conversations_assisted_compares_with_plain_greedy(conversations):
    model, tokenizer = make_model("llama"), ByteTokenizer()
    assistant = make_model("llama", seed=1)
    result = conversations.assisted(model, tokenizer, assistant, ["dynamic", "think-0.5"], 200, 1, 6, 4)
    rows = result["rows"]
    assert [(r["method"], r["way"]) for r in rows] == [
        (m, w) for m in ("dynamic", "think-0.5") for w in ("plain", "prompt-lookup", "assistant")
    ]
    assert all(ROW_FIELDS | {"way", "same_as_plain"} <= set(r) for r in rows)
    assert all(r["same_as_plain"] is None for r in rows if r["way"] == "plain")
    assert "| think-0.5 | assistant |" in conversations.assisted_summary(result)


# --------------------------------------------------------------------------- command lines (the walkthrough)
def _refused(capsys, main, argv: list[str]) -> str:
    """What a command line's argument parser says as it refuses ``argv`` (exit status 2), before any work."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch):
    """The benchmarks' model loaders fail the test: a refusal must come before the model loads."""
    from benchmarks import eval as evaluation
    from benchmarks import speed

    def load(*args, **kwargs):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(evaluation, "load_model", load)
    monkeypatch.setattr(speed, "load_model", load)
    monkeypatch.setattr("think_cache.models.load_smollm2", load)


def test_method_names_with_two_policies_or_a_repeated_part_are_refused():
    from benchmarks.common import check_methods

    with pytest.raises(ValueError, match=r"'snapkv-256\+h2o-256' has two token policies \(snapkv-256, h2o-256\)"):
        make_cache("snapkv-256+h2o-256")
    with pytest.raises(ValueError, match=r"'think-0.5\+think-0.6' has think-R twice"):
        make_cache("think-0.5+think-0.6")
    with pytest.raises(ValueError, match=r"'think-0.4\+int4\+int2' has two bit widths"):
        make_cache("think-0.4+int4+int2")
    with pytest.raises(ValueError, match="method 'think-abc': part 'think-abc' is malformed, write it as think-R"):
        make_cache("think-abc")
    with pytest.raises(ValueError, match="method 'dynamic,think-1.5'|method 'think-1.5': key_ratio"):
        check_methods(["dynamic", "think-1.5"])  # ThinKCache's own checks, named by the method
    with pytest.raises(ValueError, match="'quantized-3' is not one this benchmark runs: .*quantized-2, quantized-4"):
        check_methods(["quantized-3"])
    with pytest.raises(ValueError, match="'unpatched' is not one this benchmark runs"):
        check_methods(["unpatched"])
    assert check_methods(["unpatched", "static", "quantized-4"], ("dynamic", "unpatched", "static")) == [
        "unpatched",
        "static",
        "quantized-4",
    ]
    with pytest.raises(ValueError, match="'quantized-4' is not one"):
        check_methods(["quantized-4"], quantized=False)
    with pytest.raises(ValueError, match="empty method name"):
        check_methods(["dynamic", ""])
    assert check_methods(["think-0.4+int2+g-16", "snapkv-512+think-0.4", "think-0.5+static"])


def test_every_benchmark_refuses_a_bad_method_before_the_model_loads(capsys, no_model):
    from benchmarks import conversations, speed
    from benchmarks import eval as evaluation

    err = _refused(capsys, evaluation.main, ["--methods", "dynamic,snapkv-256+h2o-256"])
    assert "has two token policies" in err
    assert "'quantized-3' is not one" in _refused(capsys, speed.main, ["--methods", "dynamic,quantized-3"])
    err = _refused(capsys, conversations.main, ["chat", "--methods", "think-0.5+think-0.6"])
    assert "think-R twice" in err
    assert "--ways takes reused,fresh" in _refused(capsys, conversations.main, ["chat", "--ways", "reused,stale"])
    assert "--chunks" in _refused(capsys, conversations.main, ["chunked", "--chunks", "none,0"])
    assert "--samples must be 1 or more" in _refused(capsys, conversations.main, ["prefix", "--samples", "0"])


def test_eval_refuses_unknown_tasks_short_kv_prompts_and_bad_sizes(capsys, no_model):
    from benchmarks import eval as evaluation

    assert "unknown task 'foo': --tasks takes passkey and/or kv" in _refused(
        capsys, evaluation.main, ["--tasks", "passkey,foo"]
    )
    err = _refused(capsys, evaluation.main, ["--tasks", "kv", "--lengths", "256"])
    assert f"the kv task needs prompts of {evaluation.MIN_LENGTH['kv']} tokens at least, not 256" in err
    assert "--lengths must be above zero, not -5, 0" in _refused(capsys, evaluation.main, ["--lengths=-5,0"])
    assert "--lengths takes comma-separated whole numbers" in _refused(capsys, evaluation.main, ["--lengths", "1k"])
    assert "--samples must be 1 or more, not 0" in _refused(capsys, evaluation.main, ["--samples", "0"])
    evaluation.check_tasks(["passkey", "kv"], [evaluation.MIN_LENGTH["kv"]])


def test_speed_refuses_zero_steps_or_repeats_and_documents_its_options(capsys, no_model):
    from benchmarks import speed

    assert "--decode-tokens must be 1 or more, not 0" in _refused(capsys, speed.main, ["--decode-tokens", "0"])
    assert "--repeats must be 1 or more, not 0" in _refused(capsys, speed.main, ["--repeats", "0"])
    assert "--lengths must be above zero" in _refused(capsys, speed.main, ["--lengths", "0"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for option in ("--methods", "--lengths", "--repeats", "--decode-tokens", "--device", "--results-dir"):
        assert option in help_text
    assert "(default 1024,2048,4096)" in help_text and "(default 3)" in help_text and "(default 16)" in help_text
    assert "default cuda when available, else cpu" in help_text and "snapkv-B" in help_text


def _eval_file(path, samples: int | None, rows_samples: int, **header):
    """An eval results file of one dynamic row per prompt, its prompts drawn for ``rows_samples``."""
    import json

    from benchmarks.common import depths

    rows = [
        {"task": "passkey", "length": 300, "seed": 300_000 + i, "depth": d, "method": "dynamic", "correct": True}
        for i, d in enumerate(depths(rows_samples))
    ]
    data = {"model": "SmolLM2-135M-Instruct", "prompt_style": "chat", "rows": rows, **header}
    if samples is not None:
        data |= {"samples": samples, "max_new_tokens": {"passkey": 12, "kv": 24}, "kl": False}
    path.write_text(json.dumps(data))


def test_eval_resume_refuses_a_file_of_other_prompts(tmp_path, capsys, no_model):
    """Prompt i has seed 1000 * length + i and depth depths(samples)[i]: resuming with other --samples would pair
    different prompts under one seed."""
    from benchmarks import eval as evaluation

    argv = ["--resume", "--results-dir", str(tmp_path), "--tag", "x", "--lengths", "300", "--tasks", "passkey"]
    _eval_file(tmp_path / "eval_x.json", samples=2, rows_samples=2)
    err = _refused(capsys, evaluation.main, [*argv, "--samples", "4"])
    assert f"--resume: {tmp_path / 'eval_x.json'} was written with other settings (samples 2 there, 4 now)" in err
    assert "kl False there, True now" in _refused(capsys, evaluation.main, [*argv, "--samples", "2", "--kl"])
    args = evaluation.parse_args([*argv, "--samples", "2"])
    assert len(args.done) == 2 and args.path == tmp_path / "eval_x.json"
    _eval_file(tmp_path / "eval_x.json", samples=None, rows_samples=2)  # written before the settings were recorded
    assert "its prompts were drawn for another --samples than 4" in _refused(
        capsys, evaluation.main, [*argv, "--samples", "4"]
    )
    assert len(evaluation.parse_args([*argv, "--samples", "2"]).done) == 2


def test_eval_resume_matches_prompts_by_seed_and_depth(monkeypatch):
    from benchmarks import eval as evaluation
    from benchmarks.common import depths

    model = make_model("llama")
    monkeypatch.setattr(evaluation, "load_model", lambda name: (model, ByteTokenizer()))
    monkeypatch.setattr(evaluation, "MAX_NEW_TOKENS", {"passkey": 2, "kv": 2})
    first = evaluation.run(["dynamic"], [300], ["passkey"], 2)
    assert (first["samples"], first["kl"], first["max_new_tokens"]) == (2, False, {"passkey": 2, "kv": 2})
    again = evaluation.run(["dynamic"], [300], ["passkey"], 2, done=first["rows"])
    assert again["rows"] == first["rows"]  # every prompt already answered: none ran again
    wider = evaluation.run(["dynamic"], [300], ["passkey"], 4, done=first["rows"])
    new = wider["rows"][2:]
    assert sorted((r["seed"] - 300_000, r["depth"]) for r in new) == list(enumerate(depths(4)))


def test_lengths_past_the_models_context_warn_and_are_marked(monkeypatch, capsys):
    from benchmarks import eval as evaluation

    model = make_model("llama")
    model.config.max_position_embeddings = 300
    monkeypatch.setattr(evaluation, "load_model", lambda name: (model, ByteTokenizer()))
    monkeypatch.setattr(evaluation, "MAX_NEW_TOKENS", {"passkey": 2, "kv": 2})
    result = evaluation.run(["dynamic"], [200, 300], ["passkey"], 1)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "trained for 300 positions" in err and "lengths 300 reach past it" in err
    assert result["beyond_context"] == [300] and result["max_position_embeddings"] == 300
    assert [r.get("beyond_context", False) for r in result["rows"]] == [False, True]


def test_speed_saves_after_each_length_and_records_its_settings(monkeypatch, tmp_path, capsys):
    import json

    from benchmarks import speed

    model = make_model("llama")
    model.config.max_position_embeddings = 96
    monkeypatch.setattr(speed, "load_model", lambda name, dtype: (model, ByteTokenizer()))
    saved = []
    monkeypatch.setattr(speed, "save_json", lambda data, path: saved.append(json.loads(json.dumps(data))) or path)
    argv = ["--methods", "think-0.5", "--lengths", "64,96", "--repeats", "1", "--decode-tokens", "1"]
    assert speed.main([*argv, "--device", "cpu", "--results-dir", str(tmp_path)]) == 0
    assert [sorted({r["length"] for r in s["rows"]}) for s in saved] == [[64], [64, 96], [64, 96]]
    header = saved[-1]
    assert header["lengths"] == [64, 96] and header["beyond_context"] == [96] and "date_utc" in header
    assert [r["method"] for r in header["rows"]] == ["dynamic", "think-0.5"] * 2  # dynamic added: the ratios need it
    assert f"wrote {tmp_path / 'speed_local.json'}" in capsys.readouterr().out


def test_default_tags_never_name_a_committed_file_and_results_dir_redirects(tmp_path):
    from benchmarks import conversations, speed
    from benchmarks import eval as evaluation
    from benchmarks.common import RESULTS

    paths = [
        evaluation.parse_args([]).path,
        evaluation.parse_args(["--model", "gemma3"]).path,
        speed.parse_args([]).path,
        speed.parse_args(["--model", "gemma3"]).path,
        *(conversations.parse_args([part]).path for part in conversations.DEFAULTS),
    ]
    assert all(p.parent == RESULTS and "local" in p.name and not p.exists() for p in paths), paths
    assert evaluation.parse_args(["--results-dir", str(tmp_path)]).path == tmp_path / "eval_local.json"
    assert speed.parse_args(["--results-dir", str(tmp_path), "--tag", "t"]).path == tmp_path / "speed_t.json"
    chat = conversations.parse_args(["chat", "--results-dir", str(tmp_path)])
    assert chat.path == tmp_path / "conversations_chat_local.json"


def test_provenance_records_when_how_and_which_code():
    import datetime

    from benchmarks.common import provenance

    info = provenance(["benchmarks.eval", "--samples", "2"])
    assert set(info) == {"machine", "date_utc", "command", "git_commit", "git_dirty"}
    assert datetime.datetime.fromisoformat(info["date_utc"]).utcoffset() == datetime.timedelta(0)
    assert info["command"] == ["benchmarks.eval", "--samples", "2"] and "torch" in info["machine"]
    commit, dirty = info["git_commit"], info["git_dirty"]
    assert (commit is None and dirty is None) or (len(commit) == 40 and isinstance(dirty, bool))


def test_git_state_outside_a_repository_is_unknown(tmp_path, monkeypatch):
    from benchmarks.common import git_state

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_state(tmp_path) == (None, None)


def test_summarize_says_what_a_file_is(tmp_path, capsys):
    import json

    from benchmarks import conversations
    from benchmarks import eval as evaluation

    with pytest.raises(SystemExit, match=r"--summarize: no results file at .*missing.json: pass the path"):
        evaluation.main(["--summarize", str(tmp_path / "missing.json")])
    speed_file = tmp_path / "speed_x.json"
    speed_file.write_text(json.dumps({"decode_tokens": 16, "rows": [{"length": 64}]}))
    with pytest.raises(SystemExit, match="speed_x.json holds speed results, not eval results"):
        evaluation.main(["--summarize", str(speed_file)])
    eval_file = tmp_path / "eval_x.json"
    eval_file.write_text(json.dumps({"tasks": ["passkey"], "lengths": [64], "methods": [], "rows": []}))
    with pytest.raises(SystemExit, match="holds eval results, not conversations results; summarize it with python -m"):
        conversations.main(["--summarize", str(eval_file)])
    with pytest.raises(SystemExit, match="is not JSON"):
        (tmp_path / "bad.json").write_text("{")
        conversations.main(["--summarize", str(tmp_path / "bad.json")])


def test_plots_skip_a_model_without_a_panel_and_title_decode_plots_by_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import json

    from benchmarks import plots

    row = {"length": 1024, "task": "passkey", "seed": 0, "correct": 1, "held_bytes": 10, "method": "dynamic"}
    gemma = {"model": "Gemma 3 270M (base)", "tasks": ["passkey"], "rows": [row]}  # DynamicCache alone
    (tmp_path / "eval_try_gemma3.json").write_text(json.dumps(gemma))
    (tmp_path / "eval_try.json").write_text(json.dumps({"rows": [row, row | {"method": "think-0.5"}]}))
    (tmp_path / "eval_local.json").write_text("not read: the default tag's quick runs stay out of the figures")
    speed_row = {"method": "dynamic", "length": 1024, "decode_s_per_token": 0.01, "held_bytes": 2**20}
    speed = {"model": "Gemma 3 270M (base)", "device": "cpu", "dtype": "torch.float32", "repeats": 1}
    (tmp_path / "speed_try.json").write_text(json.dumps({**speed, "rows": [speed_row]}))
    (tmp_path / "speed_local.json").write_text(json.dumps({**speed, "rows": [speed_row]}))
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    assert plots.main(["--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no frontier for gemma3: eval_try_gemma3.json hold no context length" in out
    assert "wrote frontier.png, decode_try.png" in out and not (tmp_path / "frontier_gemma3.png").exists()
    assert not (tmp_path / "decode_local.png").exists()
    decode = figures[-1]
    assert decode._suptitle.get_text().startswith("Gemma 3 270M (base), cpu")
    baseline = decode.axes[0].get_lines()[0]
    assert baseline.get_label() == "dynamic" and baseline.get_marker() not in (None, "None", "")


def test_kernel_check_without_cuda_stops_cleanly_and_gpu_groups_are_checked(monkeypatch, tmp_path, capsys):
    from benchmarks import gpu, kernel_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device: run on a GPU machine, or use --smoke"):
        kernel_check.main(["--out", str(tmp_path / "k.json")])
    assert "--runs must be 1 or more" in _refused(capsys, kernel_check.main, ["--runs", "0", "--smoke"])
    with pytest.raises(SystemExit):
        kernel_check.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "required, except with --compile-for" in help_text and "(default 50" in help_text
    err = _refused(capsys, gpu.parse_args, ["--groups", "1x8k,1x-5k"])
    assert "--groups: '1x-5k' is not BATCHxCONTEXT with both above zero" in err
    assert "'8xk'" in _refused(capsys, gpu.parse_args, ["--groups", "8xk"])
