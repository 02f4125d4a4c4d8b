"""Memory and speed of each method against DynamicCache, in one run, on SmolLM2-135M-Instruct (or Gemma 3 270M:
``--model gemma3``).

    python -m benchmarks.speed --lengths 1024,2048,4096 --repeats 3

For every context length and method: the bytes the cache holds after the prompt and after the decode steps
(measured from its tensors; right after a prompt transformers' sliding layers still view the whole prompt, so on
Gemma 3 the second is DynamicCache's real footprint), the prefill time, and the median decode time per token.
Methods run interleaved, their order rotated each repeat, after a warm-up; each figure is the median over repeats
and is also given as a ratio to DynamicCache from the same run. Writes benchmarks/results/speed_<tag>.json
(``--results-dir`` for another folder; default tag ``local``), saved after each context length.

``unpatched`` is DynamicCache on the model before `think_cache.patch` (it is unpatched for that method and
patched again for the next), so ``dynamic`` against it is the cost of the patch alone::

    python -m benchmarks.speed --methods unpatched,dynamic,think-0.5 --lengths 1024,2048,4096

Methods with a ``static`` part decode compiled, ``torch.compile(model.forward, fullgraph=True)`` after an eager
prefill: ``static`` is transformers' StaticCache, ``think-0.5+static`` a static ThinKCache, both sized for the
prompt and the decoded tokens (the first steps, which compile, are warm-up)::

    python -m benchmarks.speed --methods dynamic,think-0.5,static,think-0.5+static --lengths 2048 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

import think_cache
from think_cache import _compat, held_bytes
from think_cache.models import MODELS, load_model

from .common import (
    DEFAULT_TAG,
    RESULTS,
    available_methods,
    check_methods,
    describe,
    make_cache,
    max_context,
    method_help,
    passkey,
    positive_ints,
    provenance,
    result_tag,
    save_json,
    set_patched,
    tell_prompt_length,
    warn_beyond_context,
)

DEFAULT_METHODS = (
    "dynamic,think-0.25,think-0.4,think-0.5,think-0.6,snapkv-256,snapkv-1024,"
    "snapkv-256+think-0.5,snapkv-1024+think-0.5,think-0.5+value-0.5"
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def is_compiled(method: str) -> bool:
    """Whether a method decodes under torch.compile: those with a static cache."""
    return any(part == "static" or part.startswith("static-") for part in method.split("+"))


def new_cache(model, method: str, max_cache_len: int):
    if method == "unpatched":
        return make_cache("dynamic")
    return make_cache(method, model.config, max_cache_len=max_cache_len)


def measure(
    model, input_ids: torch.Tensor, method: str, decode_tokens: int, warmup_tokens: int = 3, forward=None
) -> dict:
    """One prefill and ``decode_tokens`` greedy steps with a fresh cache of ``method``; decoding through
    ``forward`` (default: the model, eager)."""
    device = input_ids.device
    set_patched(model, method != "unpatched")
    cache = new_cache(model, method, input_ids.shape[1] + warmup_tokens + decode_tokens + 1)
    forward = forward or model
    kwargs = {_compat.CACHE_ARGUMENT: cache, "use_cache": True}
    tell_prompt_length(cache, input_ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=input_ids, logits_to_keep=1, **kwargs)
        _sync(device)
        prefill = time.perf_counter() - start
        held = held_bytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        del out
        steps = []
        for _ in range(warmup_tokens + decode_tokens):
            _sync(device)
            start = time.perf_counter()
            out = forward(input_ids=token, **kwargs)
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            steps.append(time.perf_counter() - start)
    row = {"prefill_s": prefill, "decode_s_per_token": statistics.median(steps[warmup_tokens:]), "held_bytes": held}
    # after decoding too: right after a prompt transformers' sliding layers still view the whole prompt (Gemma 3)
    row["held_bytes_decoded"] = held_bytes(cache)
    if device.type == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() - base
    return row


def run(
    methods: list[str],
    lengths: list[int],
    repeats: int,
    decode_tokens: int,
    device: str,
    dtype,
    model_name="smollm2",
    on_length: Callable[[dict], None] | None = None,
) -> dict:
    """Every method at every length (see the module docstring); ``on_length`` gets the partial result after each
    length (the command line saves it then, so an interrupted run keeps the lengths it measured)."""
    model, tokenizer = load_model(model_name, dtype=dtype)
    model = think_cache.patch(model.to(device))
    limit = max_context(model.config)
    beyond = warn_beyond_context(lengths, limit, MODELS[model_name][0])
    header = {
        **provenance(),
        "model": MODELS[model_name][0],
        "caches": describe(methods),
        "device": device,
        "dtype": str(dtype),
        "lengths": lengths,
        "repeats": repeats,
        "decode_tokens": decode_tokens,
        "max_position_embeddings": limit,
        "beyond_context": beyond,
    }
    # one compiled forward per method, reused: a fresh cache costs a recompile, the warm-up steps absorb it
    compiled = {m: torch.compile(model.forward, fullgraph=True) for m in methods if is_compiled(m)}
    rows = []
    for length in lengths:
        ids = passkey(tokenizer, length, 0.5, seed=length).inputs["input_ids"].to(device)
        measure(model, ids[:, : min(256, length)], "dynamic", 2)  # warm-up
        samples: dict[str, list[dict]] = {m: [] for m in methods}
        order = list(methods)
        for _ in tqdm(range(repeats), desc=f"{length} tokens", unit="repeat"):
            for method in order:
                forward = compiled[method] if is_compiled(method) else None
                samples[method].append(measure(model, ids, method, decode_tokens, forward=forward))
            order = order[1:] + order[:1]
        base = {k: statistics.median(s[k] for s in samples["dynamic"]) for k in samples["dynamic"][0]}
        for method in methods:
            row = {"length": length, "prompt_tokens": ids.shape[1], "method": method}
            if length in beyond:
                row["beyond_context"] = True
            for key in samples[method][0]:
                value = statistics.median(s[key] for s in samples[method])
                row[key] = value
                row[key + "_vs_dynamic"] = value / base[key]
            row["repeats"] = [s for s in samples[method]]
            rows.append(row)
        if on_length is not None:
            on_length({**header, "rows": rows})
    return {**header, "rows": rows}


def summary(result: dict) -> str:
    lines = [
        "| context | method | KV memory | after decoding | prefill | decode / token |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        decoded = "-"  # not in results files written before it was measured
        if "held_bytes_decoded" in r:
            decoded = f"{r['held_bytes_decoded'] / 2**20:.1f} MiB ({r['held_bytes_decoded_vs_dynamic']:.2f}x)"
        lines.append(
            f"| {r['length']} | {r['method']} | {r['held_bytes'] / 2**20:.1f} MiB ({r['held_bytes_vs_dynamic']:.2f}x) "
            f"| {decoded} "
            f"| {r['prefill_s']:.2f} s ({r['prefill_s_vs_dynamic']:.2f}x) "
            f"| {1000 * r['decode_s_per_token']:.1f} ms ({r['decode_s_per_token_vs_dynamic']:.2f}x) |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before anything loads (`parser.error` with what to pass); ``methods`` (with
    ``dynamic`` first when left out: the ratios need it), ``lengths`` and ``path`` made ready to use."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=list(MODELS), help="which model (default smollm2)")
    names = ("dynamic", "unpatched", "static")
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated: {method_help(names)}; dynamic is added when left out (default {DEFAULT_METHODS})",
    )
    parser.add_argument("--lengths", default="1024,2048,4096", help="context lengths in tokens (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every method per length (default %(default)s)")
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=16,
        help="timed decode steps per run, after 3 untimed (default %(default)s)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default cuda when available, else cpu; here %(default)s)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="(default %(default)s)"
    )
    parser.add_argument(
        "--tag", help=f"<results-dir>/speed_<tag>.json (default: {DEFAULT_TAG}, and the model unless smollm2)"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS, help="where the results file goes (default benchmarks/results)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    try:
        methods = check_methods(args.methods.split(","), names)
        args.lengths = positive_ints(args.lengths, "--lengths")
    except ValueError as error:
        parser.error(str(error))
    for option, value in (("--repeats", args.repeats), ("--decode-tokens", args.decode_tokens)):
        if value < 1:
            parser.error(f"{option} must be 1 or more, not {value}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be 1 or more, not {args.threads}")
    args.methods = methods if "dynamic" in methods else ["dynamic", *methods]
    args.path = args.results_dir / f"speed_{args.tag or result_tag(DEFAULT_TAG, args.model)}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    result = run(
        available_methods(args.methods),
        args.lengths,
        args.repeats,
        args.decode_tokens,
        args.device,
        dtype,
        args.model,
        on_length=lambda partial: save_json(partial, args.path),  # an interrupted run keeps the lengths it measured
    )
    path = save_json(result, args.path)
    print(summary(result))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
