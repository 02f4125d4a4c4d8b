"""What the benchmarks share: the tasks, the methods by name, one prefill replayed into every method's cache,
greedy decoding, and JSON results with the machine they came from."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache, QuantizedCache, StaticCache

import think_cache
from think_cache import H2O, SnapKV, StreamingLLM, ThinKCache
from think_cache.demo import Question, document_prompt, fill_to_tokens

RESULTS = Path(__file__).parent / "results"


# ------------------------------------------------------------------------------------------------ tasks
@dataclass
class Sample:
    task: str
    length: int
    depth: float
    seed: int
    inputs: dict
    answer: str


PASSKEY_STATEMENT = "The pass key is {0}. Remember it. {0} is the pass key."
PASSKEY_QUESTION = Question("What is the pass key?", "Answer with the number only.", "The pass key is")
KV_STATEMENT = "The number of the {} box is {}."


def kv_question(name: str) -> Question:
    """The key-value task's question about the ``name`` box."""
    ask, answer_start = f"What is the number of the {name} box?", f"The number of the {name} box is"
    return Question(ask, "Answer with the number only.", answer_start)


def passkey(tokenizer, n_tokens: int, depth: float, seed: int, style: str | None = None) -> Sample:
    """A five-digit pass key stated once at ``depth`` in about ``n_tokens`` tokens of varied filler. ``style``:
    ``chat`` or ``completion`` (default: chat when the tokenizer has a chat template; see
    `think_cache.demo.prompt_style`)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    sentences = fill_to_tokens(tokenizer, rng, n_tokens - 50)
    sentences.insert(round(len(sentences) * depth), PASSKEY_STATEMENT.format(key))
    inputs = document_prompt(tokenizer, " ".join(sentences), PASSKEY_QUESTION, style)
    return Sample("passkey", n_tokens, depth, seed, inputs, key)


_KEY_NAMES = (
    "amber",
    "birch",
    "cobalt",
    "delta",
    "ember",
    "fjord",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lumen",
    "maple",
    "nectar",
    "onyx",
    "pepper",
    "quartz",
    "raven",
    "saffron",
    "tundra",
    "violet",
    "willow",
    "yarrow",
    "zephyr",
    "falcon",
    "canyon",
    "meadow",
    "glacier",
    "lotus",
    "cedar",
)


def kv_retrieval(
    tokenizer, n_tokens: int, depth: float, seed: int, style: str | None = None, n_keys: int = 12
) -> Sample:
    """Key-value retrieval: ``n_keys`` keyed five-digit numbers ("The number of the amber box is 12345.") spread
    through about ``n_tokens`` tokens of filler; the question asks for the one nearest ``depth``. Harder than the
    pass key: every key looks like the answer (SmolLM2-135M gets about a third right at 1k tokens). ``style`` as
    in `passkey`."""
    rng = random.Random(seed)
    pairs = [(name, rng.randint(10000, 99999)) for name in rng.sample(_KEY_NAMES, n_keys)]
    sentences = fill_to_tokens(tokenizer, rng, n_tokens - 20 * n_keys)
    step = len(sentences) // n_keys
    for i, (name, value) in enumerate(pairs):
        sentences.insert(i * (step + 1) + rng.randint(0, step - 1), KV_STATEMENT.format(name, value))
    name, value = pairs[min(int(depth * n_keys), n_keys - 1)]
    inputs = document_prompt(tokenizer, " ".join(sentences), kv_question(name), style)
    return Sample("kv", n_tokens, depth, seed, inputs, str(value))


TASKS = {"passkey": passkey, "kv": kv_retrieval}

_PEOPLE = ("Marta Oyelaran", "Tomas Brevik", "Ines Kovalenko", "Pavel Achebe", "Lena Marchetti", "Omar Lindqvist")
_CITIES = ("Lisbon", "Nairobi", "Kyoto", "Quito", "Tromso", "Hanoi", "Tunis", "Riga", "Perth", "Zagreb")


@dataclass
class Fact:
    """One fact hidden in a document: its sentence, the question that asks for it, and the expected answer."""

    kind: str  # passkey, kv or place
    statement: str
    question: str
    answer: str


def fact_document(tokenizer, n_tokens: int, depth: float, seed: int, n_keys: int = 1) -> tuple[str, list[Fact]]:
    """About ``n_tokens`` tokens of varied filler hiding several facts, for questions asked one after another about
    one document: a pass key (at ``depth``), ``n_keys`` keyed five-digit numbers and a person's home town (each at
    a random place; SmolLM2 finds a home town far more often than where someone "lives"). Returns the document
    and the facts in that order."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    facts = [Fact("passkey", PASSKEY_STATEMENT.format(key), PASSKEY_QUESTION.chat, key)]
    for name in rng.sample(_KEY_NAMES, n_keys):
        value = str(rng.randint(10000, 99999))
        facts.append(Fact("kv", KV_STATEMENT.format(name, value), kv_question(name).chat, value))
    person, city = rng.choice(_PEOPLE), rng.choice(_CITIES)
    facts.append(
        Fact(
            "place",
            f"The home town of {person} is {city}.",
            f"What is the home town of {person}? Answer with the town only.",
            city,
        )
    )
    sentences = fill_to_tokens(tokenizer, rng, n_tokens - 30 - 15 * len(facts))
    places = [round(len(sentences) * depth)] + [rng.randint(0, len(sentences)) for _ in facts[1:]]
    # back to front, so that inserting one fact leaves the places of those before it as they were
    for place, fact in sorted(zip(places, facts, strict=True), key=lambda p: -p[0]):
        sentences.insert(place, fact.statement)
    return " ".join(sentences), facts


