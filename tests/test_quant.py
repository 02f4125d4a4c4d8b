"""Quantized storage math: packing, quantization bounds, and attention against an independent fake-quant reference.

The reference never calls `think_cache.quant` for the numbers it checks: it quantizes the same tokens with the same
groups itself (min/max, round, clamp), dequantizes in float, scatters the kept key channels into a zero-filled
full-size cache and runs torch's own attention.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fake_quant, fake_quant_symmetric, peak_allocated_bytes
from torch.profiler import ProfilerActivity, profile

from think_cache import quant
from think_cache.compact import gather_channels

BITS = (2, 4, 8)


# ------------------------------------------------------------------------------------------ the reference
def fake_quant_keys(keys: torch.Tensor, bits: int, pieces: list[int], block: int = 32) -> torch.Tensor:
    """Keys ``(B, H, T, C)`` quantized per channel, piece by piece (each a `quantize_keys` call), in blocks of
    ``block`` tokens from each piece's start; returns float32 dequantized keys."""
    out, start = [], 0
    for n in pieces:
        for b in range(start, start + n, block):
            chunk = keys[:, :, b : min(b + block, start + n)].float()
            out.append(fake_quant(chunk.transpose(-1, -2), bits, keys.dtype, keys=True).transpose(-1, -2))
        start += n
    assert start == keys.shape[2]
    return torch.cat(out, dim=2)


