"""The fused Triton kernel equals the torch path (`compact_attention` over a `FullStore`), run by Triton's interpreter
on the CPU (``TRITON_INTERPRET=1``): tiny shapes, so that the interpreter stays fast."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from conftest import generate, make_batch, make_model  # noqa: E402

from think_cache import H2O, SnapKV, ThinKCache, kernels  # noqa: E402
from think_cache.compact import compact_attention  # noqa: E402
from think_cache.storage import FullStore, QuantizedStore  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


if not kernels.kernel_available("cpu"):  # conftest sets TRITON_INTERPRET=1 before Triton is imported
    pytest.skip("Triton's interpreter is off (TRITON_INTERPRET=0)", allow_module_level=True)


@pytest.fixture(autouse=True)
def _auto_path(monkeypatch):
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)


def _channels(batch, kv_heads, head_dim, kept, g):
    return torch.stack(
        [torch.stack([torch.randperm(head_dim, generator=g)[:kept] for _ in range(kv_heads)]) for _ in range(batch)]
    ).to(torch.int16)


def _case(
    batch=1,
    kv_heads=2,
    group=4,
    q_len=1,
    head_dim=64,
    kept_k=32,
    kept_v=None,
    n_compact=40,
    n_recent=6,
    dtype=torch.float32,
    seed=0,
):
    """Random inputs: ``(query, store, recent_keys, recent_values)``, the query in transformers' layout (a
    transposed view of ``(batch, q_len, heads, head_dim)``, not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_len, kv_heads * group, head_dim, generator=g).to(dtype).transpose(1, 2)
    keys, values = (torch.randn(batch, kv_heads, n_compact, head_dim, generator=g).to(dtype) for _ in range(2))
    store = FullStore()
    value_channels = None if kept_v is None else _channels(batch, kv_heads, head_dim, kept_v, g)
    store.start(_channels(batch, kv_heads, head_dim, kept_k, g), value_channels)
    store.append(keys, values)
    recent_keys, recent_values = (torch.randn(batch, kv_heads, n_recent, head_dim, generator=g).to(dtype) for _ in "kv")
    return query, store, recent_keys, recent_values


