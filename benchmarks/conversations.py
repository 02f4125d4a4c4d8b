"""Conversations and long prompts on SmolLM2-135M-Instruct: does a ThinKCache answer as well when the prompt
does not arrive in one prefill? Every part calls transformers' ``generate`` as a user would (no replayed prefill).

    python -m benchmarks.conversations chat --samples 12 --methods dynamic,think-0,think-0.4,think-0.5
    python -m benchmarks.conversations chunked --samples 24 --length 2048
    python -m benchmarks.conversations prefix --samples 8 --length 1024
    python -m benchmarks.conversations assisted --samples 12 --length 1024
    python -m benchmarks.conversations --summarize benchmarks/results/conversations_chat_cpu.json

Parts:

chat      document chats of three turns (a pass key, a keyed number, the city a person lives in, asked one per
          turn through the chat template, each reply appended as the assistant's message), per method with ONE
          cache reused across turns (the pattern transformers documents) and with a FRESH cache per turn given
          the whole conversation.
chunked   the pass-key prompts of benchmarks.eval with ``generate(..., prefill_chunk_size=C)``: accuracy, the
          prompt tokens a budgeted policy holds per layer after generation, and the peak memory of generate.
prefix    prefix caching: a shared document prefilled once with a plain forward, then per question a copy of
          that cache (``copy.deepcopy``, ``pickle`` or ``torch.save``/``torch.load`` in turn) given to
          ``generate``, against document and question in one prefill into a fresh cache.
assisted  greedy decoding plain, with ``prompt_lookup_num_tokens`` and with an assistant model (a second
          SmolLM2): are the tokens those of plain greedy decoding, or does generate refuse?

Each part writes benchmarks/results/conversations_<part>_<tag>.json (``--results-dir`` for another folder;
default tag ``local``; machine, command line, git commit, settings, one row per prompt,
method and way, with the answer, whether it is right, and the error where generate raised one, so that the
ways can be paired prompt by prompt), saved after every prompt, and prints its tables. ``--summarize FILE``
prints the tables of a results file and runs nothing.

Peak memory (chunked) is the process's resident memory at its highest during ``generate`` above what it held
just before, read from Linux's VmHWM after resetting it through /proc/self/clear_refs; None elsewhere. So that the
resident size follows the live tensors, glibc's mmap threshold is fixed at 64 KiB (``mallopt``: a tensor of that
size or more gets pages of its own, handed back when it is freed, instead of a heap whose freed holes stay
resident and are reused by chance: with the default, the same run measured 135 to 158 MiB) and freed heap memory
is handed back with ``malloc_trim`` before each measure.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import io
import pickle
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

import think_cache
from think_cache import ThinKCache, held_bytes
from think_cache._compat import CACHE_ARGUMENT
from think_cache.demo import chat_prompt

from .common import (
    DEFAULT_TAG,
    RESULTS,
    check_methods,
    depths,
    describe,
    fact_document,
    is_correct,
    load_results,
    make_cache,
    method_help,
    paired,
    passkey,
    positive_ints,
    provenance,
    save_json,
)

OnPrompt = Callable[[dict], None] | None


# --------------------------------------------------------------------------------------------- shared
def _header(part: str, methods: list[str], **settings) -> dict:
    return {"part": part, **provenance(), "methods": methods, "caches": describe(methods), "settings": settings}


def _run(header: dict, jobs: Iterable, one: Callable[[object], list[dict]], on_prompt: OnPrompt) -> dict:
    """``one(job)`` for every job, with a progress bar; ``on_prompt`` gets the partial result after each."""
    rows: list[dict] = []
    for job in tqdm(jobs, desc=header["part"], unit="prompt"):
        rows += one(job)
        if on_prompt is not None:
            on_prompt({**header, "rows": rows})
    return {**header, "rows": rows}


def generate(model, tokenizer, inputs: dict, cache, max_new_tokens: int, **options) -> tuple[dict, str]:
    """Greedy ``model.generate`` with ``cache``, as a user calls it. Returns the row fields (new tokens, answer,
    status and error, seconds) and the reply text as the tokenizer decodes it (for the next chat turn)."""
    n = inputs["input_ids"].shape[1]
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs, **{CACHE_ARGUMENT: cache}, max_new_tokens=max_new_tokens, do_sample=False, **options
            )
    except Exception as error:  # a refusal is a result here: record it and go on
        return {**_error(f"{type(error).__name__}: {error}"), "seconds": time.perf_counter() - start}, ""
    seconds = time.perf_counter() - start
    tokens = out[0, n:].tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return {"status": "ok", "error": None, "tokens": tokens, "answer": text.strip(), "seconds": seconds}, text


def judged(fields: dict, expected: str) -> dict:
    return {**fields, "expected": expected, "correct": is_correct(fields["answer"], expected)}


def _error(message: str) -> dict:
    return {"status": "error", "error": message[:500], "tokens": [], "answer": "", "seconds": 0.0}


def _cell(rows: list[dict]) -> str:
    """``right/total``, with the errors when there are any."""
    errors = sum(r["status"] == "error" for r in rows)
    return f"{sum(r['correct'] for r in rows)}/{len(rows)}" + (f" ({errors} errors)" if errors else "")


def _select(rows: list[dict], **where) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _error_lines(rows: list[dict], keys: tuple[str, ...]) -> list[str]:
    """Lines for the end of a table: one per distinct error message, with the rows (by ``keys``) that raised it."""
    seen: dict[str, set] = {}
    for r in rows:
        if r["status"] == "error":
            seen.setdefault(r["error"], set()).add(" ".join(str(r[k]) for k in keys))
    lines = [f"- {', '.join(sorted(where))}: {message}" for message, where in seen.items()]
    return ["", "errors:"] + lines if lines else []


# ----------------------------------------------------------------------------------------------- chat
CHAT_WAYS = ("reused", "fresh")


def chat(
    model,
    tokenizer,
    methods: list[str],
    length: int = 1024,
    samples: int = 12,
    max_new_tokens: int = 24,
    on_prompt: OnPrompt = None,
    ways: tuple[str, ...] = CHAT_WAYS,
) -> dict:
    """``samples`` chats of three turns about a document of about ``length`` tokens, per method each way in
    ``ways`` (`CHAT_WAYS`: one cache reused, a fresh cache per turn)."""
    unknown = set(ways) - set(CHAT_WAYS)
    if unknown:
        raise ValueError(f"unknown chat ways {sorted(unknown)}; choose among {list(CHAT_WAYS)}")
    header = _header("chat", methods, length=length, samples=samples, max_new_tokens=max_new_tokens)

    def one_chat(i: int) -> list[dict]:
        depth, seed = depths(samples)[i], 1000 * length + i
        document, facts = fact_document(tokenizer, length, depth, seed)
        prompt = {"task": "chat", "length": length, "depth": depth, "seed": seed}
        rows = []
        for method in methods:
            for way in ways:
                turns = converse(model, tokenizer, document, facts, method, way, max_new_tokens)
                rows += [{**prompt, "method": method, "way": way, **turn} for turn in turns]
        return rows

    return _run(header, range(samples), one_chat, on_prompt)


def converse(model, tokenizer, document: str, facts, method: str, way: str, max_new_tokens: int) -> list[dict]:
    """One chat: the document with the first question, then one question per turn, each reply appended as the
    assistant's message. ``way`` is ``reused`` (one cache for the whole chat) or ``fresh`` (a new one per turn);
    either way ``generate`` gets the whole conversation's input_ids, with the replies that way gave."""
    messages: list[dict] = []
    rows = []
    cache = make_cache(method)
    for turn, fact in enumerate(facts, 1):
        content = f"{document}\n\n{fact.question}" if turn == 1 else fact.question
        messages.append({"role": "user", "content": content})
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        if way == "fresh":
            cache = make_cache(method)
        cached = cache.get_seq_length()
        fields, text = generate(model, tokenizer, inputs, cache, max_new_tokens)
        ok = fields["status"] == "ok"
        rows.append(
            {
                "turn": turn,
                "fact": fact.kind,
                "prompt_tokens": inputs["input_ids"].shape[1],
                "cached_tokens": cached,  # tokens the cache held when generate got it
                **judged(fields, fact.answer),
                "empty": ok and not fields["answer"],
                "repeats_previous": ok and turn > 1 and fields["answer"] == messages[-2]["content"].strip(),
            }
        )
        messages.append({"role": "assistant", "content": text})
    return rows


