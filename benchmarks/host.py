"""Host time of a decode step: the Python that a GPU decode step runs, measured on any machine.

On a GPU a decode step at batch 1 is launch-bound (an H100 spent about 40 ms of host time on a step whose kernels
took 9 ms: ``benchmarks/results/gpu_h100_profile.json``), so every microsecond of Python between the model's
ops counts as much as a kernel. This measures that Python on the CPU, where nothing else hides it::

    python -m benchmarks.host --out benchmarks/results/host_cpu.json

A tiny Llama (8 layers, hidden 64, 8 query / 2 KV heads of 16 channels, float32) makes the arithmetic small, and a
compacted layer takes the attention path a CUDA device takes (`think_cache.kernels.store_attention`, forced with
``THINK_CACHE_KERNEL=triton``) with the Triton launch itself replaced by a call that does nothing (its output is
left unwritten: random weights, the tokens do not matter), and so is torch's scaled_dot_product_attention, which
the unpatched model, DynamicCache and ThinK's prompt run: no method does attention arithmetic (on a GPU it runs
beside the host). So a method's figure is the host work of the GPU path less the launches' own (Triton binding
~100 arguments, which only a GPU can time); ``--path torch`` times the torch path instead, every method's
arithmetic done (the CPU's path and the reference).

Per method, interleaved over ``--repeats`` passes after a warm-up: a decode step's time divided by the layers
(``us_per_layer``: the fastest pass's mean over its ``--steps`` steps, so a fold's work every 32 steps counts its
share; a shared machine's noise only ever adds time, and it came in whole slow passes here); the same for the time
spent in the caches' ``update`` and the attention functions alone (``glue_us_per_layer``, `GlueClock`: what a
cache and its attention add; a patched model's hooks and mask function fall outside it); their ratios to
``unpatched`` (DynamicCache on the model before `think_cache.patch`) in the same run; Python function calls per
layer and step (all, and think_cache's: a count that noise does not move); the kernel launches and sdpa calls per
layer and step (the stubs count them: on the kernel path a compacted layer launches once, the other caches call
sdpa once); and the ``--top`` think_cache functions by their own time under cProfile (which slows what it
measures: read them as shares, not as times). The JSON's plot: ``python -m benchmarks.host --plot-only
benchmarks/results/host_cpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM

from think_cache import ThinKCache, _compat, kernels
from think_cache.attention import ATTENTION_NAME, register

from .common import (
    RESULTS,
    check_methods,
    make_cache,
    method_help,
    profile_rows,
    provenance,
    pyplot,
    save_json,
    set_patched,
    tell_prompt_length,
)

DEFAULT_METHODS = (
    "unpatched,dynamic,think-0.5,snapkv-256+think-0.5,h2o-256+think-0.5,streaming-256+think-0.5,think-0.5+int4"
)
#: The tiny model: arithmetic small enough that a step's time is its host work.
MODEL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
)  # fmt: skip


#: SMs the kernel path counts on (an H100 SXM's), so that spans and their workspace are as on that GPU.
GPU_MULTIPROCESSORS = 132


class StubLaunch:
    """Stands in for the compiled kernels (`think_cache.kernels._kernels`): ``kernel[grid](...)`` does nothing
    and is counted. `sdpa` stands in for torch's scaled_dot_product_attention likewise (an empty output)."""

    def __init__(self) -> None:
        self.launches = 0
        self.sdpa_calls = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        self.launches += 1

    def sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.sdpa_calls += 1
        return query.new_empty(*query.shape[:-1], value.shape[-1])