# ---------------------------------------------------------------------------------------------- methods
#: The size of a ``static`` part when the caller gives none (to describe or validate a method name).
STATIC_DEFAULT_LEN = 4096


def quanto_available() -> bool:
    """Whether transformers' ``QuantizedCache(backend="quanto")`` can be built (the ``optimum-quanto`` package)."""
    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def needs_quanto(method: str) -> bool:
    return method.startswith("quantized-")


def available_methods(methods: list[str]) -> list[str]:
    """``methods`` less transformers' ``QuantizedCache`` ones when optimum-quanto is absent (with a message)."""
    if quanto_available():
        return methods
    skipped = [m for m in methods if needs_quanto(m)]
    if skipped:
        print(
            f"skipping {', '.join(skipped)}: transformers' QuantizedCache(backend='quanto') needs optimum-quanto "
            "(pip install 'think-cache[bench]' or pip install 'optimum-quanto>=0.2')"
        )
    return [m for m in methods if not needs_quanto(m)]


def needs_patch(method: str) -> bool:
    """Whether a method's cache is a ThinKCache, which needs `think_cache.patch`; transformers' own caches
    (``dynamic``, ``static``, ``quantized-N``, ``unpatched``) run on any model."""
    return method not in ("dynamic", "static", "unpatched") and not needs_quanto(method)


def set_patched(model, patched: bool) -> None:
    """Patch or unpatch ``model`` as a method needs (both cheap: hooks and the attention implementation's name)."""
    if patched and not think_cache.is_patched(model):
        think_cache.patch(model)
    elif not patched and think_cache.is_patched(model):
        think_cache.unpatch(model)


#: The parts a ThinKCache method name joins with ``+`` (each at most once, and one token policy at most).
METHOD_PARTS = {
    "think": ("think-R", "prune a fraction R of the key channels (0 <= R < 1)", float),
    "value": ("value-R", "prune a fraction R of the value channels", float),
    "recent": ("recent-N", "keep the last N tokens full width", int),
    "snapkv": ("snapkv-B", "SnapKV keeps B prompt tokens per head", int),
    "h2o": ("h2o-B", "H2O keeps B tokens per head (32 of them recent)", int),
    "streaming": ("streaming-B", "StreamingLLM keeps 4 sink tokens and B - 4 recent ones", int),
    "int2": ("int2", "2-bit compact storage", None),
    "int4": ("int4", "4-bit compact storage", None),
    "int8": ("int8", "8-bit compact storage", None),
    "g": ("g-N", "value group size N of the quantized storage", int),
    "static": ("static or static-N", "a static, compileable cache (of N tokens)", int),
}
_POLICY_PARTS = ("snapkv", "h2o", "streaming")
_BITS_PARTS = ("int2", "int4", "int8")
_POLICIES = {
    "snapkv": lambda budget: SnapKV(budget=budget),
    "h2o": lambda budget: H2O(budget=budget, recent=32),
    "streaming": lambda budget: StreamingLLM(sink=4, recent=budget - 4),
}
#: The bit widths of transformers' QuantizedCache with the quanto backend (``quantized-N``).
QUANTO_BITS = (2, 4)