def chat_summary(result: dict) -> str:
    rows = result["rows"]
    turns = sorted({r["turn"] for r in rows})
    lines = ["| method | way | " + " | ".join(f"turn {t}" for t in turns) + " | empty | repeats | errors |"]
    lines.append("|" + "---|" * (len(turns) + 5))
    for method in result["methods"]:
        for way in CHAT_WAYS:
            mine = _select(rows, method=method, way=way)
            if not mine:
                continue
            cells = [_cell(_select(mine, turn=t)) for t in turns]
            counts = [sum(r[k] for r in mine) for k in ("empty", "repeats_previous")]
            counts.append(sum(r["status"] == "error" for r in mine))
            lines.append(f"| {method} | {way} | " + " | ".join(cells + [str(c) for c in counts]) + " |")
    lines.append("\n(right/chats per turn; empty: replies without text; repeats: a reply equal to the turn before's)")
    later = [r for r in rows if r["turn"] > 1]
    lines += ["", "| method | reused vs fresh, turns 2-3, same chats (95% interval) |", "|---|---|"]
    for method in result["methods"]:
        p = paired(later, "reused", "fresh", arm="way", prompt=("seed", "turn"), method=method)
        if p.n:
            lines.append(f"| {method} | {p} |")
    if {"think-0", "dynamic"} <= set(result["methods"]):
        base = {(r["seed"], r["turn"]): r["tokens"] for r in _select(rows, method="dynamic", way="reused")}
        zero = [r for r in _select(rows, method="think-0", way="reused") if (r["seed"], r["turn"]) in base]
        same = sum(r["tokens"] == base[r["seed"], r["turn"]] for r in zero)
        lines.append(f"\nthink-0 reused vs dynamic reused: {same} of {len(zero)} replies token-identical")
    return "\n".join(lines + _error_lines(rows, ("method", "way")))