@contextlib.contextmanager
def attention_path(path: str, stub: StubLaunch):
    """Within: compacted layers attend by ``path`` (``kernel``: the CUDA path with ``stub`` for the launch, and
    for torch's sdpa, which every method's other attention runs: no method does attention arithmetic; the device
    counted as an H100's `GPU_MULTIPROCESSORS`, so that a context is split into spans as there; ``torch``: the
    torch path, every method's arithmetic done)."""
    saved = {name: os.environ.get(name) for name in (kernels.KERNEL_ENV, "TRITON_INTERPRET")}
    original = kernels._kernels, kernels._multiprocessors, torch.nn.functional.scaled_dot_product_attention
    os.environ[kernels.KERNEL_ENV] = "triton" if path == "kernel" else "torch"
    if path == "kernel":
        os.environ["TRITON_INTERPRET"] = "1"  # kernel_available on the CPU; nothing is interpreted: the stub runs
        kernels._kernels = lambda interpret: stub
        kernels._multiprocessors = lambda device: GPU_MULTIPROCESSORS
        torch.nn.functional.scaled_dot_product_attention = stub.sdpa  # transformers looks it up at each call
    kernels._tiles.cache_clear()  # its span counts come from _multiprocessors
    try:
        yield
    finally:
        kernels._kernels, kernels._multiprocessors, torch.nn.functional.scaled_dot_product_attention = original
        kernels._tiles.cache_clear()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class GlueClock:
    """Seconds spent in the caches' ``update`` and in the attention functions (transformers' sdpa one, ThinK's):
    the work a cache and its attention add to a layer. A patched model also runs its attention modules' hooks and
    builds its masks with ThinK's mask function, outside these. Wraps them while `timing` is entered (after
    `think_cache.patch`, which registers ThinK's attention function anew), and puts back what it found."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    @contextlib.contextmanager
    def timing(self):
        mapping = AttentionInterface._global_mapping
        registered = ATTENTION_NAME in mapping
        register()  # ThinK's attention function in the mapping (as patch does)
        own = {cls: vars(cls).get("update") for cls in (DynamicCache, ThinKCache)}  # None: inherited
        attentions = {name: mapping[name] for name in ("sdpa", ATTENTION_NAME)}
        for cls in own:
            cls.update = self._timed(cls.update)
        for name, function in attentions.items():
            AttentionInterface.register(name, self._timed(function))
        try:
            yield self
        finally:
            for cls, update in own.items():
                if update is None:
                    del cls.update
                else:
                    cls.update = update
            for name, function in attentions.items():
                AttentionInterface.register(name, function)
            if not registered:
                del mapping[ATTENTION_NAME]


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    return model


def decode_steps(
    model,
    method: str,
    prompt: int,
    steps: int,
    profiler: cProfile.Profile | None = None,
    stub: StubLaunch | None = None,
    clock: GlueClock | None = None,
) -> list[float]:
    """A fresh cache of ``method``, a ``prompt``-token forward, then ``steps`` timed single-token forwards (under
    ``profiler`` when given); their times in seconds. ``stub`` and ``clock``: their counts are of the timed steps
    only (the prompt's are taken back)."""
    set_patched(model, method != "unpatched")
    cache = DynamicCache() if method == "unpatched" else make_cache(method, model.config)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    tell_prompt_length(cache, ids)  # compacted at the prompt's end, as generate does: not in the first step
    kwargs = {_compat.CACHE_ARGUMENT: cache, "use_cache": True}
    times = []
    with torch.no_grad():
        before = None if stub is None else (stub.launches, stub.sdpa_calls)
        token = model(input_ids=ids, **kwargs).logits[:, -1:].argmax(-1)
        if stub is not None:
            stub.launches, stub.sdpa_calls = before
        if clock is not None:
            clock.seconds = 0.0
        for i in range(steps):
            position = torch.tensor([[prompt + i]])
            start = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            logits = model(input_ids=token, position_ids=position, **kwargs).logits
            if profiler is not None:
                profiler.disable()
            times.append(time.perf_counter() - start)
            token = logits[:, -1:].argmax(-1)
    return times


def python_calls(profiler: cProfile.Profile, steps: int, layers: int) -> dict:
    """Python and builtin function calls per layer and step: all, and think_cache's own (a count, the same from
    run to run, where times on a shared machine are not)."""
    stats = pstats.Stats(profiler).stats.items()
    per = steps * layers
    return {
        "all": sum(calls for _, (_, calls, *_) in stats) / per,
        "think_cache": sum(calls for (path, *_), (_, calls, *_) in stats if "think_cache" in path) / per,
    }


def top_functions(profiler: cProfile.Profile, steps: int, layers: int, top: int) -> list[dict]:
    """think_cache's ``top`` functions by own time, per layer and step."""

    def where(path: str) -> str | None:
        return path.split("think_cache")[-1].lstrip("/") if "think_cache" in path else None

    rows = profile_rows(profiler, steps * layers, where)
    return sorted(rows, key=lambda r: -r["own_us"])[:top]


def run(methods: list[str], path: str, prompt: int, steps: int, repeats: int, top: int) -> dict:
    model = build_model()
    layers = model.config.num_hidden_layers
    stub = StubLaunch()
    per_step: dict[str, list[float]] = {m: [] for m in methods}
    launches: dict[str, list[int]] = {m: [0, 0] for m in methods}  # kernel launches, sdpa calls
    glue: dict[str, list[float]] = {m: [] for m in methods}
    clock = GlueClock()
    with attention_path(path, stub):
        for method in methods:  # warm-up: first calls, allocations
            decode_steps(model, method, prompt, 4)
        for repeat in tqdm(range(repeats), desc="host time", unit="pass"):
            order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]  # rotated each pass
            for method in order:
                before = (stub.launches, stub.sdpa_calls)
                per_step[method].append(statistics.fmean(decode_steps(model, method, prompt, steps, stub=stub)))
                launches[method][0] += stub.launches - before[0]
                launches[method][1] += stub.sdpa_calls - before[1]
            for method in order:
                set_patched(model, method != "unpatched")  # first: patching registers ThinK's attention anew
                with clock.timing():
                    decode_steps(model, method, prompt, steps, clock=clock)
                glue[method].append(clock.seconds / steps)
        profiles, calls = {}, {}
        for method in methods:
            profiler = cProfile.Profile()
            decode_steps(model, method, prompt, steps, profiler)
            profiles[method] = top_functions(profiler, steps, layers, top)
            calls[method] = python_calls(profiler, steps, layers)
    set_patched(model, False)
    rows = {}
    for method in methods:
        rows[method] = {
            "us_per_layer": 1e6 * min(per_step[method]) / layers,
            "us_per_layer_repeats": [1e6 * t / layers for t in per_step[method]],
            "glue_us_per_layer": 1e6 * min(glue[method]) / layers,
            "glue_us_per_layer_repeats": [1e6 * t / layers for t in glue[method]],
            "calls_per_layer_step": calls[method],
            "launches_per_layer_step": launches[method][0] / (repeats * steps * layers),
            "sdpa_per_layer_step": launches[method][1] / (repeats * steps * layers),
            "top_functions": profiles[method],
        }
    base = rows.get("unpatched", {})
    for row in rows.values():
        row["vs_unpatched"] = None if not base else row["us_per_layer"] / base["us_per_layer"]
        row["glue_vs_unpatched"] = None if not base else row["glue_us_per_layer"] / base["glue_us_per_layer"]
    return {
        "provenance": provenance(),
        "path": path,
        "model": MODEL,
        "prompt_tokens": prompt,
        "decode_steps": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "methods": rows,
    }