def method_help(names: tuple[str, ...] = ("dynamic",), quantized: bool = True) -> str:
    """The method names a benchmark takes, for its ``--help``: ``names`` alone, ``quantized-N`` and the
    ``+``-joined parts of a ThinKCache."""
    forms = list(names) + (["quantized-2", "quantized-4"] if quantized else [])
    parts = ", ".join(form for form, _, _ in METHOD_PARTS.values())
    return f"{', '.join(forms)}, or ThinKCache parts joined by + (each once, one token policy at most): {parts}"


def method_settings(method: str, max_cache_len: int | None = None) -> dict:
    """The ThinKCache keyword arguments a ``+``-joined method name means (`make_cache`), the token policy as
    ``policy`` (its budget) and ``policy_kind``. Raises ValueError naming the method and the part for a malformed
    or unknown part, a part given twice and two token policies or bit widths."""
    settings: dict = {"key_ratio": 0.0}
    seen: dict[str, str] = {}
    for part in method.split("+"):
        kind, dash, arg = part.partition("-")
        if kind not in METHOD_PARTS:
            raise ValueError(f"unknown method part {part!r} in {method!r}: {method_help()}")
        form, _, parse = METHOD_PARTS[kind]
        takes_arg = parse is not None and not (kind == "static" and not dash)
        if takes_arg:
            try:
                value = parse(arg)
            except ValueError:
                raise ValueError(f"method {method!r}: part {part!r} is malformed, write it as {form}") from None
        elif dash:
            raise ValueError(f"method {method!r}: part {part!r} is malformed, write it as {form}")
        group = "policy" if kind in _POLICY_PARTS else "bits" if kind in _BITS_PARTS else kind
        if group in seen:
            what, fix = {
                "policy": ("two token policies", "keep one of snapkv-B, h2o-B, streaming-B"),
                "bits": ("two bit widths", "keep one of int2, int4, int8"),
            }.get(group, (f"{form} twice", "give each part once"))
            raise ValueError(f"method {method!r} has {what} ({seen[group]}, {part}): {fix}")
        seen[group] = part
        if kind == "think":
            settings["key_ratio"] = value
        elif kind == "value":
            settings["value_ratio"] = value
        elif kind == "recent":
            settings["recent"] = value
        elif group == "policy":
            settings["policy"], settings["policy_kind"] = value, kind
        elif group == "bits":
            settings["bits"] = int(kind[3:])
        elif kind == "static":
            settings["max_cache_len"] = value if takes_arg else max_cache_len or STATIC_DEFAULT_LEN
        else:  # g
            settings["group_size"] = value
    return settings


def check_methods(methods: list[str], names: tuple[str, ...] = ("dynamic",), quantized: bool = True) -> list[str]:
    """``methods`` if every one is a method a benchmark can build: one of ``names`` (transformers' caches the
    benchmark handles itself), ``quantized-2``/``quantized-4`` when ``quantized``, or a ThinKCache whose parts
    `method_settings` reads and whose settings ThinKCache accepts (built once, without a model). Else ValueError
    naming the method, for an argument parser to report before the model loads."""
    if not methods or any(not m for m in methods):
        given = ",".join(methods)
        raise ValueError(f"empty method name in {given!r}: give comma-separated names, {method_help(names, quantized)}")
    for method in methods:
        if method in names:
            continue
        if needs_quanto(method) or method in ("dynamic", "static", "unpatched"):
            bits = method.partition("-")[2]
            if quantized and needs_quanto(method) and bits in {str(b) for b in QUANTO_BITS}:
                continue
            raise ValueError(f"method {method!r} is not one this benchmark runs: {method_help(names, quantized)}")
        try:
            make_cache(method)
        except (ValueError, TypeError) as error:
            message = str(error)
            raise ValueError(message if repr(method) in message else f"method {method!r}: {message}") from None
    return methods