def fake_quant_values(values: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Values ``(B, H, T, C)`` quantized per token in groups of ``group_size`` channels (last group: the rest)."""
    x = values.float()
    return torch.cat([fake_quant(g, bits, values.dtype) for g in x.split(group_size, dim=-1)], dim=-1)


def random_channels(batch: int, heads: int, head_dim: int, kept: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(head_dim, generator=g)[:kept].sort().values for _ in range(batch * heads)]
    return torch.stack(rows).view(batch, heads, kept)


def quantize_pieces(keys: torch.Tensor, bits: int, pieces: list[int]) -> quant.QuantKeys:
    """`quantize_keys` on consecutive pieces of ``keys``, appended with `cat_keys` (a prompt, then folds)."""
    qk, start = None, 0
    for n in pieces:
        part = quant.quantize_keys(keys[:, :, start : start + n], bits)
        qk = part if qk is None else quant.cat_keys(qk, part)
        start += n
    return qk


# ---------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13, 32, 33])
def test_pack_round_trip(bits, n):
    g = torch.Generator().manual_seed(n * 10 + bits)
    codes = torch.randint(0, 2**bits, (2, 3, n), dtype=torch.uint8, generator=g)
    packed = quant.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, math.ceil(n * bits / 8)) == (2, 3, quant.packed_width(n, bits))
    assert torch.equal(quant.unpack_codes(packed, bits, n), codes)


def test_packing_is_planar():
    # 4 bits, 5 codes -> 3 bytes; byte j holds codes j (low nibble) and j + 3 (high nibble)
    codes = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    assert quant.pack_codes(codes, 4).tolist() == [1 | 4 << 4, 2 | 5 << 4, 3]
    # 2 bits, 4 codes -> 1 byte, code i in bits [2i, 2i + 2)
    assert quant.pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]


def test_pack_validation():
    codes = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"bits must be an int, one of \(2, 4, 8\), got"):
        quant.pack_codes(codes, 3)
    with pytest.raises(TypeError, match="bits must be an int"):
        quant.pack_codes(codes, 4.0)
    with pytest.raises(TypeError, match="bits must be an int"):
        quant.pack_codes(codes, True)
    np = pytest.importorskip("numpy")
    assert torch.equal(quant.pack_codes(codes, np.int64(4)), quant.pack_codes(codes, 4))  # numpy's ints, as ints
    with pytest.raises(TypeError, match="uint8"):
        quant.pack_codes(codes.long(), 4)
    with pytest.raises(ValueError, match="must be < 16"):
        quant.pack_codes(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="pack into 2 bytes"):
        quant.unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 4)


# ----------------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", BITS)
def test_keys_error_within_half_a_step(bits):
    keys = torch.randn(2, 3, 77, 13) * torch.linspace(0.1, 5, 13)  # channels of different ranges
    qk = quant.quantize_keys(keys, bits, block=32)
    assert qk.codes.shape == (2, 3, 77, quant.packed_width(13, bits))
    assert qk.scale.shape == qk.zero.shape == (2, 3, 3, 13)  # blocks of 32, 32, 13
    assert qk.scale.dtype == keys.dtype and qk.is_regular
    step = qk.scale.repeat_interleave(32, dim=2)[:, :, :77]
    zero = qk.zero.repeat_interleave(32, dim=2)[:, :, :77]
    _assert_within_half_a_step(quant.dequantize_keys(qk), keys, step, zero, bits)
    # no block's squared error is above plain min/max's (its range is one of those tried)
    blocks = [keys[:, :, i : i + 32].transpose(-1, -2) for i in range(0, 77, 32)]
    error = (quant.dequantize_keys(qk) - keys).square()
    for i, block in enumerate(blocks):
        plain = (_minmax_fake_quant(block, bits) - block).square().sum(-1)
        assert (error[:, :, 32 * i : 32 * i + 32].sum(2) <= plain * (1 + 1e-5) + 1e-6).all()


def _minmax_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    return torch.round((x - lo) / torch.where(scale == 0, 1.0, scale)) * scale + lo


def _assert_within_half_a_step(approx, exact, step, zero, bits):
    """Every element dequantizes within half a step of itself clamped into its group's (clipped) range."""
    top = zero + step * (2**bits - 1)
    clamped = torch.maximum(torch.minimum(exact, top), zero)
    assert ((approx - clamped).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()
    if bits == 8:  # 8 bits keep the min/max range: nothing is clipped
        torch.testing.assert_close(clamped, exact)


@pytest.mark.parametrize("bits", BITS)
def test_values_error_within_half_a_step(bits):
    values = torch.randn(2, 3, 9, 45) * 3
    qv = quant.quantize_values(values, bits, group_size=32)  # groups of 32 and 13 channels
    assert qv.scale.shape == (2, 3, 9, 2) and qv.n_groups == quant.value_groups(45, 32) == 2
    group = torch.arange(45) // 32
    _assert_within_half_a_step(quant.dequantize_values(qv), values, qv.scale[..., group], qv.zero[..., group], bits)
    error = (quant.dequantize_values(qv) - values).square()
    for g, part in enumerate(values.split(32, dim=-1)):
        plain = (_minmax_fake_quant(part, bits) - part).square().sum(-1)
        assert (error[..., group == g].sum(-1) <= plain * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_values_store_no_zero_point_and_match_the_reference(bits):
    """Symmetric values: a scale per group, codes standing for ``(code - (2**bits - 1) / 2) * scale``; every
    element within half a step of itself clamped to the clipped range; equal to the reference quantizer (written
    apart in conftest) in float32 and bfloat16; and what attention reads is what dequantizing gives."""
    g = torch.Generator().manual_seed(bits)
    values = torch.randn(2, 3, 9, 45, generator=g) * 3 + 0.5
    qv = quant.quantize_values(values, bits, group_size=32, symmetric=True)
    assert qv.symmetric and qv.zero is None and [t.shape for t in qv.tensors()] == [qv.codes.shape, qv.scale.shape]
    assert qv.nbytes == qv.codes.nbytes + qv.scale.nbytes
    offset = quant.symmetric_offset(bits)
    assert offset == (2**bits - 1) / 2
    out = quant.dequantize_values(qv)
    group = torch.arange(45) // 32
    step = qv.scale[..., group]
    top = offset * step
    clamped = torch.maximum(torch.minimum(values, top), -top)
    assert ((out - clamped).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()
    torch.testing.assert_close(qv.zero_points(), -offset * qv.scale)
    reference = torch.cat([fake_quant_symmetric(p, bits, torch.float32) for p in values.split(32, dim=-1)], -1)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-6)
    half = quant.quantize_values(values.bfloat16(), bits, group_size=32, symmetric=True)
    reference = torch.cat(
        [fake_quant_symmetric(p, bits, torch.bfloat16) for p in values.bfloat16().float().split(32, -1)], -1
    )
    torch.testing.assert_close(quant.dequantize_values(half, torch.float32), reference, atol=1e-5, rtol=1e-6)
    weights = torch.softmax(torch.randn(2, 3, 4, 9, generator=g), -1)
    torch.testing.assert_close(
        quant.quantized_attention_output(weights, qv, chunk_tokens=4), weights @ out, atol=1e-5, rtol=1e-5
    )


# ------------------------------------------------------------------------------------------ one-byte scales
def test_scale_codes_round_up_within_a_step():
    """A one-byte scale stands for ``2 ** ((code - SCALE_BIAS) / SCALE_STEPS)``: every scale in range is rounded up
    to at most one step (2**(1/12), 6%) above itself, 0 stays 0 (code 0), and scales out of range clip to the ends;
    decoding is monotone and every code decodes to a distinct scale."""
    from conftest import log_scale

    s = torch.cat([torch.exp2(torch.linspace(-11.5, 9, 5001)), torch.tensor([0.0, 1.0, 0.5, 2.0**-20, 1e4])])
    codes = quant.encode_scales(s)
    assert codes.dtype == torch.uint8
    back = quant.scale_values(codes)
    torch.testing.assert_close(back, log_scale(s), atol=0, rtol=0)  # the reference, written apart
    inside = (s > 2.0**-11.9) & (s < 600)
    assert (back[inside] >= s[inside]).all() and (back[inside] <= s[inside] * 2 ** (1 / 12) * (1 + 1e-6)).all()
    assert codes[-5] == 0 and back[-5] == 0 and codes[-4] == quant.SCALE_BIAS  # 0 exact, 1.0 a code of its own
    assert codes[-2] == 1 and codes[-1] == 255 and back[-1] < 1e4  # clipped to the ends
    every = quant.scale_values(torch.arange(256, dtype=torch.uint8))
    assert torch.equal(quant.encode_scales(every[1:]), torch.arange(1, 256, dtype=torch.uint8))  # a code's own
    assert every[0] == 0 and (every[1:] > every[:-1]).all()
    assert 2.5e-4 < every[1] < 2.7e-4 and 600 < every[255] < 620
    bf16 = torch.tensor([0.3, 7.0], dtype=torch.bfloat16)
    torch.testing.assert_close(quant.scale_values(bf16), bf16.float())  # stored in a dtype: upcast only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_scaled_keys_and_values_match_the_reference(dtype):
    """Keys and values with one-byte scales: a byte per scale, each block's range centred in its levels, every
    element within half a step of itself (clipped ranges aside: min/max at 8 bits), equal to the reference
    quantizer written apart (conftest), and a constant block or an all-zero group stored exactly."""
    g = torch.Generator().manual_seed(7)
    keys = (torch.randn(2, 3, 40, 38, generator=g) * torch.linspace(0.05, 6, 38) + 1).to(dtype)
    keys[0, 1, :, 5] = 2.5  # a constant channel: scale 0, exact
    qk = quant.quantize_keys(keys, 4, block=8, log_scales=True)
    assert qk.log_scales and qk.scale.dtype == torch.uint8 and qk.zero.dtype == dtype and qk.dtype == dtype
    assert qk.nbytes == qk.codes.numel() + qk.scale.numel() * (1 + keys.element_size())
    out = quant.dequantize_keys(qk, torch.float32)
    assert out.dtype == torch.float32 and quant.dequantize_keys(qk).dtype == dtype
    assert (out[0, 1, :, 5] == 2.5).all() and (qk.scale[0, 1, :, 5] == 0).all()
    x = keys.float().view(2, 3, 5, 8, 38).transpose(-1, -2)  # (B, H, blocks, C, tokens)
    expected = fake_quant(x, 4, dtype, keys=True, log_scales=True).transpose(-1, -2).reshape(2, 3, 40, 38)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-6)
    step = qk.scales().repeat_interleave(8, dim=2)
    eight = quant.quantize_keys(keys, 8, block=8, log_scales=True)  # min/max ranges: nothing clipped
    step8 = eight.scales().repeat_interleave(8, dim=2)
    zero_error = 2e-2 * keys.float().abs() if dtype == torch.bfloat16 else 1e-5  # zero points rounded to dtype
    assert ((quant.dequantize_keys(eight, torch.float32) - keys.float()).abs() <= step8 / 2 + zero_error).all()
    assert step.max() > 0

    values = (torch.randn(2, 3, 9, 45, generator=g) * 3).to(dtype)
    values[1, 2, 4, :32] = 0  # an all-zero group: scale 0, exact
    qv = quant.quantize_values(values, 4, 32, symmetric=True, log_scales=True)
    assert qv.log_scales and qv.scale.dtype == torch.uint8 and qv.dtype == dtype and qv.zero is None
    assert qv.nbytes == qv.codes.nbytes + qv.scale.numel()
    got = quant.dequantize_values(qv, torch.float32)
    assert (got[1, 2, 4, :32] == 0).all()
    reference = torch.cat(
        [fake_quant_symmetric(p, 4, dtype, log_scales=True) for p in values.float().split(32, -1)], -1
    )
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-6)
    weights = torch.softmax(torch.randn(2, 3, 4, 9, generator=g), -1)
    torch.testing.assert_close(
        quant.quantized_attention_output(weights, qv, chunk_tokens=4), weights @ got, atol=1e-5, rtol=1e-5
    )
    query = torch.randn(2, 3, 5, 38, generator=g)
    torch.testing.assert_close(
        quant.quantized_attention_logits(query, qk, 0.5, chunk_tokens=16),
        query @ out.transpose(-1, -2) * 0.5,
        atol=1e-4,
        rtol=1e-5,
    )


def test_log_scaled_parts_keep_their_scales_through_token_operations():
    """Appending, gathering per head and narrowing keep one-byte scales as bytes (nothing re-quantized), and parts
    with different kinds of scales refuse to be joined."""
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 2, 50, 20, generator=g), torch.randn(2, 2, 50, 32, generator=g)
    qk = quant.quantize_keys(keys[:, :, :21], 4, 8, log_scales=True)
    qk = quant.cat_keys(qk, quant.quantize_keys(keys[:, :, 21:], 4, 8, log_scales=True))
    dense = quant.dequantize_keys(qk)
    index = torch.stack([torch.stack([torch.randperm(50, generator=g)[:30].sort().values for _ in "hh"]) for _ in "bb"])
    gathered = quant.gather_keys(qk, index)
    assert gathered.scale.dtype == torch.uint8 and gathered.log_scales
    torch.testing.assert_close(
        quant.dequantize_keys(gathered), dense.gather(2, index[..., None].expand(-1, -1, -1, 20))
    )
    torch.testing.assert_close(quant.dequantize_keys(quant.narrow_keys(qk, 8, 30)), dense[:, :, 8:38])
    with pytest.raises(ValueError, match="log_scales differs"):
        quant.cat_keys(qk, quant.quantize_keys(keys[:, :, :8], 4, 8))
    qv = quant.quantize_values(values, 4, 32, symmetric=True, log_scales=True)
    with pytest.raises(ValueError, match="log_scales differs"):
        quant.cat_values(qv, quant.quantize_values(values, 4, 32, symmetric=True))


