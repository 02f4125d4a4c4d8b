"""think-cache side by side with NVIDIA kvpress (ThinKPress, SnapKVPress) on the same model and prompts.

kvpress pins transformers<5.3, so this runs in its own environment:

    bash benchmarks/setup_kvpress.sh                       # once: makes .venv-kvpress
    .venv-kvpress/bin/python -m benchmarks.kvpress_compare --lengths 1024 --samples 6
    .venv-kvpress/bin/python -m benchmarks.kvpress_compare --methods dynamic,think --ratio 0.4 --lengths 2048

Both libraries run in that one process (same transformers, same torch, same prompts), methods interleaved.
For each: accuracy, the bytes the cache actually holds after the prompt (measured from its tensors), prefill
time and decode time per token. kvpress's presses compress during the prefill through forward hooks and
leave a transformers DynamicCache; ThinKPress zeroes the pruned key channels inside that full-size cache.
Our SnapKV gets kvpress's settings (window 64, kernel 5) and the same number of kept tokens.
Writes benchmarks/results/kvpress_<tag>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

import think_cache
from think_cache import SnapKV, ThinKCache, _compat, held_bytes
from think_cache.models import load_smollm2

from .common import (
    DEFAULT_TAG,
    RESULTS,
    TASKS,
    depths,
    eos_ids,
    is_correct,
    paired,
    provenance,
    save_json,
    tell_prompt_length,
)

#: What ``--methods`` picks from: each but ``dynamic`` runs in both libraries.
KINDS = ("dynamic", "think", "snapkv", "snapkv+think")


def methods(prompt_tokens: int, ratio: float = 0.5, kinds: tuple[str, ...] = KINDS) -> dict:
    """name -> (kvpress press or None, cache factory). ``ratio``: the share of key channels ThinK prunes and of
    prompt tokens SnapKV drops, in both libraries."""
    from kvpress import ComposedPress, SnapKVPress, ThinKPress

    ours_snapkv = dict(budget=int(prompt_tokens * (1 - ratio)), window=64, kernel=5)
    table = {
        "dynamic": {"dynamic": (None, DynamicCache)},
        "think": {
            f"kvpress ThinKPress({ratio})": (ThinKPress(key_channel_compression_ratio=ratio), DynamicCache),
            f"think-cache ThinK({ratio})": (None, lambda: ThinKCache(key_ratio=ratio)),
        },
        "snapkv": {
            f"kvpress SnapKVPress({ratio})": (SnapKVPress(compression_ratio=ratio), DynamicCache),
            f"think-cache SnapKV({ratio})": (None, lambda: ThinKCache(key_ratio=0, policy=SnapKV(**ours_snapkv))),
        },
        "snapkv+think": {
            f"kvpress SnapKV({ratio})+ThinK({ratio})": (
                ComposedPress([SnapKVPress(compression_ratio=ratio), ThinKPress(key_channel_compression_ratio=ratio)]),
                DynamicCache,
            ),
            f"think-cache SnapKV({ratio})+ThinK({ratio})": (
                None,
                lambda: ThinKCache(key_ratio=ratio, policy=SnapKV(**ours_snapkv)),
            ),
        },
    }
    return {name: entry for kind in kinds for name, entry in table[kind].items()}


def run_one(model, input_ids, press, make_cache, max_new_tokens: int, eos: set[int]) -> dict:
    cache = make_cache()
    kwargs = {_compat.CACHE_ARGUMENT: cache, "use_cache": True}
    tell_prompt_length(cache, input_ids)
    with torch.no_grad():
        start = time.perf_counter()
        if press is None:
            out = model(input_ids=input_ids, logits_to_keep=1, **kwargs)
        else:
            with press(model):
                out = model(input_ids=input_ids, logits_to_keep=1, **kwargs)
        prefill = time.perf_counter() - start
        held = held_bytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        tokens, steps = [int(token)], []
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            start = time.perf_counter()
            out = model(input_ids=token, **kwargs)
            steps.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
    return {"tokens": tokens, "held_bytes": held, "prefill_s": prefill, "decode_steps_s": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024", help="context lengths in tokens (default %(default)s)")
    parser.add_argument("--tasks", default="passkey,kv", help="tasks, comma-separated (default %(default)s)")
    parser.add_argument("--samples", type=int, default=6, help="prompts per task and length (default %(default)s)")
    parser.add_argument(
        "--tag", default=DEFAULT_TAG, help="benchmarks/results/kvpress_<tag>.json (default %(default)s)"
    )
    parser.add_argument("--ratio", type=float, default=0.5, help="channels pruned / tokens dropped (default 0.5)")
    parser.add_argument("--methods", default=",".join(KINDS), help=f"comma-separated among {', '.join(KINDS)}")
    args = parser.parse_args(argv)
    kinds = tuple(args.methods.split(","))
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown methods {sorted(unknown)}; choose among {', '.join(KINDS)}")
    if "dynamic" not in kinds:
        kinds = ("dynamic", *kinds)  # the ratios are to DynamicCache
    import kvpress  # noqa: F401  (fail early outside .venv-kvpress)

    model, tokenizer = load_smollm2()
    think_cache.patch(model)  # our caches need it; kvpress's DynamicCache runs through the sdpa fallback
    eos = eos_ids(model, tokenizer)
    rows = []
    jobs = [
        (n, t, i) for n in map(int, args.lengths.split(",")) for t in args.tasks.split(",") for i in range(args.samples)
    ]
    for length, task, i in tqdm(jobs, desc="prompts", unit="prompt"):
        sample = TASKS[task](tokenizer, length, depths(args.samples)[i], seed=1000 * length + i)
        ids = sample.inputs["input_ids"]
        table = methods(ids.shape[1], args.ratio, kinds)
        names = list(table)
        names = names[i % len(names) :] + names[: i % len(names)]  # rotate the order from prompt to prompt
        for name in names:
            press, make = table[name]
            r = run_one(model, ids, press, make, 24 if task == "kv" else 12, eos)
            answer = tokenizer.decode(r.pop("tokens"), skip_special_tokens=True).strip()
            rows.append(
                {
                    "task": task,
                    "length": length,
                    "depth": sample.depth,
                    "seed": sample.seed,
                    "method": name,
                    "answer": answer,
                    "expected": sample.answer,
                    "correct": is_correct(answer, sample.answer),
                    **r,
                }
            )
    result = {**provenance(), "kvpress": _kvpress_version(), "ratio": args.ratio, "rows": rows}
    path = save_json(result, RESULTS / f"kvpress_{args.tag}.json")
    print(summary(result))
    print(f"\nwrote {path}")
    return 0


def _kvpress_version() -> str:
    from importlib.metadata import version

    return version("kvpress")


def summary(result: dict) -> str:
    by: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by.setdefault(r["method"], []).append(r)
    base = by["dynamic"]
    base_held = statistics.mean(r["held_bytes"] for r in base)
    base_pre = statistics.median(r["prefill_s"] for r in base)
    base_dec = statistics.median(s for r in base for s in r["decode_steps_s"])
    lines = [
        "| method | accuracy | KV bytes after prefill | prefill | decode / token |",
        "|---|---|---|---|---|",
    ]
    for name, rs in by.items():
        acc = 100 * statistics.mean(r["correct"] for r in rs)
        held = statistics.mean(r["held_bytes"] for r in rs)
        pre = statistics.median(r["prefill_s"] for r in rs)
        dec = statistics.median(s for r in rs for s in r["decode_steps_s"])
        lines.append(
            f"| {name} | {acc:.0f}% ({len(rs)}) | {held / 2**20:.1f} MiB ({held / base_held:.2f}x) "
            f"| {pre:.2f} s ({pre / base_pre:.2f}x) | {1000 * dec:.1f} ms ({dec / base_dec:.2f}x) |"
        )
    if all("seed" in r for r in result["rows"]):  # files from before seeds were recorded cannot be paired
        lines += ["", "| method | vs dynamic on the same prompts | 95% interval |", "|---|---|---|"]
        for name in by:
            if name != "dynamic":
                p = paired(result["rows"], name, "dynamic")
                lo, hi = p.interval
                lines.append(
                    f"| {name} | {p.delta:+.1f} points ({p.gained} gained / {p.lost} lost of {p.n}) "
                    f"| {lo:+.1f} to {hi:+.1f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