def make_cache(method: str, config=None, max_cache_len: int | None = None):
    """A cache from a method name: ``dynamic`` (transformers' DynamicCache, given ``config`` as ``generate`` builds
    it); ``quantized-N``, transformers' ``QuantizedCache`` with the quanto
    backend at N = 2 or 4 bits and its defaults (64-channel groups, 128 full-precision residual tokens; needs
    ``config``, the model's, and optimum-quanto); or ``+``-joined parts among ``think-R`` (key ratio),
    ``value-R`` (value ratio), ``recent-N`` (full-width recent tokens), ``snapkv-B``, ``h2o-B`` and
    ``streaming-B`` (token budgets), ``int2``/``int4``/``int8`` (quantized compact storage), ``g-N`` (value
    group size of the quantized storage), ``static`` (a static,
    compileable ThinKCache of ``max_cache_len`` tokens) or ``static-N`` (of ``N`` tokens). A bare ``static`` is
    transformers' StaticCache of ``max_cache_len`` tokens (it needs ``config``).

    >>> make_cache("snapkv-256+think-0.5")  # SnapKV keeps 256 tokens per head, ThinK prunes half their key channels
    >>> make_cache("think-0.5+static", max_cache_len=2048 + 64)  # compileable; the benchmarks compile its decoding
    """
    if method == "dynamic":  # as generate builds it: with the config, sliding-window layers keep only their window
        return DynamicCache() if config is None else DynamicCache(config=config)
    if method == "static":
        if config is None or max_cache_len is None:
            raise ValueError("'static' is transformers' StaticCache: it needs the model's config and max_cache_len")
        return StaticCache(config=config, max_cache_len=max_cache_len)
    if needs_quanto(method):
        nbits = int(method.partition("-")[2])
        if not quanto_available():
            raise ModuleNotFoundError(
                f"{method} is transformers' QuantizedCache(backend='quanto'), which needs optimum-quanto: "
                "pip install 'optimum-quanto>=0.2'"
            )
        if config is None:
            raise ValueError(f"{method}: transformers' QuantizedCache needs the model's config")
        return QuantizedCache(backend="quanto", config=config, nbits=nbits)
    settings = method_settings(method, max_cache_len)
    if "policy" in settings:
        settings["policy"] = _POLICIES[settings.pop("policy_kind")](settings["policy"])
    return ThinKCache(**settings)


def describe(methods: list[str]) -> dict[str, str]:
    """Each method's cache with its settings (its ``repr``), for result files: defaults change between versions."""
    out = {}
    for m in methods:
        if m == "dynamic":
            out[m] = "DynamicCache(config=model.config)"
        elif m == "unpatched":
            out[m] = "DynamicCache() on the model before think_cache.patch"
        elif m == "static":
            out[m] = "StaticCache(max_cache_len=prompt + decoded tokens)"
        elif needs_quanto(m):
            bits = m.partition("-")[2]
            out[m] = f"QuantizedCache(backend='quanto', nbits={bits}, q_group_size=64, residual_length=128)"
        else:
            out[m] = repr(make_cache(m))
    return out


def depths(n: int) -> list[float]:
    """``n`` depths spread evenly over (0, 1): prompt ``i`` of a task and length puts its answer at ``depths(n)[i]``
    (with seed ``1000 * length + i``), in every benchmark, so their rows can be matched prompt by prompt."""
    return [round((i + 0.5) / n, 3) for i in range(n)]


def baseline_of(method: str) -> str | None:
    """The cache a method thins: ``snapkv-512+think-0.4`` -> ``snapkv-512``; ``think-0.4`` -> ``dynamic``;
    None for methods that thin nothing (``dynamic``, ``snapkv-512``). Quantized storage is measured against the
    same method at full precision: ``think-0.4+int4`` -> ``think-0.4``."""
    if needs_quanto(method):
        return "dynamic"
    parts = [p for p in method.split("+") if not p.startswith("g-")]
    unquantized = [p for p in parts if p not in ("int2", "int4", "int8")]
    if len(unquantized) < len(parts):
        return "+".join(unquantized) or "dynamic"
    kept = [p for p in parts if not p.startswith(("think-", "value-", "recent-"))]
    if len(kept) == len(parts):
        return None
    return "+".join(kept) or "dynamic"


def baselines_of(method: str, methods: list[str]) -> list[str]:
    """Every method among ``methods`` that ``method`` is worth comparing with on the same prompts: its
    `baseline_of`, and for quantized storage also DynamicCache (what the 2-bit goal counts against)."""
    out = [baseline_of(method)]
    if any(p in ("int2", "int4", "int8") for p in method.split("+")):
        out.append("dynamic")
    return [b for i, b in enumerate(out) if b is not None and b in methods and b not in out[:i]]


