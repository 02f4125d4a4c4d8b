"""Check the fused Triton kernel against the torch path on a GPU, and time one layer's decode attention.

    python -m benchmarks.kernel_check --out kernel_check.json           # on a CUDA machine (under a minute)
    python -m benchmarks.kernel_check --smoke --out /tmp/smoke.json     # on the CPU, Triton interpreted

1. Correctness: `think_cache.kernels.compact_decode_attention` (compiled) against the torch path
   (`think_cache.compact.compact_attention` over a `FullStore`) in bfloat16 and float32, for a few shapes including
   Llama-3.1-8B's (32 query / 8 KV heads of 128, keys at ratio 0.5). Both are compared with the torch path run in
   float32 on the same (rounded) inputs, so a bfloat16 kernel error can be read against the torch path's own.
2. Timing, Llama-3.1-8B's shape, batch 1, one query token, bfloat16, at 8k/32k/128k compact tokens (plus 16 recent
   ones): torch's sdpa over full-width keys (``enable_gqa=True``), the torch compact path and the kernel. Medians
   over ``--runs`` calls after warm-up, timed with CUDA events two ways: ``call_us`` around each call as it comes
   (what a decode step pays, host-side launch overhead included) and ``gpu_us`` with the GPU held busy while the
   call is queued (the kernels' own time).

3. With ``--sweep`` (first, about a minute on an H100): the kernel's GPU time at 8k/32k/128k tokens under each
   launch config of a small grid (`think_cache.kernels.LaunchConfig`: tokens per tile, warps, pipelining stages,
   then programs per SM for the best of those), head_dim 128. The best (least mean time relative to the current
   default) is applied before the checks and timings above, and saved as ``launch_config``;
   ``python -m benchmarks.gpu --kernel-config that.json`` launches with it too.

4. With ``--compile-for 90`` (no GPU needed, a few seconds a variant): every variant of the kernel (storage kind,
   bits, key layout, value pruning, mask, causal rows, split) compiled for that CUDA compute capability by
   Triton's CUDA backend and ptxas, specialized as a launch specializes it (innermost strides 1, pointers and the
   keys' and values' other strides multiples of 16). Triton's interpreter, which the tests run on the CPU, does
   not see what only the compiler rejects (a type a construct cannot take on the GPU, say); this does.

Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import torch

LLAMA_8B = dict(kv_heads=8, group=4, head_dim=128)
SCALE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def make_inputs(batch, kv_heads, group, q_len, head_dim, kept_k, kept_v, n_compact, n_recent, dtype, device, seed=0):
    """Random ``(query, store, recent_keys, recent_values)``; the query a transposed view as transformers passes."""
    from think_cache.storage import FullStore

    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def channels(kept):
        rows = [torch.randperm(head_dim, generator=g)[:kept] for _ in range(batch * kv_heads)]
        return torch.stack(rows).view(batch, kv_heads, kept).to(device=device, dtype=torch.int16)

    query = randn(batch, q_len, kv_heads * group, head_dim).transpose(1, 2)
    store = FullStore()
    store.start(channels(kept_k), None if kept_v is None else channels(kept_v))
    store.append(randn(batch, kv_heads, n_compact, head_dim), randn(batch, kv_heads, n_compact, head_dim))
    return query, store, randn(batch, kv_heads, n_recent, head_dim), randn(batch, kv_heads, n_recent, head_dim)


def _as(store, dtype):
    from think_cache.storage import FullStore

    out = FullStore()
    out.start(store.key_channels, store.value_channels)
    out.keys, out.values = store.keys.to(dtype), store.values.to(dtype)
    return out


def check(shape: dict, dtype: torch.dtype, device: str) -> dict:
    """Max abs errors of the kernel and of the torch path, both against the torch path in float32."""
    from think_cache import kernels
    from think_cache.compact import compact_attention

    query, store, rk, rv = make_inputs(**shape, dtype=dtype, device=device)
    n_total = shape["n_compact"] + shape["n_recent"]
    mask = None
    if shape["batch"] > 1:  # left padding: row b padded by 37 * b tokens, causal among the queries
        q_len = shape["q_len"]
        mask = torch.ones(shape["batch"], 1, q_len, n_total, dtype=torch.bool, device=device).tril(n_total - q_len)
        for b in range(shape["batch"]):
            mask[b, ..., : 37 * b] = False
    scale = shape["head_dim"] ** -0.5
    reference = compact_attention(query.float(), _as(store, torch.float32), rk.float(), rv.float(), mask, scale)
    torch_path = compact_attention(query, store, rk, rv, mask, scale)
    out = kernels.compact_decode_attention(
        query, store.key_channels, store.keys, store.values, store.value_channels, rk, rv, mask, scale
    )
    kernel_err = (out.float() - reference).abs().max().item()
    return {
        **shape,
        "dtype": str(dtype).removeprefix("torch."),
        "kernel_max_err": kernel_err,
        "torch_path_max_err": (torch_path.float() - reference).abs().max().item(),
        "ok": kernel_err <= SCALE_TOLERANCE[dtype],
    }


def quantized_store(store, bits: int, head_dim: int):
    """A `QuantizedStore` of ``bits`` holding ``store``'s tokens (its kept channels, codes of those tokens)."""
    from think_cache.storage import QuantizedStore

    out = QuantizedStore(bits)
    batch, kv_heads, tokens, _ = store.keys.shape
    out.start(store.key_channels, store.value_channels)
    # full-width tokens whose kept channels are the store's: the other channels are never read
    keys = store.keys.new_zeros(batch, kv_heads, tokens, head_dim)
    keys.scatter_(-1, store.key_channels.long()[:, :, None].expand(-1, -1, tokens, -1), store.keys)
    values = store.values
    if store.value_channels is not None:
        values = store.values.new_zeros(batch, kv_heads, tokens, head_dim)
        values.scatter_(-1, store.value_channels.long()[:, :, None].expand(-1, -1, tokens, -1), store.values)
    out.append(keys, values)
    return out