def test_symmetric_values_keep_their_layout_through_token_operations():
    """cat, gather and narrow keep symmetric values symmetric (no zero points appear); mixing refuses."""
    g = torch.Generator().manual_seed(0)
    a = quant.quantize_values(torch.randn(1, 2, 5, 16, generator=g), 4, 8, symmetric=True)
    b = quant.quantize_values(torch.randn(1, 2, 3, 16, generator=g), 4, 8, symmetric=True)
    both = quant.cat_values(a, b)
    assert both.symmetric and both.tokens == 8
    dense = torch.cat([quant.dequantize_values(a), quant.dequantize_values(b)], dim=2)
    torch.testing.assert_close(quant.dequantize_values(both), dense)
    index = torch.tensor([[[0, 6, 7], [1, 2, 5]]])
    kept = quant.gather_values(both, index)
    assert kept.symmetric
    torch.testing.assert_close(quant.dequantize_values(kept), dense.gather(2, index[..., None].expand(-1, -1, -1, 16)))
    assert quant.narrow_values(both, 2, 4).symmetric
    with pytest.raises(ValueError, match="symmetric differs"):
        quant.cat_values(a, quant.quantize_values(torch.randn(1, 2, 3, 16), 4, 8))


def test_symmetric_values_clip_an_outlier():
    """One large element per group: the clipped symmetric range beats ``max |x|`` on the others."""
    values = torch.randn(1, 1, 200, 32, generator=torch.Generator().manual_seed(3))
    values[..., 5] *= 8
    qv = quant.quantize_values(values, 4, group_size=32, symmetric=True)
    error = (quant.dequantize_values(qv) - values).square().sum()
    peak = values.abs().amax(-1, keepdim=True) / 7.5
    plain = ((values / peak + 7.5).round().clamp(0, 15) - 7.5) * peak
    assert error < 0.95 * (plain - values).square().sum()