# --------------------------------------------------------------------------------------- shared prefill
@dataclass
class Prefill:
    """One prompt's prefill, recorded: per layer its keys, values and last queries (none on an unpatched model),
    and the last logits."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]
    logits: torch.Tensor
    seconds: float


@contextlib.contextmanager
def _queries_seen(queries: dict[int, torch.Tensor], keep_queries: int | None):
    """While open, the ThinK attention function also stores each layer's last ``keep_queries`` queries (all of
    them with None) in ``queries``, by layer index."""
    first = 0 if keep_queries is None else -keep_queries
    original = AttentionInterface._global_mapping[think_cache.ATTENTION_NAME]

    def spy(module, query, key, value, attention_mask, **kwargs):
        queries[module.layer_idx] = query[:, :, first:].clone()
        return original(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(think_cache.ATTENTION_NAME, spy)
    try:
        yield queries
    finally:
        AttentionInterface.register(think_cache.ATTENTION_NAME, original)


def record_prefill(model, input_ids: torch.Tensor, keep_queries: int | None = 64) -> Prefill:
    """Run the prompt once. Under ThinK (and SnapKV) the prefill attends over full keys whatever the method, and
    each layer is compacted from that layer's own keys, values and queries, so `cache_from_prefill` rebuilds any
    method's cache exactly from this record. The prompt's ``keep_queries`` last queries are kept per layer (all of
    them with None, which H2O's prompt scores need) when the model is patched (ThinK's methods need that; on an
    unpatched model only transformers' own caches can be rebuilt). Every layer keeps all its keys, sliding or not,
    and only the last position's logits are computed (a 262k vocabulary over 8k tokens would take 8 GB)."""
    queries: dict[int, torch.Tensor] = {}
    cache = DynamicCache()
    seeing = _queries_seen(queries, keep_queries) if think_cache.is_patched(model) else contextlib.nullcontext()
    with seeing, torch.no_grad():
        start = time.perf_counter()
        out = model(
            input_ids=input_ids, use_cache=True, logits_to_keep=1, **{think_cache._compat.CACHE_ARGUMENT: cache}
        )
        seconds = time.perf_counter() - start
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return Prefill(keys, values, [queries[i] for i in sorted(queries)], out.logits[:, -1], seconds)


def attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]


def _softcap(module) -> float | None:
    """The logit cap the model passes its attention function (only Gemma 2's attention passes one)."""
    config = module.config
    return getattr(config, "attn_logit_softcapping", None) if config.model_type == "gemma2" else None


def cache_from_prefill(model, method: str, prefill: Prefill):
    """The cache ``method`` would hold after the recorded prefill (exactly: see `record_prefill`)."""
    cache = make_cache(method, model.config)
    if not isinstance(cache, ThinKCache):  # DynamicCache, QuantizedCache: what their first update would hold
        for i, (k, v) in enumerate(zip(prefill.keys, prefill.values, strict=True)):
            cache.update(k.clone(), v.clone(), i)
        for layer in cache.layers if isinstance(cache, DynamicCache) else ():
            if getattr(layer, "is_sliding", False):  # its window is a view of the whole prompt until the next step
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        return cache
    if not prefill.queries:
        raise ValueError(f"{method} needs the prompt's queries: think_cache.patch(model) before record_prefill")
    cache._model_config = model.config
    for module, k, v, q in zip(attention_modules(model), prefill.keys, prefill.values, prefill.queries, strict=True):
        layer = cache._new_layer(module)  # what ThinKCache.update does on a layer's first call
        cache.layers.append(layer)
        layer.update(k.clone(), v.clone())
        layer.observe(q, None, module.scaling, softcap=_softcap(module))
        layer.compact()
    return cache


def tell_prompt_length(cache, input_ids: torch.Tensor) -> None:
    """Benchmarks that drive the forward loop themselves tell a ThinKCache where the prompt ends, as the patched
    ``generate`` does for every call, so that it is compacted at the end of the prefill forward."""
    if isinstance(cache, ThinKCache):
        cache.mark_prompt_end(input_ids.shape[1])