def check_quantized(shape: dict, bits: int, dtype: torch.dtype, device: str, gathered: bool = False) -> dict:
    """`check` for the kernel over a `QuantizedStore` of ``bits`` (codes unpacked in the kernel); ``gathered``: keep
    a different two thirds of the tokens per head first (irregular key blocks, as after eviction)."""
    from think_cache import kernels
    from think_cache.compact import compact_attention

    query, store, rk, rv = make_inputs(**shape, dtype=dtype, device=device)
    store = quantized_store(store, bits, shape["head_dim"])
    if gathered:
        g = torch.Generator().manual_seed(7)
        n, kept = shape["n_compact"], 2 * shape["n_compact"] // 3
        rows = [torch.randperm(n, generator=g)[:kept].sort().values for _ in range(shape["batch"] * shape["kv_heads"])]
        store.gather(torch.stack(rows).view(shape["batch"], shape["kv_heads"], kept).to(device))
    scale = shape["head_dim"] ** -0.5
    reference = compact_attention(query.float(), store, rk.float(), rv.float(), None, scale).float()
    torch_path = compact_attention(query, store, rk, rv, None, scale)
    out = kernels.store_attention(query, store, rk, rv, None, scale)
    kernel_err = (out.float() - reference).abs().max().item()
    return {
        **shape,
        "bits": bits,
        "gathered": gathered,
        "dtype": str(dtype).removeprefix("torch."),
        "kernel_max_err": kernel_err,
        "torch_path_max_err": (torch_path.float() - reference).abs().max().item(),
        "ok": kernel_err <= SCALE_TOLERANCE[dtype],
    }


def _timer(device: str):
    """``time(fn, runs) -> (call_us, gpu_us)`` medians: CUDA events on a GPU, the wall clock on the CPU."""
    if device != "cuda":

        def wall(fn, runs):
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
            return statistics.median(times), None

        return wall

    def events(fn, runs):
        call, gpu = [], []
        for busy in (False, True):
            for _ in range(runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if busy:  # the GPU sleeps while the call is queued behind it: only the kernels' time is measured
                    torch.cuda._sleep(2_000_000)
                start.record()
                fn()
                end.record()
                end.synchronize()
                (gpu if busy else call).append(start.elapsed_time(end) * 1e3)
        return statistics.median(call), statistics.median(gpu)

    return events


def time_layer(n_compact: int, n_recent: int, device: str, runs: int, warmup: int, shape: dict) -> dict:
    """One layer's attention for one query token: sdpa over full keys, the torch compact path, the kernel."""
    from think_cache import kernels
    from think_cache.compact import compact_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kv_heads, group, head_dim = shape["kv_heads"], shape["group"], shape["head_dim"]
    query, store, rk, rv = make_inputs(
        1, kv_heads, group, 1, head_dim, head_dim // 2, None, n_compact, n_recent, dtype, device
    )
    full_keys = torch.randn(1, kv_heads, n_compact + n_recent, head_dim, device=device, dtype=dtype)
    full_values = torch.randn_like(full_keys)
    scale = head_dim**-0.5
    int4 = quantized_store(store, 4, head_dim)
    fns = {
        "sdpa_full": lambda: torch.nn.functional.scaled_dot_product_attention(
            query, full_keys, full_values, scale=scale, enable_gqa=True
        ),
        "torch_compact": lambda: compact_attention(query, store, rk, rv, None, scale),
        "kernel": lambda: kernels.compact_decode_attention(
            query, store.key_channels, store.keys, store.values, None, rk, rv, None, scale
        ),
        "torch_int4": lambda: compact_attention(query, int4, rk, rv, None, scale),
        "kernel_int4": lambda: kernels.store_attention(query, int4, rk, rv, None, scale),
    }
    timer = _timer(device)
    row = {"compact_tokens": n_compact, "recent_tokens": n_recent}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        row[f"{name}_call_us"], row[f"{name}_gpu_us"] = timer(fn, runs)
    return row


SWEEP_TILES = dict(block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))
SWEEP_PROGRAMS_PER_SM = (1, 2, 4, 8)