@pytest.mark.parametrize("bits", [2, 4])
def test_clipping_beats_min_max_on_an_outlier(bits):
    """One large element per group: min/max spends the levels on it, the clipped range on the others."""
    values = torch.randn(1, 1, 200, 32, generator=torch.Generator().manual_seed(3))
    values[..., 5] *= 8
    error = (quant.dequantize_values(quant.quantize_values(values, bits, group_size=32)) - values).square().sum()
    plain = (_minmax_fake_quant(values, bits) - values).square().sum()
    assert error < {2: 0.8, 4: 0.95}[bits] * plain


@pytest.mark.parametrize("bits", [2, 4])
def test_clipping_search_in_slices_equals_one_pass(bits, monkeypatch):
    """The ratios are searched a bounded slice of groups at a time (a long prompt); the slices change nothing, and
    each group keeps the ratio with the least error (the widest of equal ones), checked against a loop here."""
    g = torch.Generator().manual_seed(bits)
    keys = torch.randn(2, 3, 77, 38, generator=g) * torch.linspace(0.1, 4, 38)
    real = torch.rand(2, 1, 77, generator=g) > 0.2
    whole = quant.quantize_keys(keys, bits, real=real)
    monkeypatch.setattr(quant, "CLIP_SEARCH_ELEMENTS", 100)  # a few groups a slice
    sliced = quant.quantize_keys(keys, bits, real=real)
    for a, b in zip(whole.tensors(), sliced.tensors(), strict=True):
        assert torch.equal(a, b)
    # the same choice as trying each ratio in turn
    x = torch.randn(50, 32, generator=g)
    x[:, 3] *= 6
    lo, hi = x.amin(-1), x.amax(-1)
    qmax = (1 << bits) - 1
    best_error, best_codes = torch.full((50,), float("inf")), torch.zeros(50, 32)
    for ratio in quant.CLIP_RATIOS[bits]:
        margin = (1.0 - ratio) / 2 * (hi - lo)
        codes, scale, zero, _ = quant._rounded(x, lo + margin, hi - margin, qmax, torch.float32)
        error = (codes * scale[:, None] + zero[:, None] - x).square().sum(-1)
        better = error < best_error  # strictly: the earlier (wider) ratio keeps a tie
        best_error = torch.where(better, error, best_error)
        best_codes = torch.where(better[:, None], codes, best_codes)
    codes, _, _ = quant._minmax_quantize(x, bits, torch.float32)
    assert torch.equal(codes, best_codes.to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8_bit_logits_on_outlier_keys(dtype):
    """Realistic key statistics: RoPE'd keys with a few outlier channels of magnitude ~100 (small spread, large
    offset: the case where a zero point rounded to a low dtype or a range mixing channels would cost the most).
    8-bit logits stay within half a step per channel of the exact ones (a bfloat16 scale, rounded down by up to
    2**-9, may clamp the top code: one step), a few hundredths in absolute terms."""
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(1, 3, 1000, 38, generator=g)
    keys[..., :3] = keys[..., :3] * 5 + 100
    keys[..., 3] = keys[..., 3] * 3 - 120
    keys = keys.to(dtype)
    query = torch.randn(1, 3, 9, 38, generator=g).to(dtype)
    exact = query.float() @ keys.float().transpose(-1, -2) * 0.125
    qk = quant.quantize_keys(keys, 8)
    logits = quant.quantized_attention_logits(query, qk, 0.125)
    step = qk.scale.float().repeat_interleave(32, dim=2)[:, :, :1000]  # (B, H, T, C)
    bound = 0.125 * (query.float().abs()[:, :, :, None, :] * step[:, :, None]).sum(-1) / 2
    slack = 1.0 if dtype == torch.float32 else 2.0
    assert ((logits - exact).abs() <= slack * bound + 1e-4).all()
    assert (logits - exact).abs().max() < 0.05
    probs, ref = logits.softmax(-1), exact.softmax(-1)
    assert (probs - ref).abs().max() < 2e-3


@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_are_exact(bits):
    keys = torch.randn(1, 2, 40, 6)
    keys[:, :, :32, 2] = 0.37  # channel 2 constant over the first block
    keys[:, 1, 32:, :] = -1.25  # head 1's last block entirely constant
    qk = quant.quantize_keys(keys, bits)
    assert qk.scale[:, :, 0, 2].eq(0).all() and qk.scale[:, 1, 1].eq(0).all()
    deq = quant.dequantize_keys(qk)
    assert torch.equal(deq[:, :, :32, 2], keys[:, :, :32, 2])
    assert torch.equal(deq[:, 1, 32:], keys[:, 1, 32:])

    values = torch.randn(1, 2, 5, 8)
    values[:, :, 3] = 2.5  # token 3 constant
    qv = quant.quantize_values(values, bits, group_size=4)
    assert torch.equal(quant.dequantize_values(qv)[:, :, 3], values[:, :, 3])


def test_quantize_validation():
    keys = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"bits must be an int, one of \(2, 4, 8\), got"):
        quant.quantize_keys(keys, 16)
    with pytest.raises(TypeError, match="bits must be an int"):
        quant.quantize_values(keys, "4")
    with pytest.raises(ValueError, match="block must be an int >= 1"):
        quant.quantize_keys(keys, 4, block=0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        quant.quantize_values(keys, 4, group_size=2.0)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        quant.quantize_values(keys, 4, group_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        quant.quantize_keys(keys.long(), 4)
    with pytest.raises(ValueError, match="4 dimensions"):
        quant.quantize_keys(keys[0], 4)


def test_group_size_larger_than_the_width_is_one_group():
    qv = quant.quantize_values(torch.randn(1, 1, 3, 10), 4, group_size=32)
    assert qv.group_size == 10 and qv.n_groups == 1


# -------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("pieces", [[77], [64, 32], [17, 32, 5, 32], [3]])
@pytest.mark.parametrize("chunk", [32, quant.DEFAULT_CHUNK_TOKENS])
def test_attention_equals_fake_quant_reference(bits, pieces, chunk, attention_path):
    """Logits, outputs and the whole attention equal stock attention over a zero-filled fake-quant cache."""
    torch.manual_seed(bits * 100 + len(pieces) + chunk)
    batch, kv_heads, group, q_len, head_dim, kept = 2, 2, 3, 2, 16, 7
    tokens = sum(pieces)
    scaling = head_dim**-0.5
    keys = torch.randn(batch, kv_heads, tokens, head_dim) * 2
    values = torch.randn(batch, kv_heads, tokens, head_dim)
    query = torch.randn(batch, kv_heads * group, q_len, head_dim)
    channels = random_channels(batch, kv_heads, head_dim, kept, seed=tokens)

    compact_keys = gather_channels(keys, channels)
    qk = quantize_pieces(compact_keys, bits, pieces)
    qv = quant.quantize_values(values, bits, group_size=6)  # groups of 6, 6, 4 channels
    assert qk.is_regular == all(n % 32 == 0 for n in pieces[:-1])

    # the reference: a full-size cache, pruned channels zero, kept ones fake-quantized; torch's own attention
    ref_keys = torch.zeros(batch, kv_heads, tokens, head_dim)
    index = channels[:, :, None, :].expand(batch, kv_heads, tokens, kept)
    ref_keys.scatter_(-1, index, fake_quant_keys(compact_keys, bits, pieces))
    ref_values = fake_quant_values(values, bits, 6)
    ref_logits = torch.matmul(query, ref_keys.repeat_interleave(group, dim=1).transpose(-1, -2)) * scaling
    ref_out = F.scaled_dot_product_attention(
        query, ref_keys.repeat_interleave(group, 1), ref_values.repeat_interleave(group, 1), scale=scaling
    )

    # GQA flattened: a KV head's whole query group as rows
    q_rows = query.reshape(batch, kv_heads, group * q_len, head_dim)
    logits = quant.quantized_attention_logits(gather_channels(q_rows, channels), qk, scaling, chunk)
    assert logits.dtype == torch.float32 and logits.shape == (batch, kv_heads, group * q_len, tokens)
    torch.testing.assert_close(logits.view_as(ref_logits), ref_logits, atol=1e-4, rtol=1e-4)

    weights = torch.softmax(logits, dim=-1)
    out = quant.quantized_attention_output(weights, qv, chunk)
    torch.testing.assert_close(out, torch.matmul(weights, ref_values), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.view_as(ref_out), ref_out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("regular", [True, False])
def test_attention_over_several_chunks_traces_whole(regular):
    """Regression: a chunk after the first wrote its logits with a non-contiguous ``out=``, which dynamo refuses: a
    compiled static quantized cache over more than one chunk (SmolLM2 at 2k) failed with a graph break."""
    torch.manual_seed(3)
    batch, kv_heads, rows, kept = 1, 2, 3, 8
    pieces = [96, 64] if regular else [17, 32, 5, 32]
    qk = quantize_pieces(torch.randn(batch, kv_heads, sum(pieces), kept), 4, pieces)
    assert qk.is_regular == regular
    q = torch.randn(batch, kv_heads, rows, kept)
    eager = quant.quantized_attention_logits(q, qk, 0.5, 32)
    compiled = torch.compile(quant.quantized_attention_logits, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, qk, 0.5, 32), eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", BITS)
def test_bf16_scales_and_float32_accumulation(bits, attention_path):
    torch.manual_seed(bits)
    keys = (torch.randn(1, 2, 70, 8) * 3).bfloat16()
    values = torch.randn(1, 2, 70, 12).bfloat16()
    query = torch.randn(1, 2, 3, 8).bfloat16()
    qk = quantize_pieces(keys, bits, [40, 30])
    qv = quant.quantize_values(values, bits, group_size=8)
    assert qk.scale.dtype == qk.zero.dtype == qv.scale.dtype == qv.zero.dtype == torch.bfloat16
    assert qk.dtype == qv.dtype == torch.bfloat16

    logits = quant.quantized_attention_logits(query, qk, 0.25, chunk_tokens=32)
    ref = torch.matmul(query.float(), fake_quant_keys(keys, bits, [40, 30]).transpose(-1, -2)) * 0.25
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)

    weights = torch.softmax(logits, -1)
    out = quant.quantized_attention_output(weights.bfloat16(), qv, chunk_tokens=32)
    ref_out = torch.matmul(weights.bfloat16().float(), fake_quant_values(values, bits, 8))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    # the float32 dequantized keys are what the bf16 codes and scales stand for
    torch.testing.assert_close(
        quant.dequantize_keys(qk, torch.float32), fake_quant_keys(keys, bits, [40, 30]), atol=1e-6, rtol=0
    )


def test_empty_context(attention_path):
    qk = quant.quantize_keys(torch.randn(1, 2, 0, 4), 4)
    qv = quant.quantize_values(torch.randn(1, 2, 0, 6), 4)
    assert quant.quantized_attention_logits(torch.randn(1, 2, 3, 4), qk, 0.5).shape == (1, 2, 3, 0)
    assert quant.quantized_attention_output(torch.randn(1, 2, 3, 0), qv).eq(0).all()


def test_attention_validation():
    qk = quant.quantize_keys(torch.randn(1, 2, 5, 4), 4)
    qv = quant.quantize_values(torch.randn(1, 2, 5, 6), 4)
    with pytest.raises(ValueError, match="does not match the keys"):
        quant.quantized_attention_logits(torch.randn(1, 2, 3, 5), qk, 0.5)
    with pytest.raises(ValueError, match="does not match the values"):
        quant.quantized_attention_output(torch.randn(1, 2, 3, 4), qv)
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1"):
        quant.quantized_attention_logits(torch.randn(1, 2, 3, 4), qk, 0.5, chunk_tokens=0)


# ------------------------------------------------------------------------------- appending, gathering, rows
@pytest.mark.parametrize("bits", BITS)
def test_cat_keeps_every_token_and_its_scale(bits):
    keys = torch.randn(2, 2, 100, 5)
    full = quantize_pieces(keys, bits, [64, 36])
    assert full.is_regular and full.n_blocks == 4
    ragged = quantize_pieces(keys, bits, [50, 32, 18])
    assert not ragged.is_regular and ragged.n_blocks == 2 + 1 + 1
    assert ragged.block_index.dtype == torch.int32
    torch.testing.assert_close(quant.dequantize_keys(ragged), fake_quant_keys(keys, bits, [50, 32, 18]))
    # appending after an irregular part stays irregular and numbers the new blocks after the old
    more = quant.cat_keys(ragged, quant.quantize_keys(keys[:, :, :32], bits))
    assert more.block_index[..., -1].eq(4).all() and more.tokens == 132

    values = torch.randn(2, 2, 100, 7)
    qv = quant.cat_values(
        quant.quantize_values(values[:, :, :30], bits), quant.quantize_values(values[:, :, 30:], bits)
    )
    torch.testing.assert_close(
        quant.dequantize_values(qv), quant.dequantize_values(quant.quantize_values(values, bits))
    )

    with pytest.raises(ValueError, match="bits differs"):
        quant.cat_keys(full, quant.quantize_keys(keys, 8 if bits != 8 else 4))


@pytest.mark.parametrize("bits", BITS)
def test_gather_tokens_per_head(bits):
    torch.manual_seed(bits)
    keys, values = torch.randn(2, 3, 150, 6), torch.randn(2, 3, 150, 10)
    qk = quantize_pieces(keys, bits, [70, 32, 48])
    qv = quant.quantize_values(values, bits, group_size=4)
    # per head: keep 20 tokens, all from the first and the last blocks for head 0 (blocks in between die)
    index = torch.stack([torch.randperm(150)[:20].sort().values for _ in range(6)]).view(2, 3, 20)
    index[:, 0] = torch.cat([torch.arange(10), torch.arange(140, 150)])
    gk, gv = quant.gather_keys(qk, index), quant.gather_values(qv, index)

    dense_k, dense_v = quant.dequantize_keys(qk), quant.dequantize_values(qv)
    take = lambda x: torch.gather(x, 2, index[..., None].expand(*index.shape, x.shape[-1]))  # noqa: E731
    assert torch.equal(quant.dequantize_keys(gk), take(dense_k))
    assert torch.equal(quant.dequantize_values(gv), take(dense_v))
    assert gk.n_blocks <= min(20, qk.n_blocks)  # scales of blocks no head uses are dropped
    assert gk.codes.shape == (2, 3, 20, quant.packed_width(6, bits))

    # attention over the gathered tokens equals attention over the gathered dense tokens
    query = torch.randn(2, 3, 4, 6)
    logits = quant.quantized_attention_logits(query, gk, 0.5, chunk_tokens=32)
    torch.testing.assert_close(logits, torch.matmul(query, take(dense_k).transpose(-1, -2)) * 0.5)
    with pytest.raises(ValueError, match="index must be"):
        quant.gather_keys(qk, index[0])


@pytest.mark.parametrize("bits", BITS)
def test_narrow_drops_oldest_and_crops(bits):
    keys = torch.randn(1, 2, 100, 5)
    qk = quant.quantize_keys(keys, bits)
    dense = quant.dequantize_keys(qk)
    aligned = quant.narrow_keys(qk, 32, 60)  # starts a block: stays regular
    assert aligned.is_regular and aligned.n_blocks == 2
    assert torch.equal(quant.dequantize_keys(aligned), dense[:, :, 32:92])
    shifted = quant.narrow_keys(qk, 5, 90)
    assert not shifted.is_regular
    assert torch.equal(quant.dequantize_keys(shifted), dense[:, :, 5:95])
    qv = quant.quantize_values(torch.randn(1, 2, 100, 8), bits)
    assert torch.equal(quant.dequantize_values(quant.narrow_values(qv, 7, 3)), quant.dequantize_values(qv)[:, :, 7:10])
    with pytest.raises(ValueError, match="out of range"):
        quant.narrow_keys(qk, 90, 20)


def test_batch_rows_and_bytes():
    keys, values = torch.randn(3, 2, 45, 6), torch.randn(3, 2, 45, 8)
    qk, qv = quantize_pieces(keys, 4, [13, 32]), quant.quantize_values(values, 2, group_size=4)
    order = torch.tensor([2, 0, 0])
    assert torch.equal(quant.dequantize_keys(qk.index_select(order)), quant.dequantize_keys(qk)[order])
    assert torch.equal(quant.dequantize_values(qv.index_select(order)), quant.dequantize_values(qv)[order])
    doubled = qk.map(lambda t: t.repeat_interleave(2, dim=0))
    assert torch.equal(quant.dequantize_keys(doubled), quant.dequantize_keys(qk).repeat_interleave(2, dim=0))

    # codes really packed: 4-bit keys take 3 bytes a token for 6 channels, 2-bit values 2 bytes for 8
    assert qk.codes.shape[-1] == 3 and qv.codes.shape[-1] == 2
    assert qk.nbytes == qk.codes.numel() + 2 * qk.scale.numel() * 4 + qk.block_index.numel() * 4
    assert qv.nbytes == sum(t.numel() * t.element_size() for t in qv.tensors())
    assert {id(t) for t in qk.tensors()} == {id(qk.codes), id(qk.scale), id(qk.zero), id(qk.block_index)}


# ------------------------------------------------------------------------------------------ the transient
def largest_allocation(*fns) -> int:
    """Bytes of the largest allocation an op itself made while ``fns`` ran (the CPU profiler's memory record)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for fn in fns:
            fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("bits", BITS)
def test_largest_temporary_does_not_grow_with_context(bits, torch_path):
    """At 1k and 4k tokens the torch path's largest allocation is one chunk's float buffer, 1/8 of the dense keys at
    4k (the CPU loops: `test_cpu_kernels.py`)."""
    batch, heads, channels, chunk = 1, 2, 64, 512
    expected = quant.attention_transient_bytes(batch, heads, channels, bits, 4096, chunk)
    assert expected == quant.attention_transient_bytes(batch, heads, channels, bits, 1024, chunk)
    assert expected == batch * heads * chunk * channels * 4
    query = torch.randn(batch, heads, 1, channels)
    for tokens in (1024, 4096):
        keys = torch.randn(batch, heads, tokens, channels)
        regular = quant.quantize_keys(keys, bits)
        ragged = quantize_pieces(keys, bits, [17, tokens - 17])
        qv = quant.quantize_values(torch.randn(batch, heads, tokens, channels), bits, group_size=64)
        weights = torch.softmax(torch.randn(batch, heads, 1, tokens), -1)
        largest = largest_allocation(
            lambda qk=regular: quant.quantized_attention_logits(query, qk, 0.1, chunk),
            lambda qk=ragged: quant.quantized_attention_logits(query, qk, 0.1, chunk),
            lambda qv=qv, w=weights: quant.quantized_attention_output(w, qv, chunk),
        )
        assert largest == expected, tokens
    assert expected * 8 == batch * heads * 4096 * channels * 4


@pytest.mark.parametrize("bits", BITS)
def test_quantizing_a_long_prompt_works_in_slices(bits, monkeypatch):
    """A prompt is quantized a slice of whole blocks at a time (`QUANTIZE_CHUNK_ELEMENTS`): the same codes, scales
    and zero points as at once (ranges are per block and per token), padding masks followed across slices, and
    scratch within a few slices whatever the length (found in review: 13x an 8k layer's keys and values at once)."""
    keys, values = torch.randn(2, 3, 203, 40, dtype=torch.bfloat16), torch.randn(2, 3, 203, 24, dtype=torch.bfloat16)
    real = torch.rand(2, 1, 203, generator=torch.Generator().manual_seed(1)) > 0.3
    log = quant.LOG_SCALES[bits]
    whole = quant.quantize_keys(keys, bits, quant.key_block(bits), real, log), quant.quantize_values(values, bits, 16)
    monkeypatch.setattr(quant, "QUANTIZE_CHUNK_ELEMENTS", 2 * 3 * 40 * 37)  # a few blocks a slice, a ragged end
    sliced = quant.quantize_keys(keys, bits, quant.key_block(bits), real, log), quant.quantize_values(values, bits, 16)
    for a, b in zip(whole, sliced, strict=True):
        assert a.block_index is None if isinstance(a, quant.QuantKeys) else True
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    monkeypatch.undo()
    one_layer = []  # 8 KV heads of 128 channels in bfloat16: scratch at 2k and 8k tokens, beyond what is returned
    for tokens in (2048, 8192):
        k, v = (
            torch.randn(1, 8, tokens, 128, dtype=torch.bfloat16),
            torch.randn(1, 8, tokens, 128, dtype=torch.bfloat16),
        )
        out = []
        peak = peak_allocated_bytes(
            lambda k=k, v=v, out=out: out.extend([quant.quantize_keys(k, bits), quant.quantize_values(v, bits)])
        )
        one_layer.append(peak - sum(t.nbytes for part in out for t in part.tensors()))
    assert one_layer[1] <= one_layer[0] + 2**20, one_layer  # flat in the length (at once: 13x the layer at 8k)
    assert one_layer[1] <= 12 * quant.QUANTIZE_CHUNK_ELEMENTS * 4, one_layer


def test_keys_are_clipped_less_than_values_at_two_bits():
    """At 2 bits a key block's range keeps at least 0.8 of its min/max range (`KEY_CLIP_RATIOS`), where a value
    group may narrow to half of it: clipping keys hard flattens the extreme keys that make the largest logits."""
    x = torch.randn(1, 1, 32, 64, generator=torch.Generator().manual_seed(5))
    x[:, :, 7] *= 10  # one token far out in every channel: the values' search narrows to 0.5, the keys' to 0.8
    qk = quant.quantize_keys(x, 2, block=32)
    key_range = qk.scale[0, 0, 0].float() * 3
    assert (key_range >= 0.8 * (x[0, 0].amax(0) - x[0, 0].amin(0)) - 1e-5).all()
    qv = quant.quantize_values(x.transpose(-1, -2), 2, group_size=32)  # the same numbers as value groups
    value_range = qv.scale.float() * 3
    full = x.transpose(-1, -2).amax(-1) - x.transpose(-1, -2).amin(-1)
    assert (value_range < 0.75 * full[..., None]).any()


def test_storage_defaults():
    """2 bits take 16-token key blocks and 64-channel value groups (0.15x of DynamicCache's bytes at key ratio 0.5,
    head_dim 64, bfloat16, measured in test_quantized_cache); 4 bits 8-token blocks, 32-channel groups and one-byte
    scales; 8 bits 32 and 32."""
    from think_cache import ThinKCache
    from think_cache.storage import QuantizedStore

    assert [quant.key_block(b) for b in (2, 4, 8)] == [16, 8, 32]
    assert [quant.LOG_SCALES[b] for b in (2, 4, 8)] == [False, True, False]
    assert [ThinKCache(key_ratio=0.5, bits=b).group_size for b in (2, 4, 8)] == [64, 32, 32]
    assert ThinKCache(key_ratio=0.5, bits=2, group_size=16).group_size == 16
    store = QuantizedStore(2)
    assert (store.key_block, store.group_size, store.block) == (16, 64, 32)
    assert all(quant.DEFAULT_BLOCK % quant.key_block(b) == 0 for b in (2, 4, 8))  # folds quantize whole key blocks
