"""GPU figures in one command: a Llama-3.1-8B-shaped model with random bf16 weights, every method at 8k, 32k and
128k tokens of context, against the unpatched model in the same run.

Run from the repository root on any CUDA machine (nothing to download or install beyond torch and transformers;
``python3 -m`` from the root imports this checkout's think_cache)::

    python3 -m benchmarks.gpu --out benchmarks/results/gpu_h100.json --budget-s 330

and afterwards, on any machine with matplotlib, the plot next to the JSON (``gpu_h100.png``) and the table again::

    python -m benchmarks.gpu --plot-only benchmarks/results/gpu_h100.json

The model: vocab 128256, hidden 4096, intermediate 14336, 32 layers, 32 query / 8 KV heads, head_dim 128,
rope_theta 5e5, built directly on the GPU in bf16 (no fp32 copy, about a second). Random weights are fine for
time and memory, not for accuracy. Prompts are random token ids.

Per cell (batch x context x method), with a fresh cache:

- ``prefill_s``: one forward over the prompt with ``logits_to_keep=1`` (a 128k-vocab logits tensor of a 32k prompt
  would take 16 GB);
- ``decode_s_per_token``: median over ``--decode-steps`` (32) single-token forwards after ``--warmup-steps`` (3),
  each between two ``torch.cuda.synchronize()``; 35 steps cross ThinK's 32-token fold, whose cost shows in
  ``decode_max_s`` and in the per-step times kept in ``decode_steps_s``; over a cell's repeats the median, and the
  best in ``decode_best_s_per_token`` (the "best" column: host noise only adds time);
- ``held_bytes``: the bytes of the cache's tensors right after the prompt (`think_cache.held_bytes`);
- ``peak_bytes``: ``max_memory_allocated()`` during prefill and decoding, less what was allocated before (the
  weights and the prompt's ids);
- with ``--profile`` (cells of the first group only): CUDA kernels and their summed GPU time in one more decode
  step under ``torch.profiler``.

Every figure also comes as a ratio to ``unpatched`` of the same batch and context (``vs_unpatched``).

Methods: ``unpatched`` (the model before `think_cache.patch`, with DynamicCache), ``dynamic`` (patched model,
DynamicCache: the cost of the patch alone), and the cache names of `benchmarks.common.make_cache`
(``think-0.5``, ``think-0.5+int4``, ``snapkv-1024+think-0.5``, ...). ``static`` is transformers' StaticCache on
the unpatched model, eager; ``static-compiled`` the same with the decode forward under
``torch.compile(mode="reduce-overhead")``, opt-in with ``--compile``: it runs in a child process, after every
other cell of the first pass, killed after ``--compile-timeout-s`` (the first compiled call took 78 s on an H100),
so that a hung compile or its CUDA graph pool cannot spoil the other figures. The model is patched and unpatched
between cells as each method needs (`think_cache.unpatch` restores the sdpa attention exactly).

Schedule and budget: groups run in priority order (``--groups``, default batch 1 at 8k, then 32k, then batch 8 at
8k, then batch 1 at 128k), every method in each; then ``--repeats``-1 more passes over the first group, in rotated
method order (interleaved repeats: host-side noise moved one configuration from 26 to 93 ms per token between
repeats on the H100 once). A cell's figures are medians over its repeats. Before each cell its time is estimated
from the cells done (prefill scaled between linear and quadratic in the tokens, H2O's prefill quadratic: it scores
every prompt query); a cell that would not end within ``--budget-s`` (counted from the start of ``main``) is
recorded as skipped, and cheaper ones after it still run. A CUDA out-of-memory is recorded as ``oom`` and the run
goes on; any other error is recorded with its message. The JSON is rewritten after every cell, so an interrupted
run keeps what it measured, and a watchdog ends the process ``--grace-s`` after the budget whatever is running.

Expected on an H100 with the default groups: start-up (imports, CUDA, model, warm-up) about 15 s; batch 1 at 8k
about 25 s; 32k about 75 s (H2O's prefill alone 30-40 s); batch 8 at 8k about 60 s; 128k about 20 s a method
(H2O skipped by its estimate); the repeats of the first group fill what is left of the budget.

``--compile`` adds ``think-0.5+static-compiled`` and ``static-compiled`` (the static ThinK cache of
``ThinKCache(key_ratio=0.5, max_cache_len=N)``, its decode step under ``torch.compile(fullgraph=True,
mode="reduce-overhead")``); any method of a static cache ending in ``-compiled`` decodes so, in a child process.
``--kernel-config JSON`` launches the Triton kernel as ``benchmarks/kernel_check.py --sweep`` chose (saved in
that JSON).

``--smoke``: a tiny Llama (2 layers, hidden 64, 4 query / 2 KV heads) on the CPU with short prompts, policy
budgets scaled down to 64 tokens and 4 decode steps: the whole pipeline in seconds, for the tests
(``--smoke --device cuda --profile --compile`` checks the GPU paths in about a minute).

The kernel micro-benchmark of ``think_cache.kernels`` is not here: see ``benchmarks/kernel_check.py``.
Nothing here imports matplotlib, numpy or tqdm except ``--plot-only``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import think_cache
from think_cache import _compat, held_bytes
from think_cache.cache import human_bytes

from .common import RESULTS, make_cache, profile_rows, provenance, pyplot, save_json, set_patched, tell_prompt_length
from .kernel_check import apply_launch_config

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=5e5,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
)
SMOKE_MODEL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=5e5,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
)

# H2O last: its prefill scores every prompt query (7.75x DynamicCache's prefill at 8k on the H100)
DEFAULT_METHODS = (
    "unpatched,dynamic,think-0.5,think-0.5+int4,snapkv-1024+think-0.5,streaming-2048+think-0.5,h2o-2048+think-0.5"
)
SMOKE_METHODS = (
    "unpatched,dynamic,think-0.5,think-0.5+int4,snapkv-64+think-0.5,streaming-64+think-0.5,h2o-64+think-0.5,static"
)
DEFAULT_GROUPS = "1x8k,1x32k,8x8k,1x128k"
SMOKE_GROUPS = "1x96,1x160,2x96"

UNPATCHED_METHODS = ("unpatched", "static", "static-compiled")
#: What ``--compile`` adds at the first group: transformers' StaticCache and the static ThinK cache, compiled.
COMPILE_METHODS = ("think-0.5+static-compiled", "static-compiled")


def is_compiled(method: str) -> bool:
    """A ``-compiled`` method decodes under ``torch.compile`` (CUDA graphs on a GPU), in a child process with a
    timeout: transformers' ``static-compiled`` or a static ThinK cache, e.g. ``think-0.5+static-compiled``."""
    return method.endswith("-compiled")


