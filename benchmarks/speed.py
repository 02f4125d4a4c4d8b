"""Memory and speed of each method against DynamicCache, in one run, on SmolLM2-135M-Instruct (or Gemma 3 270M:
``--model gemma3``).

    python -m benchmarks.speed --lengths 1024,2048,4096 --repeats 3

For every context length and method: the bytes the cache holds after the prompt and after the decode steps
(measured from its tensors; right after a prompt transformers' sliding layers still view the whole prompt, so on
Gemma 3 the second is DynamicCache's real footprint), the prefill time, and the median decode time per token.
Methods run interleaved, their order rotated each repeat, after a warm-up; each figure is the median over repeats
and is also given as a ratio to DynamicCache from the same run. Writes benchmarks/results/speed_<tag>.json.

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

import torch
from tqdm.auto import tqdm

import think_cache
from think_cache import _compat, held_bytes
from think_cache.models import MODELS, load_model

from .common import (
    RESULTS,
    available_methods,
    describe,
    machine,
    make_cache,
    passkey,
    result_tag,
    save_json,
    set_patched,
    tell_prompt_length,
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
    methods: list[str], lengths: list[int], repeats: int, decode_tokens: int, device: str, dtype, model_name="smollm2"
) -> dict:
    model, tokenizer = load_model(model_name, dtype=dtype)
    model = think_cache.patch(model.to(device))
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
            for key in samples[method][0]:
                value = statistics.median(s[key] for s in samples[method])
                row[key] = value
                row[key + "_vs_dynamic"] = value / base[key]
            row["repeats"] = [s for s in samples[method]]
            rows.append(row)
    return {
        "machine": machine(),
        "model": MODELS[model_name][0],
        "caches": describe(methods),
        "device": device,
        "dtype": str(dtype),
        "repeats": repeats,
        "decode_tokens": decode_tokens,
        "rows": rows,
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=list(MODELS), help="which model (default smollm2)")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tag", help="results/speed_<tag>.json (default: the device, and the model unless smollm2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = available_methods(args.methods.split(","))
    if "dynamic" not in methods:
        methods.insert(0, "dynamic")
    lengths = [int(n) for n in args.lengths.split(",")]
    dtype = getattr(torch, args.dtype)
    result = run(methods, lengths, args.repeats, args.decode_tokens, args.device, dtype, args.model)
    path = save_json(result, RESULTS / f"speed_{args.tag or result_tag(args.device, args.model)}.json")
    print(summary(result))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