def _check(query, store, recent_keys, recent_values, mask=None, split_tokens=None):
    scale = query.shape[-1] ** -0.5
    expected = compact_attention(query, store, recent_keys, recent_values, mask, scale)
    args = (query, store.key_channels, store.keys, store.values, store.value_channels, recent_keys, recent_values)
    if split_tokens is None:
        out = kernels.compact_decode_attention(*args, mask, scale)
    else:
        out = kernels._attention(*args, mask, scale, split_tokens=split_tokens)
    assert out.shape == expected.shape and out.dtype == query.dtype
    tol = TOL[query.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_key_ratios_groups_and_query_lengths(ratio, group, q_len):
    _check(*_case(group=group, q_len=q_len, kept_k=int(64 * ratio), seed=group + q_len))


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("kept_v", [48, 26])
def test_value_pruning(kept_v, q_len):
    _check(*_case(kept_k=38, kept_v=kept_v, q_len=q_len))


@pytest.mark.parametrize("q_len", [1, 3])
def test_left_padding(q_len):
    case = _case(batch=3, q_len=q_len, n_compact=45)
    n_total = 45 + 6
    mask = torch.ones(3, 1, q_len, n_total, dtype=torch.bool).tril(n_total - q_len)
    mask[1, ..., :9] = False  # row 1 left-padded by 9 tokens, row 2 by 30 (into the recent part's reach)
    mask[2, ..., :30] = False
    _check(*case, mask=mask)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    _check(*case, mask=additive)


def test_per_head_mask_after_eviction():
    """Under a token policy each KV head holds its own tokens: the mask has the KV heads in dim 1."""
    batch, kv_heads, q_len, n_total = 2, 2, 2, 46
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(batch, kv_heads, q_len, n_total, generator=g) > 0.4
    mask[..., -q_len:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    _check(*_case(batch=batch, kv_heads=kv_heads, q_len=q_len, kept_v=40), mask=mask)


def test_fully_masked_row_is_uniform_like_the_torch_path():
    mask = torch.ones(1, 1, 2, 46, dtype=torch.bool)
    mask[..., 0, :] = False
    _check(*_case(q_len=2), mask=mask, split_tokens=16)


@pytest.mark.parametrize("q_len", [1, 4])
def test_empty_compact_part(q_len):
    _check(*_case(n_compact=0, q_len=q_len, n_recent=7))


def test_fewer_recent_tokens_than_queries():
    _check(*_case(q_len=4, n_recent=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    _check(*_case(dtype=dtype, kept_k=38, q_len=2))
    _check(*_case(dtype=dtype, kept_k=38, kept_v=40), split_tokens=16)


@pytest.mark.parametrize(("head_dim", "kept_k", "kept_v"), [(128, 77, None), (256, 100, 90), (512, 256, None)])
def test_wide_heads_and_odd_widths(head_dim, kept_k, kept_v):
    _check(*_case(kv_heads=1, group=2, head_dim=head_dim, kept_k=kept_k, kept_v=kept_v, n_compact=70))


def test_split_across_programs():
    """A context longer than one span: partial results merged by log-sum-exp, the span boundary inside the compact
    part, on the compact/recent boundary and inside the recent part."""
    case = _case(batch=2, kv_heads=2, group=2, q_len=3, kept_v=40, n_compact=100, n_recent=40)
    mask = torch.ones(2, 1, 3, 140, dtype=torch.bool).tril(137)
    mask[0, ..., :50] = False
    for split_tokens in (16, 64, 100):
        _check(*case, mask=mask, split_tokens=split_tokens)
    _check(*_case(n_compact=300), split_tokens=None)  # the automatic plan splits 306 tokens on the CPU too


def _quantized_case(bits, kept_k=38, kept_v=None, q_len=1, n_compact=100, dtype=torch.float32, seed=0, group_size=32):
    """A `QuantizedStore` of ``n_compact`` tokens (regular key blocks), a query and a recent part."""
    batch, kv_heads, group, head_dim = 2, 2, 4, 64
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_len, kv_heads * group, head_dim, generator=g).to(dtype).transpose(1, 2)
    store = QuantizedStore(bits, group_size)
    value_channels = None if kept_v is None else _channels(batch, kv_heads, head_dim, kept_v, g)
    store.start(_channels(batch, kv_heads, head_dim, kept_k, g), value_channels)
    keys, values = (torch.randn(batch, kv_heads, n_compact, head_dim, generator=g).to(dtype) for _ in "kv")
    store.append(keys * torch.linspace(0.1, 3, head_dim).to(dtype), values)  # channels of different ranges
    recent = [torch.randn(batch, kv_heads, 7, head_dim, generator=g).to(dtype) for _ in "kv"]
    return query, store, *recent


def _check_quantized(query, store, recent_keys, recent_values, mask=None, split_tokens=None):
    scale = query.shape[-1] ** -0.5
    expected = compact_attention(query, store, recent_keys, recent_values, mask, scale)
    if split_tokens is None:
        out = kernels.store_attention(query, store, recent_keys, recent_values, mask, scale)
    else:
        args = (query, store.key_channels, store.keys.codes, store.values.codes, store.value_channels)
        quantized = (store.keys, store.values)
        out = kernels._attention(
            *args, recent_keys, recent_values, mask, scale, split_tokens=split_tokens, quantized=quantized
        )
    assert out.shape == expected.shape and out.dtype == query.dtype
    tol = TOL[query.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("kept_v", [None, 40])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_store(bits, kept_v, q_len):
    """Codes unpacked in the kernel (odd kept widths: padded planes; value groups of 32 and 8) equal the torch
    path: regular key blocks, then irregular ones after a per-head gather, with left padding and several spans."""
    query, store, rk, rv = _quantized_case(bits, kept_v=kept_v, q_len=q_len, seed=bits)
    _check_quantized(query, store, rk, rv)
    _check_quantized(query, store, rk, rv, split_tokens=32)  # regular blocks over spans: one key block a tile
    g = torch.Generator().manual_seed(1)
    index = torch.stack(
        [torch.stack([torch.randperm(100, generator=g)[:61].sort().values for _ in "hh"]) for _ in "bb"]
    )
    store.gather(index)
    assert store.keys.block_index is not None  # each token keeps the block it was quantized in
    mask = torch.ones(2, 1, q_len, 68, dtype=torch.bool).tril(68 - q_len)
    mask[1, ..., :9] = False
    _check_quantized(query, store, rk, rv, mask=mask)
    _check_quantized(query, store, rk, rv, mask=mask, split_tokens=32)


@pytest.mark.parametrize("kept_v", [None, 40])
@pytest.mark.parametrize("group_size", [8, 16, 64, 128])
def test_quantized_value_groups(group_size, kept_v):
    """Each value group's scale is loaded once per token and spread over the group's channels: groups narrower than
    a tile, one group over the whole row, and a row narrower than one group all equal the torch path."""
    _check_quantized(*_quantized_case(4, kept_v=kept_v, q_len=2, group_size=group_size, seed=group_size))


def test_layouts_the_kernel_cannot_read_take_the_torch_path(monkeypatch):
    """Value groups that are not a power of two cannot be spread over a tile by a reshape: `use_kernel` sends such a
    store to the torch path even under ``triton``, and the kernel refuses it if called directly."""
    monkeypatch.setenv(kernels.KERNEL_ENV, "triton")
    assert kernels.kernel_reads(QuantizedStore(4, 32)) and kernels.use_kernel(QuantizedStore(4, 32), "cpu")
    assert not kernels.kernel_reads(QuantizedStore(4, 24))
    assert not kernels.use_kernel(QuantizedStore(4, 24), "cpu")
    query, store, rk, rv = _quantized_case(4, group_size=24)
    with pytest.raises(ValueError, match="power-of-two groups and tiles"):
        kernels.store_attention(query, store, rk, rv, None, 0.125)
    one_group = _quantized_case(4, kept_v=40, group_size=48)  # any width when a row is one group
    assert kernels.kernel_reads(one_group[1]) and kernels.use_kernel(one_group[1], "cpu")
    _check_quantized(*one_group)


def _check_token_weights(query, store, recent_keys, recent_values, mask=None, split_tokens=None):
    """The kernel's output and per-token weights (H2O's) against `compact_attention(return_token_weights=True)`."""
    scale = query.shape[-1] ** -0.5
    expected, expected_weights = compact_attention(
        query, store, recent_keys, recent_values, mask, scale, return_token_weights=True
    )
    quantized = (store.keys, store.values) if isinstance(store, QuantizedStore) else None
    compact_keys, compact_values = (store.keys.codes, store.values.codes) if quantized else (store.keys, store.values)
    out, weights = kernels._attention(
        query, store.key_channels, compact_keys, compact_values, store.value_channels, recent_keys, recent_values,
        mask, scale, split_tokens=split_tokens, quantized=quantized, token_weights=True,
    )  # fmt: skip
    assert weights.shape == expected_weights.shape and weights.dtype == torch.float32
    tol = TOL[query.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(weights, expected_weights, atol=tol, rtol=tol)


@pytest.mark.parametrize("split_tokens", [None, 32])
@pytest.mark.parametrize("q_len", [1, 3])
def test_token_weights(q_len, split_tokens):
    """With ``token_weights`` the kernel also gives each stored token's attention weight summed over its KV head's
    query rows, as the torch path does for H2O: full precision and 4-bit, one span or several, a left-padded batch
    (its padded rows: a query that may see nothing spreads its weight evenly, as the torch path's softmax does)."""
    case = _case(batch=2, q_len=q_len, n_compact=100, kept_v=40, seed=q_len)
    n_total = 106
    mask = torch.ones(2, 1, q_len, n_total, dtype=torch.bool).tril(n_total - q_len)
    mask[1, ..., :30] = False
    _check_token_weights(*case, mask=mask, split_tokens=split_tokens)
    _check_token_weights(*case, split_tokens=split_tokens)
    mask[1] = False  # a row that may see nothing
    _check_token_weights(*case, mask=mask, split_tokens=split_tokens)
    query, store, rk, rv = _quantized_case(4, kept_v=40, q_len=q_len, seed=5)
    n_total = store.tokens + rk.shape[2]
    _check_token_weights(query, store, rk, rv, split_tokens=split_tokens)
    assert kernels.store_attention(query, store, rk, rv, None, 0.125, token_weights=True)[1].shape == (2, 2, n_total)


def test_quantized_store_must_match_its_channels():
    """The kernel reads scales by the kept channel counts: codes of another width are refused, not read past."""
    query, store, rk, rv = _quantized_case(4, kept_v=40)
    channels = store.key_channels
    store.key_channels = channels[..., :30]
    with pytest.raises(ValueError, match="kept key / 40 value channels"):
        kernels.quantized_decode_attention(query, store, rk, rv, None, 0.125)
    store.key_channels = channels
    other = QuantizedStore(2)
    other.start(store.key_channels, store.value_channels)
    other.append(torch.randn(2, 2, 100, 64), torch.randn(2, 2, 100, 64))
    store.values = other.values
    with pytest.raises(ValueError, match="expected the same code width, tokens and kind of scales"):
        kernels.quantized_decode_attention(query, store, rk, rv, None, 0.125)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_store_half_precision(dtype):
    _check_quantized(*_quantized_case(4, kept_v=40, q_len=2, dtype=dtype))


def test_dispatch_choice(monkeypatch):
    full, quantized = FullStore(), QuantizedStore(bits=4)
    assert kernels.kernel_available("cpu")  # interpreted
    assert not kernels.use_kernel(full, torch.device("cpu"))  # auto: CUDA only
    monkeypatch.setenv(kernels.KERNEL_ENV, "triton")
    assert kernels.use_kernel(full, torch.device("cpu"))
    assert kernels.use_kernel(quantized, torch.device("cpu"))  # codes read by the kernel too
    assert not kernels.use_kernel(full, torch.device("cpu"), softcap=30.0)  # no cap in the kernel
    monkeypatch.setenv(kernels.KERNEL_ENV, "torch")
    assert not kernels.use_kernel(full, torch.device("cpu"))
    monkeypatch.setenv(kernels.KERNEL_ENV, "cuda")
    with pytest.raises(ValueError, match="THINK_CACHE_KERNEL='cuda'"):
        kernels.use_kernel(full, torch.device("cpu"))
    monkeypatch.setenv(kernels.KERNEL_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.use_kernel(full, torch.device("cpu"))


def _generate(monkeypatch, path, model, ids, mask, steps, **cache_kwargs):
    monkeypatch.setenv(kernels.KERNEL_ENV, path)
    calls = []
    real = kernels.store_attention
    monkeypatch.setattr(kernels, "store_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = generate(model, ids, mask, ThinKCache(**cache_kwargs), steps=steps)
    assert bool(calls) == (path == "triton")
    return out


@pytest.mark.parametrize(
    "cache_kwargs",
    [
        dict(key_ratio=0.5),
        dict(key_ratio=0.5, value_ratio=0.3, policy=SnapKV(budget=24, window=6, kernel=3)),
        dict(key_ratio=0.5, bits=4),
        dict(key_ratio=0.4, value_ratio=0.3, bits=2, policy=SnapKV(budget=24, window=6, kernel=3)),
        dict(key_ratio=0.5, value_ratio=0.25, policy=H2O(budget=20, recent=4)),
        dict(key_ratio=0.5, bits=4, policy=H2O(budget=20, recent=4)),
    ],
    ids=["think", "snapkv-values", "int4", "snapkv-values-int2", "h2o-values", "h2o-int4"],
)
def test_generation_equals_torch_path(monkeypatch, cache_kwargs):
    """A tiny GQA Llama, greedy, a left-padded batch, long enough for generated tokens to fold into the compact
    part: the same tokens and logits through the kernel as through the torch path."""
    model = make_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=1)
    ids, mask = make_batch([30, 21], seed=4)
    a = _generate(monkeypatch, "triton", model, ids, mask, 36, **cache_kwargs)
    b = _generate(monkeypatch, "torch", model, ids, mask, 36, **cache_kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_kernel_check_smoke(tmp_path):
    """benchmarks/kernel_check.py, the GPU check, runs its tiny CPU variant and writes its JSON."""
    from benchmarks import kernel_check

    out = tmp_path / "check.json"
    results = kernel_check.main(["--smoke", "--out", str(out), "--runs", "2"])
    # plain stores, then 2/4/8-bit ones, as appended and gathered per head (irregular key blocks)
    assert results["all_ok"] and len(results["checks"]) == 4 + 3 * 2 * 2 * 2
    assert {(c["bits"], c["gathered"]) for c in results["checks"][4:]} == {(b, g) for b in (2, 4, 8) for g in (0, 1)}
    assert json.loads(out.read_text())["timings"][0]["kernel_call_us"] > 0


def test_kernel_check_sweep_applies_and_saves_its_choice(tmp_path, monkeypatch):
    """--sweep times each launch config of its grid, applies the best, saves it as launch_config; the benchmarks
    launch with it through apply_launch_config; the module's default is back afterwards."""
    from benchmarks import kernel_check

    monkeypatch.setattr(kernels, "LAUNCH", dict(kernels.LAUNCH))  # the run applies its choice for the process
    default = kernels.LAUNCH[64]
    out = tmp_path / "sweep.json"
    results = kernel_check.main(["--smoke", "--sweep", "--out", str(out), "--runs", "1"])
    tuning = results["sweep"]
    rows = tuning["rows"]
    assert results["all_ok"] and len(rows) == 1 + 2 + 2  # the current config, two tiles, two programs per SM
    assert {r["block_n"] for r in rows} == {32, 64} and {r["programs_per_sm"] for r in rows} == {1, 2}
    best = min(rows, key=lambda r: r["relative"])
    assert tuning["best"] == {k: best[k] for k in ("block_n", "num_warps", "num_stages", "programs_per_sm")}
    assert results["launch_config"] == {"head_dim": 64, **tuning["best"]}
    kernels.LAUNCH[64] = default
    kernel_check.apply_launch_config(str(out))
    assert kernels.LAUNCH[64] == kernels.LaunchConfig(**tuning["best"])


def test_launch_config_changes_the_launch_not_the_answer():
    """Every launch config the sweep may pick (tiles, warps, stages, spans) gives the default's output."""
    query, store, rk, rv = _case(n_compact=600, n_recent=5, kept_v=40, seed=3)
    reference = kernels.store_attention(query, store, rk, rv, None, 0.125)
    for changes in (dict(block_n=32), dict(num_warps=8, num_stages=2), dict(programs_per_sm=8, block_n=128)):
        previous = kernels.configure(64, **changes)
        try:
            out = kernels.store_attention(query, store, rk, rv, None, 0.125)
        finally:
            kernels.LAUNCH[64] = previous
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_variants_compile_for_an_h100(tmp_path):
    """The interpreter misses what only the CUDA compiler rejects: the full-precision kernel, the quantized one with
    regular and with irregular key blocks, the masked causal variant and both with token weights (H2O) compile for
    sm_90 (no GPU needed)."""
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if not hasattr(triton, "compile") or "nvidia" not in triton.backends.backends:
        pytest.skip("Triton without its CUDA backend")
    script = (
        "import json, sys; from benchmarks import kernel_check as k; "
        "v = [k.VARIANTS[2], (4, False, True, False, False, True, False), (2, True, True, False, False, True, False), "
        "k.VARIANTS[-3], k.VARIANTS[-2], k.VARIANTS[-1]]; "
        "json.dump(k.compile_for(90, v), sys.stdout)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout)
    assert len(records) == 6 and all(r["ok"] for r in records), [r.get("error") for r in records]


def test_span_counters_are_reset_for_the_next_launch():
    """The split kernel's per-program counters are kept between launches: each launch leaves them at zero, so a
    second launch over other spans (and another program count) combines its own spans only."""
    kernels._COUNTERS.clear()
    case = _case(batch=2, n_compact=300, kept_v=40)
    _check(*case, split_tokens=64)
    (counters,) = kernels._COUNTERS.values()
    assert counters.numel() >= 2 * 2 and not counters.any()
    _check(*case, split_tokens=32)
    _check(*_case(batch=1, group=8, n_compact=200, seed=3), split_tokens=64)
    assert not counters.any() and len(kernels._COUNTERS) == 1


def test_a_failed_launch_drops_the_kept_counters(monkeypatch):
    """A launch that stops part way may leave counts behind; the kept counters are dropped with it, and the next
    launch starts from zeroed ones."""
    case = _case(n_compact=300)
    _check(*case, split_tokens=64)
    assert kernels._COUNTERS

    class Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[10][:1] = 1  # a span counted itself, then the launch failed
                raise RuntimeError("launch failed")

            return launch

    with monkeypatch.context() as m:
        m.setattr(kernels, "_kernels", lambda interpret: Failing())
        with pytest.raises(RuntimeError, match="launch failed"):
            _check(*case, split_tokens=64)
    assert not kernels._COUNTERS
    _check(*case, split_tokens=64)


def test_h2o_takes_the_torch_path_when_its_logits_would_not_fit_a_chunk(monkeypatch):
    """Under H2O the kernel writes every row's logits as one float32 block; a forward whose block would exceed the
    torch path's chunk (`attention.ROW_CHUNK_ELEMENTS`, e.g. a long later prompt over a long context) takes the
    chunked torch path instead, with the same tokens."""
    from think_cache import attention

    model = make_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=1)
    ids, mask = make_batch([30, 21], seed=4)
    settings = dict(key_ratio=0.5, policy=H2O(budget=20, recent=4))
    through_kernel = _generate(monkeypatch, "triton", model, ids, mask, 12, **settings)
    monkeypatch.setattr(attention, "ROW_CHUNK_ELEMENTS", 64)  # smaller than any decoding step's logits here
    calls = []
    real = kernels.store_attention
    monkeypatch.setattr(kernels, "store_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    chunked = generate(model, ids, mask, ThinKCache(**settings), steps=12)
    assert not calls
    assert torch.equal(chunked.sequences, through_kernel.sequences)
