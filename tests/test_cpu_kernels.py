"""The CPU loops of think_cache.cpu_kernels: what the torch path computes, for every layout; when they serve; how
they are built and what happens when they cannot be."""

from __future__ import annotations

import dataclasses
import platform
import threading
import warnings

import pytest
import torch
from conftest import generate, make_batch, make_model
from test_quant import fake_quant_keys, fake_quant_values, quantize_pieces
from test_quantized_cache import _LargestTensor

from think_cache import ThinKCache, cpu_kernels, kernels, quant
from think_cache.compact import compact_attention
from think_cache.storage import QuantizedStore

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU loops cannot be built here")


@pytest.fixture(autouse=True)
def loops_on(monkeypatch):
    """Whatever the environment says, these tests run the loops (a test that wants the torch path sets it)."""
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)


def both_paths(fn, monkeypatch):
    """``fn()`` through the loops, then through the torch path."""
    loops = fn()
    with monkeypatch.context() as m:
        m.setenv(kernels.KERNEL_ENV, "torch")
        reference = fn()
    return loops, reference


def pieces_of(keys: torch.Tensor, bits: int, pieces: list[int], log_scales: bool) -> quant.QuantKeys:
    qk, start = None, 0
    for n in pieces:
        part = quant.quantize_keys(keys[:, :, start : start + n], bits, quant.key_block(bits), log_scales=log_scales)
        qk = part if qk is None else quant.cat_keys(qk, part)
        start += n
    return qk


# (bits, log scales, key channels, value channels, value group, symmetric values, pieces, rows)
CASES = [
    (4, True, 32, 64, 32, True, [4096], 3),  # SmolLM2's 4-bit decode step at key ratio 0.5
    (4, True, 39, 51, 32, True, [64, 40], 9),  # key ratio 0.4, value ratio 0.2: planes not a multiple of 8 lanes
    (2, False, 32, 64, 64, False, [100], 1),
    (2, False, 13, 20, 6, False, [17, 32, 5], 5),  # ragged blocks (a block index), groups across lane vectors
    (8, False, 32, 64, 32, False, [96, 1], 4),
    (8, True, 7, 12, 5, True, [33], 8),
    (4, False, 64, 128, 32, False, [31], 2),
    (4, True, 16, 64, 64, True, [1], 64),  # one token; the most rows the loops serve
]