def cache_name(method: str) -> str:
    """The `make_cache` name of a method: ``-compiled`` says how it decodes, not which cache it has."""
    return method.removesuffix("-compiled")


GIB = 2**30


# ------------------------------------------------------------------------------------------- the model
def build_model(smoke: bool, device: str) -> tuple[LlamaForCausalLM, float]:
    """The random-weight Llama, built where it runs: bf16 on CUDA (fp32 on the CPU), no copy made elsewhere."""
    config = LlamaConfig(**(SMOKE_MODEL if smoke else LLAMA_8B))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    start = time.perf_counter()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    _sync(device)
    return model, time.perf_counter() - start


def prompt_ids(batch: int, context: int, vocab: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * batch + context)
    return torch.randint(3, vocab, (batch, context), generator=generator).to(device)


def new_cache(method: str, model, context: int, steps: int):
    if method == "unpatched":
        return DynamicCache()
    return make_cache(cache_name(method), model.config, max_cache_len=context + steps + 1)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _is_cuda(model) -> bool:
    return model.device.type == "cuda"


# ----------------------------------------------------------------------------------------- measuring
def measure(model, method: str, batch: int, context: int, steps: int, warmup: int, profile: bool) -> dict:
    """One cell: prefill, ``warmup + steps`` timed decode steps, bytes, peak memory; a fresh cache."""
    set_patched(model, method not in UNPATCHED_METHODS)
    device = model.device
    cuda = _is_cuda(model)
    ids = prompt_ids(batch, context, model.config.vocab_size, device)
    compiled = is_compiled(method)
    if compiled:
        warmup = max(warmup, 3)  # compile, a first run, the CUDA graphs recorded: then the replays are timed
    cache = new_cache(method, model, context, warmup + steps + (1 + HOST_PROFILE_STEPS if profile else 0))
    tell_prompt_length(cache, ids)
    kwargs = {_compat.CACHE_ARGUMENT: cache, "use_cache": True, "logits_to_keep": 1}
    forward = model
    position = _static_positions(model, batch, context) if method.startswith("static") else None
    if compiled:
        # ThinK's static step is captured whole (fullgraph): a graph break would be a defect, not a slower figure
        mode = "reduce-overhead" if cuda else None
        forward = torch.compile(model.__call__, mode=mode, fullgraph=method != "static-compiled")
    row: dict = {"status": "ok"}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, **kwargs)  # prefill uncompiled: one shape, run once
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        row["prefill_s"] = time.perf_counter() - start
        del out
        row["held_bytes"] = held_bytes(cache)
        if isinstance(cache, think_cache.ThinKCache):
            row["held_vs_dense"] = cache.stats().ratio
        times = []
        for i in range(warmup + steps):
            extra = position(i) if position else {}
            _sync(device)
            start = time.perf_counter()
            if compiled and cuda:
                torch.compiler.cudagraph_mark_step_begin()
            out = forward(input_ids=token, **kwargs, **extra)
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            times.append(time.perf_counter() - start)
            del out
        if compiled:
            row["compile_s"] = times[0]  # the first call compiles (and CUDA graphs are recorded on the next)
        decode = times[warmup:]
        row["decode_s_per_token"] = statistics.median(decode)
        row["decode_mean_s"] = sum(decode) / len(decode)
        row["decode_max_s"] = max(decode)
        row["decode_steps_s"] = [round(t, 6) for t in times]
        if cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        if profile:
            extra = position(warmup + steps) if position else {}
            row.update(profile_step(forward, token, {**kwargs, **extra}, cuda))
    return row