def sweep(device: str, runs: int, lengths, shape: dict, tiles=SWEEP_TILES, per_sm=SWEEP_PROGRAMS_PER_SM) -> dict:
    """The kernel's GPU time (µs, one query token) at each ``lengths`` under each launch config of the grid, for
    heads of ``shape["head_dim"]``; returns the rows and the best config (least mean time relative to the
    current one). The current config is restored afterwards."""
    from think_cache import kernels

    head_dim, key = shape["head_dim"], kernels._pow2(shape["head_dim"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    inputs = {
        n: make_inputs(1, shape["kv_heads"], shape["group"], 1, head_dim, head_dim // 2, None, n, 16, dtype, device)
        for n in lengths
    }
    timer = _timer(device)
    default = kernels.LAUNCH.get(key, kernels.LaunchConfig())
    rows: list[dict] = []

    def measure(config) -> dict:
        kernels.LAUNCH[key] = config
        row = dataclasses.asdict(config)
        try:
            for n, (query, store, rk, rv) in inputs.items():

                def fn(query=query, store=store, rk=rk, rv=rv):
                    return kernels.store_attention(query, store, rk, rv, None, head_dim**-0.5)

                for _ in range(3):
                    fn()
                call_us, gpu_us = timer(fn, runs)
                row[f"us_{n}"] = gpu_us if gpu_us is not None else call_us
        except Exception as error:  # noqa: BLE001 - a config the compiler refuses (registers, shared memory)
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
        return row

    try:
        base = measure(default)
        if "error" in base:
            raise RuntimeError(f"the current launch config fails: {base['error']}")

        def score(row: dict) -> float:
            if "error" in row:
                return float("inf")
            return sum(row[f"us_{n}"] / base[f"us_{n}"] for n in lengths) / len(lengths)

        for block_n in tiles["block_n"]:
            for warps in tiles["num_warps"]:
                for stages in tiles["num_stages"]:
                    measure(dataclasses.replace(default, block_n=block_n, num_warps=warps, num_stages=stages))
        best_tiles = min(rows, key=score)
        chosen = {k: best_tiles[k] for k in ("block_n", "num_warps", "num_stages")}
        for programs in per_sm:
            measure(kernels.LaunchConfig(**chosen, programs_per_sm=programs))
        for row in rows:
            row["relative"] = score(row)
        best = min(rows, key=score)
    finally:
        kernels.LAUNCH[key] = default
    fields = ("block_n", "num_warps", "num_stages", "programs_per_sm")
    return {
        "head_dim": head_dim,
        "default": dataclasses.asdict(default),
        "best": {k: best[k] for k in fields},
        "rows": rows,
    }


def apply_launch_config(path: str) -> dict:
    """Launch the kernel with the ``launch_config`` a ``--sweep`` saved in ``path`` (for `benchmarks.gpu`)."""
    from think_cache import kernels

    config = json.loads(open(path).read())["launch_config"]
    fields = {k: v for k, v in config.items() if k != "head_dim"}
    kernels.configure(config["head_dim"], **fields)
    return config


#: The kernel's variants `compile_for` builds: (quantized bits or None, irregular key blocks, pruned values, mask,
#: causal, split, token weights), in bfloat16 with head_dim 128 (64 kept key channels).
VARIANTS = [
    (None, False, False, False, False, False, False),
    (None, False, False, False, False, True, False),
    (None, False, True, True, False, True, False),
    (None, False, True, False, True, False, False),
    *((bits, irregular, pruned, False, False, True, False) for bits in (2, 4, 8) for irregular in (False, True)
      for pruned in (False, True)),
    (4, False, True, True, True, False, False),
    (None, False, False, True, False, True, True),
    (4, True, True, False, False, False, True),
]  # fmt: skip


def compile_for(arch: int, variants=VARIANTS) -> list[dict]:
    """Compile each of ``variants`` (see `VARIANTS`) for CUDA compute capability ``arch`` (90: H100) without a GPU;
    returns one record per variant, with the compiler's error where it failed. Needs Triton's CUDA backend and
    ``TRITON_INTERPRET`` unset (the kernel is jitted, not wrapped for the interpreter)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from think_cache import kernels
    from think_cache import quant as quant_layout

    jitted = kernels._kernels(False)
    params = list(inspect.signature(kernels._split_pass).parameters)
    records = []
    for bits, irregular, pruned, mask, causal, split, scores in variants:
        quant = bits is not None
        codes = "*u8" if quant else "*bf16"
        log_scales = quant and quant_layout.LOG_SCALES[bits]
        scales = "*u8" if log_scales else "*bf16"
        types = dict(
            q_ptr="*bf16", kch_ptr="*i16", ck_ptr=codes, cv_ptr=codes, vch_ptr="*i16", rk_ptr="*bf16",
            rv_ptr="*bf16", mask_ptr="*u8", out_ptr="*bf16", part_ptr="*fp32", count_ptr="*i32", ks_ptr=scales,
            lg_ptr="*fp32", st_ptr="*fp32",
            kz_ptr="*bf16", kb_ptr="*i32" if irregular else "*bf16", vs_ptr=scales, vz_ptr="*bf16", scale_log2="fp32",
        )  # fmt: skip
        block_kv = 64 if pruned else 128
        # a quantized launch's tile is the store's key block (16 tokens of shorter ones), its value group the
        # store's default
        block_n = max(16, quant_layout.key_block(bits)) if quant else 32
        constexprs = dict(
            BLOCK_R=16, BLOCK_N=block_n, BLOCK_D=128, BLOCK_KK=64,
            BLOCK_KV=block_kv, HAS_MASK=mask, CAUSAL=causal, PRUNED_V=pruned, SPLIT=split, BLOCK_S=64,
            PRECISION="tf32", UPCAST=False, QUANT=quant, BITS=bits or 8, IRREGULAR=irregular,
            V_GROUP=quant_layout.default_group_size(bits) if quant else block_kv, SCORES=scores,
            V_SYMMETRIC=quant and quant_layout.SYMMETRIC_VALUES[bits],
            TOKEN_BLOCKS=quant and not irregular and quant_layout.key_block(bits) < block_n, LOG_SCALES=log_scales,
        )  # fmt: skip
        # as a launch on a GPU specializes them: the innermost strides are 1 (constants), pointers and the other
        # strides of the keys and values multiples of 16 (aligned rows), what grows with the tokens unspecialized
        innermost = {p for p in params if p[0] == "s" and p.endswith(("_c", "_d")) and p != "sm_n"}
        constexprs.update({p: 1 for p in innermost})
        aligned = [
            i for i, p in enumerate(params)
            if p.endswith("_ptr") or (p[0] == "s" and "_" in p and p not in set(kernels.GROWING_ARGUMENTS) | innermost)
        ]  # fmt: skip
        signature = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
        constants = {(params.index(p),): value for p, value in constexprs.items()}
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned if signature[params[i]] != "constexpr"}
        record = dict(
            bits=bits, irregular=irregular, pruned_values=pruned, mask=mask, causal=causal, split=split, scores=scores
        )
        started = time.perf_counter()
        try:
            triton.compile(
                ASTSource(fn=jitted, signature=signature, constexprs=constants, attrs=attrs),
                target=GPUTarget("cuda", arch, 32),
            )
            record["ok"] = True
        except Exception as error:  # the compiler's message is the result
            record["ok"], record["error"] = False, repr(error.__cause__ or error)[:2000]
        record["seconds"] = round(time.perf_counter() - started, 1)
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="where to write the JSON results (required, except with --compile-for)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    parser.add_argument(
        "--runs", type=int, default=50, help="timed calls per measure, median taken (default 50; smoke: 3 at most)"
    )
    parser.add_argument("--sweep", action="store_true", help="tune the launch config first (see the docstring)")
    parser.add_argument(
        "--compile-for", type=int, metavar="CC", help="only compile every variant for CUDA capability CC (90), no GPU"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be 1 or more, not {args.runs}")
    if args.compile_for:
        records = compile_for(args.compile_for)
        for r in records:
            print(
                ("ok  " if r["ok"] else "FAIL")
                + f" {r['seconds']:5.1f} s "
                + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("ok", "seconds", "error"))
                + ("" if r["ok"] else "\n     " + r["error"])
            )
        from benchmarks.common import provenance

        results = dict(provenance(), compile_for=args.compile_for, triton=__import__("triton").__version__)
        results["variants"] = records
        results["all_ok"] = all(r["ok"] for r in records)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        return results
    if not args.out:
        parser.error("--out is required")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device: run on a GPU machine, or use --smoke for the tiny CPU run (Triton interpreted)"
        )
    if args.smoke:  # before Triton is first imported (the model classes of transformers import it)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from think_cache import kernels

    device = "cpu" if args.smoke else "cuda"
    if not kernels.kernel_available(device):
        raise SystemExit(f"the kernel cannot run on {device}: needs triton and a CUDA device (or --smoke)")
    started = time.perf_counter()

    if args.smoke:
        checks = [
            dict(batch=1, kv_heads=2, group=4, q_len=1, head_dim=64, kept_k=32, kept_v=None, n_compact=300, n_recent=5),
            dict(batch=2, kv_heads=1, group=2, q_len=2, head_dim=64, kept_k=38, kept_v=40, n_compact=90, n_recent=4),
        ]
        lengths, runs, warmup, timing_shape = (256,), min(args.runs, 3), 1, dict(kv_heads=2, group=4, head_dim=64)
    else:
        checks = [
            dict(batch=1, **LLAMA_8B, q_len=1, kept_k=64, kept_v=None, n_compact=4096, n_recent=20),
            dict(batch=2, **LLAMA_8B, q_len=4, kept_k=64, kept_v=77, n_compact=3000, n_recent=37),
            dict(
                batch=1, kv_heads=3, group=3, q_len=1, head_dim=64, kept_k=38, kept_v=None, n_compact=1000, n_recent=7
            ),
            dict(
                batch=1, kv_heads=2, group=2, q_len=2, head_dim=256, kept_k=100, kept_v=None, n_compact=777, n_recent=9
            ),
        ]
        lengths, runs, warmup, timing_shape = (8192, 32768, 131072), args.runs, 10, LLAMA_8B

    tuning = None
    if args.sweep:
        if args.smoke:  # the grid's shape only: each interpreted call takes a while
            grid = dict(tiles=dict(block_n=(32, 64), num_warps=(4,), num_stages=(None,)), per_sm=(1, 2))
            tuning = sweep(device, 1, (256,), timing_shape, **grid)
        else:
            tuning = sweep(device, min(runs, 20), lengths, timing_shape)
        kernels.configure(tuning["head_dim"], **tuning["best"])
        print(f"launch config for head_dim {tuning['head_dim']}: {tuning['best']} (was {tuning['default']})")
    launch = kernels.LAUNCH[kernels._pow2(timing_shape["head_dim"])]
    from benchmarks.common import provenance  # after TRITON_INTERPRET is set: it imports transformers

    results = {
        **provenance(),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "launch_config": {"head_dim": timing_shape["head_dim"], **dataclasses.asdict(launch)},
        "sweep": tuning,
        "checks": [check(shape, dtype, device) for dtype in (torch.bfloat16, torch.float32) for shape in checks]
        + [
            check_quantized(shape, bits, dtype, device, gathered)
            for bits in (4, 2, 8)
            for dtype in (torch.bfloat16, torch.float32)
            for shape in checks
            for gathered in (False, True)
        ],
        "timings": [time_layer(n, 16, device, runs, warmup, timing_shape) for n in lengths],
    }
    results["all_ok"] = all(c["ok"] for c in results["checks"])
    results["seconds"] = round(time.perf_counter() - started, 1)

    for c in results["checks"]:
        print(
            f"{c['dtype']:>8}{_bits(c)} B={c['batch']} {c['kv_heads']}x{c['group']} heads D={c['head_dim']} "
            f"L={c['q_len']} "
            f"keys {c['kept_k']} values {c['kept_v']} tokens {c['n_compact']}+{c['n_recent']}: kernel err "
            f"{c['kernel_max_err']:.2e} (torch path {c['torch_path_max_err']:.2e}) {'ok' if c['ok'] else 'FAIL'}"
        )
    for t in results["timings"]:
        print(
            f"{t['compact_tokens']:>7} tokens, µs per call (GPU only): "
            + ", ".join(f"{m} {t[f'{m}_call_us']:.1f} ({_us(t[f'{m}_gpu_us'])})" for m in _METHODS)
        )
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out} in {results['seconds']} s")
    return results


_METHODS = ("sdpa_full", "torch_compact", "kernel", "torch_int4", "kernel_int4")


def _bits(check: dict) -> str:
    if "bits" not in check:
        return ""
    return f" int{check['bits']}" + (" gathered" if check["gathered"] else "")


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