# -------------------------------------------------------------------------------------------- chunked
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class PeakMemory:
    """Context manager: ``bytes`` is the process's peak resident memory during the block above what it held on
    entry (Linux; None elsewhere). See the module docstring."""

    def __init__(self):
        self.bytes: int | None = None

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def __enter__(self) -> PeakMemory:
        self._start = None
        if not sys.platform.startswith("linux"):
            return self
        gc.collect()
        libc = ctypes.CDLL(None)
        if hasattr(libc, "mallopt"):  # glibc: blocks of 64 KiB and more get their own pages, returned when freed
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the high-water mark (VmHWM) restarts from the current resident size
        except OSError:  # not allowed here: no measure rather than a wrong one
            return self
        self._start = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self._start is not None:
            self.bytes = self._status("VmHWM") - self._start


def prompt_tokens_held(cache, prompt_length: int) -> list[int] | None:
    """Per layer, the prompt tokens a ThinKCache holds after generation (stored tokens minus the generated ones
    it took in; every KV head of a layer stores as many); None for other caches."""
    if not isinstance(cache, ThinKCache):
        return None
    return [s.stored_tokens - (s.tokens - prompt_length) for s in cache.stats().layers]


def chunked(
    model,
    tokenizer,
    methods: list[str],
    length: int = 2048,
    samples: int = 24,
    max_new_tokens: int = 12,
    chunks: tuple[int | None, ...] = (None, 32, 64, 256),
    on_prompt: OnPrompt = None,
) -> dict:
    """The pass-key prompts (those of benchmarks.eval with as many samples) with ``prefill_chunk_size`` in
    ``chunks`` (None: one prefill), per method."""
    header = _header(
        "chunked", methods, length=length, samples=samples, max_new_tokens=max_new_tokens, chunks=list(chunks)
    )

    def one_prompt(i: int) -> list[dict]:
        sample = passkey(tokenizer, length, depths(samples)[i], seed=1000 * length + i)
        n = sample.inputs["input_ids"].shape[1]
        if i == 0:  # the first generate of a process takes memory once for good (about 0.5 GiB): not in a row
            generate(model, tokenizer, sample.inputs, make_cache("dynamic"), 2)
        rows = []
        for method in methods:
            for chunk in chunks:
                cache = make_cache(method)
                options = {} if chunk is None else {"prefill_chunk_size": chunk}
                with PeakMemory() as peak:
                    fields, _ = generate(model, tokenizer, sample.inputs, cache, max_new_tokens, **options)
                held = prompt_tokens_held(cache, n)
                budget = getattr(getattr(cache, "policy", None), "budget", None)
                rows.append(
                    {
                        "task": sample.task,
                        "length": length,
                        "depth": sample.depth,
                        "seed": sample.seed,
                        "prompt_tokens": n,
                        "method": method,
                        "chunk": chunk,
                        **judged(fields, sample.answer),
                        "peak_bytes": peak.bytes,
                        "held_bytes": held_bytes(cache),
                        "prompt_tokens_held": held,
                        "budget": budget,
                        "within_budget": None if budget is None or held is None else max(held) <= budget,
                    }
                )
                del cache
        return rows

    return _run(header, range(samples), one_prompt, on_prompt)