def _static_positions(model, batch: int, context: int):
    """The position arguments of decode step ``i`` on a StaticCache, as tensors (no recompile per step); older
    transformers also take ``cache_position``."""
    device = model.device
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    def position(i: int) -> dict:
        extra = {"position_ids": torch.full((batch, 1), context + i, device=device)}
        if takes_cache_position:
            extra["cache_position"] = torch.tensor([context + i], device=device)
        return extra

    return position


def profile_step(forward, token: torch.Tensor, kwargs: dict, cuda: bool) -> dict:
    """Kernels launched by one decode step and their summed GPU time (torch.profiler), and the aten ops run."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(token.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        out = forward(input_ids=token, **kwargs)
        out.logits[:, -1:].argmax(-1)
        _sync(token.device)
    seconds = time.perf_counter() - start
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return {
        "kernels_per_step": len(kernels),
        "kernel_time_per_step_s": sum(e.time_range.elapsed_us() for e in kernels) / 1e6,
        "aten_ops_per_step": sum(1 for e in events if e.name.startswith("aten::")),
        "profiled_step_s": seconds,
        "host_profile": host_profile(forward, token, kwargs),
    }


#: This checkout's root, cut from the paths `host_profile` reports.
ROOT = str(Path(__file__).resolve().parent.parent) + "/"
#: Decode steps `host_profile` runs under cProfile.
HOST_PROFILE_STEPS = 4
#: Where the functions `host_profile` reports live (the Python a decode step runs on the host).
HOST_PROFILE_PATHS = ("think_cache", "transformers", "triton", "torch/nn")


def host_profile(forward, token: torch.Tensor, kwargs: dict, top: int = 40) -> list[dict]:
    """Host time per decode step by function (cProfile over `HOST_PROFILE_STEPS` steps, per step): on a GPU the
    step is launch-bound, so this says where its time goes. The ``top`` functions of `HOST_PROFILE_PATHS` by
    cumulative time, with their own time and calls per step."""
    import cProfile

    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for _ in range(HOST_PROFILE_STEPS):
            out = forward(input_ids=token, **kwargs)
            out.logits[:, -1:].argmax(-1)
        _sync(token.device)
        profiler.disable()

    def where(path: str) -> str | None:
        if any(part in path for part in HOST_PROFILE_PATHS):
            return path.split("site-packages/")[-1].removeprefix(ROOT)
        return None

    rows = profile_rows(profiler, HOST_PROFILE_STEPS, where)
    return sorted(rows, key=lambda r: -r["cumulative_us"])[:top]


def warm_up(model, smoke: bool) -> float:
    """Load kernels and libraries once (cuBLAS, the sdpa and ThinK paths), outside every cell."""
    start = time.perf_counter()
    for method in ("unpatched", "think-0.5", "think-0.5+int4"):
        # a method that fails here fails again in its cells, where the error is recorded: never stop the run
        run_one(lambda method=method: measure(model, method, 1, 96 if smoke else 1024, 2, 1, profile=False))
    gc.collect()
    if _is_cuda(model):
        torch.cuda.empty_cache()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ the child
def measure_in_child(args, method: str, batch: int, context: int, timeout_s: float, register=None) -> dict:
    """``measure`` in a fresh process (same model, same seed), killed after ``timeout_s``."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "cell.json"
        command = [sys.executable, "-m", "benchmarks.gpu", "--child", method, "--groups", f"{batch}x{context}"]
        command += [
            "--out",
            str(out),
            "--decode-steps",
            str(args.decode_steps),
            "--warmup-steps",
            str(args.warmup_steps),
        ]
        command += ["--device", args.device] + (["--smoke"] if args.smoke else [])
        command += ["--kernel-config", str(args.kernel_config)] if args.kernel_config else []
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent)
        if register:
            register(child)
        try:
            code = child.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return {"status": "timeout", "error": f"killed after {timeout_s:.0f} s", "child_s": timeout_s}
        finally:
            if register:
                register(None)
        if not out.exists():
            return {"status": "error", "error": f"child exited with {code} and wrote nothing"}
        row = json.loads(out.read_text())
        row["child_s"] = time.perf_counter() - start
        return row