@pytest.mark.parametrize("bits, log_scales, kept_k, kept_v, group, symmetric, pieces, rows", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loops_equal_the_torch_path(
    bits, log_scales, kept_k, kept_v, group, symmetric, pieces, rows, dtype, monkeypatch
):
    g = torch.Generator().manual_seed(bits * 1000 + kept_k + rows)
    batch, heads, tokens = 2, 2, sum(pieces)
    keys = (torch.randn(batch, heads, tokens, kept_k, generator=g) * 2).to(dtype)
    values = torch.randn(batch, heads, tokens, kept_v, generator=g).to(dtype)
    qk = pieces_of(keys, bits, pieces, log_scales)
    qv = quant.quantize_values(values, bits, group, symmetric=symmetric, log_scales=log_scales)
    assert qk.log_scales == qv.log_scales == log_scales
    query = torch.randn(batch, heads, rows, kept_k, generator=g).to(dtype)
    weights = torch.softmax(torch.randn(batch, heads, rows, tokens, generator=g), -1)
    assert cpu_kernels.serves(query, rows) and cpu_kernels.serves(weights, rows)

    logits, ref_logits = both_paths(lambda: quant.quantized_attention_logits(query, qk, 0.125), monkeypatch)
    assert logits.dtype == torch.float32 and logits.shape == (batch, heads, rows, tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-5)
    out, ref_out = both_paths(lambda: quant.quantized_attention_output(weights, qv), monkeypatch)
    assert out.dtype == torch.float32 and out.shape == (batch, heads, rows, kept_v)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_loops_equal_the_fake_quant_reference(bits):
    """Not only the torch path: the loops' logits and outputs equal float math on fake-quantized keys and values."""
    g = torch.Generator().manual_seed(bits)
    keys, values = torch.randn(1, 3, 77, 24, generator=g), torch.randn(1, 3, 77, 40, generator=g)
    query, pieces = torch.randn(1, 3, 3, 24, generator=g), [64, 13]
    qk = quantize_pieces(keys, bits, pieces)  # 32-token blocks, as the fake-quant reference's
    qv = quant.quantize_values(values, bits, 16)
    assert cpu_kernels.serves(query, 3)
    logits = quant.quantized_attention_logits(query, qk, 0.2)
    torch.testing.assert_close(logits, query @ fake_quant_keys(keys, bits, pieces).transpose(-1, -2) * 0.2)
    weights = torch.softmax(logits, -1)
    torch.testing.assert_close(
        quant.quantized_attention_output(weights, qv), weights @ fake_quant_values(values, bits, 16)
    )


def test_tokens_gathered_per_head(monkeypatch):
    """A policy's gather leaves each head its own tokens and irregular blocks (a block index per head)."""
    g = torch.Generator().manual_seed(7)
    qk = quant.quantize_keys(torch.randn(2, 3, 96, 20, generator=g), 4, 8, log_scales=True)
    qv = quant.quantize_values(torch.randn(2, 3, 96, 64, generator=g), 4, 32, symmetric=True, log_scales=True)
    index = torch.stack([torch.randperm(96, generator=g)[:41].sort().values for _ in range(6)]).view(2, 3, 41)
    qk, qv = quant.gather_keys(qk, index), quant.gather_values(qv, index)
    assert not qk.is_regular
    query, weights = torch.randn(2, 3, 4, 20, generator=g), torch.softmax(torch.randn(2, 3, 4, 41, generator=g), -1)
    for fn in (
        lambda: quant.quantized_attention_logits(query, qk, 0.3),
        lambda: quant.quantized_attention_output(weights, qv),
    ):
        loops, reference = both_paths(fn, monkeypatch)
        torch.testing.assert_close(loops, reference, atol=2e-5, rtol=1e-5)


def test_empty_context_through_the_loops():
    qk = quant.quantize_keys(torch.randn(1, 2, 0, 4), 4)
    qv = quant.quantize_values(torch.randn(1, 2, 0, 6), 4)
    query = torch.randn(1, 2, 3, 4)
    assert cpu_kernels.serves(query, 3)
    assert quant.quantized_attention_logits(query, qk, 0.5).shape == (1, 2, 3, 0)
    assert quant.quantized_attention_output(torch.randn(1, 2, 3, 0), qv).eq(0).all()


def test_half_precision_edge_values(monkeypatch):
    """float16 scales and zero points read in place: subnormals, zeros, the largest finite, infinity (the loops
    decode them as torch does; an infinite zero point gives the torch path's inf / nan logits)."""
    g = torch.Generator().manual_seed(11)
    qk = quant.quantize_keys(torch.randn(1, 2, 40, 9, generator=g).half(), 4, 8)
    special = torch.tensor([6e-8, 3e-5, 6.1e-5, 0.0, -0.0, 65504.0, -2e-7, 1.0], dtype=torch.float16)
    scale = qk.scale.clone().view(-1)
    scale[: special.numel()] = special.abs()
    zero = qk.zero.clone().view(-1)
    zero[: special.numel()] = special
    zero[-1] = float("inf")
    qk = quant.QuantKeys(qk.codes, scale.view_as(qk.scale), zero.view_as(qk.zero), None, 4, 8, 9, torch.float16)
    query = torch.randn(1, 2, 3, 9, generator=g)
    loops, reference = both_paths(lambda: quant.quantized_attention_logits(query, qk, 0.3), monkeypatch)
    assert torch.isinf(reference).any() or torch.isnan(reference).any()
    torch.testing.assert_close(loops, reference, atol=2e-5, rtol=1e-5, equal_nan=True)


def test_keys_of_no_channels_give_zero_logits():
    qk = quant.quantize_keys(torch.randn(1, 2, 40, 0), 4, 8)
    logits = quant.quantized_attention_logits(torch.randn(1, 2, 3, 0), qk, 0.5)
    assert logits.shape == (1, 2, 3, 40) and logits.eq(0).all()


def test_layouts_the_loops_would_misread_are_refused():
    """Where the torch path would fail on a broken layout, the loops raise before reading past an array."""
    qk = quant.quantize_keys(torch.randn(1, 2, 40, 8), 4, 8)
    query = torch.randn(1, 2, 3, 8)
    index = torch.zeros(1, 2, 40, dtype=torch.int32)
    index[0, 1, 7] = qk.n_blocks  # one past the last block
    with pytest.raises(ValueError, match="block index past the stored blocks"):
        cpu_kernels.keys_logits(query, dataclasses.replace(qk, block_index=index), 0.5)
    with pytest.raises(ValueError, match="do not cover"):
        cpu_kernels.keys_logits(query, dataclasses.replace(qk, scale=qk.scale[:, :, :2], zero=qk.zero[:, :, :2]), 0.5)
    with pytest.raises(ValueError, match="pack into 4 bytes"):
        cpu_kernels.keys_logits(query, dataclasses.replace(qk, codes=qk.codes[..., :3]), 0.5)
    qv = quant.quantize_values(torch.randn(1, 2, 40, 12), 4, 8)
    weights = torch.softmax(torch.randn(1, 2, 3, 40), -1)
    with pytest.raises(ValueError, match="does not fit codes"):
        cpu_kernels.values_output(weights, dataclasses.replace(qv, scale=qv.scale[..., :1]))


def test_results_on_the_cpu_under_another_default_device():
    """The loops write into tensors they allocate on the CPU, whatever the default device (under a meta default
    an allocation without a device would be meta: no memory to write)."""
    qk = quant.quantize_keys(torch.randn(1, 2, 40, 8), 4, 8)
    qv = quant.quantize_values(torch.randn(1, 2, 40, 12), 4, 8)
    query, weights = torch.randn(1, 2, 3, 8), torch.softmax(torch.randn(1, 2, 3, 40), -1)
    expected = quant.quantized_attention_logits(query, qk, 0.5), quant.quantized_attention_output(weights, qv)
    with torch.device("meta"):
        got = quant.quantized_attention_logits(query, qk, 0.5), quant.quantized_attention_output(weights, qv)
    for a, b in zip(got, expected, strict=True):
        assert a.device.type == "cpu"
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("flags", [(), ("-mavx", "-mno-avx2")], ids=["portable", "avx-only"])
def test_other_builds_compute_the_same(flags, tmp_path, monkeypatch):
    """The portable build (the fallback where -march=native fails) and an AVX-without-AVX2 build: each code path
    of the source compiles and gives the torch path's numbers."""
    if flags and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    compiler = cpu_kernels._compiler()
    target = tmp_path / "loops.so"
    complaint, _ = cpu_kernels._compile(compiler, cpu_kernels._FLAGS + flags, target)
    assert complaint is None, complaint
    lib = cpu_kernels._load(target)
    monkeypatch.setattr(cpu_kernels, "library", lambda: lib)
    test_loops_equal_the_torch_path(4, True, 39, 51, 32, True, [64, 40], 9, torch.bfloat16, monkeypatch)
    test_loops_equal_the_torch_path(2, False, 13, 20, 6, False, [17, 32, 5], 5, torch.float32, monkeypatch)


# --------------------------------------------------------------------------------------------------- dispatch
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's fake tensors import it
def test_which_calls_the_loops_serve(monkeypatch):
    x = torch.randn(1, 2, 3, 8)
    assert cpu_kernels.serves(x, 3)
    assert cpu_kernels.serves(x, cpu_kernels.MAX_ROWS) and not cpu_kernels.serves(x, cpu_kernels.MAX_ROWS + 1)
    assert not cpu_kernels.serves(torch.randn(1, 2, 3, 8, device="meta"), 3)
    qk = quant.quantize_keys(torch.randn(1, 2, 5, 8), 4, 8)
    assert cpu_kernels.serves(x, 3, qk)
    for field in ("codes", "scale", "zero"):  # any tensor without CPU memory: the torch path (or its error)
        assert not cpu_kernels.serves(x, 3, dataclasses.replace(qk, **{field: getattr(qk, field).to("meta")}))
    with torch._subclasses.fake_tensor.FakeTensorMode() as fake:
        assert not cpu_kernels.serves(fake.from_tensor(x), 3)
    wants_grad = x.clone().requires_grad_()
    assert not cpu_kernels.serves(wants_grad, 3)
    assert not cpu_kernels.serves(x, 3, dataclasses.replace(qk, zero=qk.zero.clone().requires_grad_()))
    with torch.no_grad():
        assert cpu_kernels.serves(wants_grad, 3)
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        assert not cpu_kernels.serves(fwad.make_dual(x, torch.ones_like(x)), 3)
    index = torch.zeros(1, 2, 5, dtype=torch.int32)
    assert cpu_kernels.serves(x, 3, dataclasses.replace(qk, block_index=index))
    assert not cpu_kernels.serves(x, 3, dataclasses.replace(qk, block_index=index.long()))  # read as stored: int32
    monkeypatch.setenv(kernels.KERNEL_ENV, "torch")
    assert not cpu_kernels.serves(x, 3)
    monkeypatch.setenv(kernels.KERNEL_ENV, "cpu")
    with pytest.raises(ValueError, match="expected 'auto', 'torch' or 'triton'"):
        cpu_kernels.serves(x, 3)


def test_gradients_through_scales_and_forward_mode_keep_the_torch_path():
    """Quantized tensors that want gradients, or a dual query: the loops would drop them silently."""
    qk = quant.quantize_keys(torch.randn(1, 2, 40, 8), 4, 8)
    zero = qk.zero.clone().requires_grad_()
    logits = quant.quantized_attention_logits(torch.randn(1, 2, 3, 8), dataclasses.replace(qk, zero=zero), 0.5)
    assert logits.requires_grad
    logits.sum().backward()
    assert zero.grad is not None and zero.grad.abs().sum() > 0


def test_malformed_layouts_are_refused_not_read(monkeypatch):
    """Hand-built codes the loops cannot read safely: a clear error (or the torch path), never a read past them."""
    qk = quant.quantize_keys(torch.randn(2, 2, 40, 8), 4, 8)
    query = torch.randn(2, 2, 3, 8)
    with pytest.raises(ValueError, match="pack into"):  # codes without their token axis
        cpu_kernels.keys_logits(query, dataclasses.replace(qk, codes=qk.codes[:, :, 0]), 0.5)
    index = torch.zeros(2, 2, 40, dtype=torch.int32)
    for bad in (index[:1], index[..., :30]):  # one batch row for two; fewer tokens than the codes hold
        with pytest.raises(ValueError, match="block index of shape"):
            cpu_kernels.keys_logits(query, dataclasses.replace(qk, block_index=bad), 0.5)
    with pytest.raises(ValueError, match="block"):
        cpu_kernels.keys_logits(query, dataclasses.replace(qk, block=0), 0.5)
    qv = quant.quantize_values(torch.randn(2, 2, 40, 8), 4, 4)
    weights = torch.softmax(torch.randn(2, 2, 3, 40), -1)
    for group in (0, -1):
        with pytest.raises(ValueError, match="group_size"):
            cpu_kernels.values_output(weights, dataclasses.replace(qv, group_size=group))
    logits = cpu_kernels.keys_logits(query, qk, torch.tensor(0.5))  # a tensor scale, as the torch path takes
    torch.testing.assert_close(logits, quant.dequantize_keys(qk, torch.float32).matmul(query.mT).mT * 0.5)


def test_many_rows_take_the_torch_path(monkeypatch):
    """A later prompt's many rows get the torch path, whose matmuls block for the cache."""
    calls = []
    original = cpu_kernels.keys_logits
    monkeypatch.setattr(cpu_kernels, "keys_logits", lambda *a: calls.append(1) or original(*a))
    qk = quant.quantize_keys(torch.randn(1, 2, 40, 8), 4, 8)
    quant.quantized_attention_logits(torch.randn(1, 2, 3, 8), qk, 0.5)
    assert calls == [1]
    quant.quantized_attention_logits(torch.randn(1, 2, cpu_kernels.MAX_ROWS + 1, 8), qk, 0.5)
    assert calls == [1]


def test_a_decoding_step_allocates_no_context_sized_copy():
    """Through the loops, a decode step's largest tensor is a row of logits per query (rows x tokens floats, as
    stock attention's weights): nothing of tokens x channels, and the loops' own buffer does not depend on tokens."""
    batch, heads, group, head_dim = 1, 2, 2, 64
    g = torch.Generator().manual_seed(0)
    channels = torch.arange(0, head_dim, 2).expand(batch, heads, head_dim // 2)
    for tokens in (2048, 8192):
        store = QuantizedStore(4)
        store.start(channels, None)
        for _ in range(0, tokens, 1024):
            k = torch.randn(batch, heads, 1024, head_dim, generator=g, dtype=torch.bfloat16)
            store.append(k, torch.randn(batch, heads, 1024, head_dim, generator=g, dtype=torch.bfloat16))
        query = torch.randn(batch, heads * group, 1, head_dim, generator=g, dtype=torch.bfloat16)
        recent = torch.randn(batch, heads, 5, head_dim, generator=g, dtype=torch.bfloat16)
        with _LargestTensor() as seen:
            compact_attention(query, store, recent, recent, None, head_dim**-0.5)
        assert seen.largest <= batch * heads * group * (tokens + 5) * 4
        assert seen.largest < batch * heads * tokens * head_dim * 4 / 16


def test_generation_equals_the_torch_path(monkeypatch):
    """A 4-bit cache's greedy generation, left-padded batch, gives the torch path's logits."""
    model = make_model("llama")
    ids, mask = make_batch([50, 37], seed=3)

    def run():
        out = generate(model, ids, mask, ThinKCache(key_ratio=0.5, value_ratio=0.25, bits=4, window=8), 70)
        return torch.stack(out.logits), out.sequences

    (logits, tokens), (ref_logits, ref_tokens) = both_paths(run, monkeypatch)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ build
@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A build folder of its own and no library loaded yet (restored for the other tests afterwards)."""
    monkeypatch.setenv(cpu_kernels.BUILD_DIR_ENV, str(tmp_path))
    cpu_kernels.library.cache_clear()
    yield tmp_path
    cpu_kernels.library.cache_clear()


def test_the_build_is_reused(fresh_build, monkeypatch):
    assert cpu_kernels.available()
    built = list(fresh_build.glob("quant_attention-*.so"))
    assert len(built) == 1 and not list(fresh_build.glob("*.tmp"))
    cpu_kernels.library.cache_clear()
    monkeypatch.setattr(cpu_kernels, "_compile", lambda *a: pytest.fail("compiled again"))
    assert cpu_kernels.available()


def test_a_failed_native_build_falls_back_and_is_remembered(fresh_build, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_NATIVE", ("-mno-such-option",))
    assert cpu_kernels.available()  # the portable build
    assert len(list(fresh_build.glob("*.failed"))) == 1 and len(list(fresh_build.glob("*.so"))) == 1
    cpu_kernels.library.cache_clear()
    monkeypatch.setattr(cpu_kernels, "_compile", lambda *a: pytest.fail("compiled again"))
    assert cpu_kernels.available()


def test_without_a_compiler_a_warning_and_the_torch_path(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    monkeypatch.setattr(cpu_kernels, "_library_path", lambda c, f, folder: fresh_build / f"{len(f)}.so")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert not cpu_kernels.available()
    qk = quant.quantize_keys(torch.randn(1, 2, 40, 8), 4, 8)
    query = torch.randn(1, 2, 3, 8)
    assert not cpu_kernels.serves(query, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torch path, and no second warning
        logits = quant.quantized_attention_logits(query, qk, 0.5)
    torch.testing.assert_close(logits, query @ quant.dequantize_keys(qk, torch.float32).transpose(-1, -2) * 0.5)


def test_a_passing_failure_is_not_remembered(fresh_build, monkeypatch):
    """A compiler that timed out or could not start says nothing lasting about the flags: the next process tries
    the native build again."""

    real_run, calls = cpu_kernels.subprocess.run, []

    def first_times_out(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise cpu_kernels.subprocess.TimeoutExpired("cc", 120)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels.subprocess, "run", first_times_out)
    assert cpu_kernels.available()  # the portable build, after the native one "timed out"
    assert not list(fresh_build.glob("*.failed")) and not list(fresh_build.glob("*.tmp"))


def test_an_interrupted_build_leaves_nothing(fresh_build, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cpu_kernels.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cpu_kernels.available()
    assert not list(fresh_build.iterdir())


def test_a_relative_build_folder_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(cpu_kernels.BUILD_DIR_ENV, "built")
    assert cpu_kernels.build_dir() == tmp_path / "built"


def test_a_link_is_not_loaded(fresh_build):
    """The file checked is the file loaded: a link in the build folder (to a library anyone could have written) is
    refused."""
    assert cpu_kernels.available()
    (built,) = fresh_build.glob("quant_attention-*.so")
    link = fresh_build / "link.so"
    link.symlink_to(built)
    with pytest.raises(OSError):
        cpu_kernels._load(link)
    built.chmod(0o777)
    with pytest.raises(PermissionError, match="alone"):
        cpu_kernels._load(built)


def test_threads_asking_at_once_build_once(fresh_build):
    results = []
    threads = [threading.Thread(target=lambda: results.append(cpu_kernels.available())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4
    assert len(list(fresh_build.glob("quant_attention-*.so"))) == 1 and not list(fresh_build.glob("*.tmp"))


def test_a_folder_others_can_write_is_not_used(fresh_build, monkeypatch):
    """A library loaded from a folder anyone can write to could be anyone's: such a folder is passed over (for the
    private temporary one)."""
    shared = fresh_build / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(cpu_kernels.BUILD_DIR_ENV, str(shared))
    assert cpu_kernels.available()
    assert not list(shared.iterdir())
    # nor a private folder inside it: another user could rename it and put their own in its place
    monkeypatch.setenv(cpu_kernels.BUILD_DIR_ENV, str(shared / "mine"))
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.available()
    assert not list((shared / "mine").iterdir())