def table(result: dict) -> str:
    lines = [f"host time per layer and decode step ({result['path']} path, {result['prompt_tokens']}-token prompt)"]
    for method, row in result["methods"].items():
        ratio = "" if row["vs_unpatched"] is None else f"{row['vs_unpatched']:.2f}x"
        glue_ratio = "" if row["glue_vs_unpatched"] is None else f"{row['glue_vs_unpatched']:.2f}x"
        calls = row["calls_per_layer_step"]
        lines.append(
            f"  {method:26s} {row['us_per_layer']:7.1f} us {ratio:>6s}   glue {row['glue_us_per_layer']:6.1f} us "
            f"{glue_ratio:>6s}   calls {calls['all']:6.1f} (think_cache "
            f"{calls['think_cache']:5.1f})   launches {row['launches_per_layer_step']:.2f}, sdpa "
            f"{row['sdpa_per_layer_step']:.2f}"
        )
    return "\n".join(lines)


def plot(path: Path) -> Path:
    """A bar per method, its µs per layer and ratio to unpatched; saved next to the JSON."""
    import json

    plt = pyplot()
    result = json.loads(path.read_text())
    methods = list(result["methods"])
    values = [result["methods"][m]["us_per_layer"] for m in methods]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(methods) + 1.5))
    bars = ax.barh(methods, values, color="tab:blue")
    for bar, method in zip(bars, methods, strict=True):
        ratio = result["methods"][method]["vs_unpatched"]
        if ratio is not None:
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {ratio:.2f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("host time per layer and decode step (µs)")
    ax.set_title(f"Decode step host time, {result['path']} path (tiny Llama, CPU)")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=method_help(("unpatched", "dynamic"), False))
    parser.add_argument("--path", choices=("kernel", "torch"), default="kernel", help="compacted layers' attention")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default %(default)s)")
    parser.add_argument("--steps", type=int, default=33, help="timed decode steps per pass (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved passes (default %(default)s)")
    parser.add_argument("--top", type=int, default=12, help="think_cache functions kept from the profile")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    parser.add_argument("--out", default=str(RESULTS / "host_cpu.json"), help="the JSON (default %(default)s)")
    parser.add_argument("--plot-only", metavar="JSON", default=None, help="plot a result, run nothing")
    args = parser.parse_args(argv)
    if args.plot_only is None:
        try:
            args.method_list = check_methods(args.methods.split(","), ("unpatched", "dynamic"), quantized=False)
        except ValueError as error:
            parser.error(str(error))
        if args.path == "kernel" and not kernels._triton_installed():
            parser.error("--path kernel needs triton installed (pip install triton); or give --path torch")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only is not None:
        print(f"plot: {plot(Path(args.plot_only))}")
        return 0
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run(args.method_list, args.path, args.prompt, args.steps, args.repeats, args.top)
    finally:
        torch.set_num_threads(threads)
    out = save_json(result, Path(args.out))
    print(table(result))
    print(f"saved {out}; plot: {plot(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