def _mib(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.median(values) / 2**20:.1f}" if values else "n/a"


def chunked_summary(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "| method | chunk | accuracy | vs one prefill, same prompts (95% interval) | peak memory in generate, MiB "
        "(median) | KV held, MiB | prompt tokens held per layer (max) / budget |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in result["methods"]:
        for chunk in result["settings"]["chunks"]:
            mine = _select(rows, method=method, chunk=chunk)
            if not mine:
                continue
            vs = "" if chunk is None else str(paired(rows, chunk, None, arm="chunk", method=method))
            budget = ""
            if mine[0]["budget"] is not None:
                most = max(max(r["prompt_tokens_held"]) for r in mine)
                over = sum(not r["within_budget"] for r in mine)
                budget = f"{most} / {mine[0]['budget']} (over on {over} of {len(mine)} prompts)"
            lines.append(
                f"| {method} | {chunk or 'none'} | {_cell(mine)} | {vs} | {_mib([r['peak_bytes'] for r in mine])} "
                f"| {_mib([r['held_bytes'] for r in mine])} | {budget} |"
            )
    return "\n".join(lines + _error_lines(rows, ("method", "chunk")))


# --------------------------------------------------------------------------------------------- prefix
COPIES = ("deepcopy", "pickle", "torch.save")


def copy_cache(cache, how: str):
    """A copy of a filled cache, made as a user would: ``copy.deepcopy``, a pickle round trip, or
    ``torch.save``/``torch.load(weights_only=False)``."""
    if how == "deepcopy":
        return copy.deepcopy(cache)
    if how == "pickle":
        return pickle.loads(pickle.dumps(cache))
    buffer = io.BytesIO()
    torch.save(cache, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _shared_prefix(tokenizer, document: str, prompts: list[dict], question: str) -> int:
    """How many leading tokens every prompt shares with the chat template's text up to the document's end,
    tokenized alone (the prefix a user would prefill once)."""
    messages = [{"role": "user", "content": f"{document}\n\n{question}"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text[: text.index(document) + len(document)], add_special_tokens=False)["input_ids"]
    shared = len(ids)
    for p in prompts:
        full = p["input_ids"][0, : len(ids)].tolist()
        shared = min(shared, next((i for i, (a, b) in enumerate(zip(ids, full, strict=True)) if a != b), len(ids)))
    return shared


def prefix(
    model,
    tokenizer,
    methods: list[str],
    length: int = 1024,
    samples: int = 8,
    max_new_tokens: int = 24,
    questions: int = 3,
    on_prompt: OnPrompt = None,
) -> dict:
    """``samples`` documents of about ``length`` tokens, ``questions`` questions each (the pass key, then keyed
    numbers): prefix-cached (the document prefilled once, a copy of its cache per question) against one prefill
    of document and question, per method. The copy is made by `copy_cache`, its ways taken in turn."""
    header = _header(
        "prefix", methods, length=length, samples=samples, max_new_tokens=max_new_tokens, questions=questions
    )

    def one_document(i: int) -> list[dict]:
        depth, seed = depths(samples)[i], 1000 * length + i
        document, facts = fact_document(tokenizer, length, depth, seed, n_keys=questions - 1)
        asks = facts[:questions]
        prompts = [chat_prompt(tokenizer, document, f.question) for f in asks]
        shared = _shared_prefix(tokenizer, document, prompts, asks[0].question)
        rows = []
        for method in methods:
            cache, failed = make_cache(method), None
            try:
                with torch.no_grad():
                    ids = prompts[0]["input_ids"][:, :shared]
                    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_ARGUMENT: cache})
            except Exception as error:
                failed = f"prefill of the document: {type(error).__name__}: {error}"
            for q, (fact, inputs) in enumerate(zip(asks, prompts, strict=True)):
                how = COPIES[q % len(COPIES)]
                base = {"task": fact.kind, "length": length, "depth": depth, "seed": seed, "question": q}
                base |= {"prompt_tokens": inputs["input_ids"].shape[1], "prefix_tokens": shared, "method": method}
                one, _ = generate(model, tokenizer, inputs, make_cache(method), max_new_tokens)
                rows.append({**base, "way": "one-prefill", "copy": None, **judged(one, fact.answer)})
                if failed:
                    fields = _error(failed)
                else:
                    fields = _from_copy(model, tokenizer, inputs, cache, how, max_new_tokens)
                same = fields["status"] == "ok" and fields["tokens"] == one["tokens"]
                rows.append(
                    {**base, "way": "prefix", "copy": how, **judged(fields, fact.answer), "same_as_one_prefill": same}
                )
            del cache
        return rows

    return _run(header, range(samples), one_document, on_prompt)


def _from_copy(model, tokenizer, inputs: dict, cache, how: str, max_new_tokens: int) -> dict:
    try:
        copied = copy_cache(cache, how)
    except Exception as error:
        return _error(f"{how}: {type(error).__name__}: {error}")
    return generate(model, tokenizer, inputs, copied, max_new_tokens)[0]


def prefix_summary(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "| method | one prefill | prefix cached | by copy | prefix vs one prefill, same prompts (95% interval) "
        "| prefix tokens identical to one prefill |",
        "|---|---|---|---|---|---|",
    ]
    for method in result["methods"]:
        one, cached = _select(rows, method=method, way="one-prefill"), _select(rows, method=method, way="prefix")
        if not cached:
            continue
        by_copy = ", ".join(f"{how} {_cell(_select(cached, copy=how))}" for how in COPIES)
        p = paired(rows, "prefix", "one-prefill", arm="way", prompt=("seed", "question"), method=method)
        same = sum(r["same_as_one_prefill"] for r in cached)
        lines.append(f"| {method} | {_cell(one)} | {_cell(cached)} | {by_copy} | {p} | {same}/{len(cached)} |")
    return "\n".join(lines + _error_lines(rows, ("method", "copy")))


# ------------------------------------------------------------------------------------------- assisted
def assisted(
    model,
    tokenizer,
    assistant,
    methods: list[str],
    length: int = 1024,
    samples: int = 12,
    max_new_tokens: int = 48,
    lookup: int = 10,
    on_prompt: OnPrompt = None,
) -> dict:
    """The pass-key prompts decoded greedily per method: plain, with ``prompt_lookup_num_tokens=lookup``, and
    with ``assistant_model=assistant`` (a second model, patched); each with a fresh cache of the method."""
    header = _header("assisted", methods, length=length, samples=samples, max_new_tokens=max_new_tokens, lookup=lookup)
    ways = {
        "plain": {},
        "prompt-lookup": {"prompt_lookup_num_tokens": lookup},
        "assistant": {"assistant_model": assistant},
    }

    def one_prompt(i: int) -> list[dict]:
        sample = passkey(tokenizer, length, depths(samples)[i], seed=1000 * length + i)
        prompt = {"task": sample.task, "length": length, "depth": sample.depth, "seed": sample.seed}
        rows = []
        for method in methods:
            for way, options in ways.items():
                fields, _ = generate(model, tokenizer, sample.inputs, make_cache(method), max_new_tokens, **options)
                if way == "plain":
                    plain = fields
                same = None
                if way != "plain" and plain["status"] == fields["status"] == "ok":
                    same = fields["tokens"] == plain["tokens"]
                rows.append(
                    {**prompt, "method": method, "way": way, **judged(fields, sample.answer), "same_as_plain": same}
                )
        return rows

    return _run(header, range(samples), one_prompt, on_prompt)


def assisted_summary(result: dict) -> str:
    rows = result["rows"]
    lines = ["| method | way | right | ran / errors | tokens identical to plain greedy |", "|---|---|---|---|---|"]
    for method in result["methods"]:
        for way in ("plain", "prompt-lookup", "assistant"):
            mine = _select(rows, method=method, way=way)
            if not mine:
                continue
            ran = sum(r["status"] == "ok" for r in mine)
            compared = [r for r in mine if r["same_as_plain"] is not None]
            same = "" if way == "plain" else f"{sum(r['same_as_plain'] for r in compared)}/{len(compared)}"
            right = sum(r["correct"] for r in mine)
            lines.append(f"| {method} | {way} | {right}/{len(mine)} | {ran} / {len(mine) - ran} | {same} |")
    return "\n".join(lines + _error_lines(rows, ("method", "way")))


# ----------------------------------------------------------------------------------------------- main
SUMMARIES = {
    "chat": chat_summary,
    "chunked": chunked_summary,
    "prefix": prefix_summary,
    "assisted": assisted_summary,
}

DEFAULTS = {
    "chat": dict(methods="dynamic,think-0,think-0.4,think-0.5", length=1024, samples=12, max_new_tokens=24),
    "chunked": dict(
        methods="dynamic,think-0.4,think-0.5,snapkv-512+think-0.4", length=2048, samples=24, max_new_tokens=12
    ),
    "prefix": dict(methods="dynamic,think-0.4,think-0.5", length=1024, samples=8, max_new_tokens=24),
    "assisted": dict(
        methods="dynamic,think-0.5,snapkv-512+think-0.5,h2o-512+think-0.5,streaming-512+think-0.5",
        length=1024,
        samples=12,
        max_new_tokens=48,
    ),
}

_HELP = {
    "chat": "multi-turn document chats, one cache reused vs a fresh cache per turn",
    "chunked": "pass keys with prefill_chunk_size",
    "prefix": "a document prefilled once, its cache copied per question",
    "assisted": "prompt lookup and an assistant model against plain greedy decoding",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summarize", metavar="JSON", help="print the tables of a results file and run nothing")
    parts = parser.add_subparsers(dest="part", metavar="{" + ",".join(DEFAULTS) + "}")
    for part, defaults in DEFAULTS.items():
        sub = parts.add_parser(part, help=_HELP[part], description=_HELP[part])
        sub.add_argument(
            "--methods",
            default=defaults["methods"],
            help=f"comma-separated: {method_help(quantized=False)} (default %(default)s)",
        )
        sub.add_argument("--length", type=int, default=defaults["length"], help="prompt tokens (default %(default)s)")
        unit = {"chat": "chats", "prefix": "documents"}.get(part, "prompts")
        sub.add_argument("--samples", type=int, default=defaults["samples"], help=f"{unit} (default %(default)s)")
        sub.add_argument(
            "--max-new-tokens", type=int, default=defaults["max_new_tokens"], help="per reply (default %(default)s)"
        )
        sub.add_argument(
            "--tag", default=DEFAULT_TAG, help=f"<results-dir>/conversations_{part}_<tag>.json (default %(default)s)"
        )
        sub.add_argument(
            "--results-dir", type=Path, default=RESULTS, help="where the results file goes (default benchmarks/results)"
        )
        sub.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
        if part == "chunked":
            sub.add_argument(
                "--chunks", default="none,32,64,256", help="prefill_chunk_size values (default %(default)s)"
            )
        if part == "chat":
            sub.add_argument("--ways", default=",".join(CHAT_WAYS), help="which ways (default %(default)s)")
        if part == "prefix":
            sub.add_argument("--questions", type=int, default=3, help="questions per document (default %(default)s)")
        if part == "assisted":
            sub.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens (default %(default)s)")
    return parser


def parse_chunks(text: str) -> tuple[int | None, ...]:
    """``--chunks``: ``none,32,64`` -> ``(None, 32, 64)`` (none: one prefill); ValueError for anything else."""
    return tuple(
        None if c == "none" else positive_ints(c, "--chunks (sizes above zero, or none)")[0] for c in text.split(",")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before the model loads (`parser.error` with what to pass): the part, its methods,
    sizes, ways and chunks; ``methods``, ``ways`` and ``chunks`` made ready to use."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.summarize:
        return args
    if args.part is None:
        parser.error("name a part (chat, chunked, prefix, assisted) or give --summarize")
    try:
        args.methods = check_methods(args.methods.split(","), quantized=False)
        if args.part == "chat":
            unknown = sorted(set(args.ways.split(",")) - set(CHAT_WAYS))
            if unknown:
                raise ValueError(f"unknown chat ways {unknown}: --ways takes {','.join(CHAT_WAYS)}")
            args.ways = tuple(args.ways.split(","))
        if args.part == "chunked":
            args.chunks = parse_chunks(args.chunks)
    except ValueError as error:
        parser.error(str(error))
    for option in ("length", "samples", "max_new_tokens", "questions", "lookup", "threads"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be 1 or more, not {value}")
    args.path = args.results_dir / f"conversations_{args.part}_{args.tag}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        try:
            result = load_results(args.summarize, "conversations")
        except ValueError as error:
            raise SystemExit(str(error)) from None
        if result["part"] not in SUMMARIES:
            raise SystemExit(f"--summarize: {args.summarize} holds part {result['part']!r}, none of {list(SUMMARIES)}")
        print(SUMMARIES[result["part"]](result))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from think_cache.models import load_smollm2

    model, tokenizer = load_smollm2()
    think_cache.patch(model)
    path = args.path
    common = dict(
        methods=args.methods,
        length=args.length,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        on_prompt=lambda partial: save_json(partial, path),  # an interrupted run keeps what it measured
    )
    if args.part == "chat":
        result = chat(model, tokenizer, ways=args.ways, **common)
    elif args.part == "chunked":
        result = chunked(model, tokenizer, chunks=args.chunks, **common)
    elif args.part == "prefix":
        result = prefix(model, tokenizer, questions=args.questions, **common)
    else:
        assistant, _ = load_smollm2()  # a second instance, loaded separately
        result = assisted(model, tokenizer, think_cache.patch(assistant), lookup=args.lookup, **common)
    save_json(result, path)
    print(SUMMARIES[args.part](result))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