def greedy_decode(model, cache, first_token: torch.Tensor, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy tokens after the prompt, the first one given (from the prefill's logits)."""
    tokens = [int(first_token)]
    token = first_token.view(1, 1)
    with torch.no_grad():
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            out = model(input_ids=token, use_cache=True, **{think_cache._compat.CACHE_ARGUMENT: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
    return tokens


def answer_log_probs(model, cache, tokens: list[int]) -> torch.Tensor:
    """``(len(tokens) - 1, vocab)`` float32 log-probabilities of each next token of an answer ``tokens`` (its first
    token predicted by the prefill), teacher-forced over ``cache``, which holds the prompt.

    The tokens go in one a step, as greedy decoding feeds them: a ThinK cache folds waiting tokens into its compact
    part per forward, so one forward over the whole answer would thin its first tokens before the later ones
    attend to them, which decoding does not (the same cache's own greedy answer then lost its argmax). Fed this way
    the argmax is the cache's greedy token wherever the answer so far is its own."""
    if len(tokens) < 2:
        return torch.zeros(0, model.config.vocab_size)
    steps = []
    with torch.no_grad():
        for token in tokens[:-1]:
            out = model(
                input_ids=torch.tensor([[token]]), use_cache=True, **{think_cache._compat.CACHE_ARGUMENT: cache}
            )
            steps.append(out.logits[0, -1])
    return torch.stack(steps).float().log_softmax(-1)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``KL(reference || other)`` of log-probabilities ``(positions, vocab)``, summed over the positions (nats)."""
    return float((reference.exp() * (reference - other)).sum())


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def is_correct(answer_text: str, expected: str) -> bool:
    """A number must stand whole in the answer (12345 is not in 123456); a word (a city) as a word, in any case."""
    if expected.isdigit():
        return expected in re.findall(r"\d+", answer_text)
    return re.search(rf"\b{re.escape(expected)}\b", answer_text, re.IGNORECASE) is not None


# ------------------------------------------------------------------------------------------------- JSON
def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "think_cache": think_cache.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_state(folder: Path = Path(__file__).parent) -> tuple[str | None, bool | None]:
    """The commit checked out where ``folder`` lies and whether tracked files differ from it (None, None outside
    a git work tree or without git)."""
    try:
        run = dict(cwd=folder, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(changes.strip())


def provenance(argv: list[str] | None = None) -> dict:
    """Where a results file comes from, for its header: the machine (`machine`), the UTC date and time (ISO
    8601), the command line (``argv``, default ``sys.argv``), the git commit of the code (None when unknown) and
    whether the work tree differed from it (``git_dirty``)."""
    commit, dirty = git_state()
    return {
        "machine": machine(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv if argv is None else argv),
        "git_commit": commit,
        "git_dirty": dirty,
    }


#: The default tag of a new results file: no committed file in benchmarks/results uses it.
DEFAULT_TAG = "local"


def result_tag(base: str, model_name: str) -> str:
    """A results file's default tag: ``base`` for SmolLM2, whose results came first, else ``base_<model>``
    (``local_gemma3``), so another model never overwrites them."""
    return base if model_name == "smollm2" else f"{base}_{model_name}"


def max_context(config) -> int | None:
    """The longest context a model was trained for (``max_position_embeddings`` of its text config), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def beyond_context(lengths: list[int], limit: int | None) -> list[int]:
    """The ``lengths`` at or past a model's ``limit`` (`max_context`; none when it is unknown)."""
    return [n for n in lengths if limit is not None and n >= limit]


def warn_beyond_context(lengths: list[int], limit: int | None, model: str) -> list[int]:
    """Say once on stderr which ``lengths`` reach past the model's context (their results measure a model out of
    its range: positions it never saw); returns them."""
    beyond = beyond_context(lengths, limit)
    if beyond:
        print(
            f"warning: {model} was trained for {limit} positions (max_position_embeddings); lengths "
            f"{', '.join(map(str, beyond))} reach past it, so their results measure the model out of its range "
            "(their rows say beyond_context: true)",
            file=sys.stderr,
        )
    return beyond


def results_kind(data: object) -> str:
    """Which benchmark wrote a results file's contents: ``eval``, ``speed``, ``conversations``, ``sweep`` (runs of
    eval in one file), ``gpu``, ``kernel_check`` or ``unknown``."""
    if not isinstance(data, dict):
        return "unknown"
    if "part" in data and "rows" in data:
        return "conversations"
    if "runs" in data:
        return "sweep"
    if "tasks" in data and "rows" in data:
        return "eval"
    if "decode_tokens" in data and "rows" in data:
        return "speed"
    if "checks" in data or "compile_for" in data:
        return "kernel_check"
    if "cells" in data:
        return "gpu"
    return "unknown"


def load_results(path: str | Path, kind: str) -> dict:
    """A results file of benchmark ``kind`` (`results_kind`), read for ``--summarize``; ValueError saying what to
    pass instead for a missing file, one that is not JSON, or one another benchmark wrote."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--summarize: no results file at {path}: pass the path of {kind} results (a JSON file)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--summarize: {path} is not JSON ({error})") from None
    found = results_kind(data)
    if found != kind:
        hint = f"; summarize it with {SUMMARIZERS[found]}" if found in SUMMARIZERS else ""
        raise ValueError(f"--summarize: {path} holds {found} results, not {kind} results{hint}")
    return data


#: The command that prints the tables of a results file, by `results_kind`.
SUMMARIZERS = {
    "eval": "python -m benchmarks.eval --summarize FILE",
    "conversations": "python -m benchmarks.conversations --summarize FILE",
    "gpu": "python -m benchmarks.gpu --plot-only FILE",
}


def positive_ints(text: str, what: str) -> list[int]:
    """Comma-separated whole numbers above zero (``--lengths 1024,2048``); ValueError naming ``what`` else."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} takes comma-separated whole numbers (1024,2048), not {text!r}") from None
    bad = [v for v in values if v <= 0]
    if bad:
        raise ValueError(f"{what} must be above zero, not {', '.join(map(str, bad))}")
    return values


def profile_rows(profiler, per: int, where: Callable[[str], str | None]) -> list[dict]:
    """A cProfile run's functions, each counted per ``per`` (steps, or layers times steps): its calls, own and
    cumulative µs, for the functions whose file ``where`` names (None leaves one out); unsorted."""
    import pstats

    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in pstats.Stats(profiler).stats.items():
        file = where(path)
        if file is not None:
            rows.append(
                {
                    "function": f"{file}:{line}({name})",
                    "calls": calls / per,
                    "own_us": 1e6 * own / per,
                    "cumulative_us": 1e6 * cumulative / per,
                }
            )
    return rows


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no display), imported only when a benchmark plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_json(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)  # atomic: an interrupt never leaves half a file
    return path


@dataclass
class Paired:
    """``method`` against ``baseline`` on the same prompts: accuracy difference in points, with the prompts it
    got right where the baseline did not (``gained``) and the reverse (``lost``), and a 95% interval
    (Agresti-Min: half a prompt added to each cell of the paired 2x2 table, so that no change on a few prompts
    still gives an honest width rather than zero)."""

    n: int
    gained: int
    lost: int

    @property
    def delta(self) -> float:
        return 100 * (self.gained - self.lost) / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        n = self.n + 2
        up, down = (self.gained + 0.5) / n, (self.lost + 0.5) / n
        centre = up - down
        half = 1.96 * ((up + down - centre**2) / n) ** 0.5
        return 100 * max(centre - half, -1.0), 100 * min(centre + half, 1.0)

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{self.delta:+.1f} points ({self.gained} gained / {self.lost} lost of {self.n}; {lo:+.1f} to {hi:+.1f})"


def paired(
    rows: list[dict],
    method,
    baseline,
    /,
    *,
    arm: str = "method",
    prompt: tuple[str, ...] = ("task", "length", "seed"),
    **where,
) -> Paired:
    """Compare two methods prompt by prompt (prompts keyed by task, length and seed), over rows matching ``where``.

    ``arm`` names the field that tells the two apart (``method`` and ``baseline`` are its values: two ways of
    running one method, say) and ``prompt`` the fields that make a prompt (add ``turn`` for a chat's turns)."""
    outcome: dict[tuple[object, tuple], bool] = {}
    for row in rows:
        if row[arm] in (method, baseline) and all(row[k] == v for k, v in where.items()):
            outcome[row[arm], tuple(row[k] for k in prompt)] = bool(row["correct"])
    prompts = [key for m, key in outcome if m == method and (baseline, key) in outcome]
    gained = sum(outcome[method, k] and not outcome[baseline, k] for k in prompts)
    lost = sum(outcome[baseline, k] and not outcome[method, k] for k in prompts)
    return Paired(len(prompts), gained, lost)


def group_mean(rows: list[dict], keys: tuple[str, ...], value: str) -> dict[tuple, float]:
    sums: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        sums[tuple(row[k] for k in keys)].append(float(row[value]))
    return {k: sum(v) / len(v) for k, v in sums.items()}