def child_main(args) -> int:
    ((batch, context),) = parse_groups(args.groups)
    if args.kernel_config:
        apply_launch_config(args.kernel_config)
    model, _ = build_model(args.smoke, args.device)
    row = run_one(lambda: measure(model, args.child, batch, context, args.decode_steps, args.warmup_steps, False))
    save_json(row, Path(args.out))
    return 0


# ------------------------------------------------------------------------------------------- schedule
def parse_groups(text: str) -> list[tuple[int, int]]:
    """``"1x8k,8x8k"`` -> ``[(1, 8192), (8, 8192)]`` (k = 1024); ValueError naming the group for one that is not
    BATCHxCONTEXT with both above zero."""
    groups = []
    for part in text.split(","):
        batch, _, context = part.strip().lower().partition("x")
        scale = 1024 if context.endswith("k") else 1
        try:
            group = (int(batch), int(context.removesuffix("k")) * scale)
        except ValueError:
            group = (0, 0)
        if min(group) < 1:
            raise ValueError(f"--groups: {part!r} is not BATCHxCONTEXT with both above zero (1x8k, 8x2048)")
        groups.append(group)
    return groups


def context_label(context: int) -> str:
    return f"{context // 1024}k" if context % 1024 == 0 else str(context)


def schedule(groups, methods, repeats: int, compile_methods) -> list[tuple[int, int, int, str]]:
    """``(pass, batch, context, method)`` in the order they run: every group once, child-process cells at the end
    of that first pass, then more passes over the first group with the method order rotated."""
    plain = [m for m in methods if not is_compiled(m)]
    cells = [(0, b, c, m) for b, c in groups for m in plain]
    cells += [(0, b, c, m) for b, c in groups[:1] for m in compile_methods]
    for p in range(1, repeats):
        shift = p % len(plain)
        cells += [(p, *groups[0], m) for m in plain[shift:] + plain[:shift]]
    return cells


def estimate_s(history: list[dict], method: str, batch: int, context: int) -> float | None:
    """Seconds a cell will take, scaled from the nearest cell done of the same method (else of the baselines):
    prefill between linear and quadratic in the tokens (H2O quadratic), decoding half fixed, half linear.
    None when nothing is known yet."""
    same = [h for h in history if h["method"] == method]
    known = same or [h for h in history if h["method"] in ("unpatched", "dynamic")]
    if not known:
        return None
    tokens = batch * context
    ref = min(known, key=lambda h: (abs(h["batch"] * h["context"] - tokens), -h["batch"] * h["context"]))
    linear = tokens / (ref["batch"] * ref["context"])
    quadratic = batch * context**2 / (ref["batch"] * ref["context"] ** 2)
    if method.startswith("h2o") or "+h2o" in method:
        prefill = ref["prefill_s"] * quadratic
    else:
        prefill = ref["prefill_s"] * (0.6 * linear + 0.4 * quadratic)
    rest = ref["cell_s"] - ref["prefill_s"]
    factor = 1.0 if same else 1.5  # another method than the one measured: leave room
    return factor * (1.15 * (prefill + rest * (0.5 + 0.5 * linear)) + 1.0)


def run_one(fn) -> dict:
    """A cell's measurement with every failure recorded: out of memory as ``oom``, anything else as ``error``."""
    try:
        row = fn()
    except torch.cuda.OutOfMemoryError as error:
        row = {"status": "oom", "error": str(error).splitlines()[0][:300]}
    except Exception as error:  # noqa: BLE001 - record it, go on with the next cell
        row = {"status": "error", "error": f"{type(error).__name__}: {str(error)[:500]}"}
    if row["status"] != "ok":
        gc.collect()  # a failure's frames may hold its cache; 0.3 s a call, so not after every cell
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


# -------------------------------------------------------------------------------------------- results
METRICS = ("prefill_s", "decode_s_per_token", "held_bytes", "peak_bytes", "kernels_per_step", "kernel_time_per_step_s")


def merge(cell: dict) -> None:
    """A cell's figures: medians over its successful samples (its status: ok if any succeeded), and the best of
    their decoding times (``decode_best_s_per_token``: host noise only ever adds time, and on a shared host it came
    in whole slow samples; the H100's unpatched model once decoded 8k in 33 and in 35 ms, 32k in 75 and in 128)."""
    ok = [s for s in cell["samples"] if s["status"] == "ok"]
    for key in METRICS + ("decode_max_s", "held_vs_dense", "compile_s"):
        values = [s[key] for s in ok if s.get(key) is not None]
        if values:
            cell[key] = statistics.median(values)
        else:
            cell.pop(key, None)
    decode = [s["decode_s_per_token"] for s in ok if s.get("decode_s_per_token") is not None]
    if decode:
        cell["decode_best_s_per_token"] = min(decode)
    else:
        cell.pop("decode_best_s_per_token", None)
    cell["repeats"] = len(ok)
    cell["status"] = "ok" if ok else cell["samples"][-1]["status"]
    if not ok:
        cell["error"] = cell["samples"][-1].get("error")


def add_ratios(cells: list[dict]) -> None:
    base = {(c["batch"], c["context"]): c for c in cells if c["method"] == "unpatched" and c["status"] == "ok"}
    for cell in cells:
        ref = base.get((cell["batch"], cell["context"]))
        if cell["status"] != "ok" or ref is None:
            cell.pop("vs_unpatched", None)
            continue
        keys = METRICS + ("decode_best_s_per_token",)
        cell["vs_unpatched"] = {k: cell[k] / ref[k] for k in keys if cell.get(k) is not None and ref.get(k)}


def table(result: dict) -> str:
    lines = [
        "| batch | context | method | prefill s | decode ms/token | best | KV held | peak above weights | kernels |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(result["cells"], key=lambda c: (c["batch"], c["context"])):
        head = f"| {c['batch']} | {context_label(c['context'])} | {c['method']} |"
        if c["status"] != "ok":
            lines.append(f"{head} {c['status']}: {(c.get('error') or '')[:80]} | | | | | |")
            continue
        ratio = c.get("vs_unpatched", {})

        def fmt(key, scale, digits, c=c, ratio=ratio):
            if c.get(key) is None:
                return "-"
            text = human_bytes(c[key]) if digits is None else f"{c[key] * scale:.{digits}f}"
            return f"{text} ({ratio[key]:.2f}x)" if key in ratio and c["method"] != "unpatched" else text

        kernels = "-" if c.get("kernels_per_step") is None else str(round(c["kernels_per_step"]))
        lines.append(
            f"{head} {fmt('prefill_s', 1, 2)} | {fmt('decode_s_per_token', 1000, 1)} | "
            f"{fmt('decode_best_s_per_token', 1000, 1)} | {fmt('held_bytes', 1, None)} | "
            f"{fmt('peak_bytes', 1, None)} | {kernels} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def plot(path: Path) -> Path:
    """Decode time per token and KV bytes against context, one line per method (batch 1 solid, others dashed)."""
    plt = pyplot()

    result = json.loads(Path(path).read_text())
    cells = [c for c in result["cells"] if c["status"] == "ok"]
    methods = list(dict.fromkeys(c["method"] for c in result["cells"]))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.5))
    for method in methods:
        for batch in sorted({c["batch"] for c in cells}):
            rows = sorted(
                (c for c in cells if c["method"] == method and c["batch"] == batch), key=lambda c: c["context"]
            )
            if not rows:
                continue
            x = [c["context"] for c in rows]
            style = ("--" if method == "unpatched" else "-") if batch == 1 else ":"
            kw = dict(
                color="k" if method == "unpatched" else colours[method],
                linestyle=style,
                marker="o" if batch == 1 else "s",
            )
            label = method if batch == 1 else f"{method}, batch {batch}"
            ax1.plot(x, [1000 * c["decode_s_per_token"] for c in rows], label=label, **kw)
            ax2.plot(x, [c["held_bytes"] / GIB for c in rows], label=label, **kw)
    contexts = sorted({c["context"] for c in cells})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [context_label(n) for n in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("decode time per token (ms, median)")
    ax2.set_ylabel("KV cache after the prompt (GiB)")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    info = result["machine"]
    name = "tiny Llama (smoke)" if result["smoke"] else "Llama-3.1-8B shape, random bf16 weights"
    fig.suptitle(
        f"{name}: {info.get('gpu', result['device'])}, torch {info['torch']}, transformers {info['transformers']}"
    )
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="the JSON (default benchmarks/results/gpu.json, gpu_smoke.json)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget from the start of main")
    parser.add_argument("--grace-s", type=float, default=30.0, help="the watchdog ends the process this long after")
    parser.add_argument("--methods", default=None, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--groups", default=None, help=f"BxCONTEXT in priority order (default {DEFAULT_GROUPS})")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the first group, budget permitting")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed steps (default 32; smoke 4)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--profile", action="store_true", help="count kernels of one step in the first group")
    parser.add_argument("--compile", action="store_true", help="add static-compiled at the first group")
    parser.add_argument("--compile-timeout-s", type=float, default=200.0)
    parser.add_argument(
        "--kernel-config", metavar="JSON", default=None, help="launch the kernel as a kernel_check --sweep chose"
    )
    parser.add_argument("--device", default=None, help="default cuda (smoke: cpu)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, short prompts: seconds on the CPU")
    parser.add_argument(
        "--plot-only",
        metavar="JSON",
        default=None,
        help="plot (the PNG goes next to the JSON) and tabulate a result, run nothing",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.methods = (args.methods or (SMOKE_METHODS if args.smoke else DEFAULT_METHODS)).split(",")
    args.groups = args.groups or (SMOKE_GROUPS if args.smoke else DEFAULT_GROUPS)
    try:
        parse_groups(args.groups)
    except ValueError as error:
        parser.error(str(error))
    args.decode_steps = args.decode_steps or (4 if args.smoke else 32)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if args.smoke else 3)
    default_out = RESULTS / ("gpu_smoke.json" if args.smoke else "gpu.json")
    args.out = Path(args.out) if args.out else default_out
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.plot_only:
        print(table(json.loads(Path(args.plot_only).read_text())))
        print(f"wrote {plot(Path(args.plot_only))}")
        return 0
    if args.child:
        return child_main(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --smoke for the tiny CPU run", file=sys.stderr)
        return 2
    for method in args.methods:
        if method not in UNPATCHED_METHODS and method != "dynamic":
            make_cache(cache_name(method))  # an unknown name fails now, not after the model is built

    def elapsed() -> float:
        return time.perf_counter() - started

    def log(text: str) -> None:
        print(f"[{elapsed():6.1f}s] {text}", flush=True)

    child: dict = {"process": None}
    deadline = args.budget_s + args.grace_s

    def watchdog() -> None:  # the last resort: a cell that overran its estimate by more than the grace
        log(f"watchdog: {deadline:.0f} s passed, stopping now; {args.out} holds every cell finished")
        if child["process"] is not None:
            child["process"].kill()
        os._exit(3)

    timer = threading.Timer(max(deadline - elapsed(), 0), watchdog)
    timer.daemon = True
    timer.start()
    try:
        result = benchmark(args, elapsed, log, child)
    finally:
        timer.cancel()
    print(table(result), flush=True)
    log(f"wrote {args.out}")
    return 0


def benchmark(args, elapsed, log, child: dict) -> dict:
    """Build the model, warm up, run the schedule within the budget; the JSON is written after every cell."""
    groups = parse_groups(args.groups)
    compile_methods = [m for m in args.methods if is_compiled(m)] + list(COMPILE_METHODS if args.compile else ())
    compile_methods = list(dict.fromkeys(compile_methods))
    methods = [m for m in args.methods if not is_compiled(m)]
    if "unpatched" not in methods:
        methods.insert(0, "unpatched")

    launch = apply_launch_config(args.kernel_config) if args.kernel_config else None
    model, build_s = build_model(args.smoke, args.device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"model built in {build_s:.2f} s: {weights / GIB:.2f} GiB of weights on {model.device}")
    warm_s = warm_up(model, args.smoke)
    log(f"warm-up {warm_s:.1f} s")
    result = {
        "benchmark": "gpu",
        "smoke": args.smoke,
        **provenance(),
        "device": str(model.device),
        "cuda": torch.version.cuda,
        "dtype": str(model.dtype),
        "config": {k: getattr(model.config, k, None) for k in (SMOKE_MODEL if args.smoke else LLAMA_8B)},
        "weights_bytes": weights,
        "model_build_s": build_s,
        "warmup_s": warm_s,
        "settings": {
            "methods": methods + compile_methods,
            "groups": args.groups,
            "repeats": args.repeats,
            "decode_steps": args.decode_steps,
            "warmup_steps": args.warmup_steps,
            "budget_s": args.budget_s,
            "profile": args.profile,
            "compile_timeout_s": args.compile_timeout_s,
            "logits_to_keep": 1,
            "kernel_launch": launch,
        },
        "caches": {
            m: repr(make_cache(cache_name(m)))
            for m in methods + compile_methods
            if m not in UNPATCHED_METHODS and m != "dynamic"
        },
        "cells": [],
        "finished": False,
    }
    cells: dict[tuple[int, int, str], dict] = {}
    history: list[dict] = []
    plan = schedule(groups, methods, args.repeats, compile_methods)
    for n, (repeat, batch, context, method) in enumerate(plan, 1):
        where = f"{n}/{len(plan)} {batch}x{context_label(context)} {method}" + (
            f" (repeat {repeat + 1})" if repeat else ""
        )
        key = (batch, context, method)
        if key not in cells:
            cells[key] = {"batch": batch, "context": context, "method": method, "samples": []}
            result["cells"].append(cells[key])
        left = args.budget_s - elapsed()
        # a compile needs a minute at least; a cell of unknown cost (the first) runs if any time is left
        guess = 60.0 if is_compiled(method) else estimate_s(history, method, batch, context) or 0.0
        if left <= 0 or guess > left:
            reason = f"budget: about {guess:.0f} s needed, {left:.0f} s left"
            if repeat == 0:
                cells[key]["samples"].append({"status": "skipped", "error": reason})
                merge(cells[key])
            log(f"{where}: skipped ({reason})")
            continue
        start = time.perf_counter()
        if is_compiled(method):
            timeout = min(args.compile_timeout_s, left - 5)

            def register(process):
                child["process"] = process

            row = run_one(lambda: measure_in_child(args, method, batch, context, timeout, register))  # noqa: B023
        else:
            profile = args.profile and (batch, context) == groups[0] and repeat == 0
            row = run_one(
                lambda: measure(model, method, batch, context, args.decode_steps, args.warmup_steps, profile)  # noqa: B023
            )
        row["cell_s"] = time.perf_counter() - start
        row["at_s"] = elapsed()
        if row["status"] == "ok" and not is_compiled(method):
            history.append({"method": method, "batch": batch, "context": context, **row})
        cells[key]["samples"].append(row)
        merge(cells[key])
        add_ratios(result["cells"])
        result["elapsed_s"] = elapsed()
        save_json(result, args.out)
        log(f"{where}: {describe_row(cells[key], row)}")
    result["finished"] = True
    result["elapsed_s"] = elapsed()
    save_json(result, args.out)
    return result


def describe_row(cell: dict, row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error')}"
    ratio = cell.get("vs_unpatched", {}).get("decode_s_per_token")
    text = (
        f"prefill {row['prefill_s']:.2f} s, decode {1000 * row['decode_s_per_token']:.1f} ms/token"
        + (f" ({ratio:.2f}x unpatched)" if ratio and cell["method"] != "unpatched" else "")
        + f", KV {human_bytes(row['held_bytes'])}"
    )
    if row.get("peak_bytes") is not None:
        text += f", peak {human_bytes(row['peak_bytes'])}"
    if row.get("kernels_per_step") is not None:
        text += f", {row['kernels_per_step']} kernels/step"
    if row.get("compile_s") is not None:
        text += f", first call {row['compile_s']:.0f} s"
    return text + f" [{row['cell_s']:.1f} s]"


if __name__ == "__main__":
    raise SystemExit(main())
