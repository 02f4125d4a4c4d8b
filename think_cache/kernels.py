"""A fused Triton kernel for attention over a ThinK layer: compact part then recent part, one softmax.

`compact_decode_attention` computes what `think_cache.compact.compact_attention` computes for a `FullStore`
(`quantized_decode_attention` for a `QuantizedStore`; the torch path stays the reference and the CPU path) in
one kernel launch per layer. A long context is split into spans of tokens across programs (flash-decoding), and
the last program of each row block to finish combines the spans' partial results, so there is no second launch.

What one program does, for one (batch row, KV head, block of query rows, span of tokens):

* reads its query rows once, at full width (for the recent part) and gathered at the KV head's kept key channels
  (``key_channels``, loaded in the kernel: no gathered copy of the query is made); a KV head's whole GQA group of
  query heads (times ``q_len`` rows) shares every key and value load;
* streams its span of the compact keys ``(tokens, kept_k)`` and values ``(tokens, kept_v)`` in tiles of
  ``BLOCK_N`` tokens, then its span of the full-width recent keys and values, with an online softmax in float32
  (logits ``scale * q[kept] . k``, masked columns at float32's minimum as in the torch path, so that a row with
  nothing to attend gets a uniform softmax rather than NaN);
* with pruned values, accumulates the compact part's contribution at the kept value channels and scatters it
  back to ``head_dim`` channels once, at the end (zero at the pruned channels);
* writes the normalized output directly in transformers' ``(batch, q_len, q_heads, head_dim)`` layout when the
  context is one span; else writes its unnormalized partial output, running max and running sum, counts itself
  done with an atomic add, and if it is the last span of its rows to finish, combines all spans by log-sum-exp
  and writes the output.

Memory: the kernel reads the query, the kept channels, the compact and recent keys and values once each and the
mask if any; it allocates the output and, when the context is split into ``S`` spans, a float32 workspace of
``batch * q_heads * q_len * S * (head_dim + 2) * 4`` bytes (``S`` is at most about twice the number of SMs divided
by ``batch * kv_heads``: about 0.5 MiB at batch 1 on an H100 for Llama-3.1-8B's shape, whatever the context
length), and keeps one int32 counter per program, zeroed once per device and stream and reset by the kernel. A
float additive mask is first turned into a bool one (the torch path does the same).

Storage kinds: the kernel reads a `FullStore`'s tensors directly, and a `QuantizedStore`'s packed codes
(`quantized_decode_attention`, the ``QUANT`` variant of the same kernel): per tile, each kept key channel's byte
is loaded, shifted and masked (planar packing, see `think_cache.quant`), times its token block's scale plus zero
point, and each value channel's code times its token's group scale plus zero point, all in registers; the rest of
the loop is shared. `store_attention` picks the variant for the store. Before it, a 4-bit cache decoded at 4.5x
DynamicCache's time per token on an H100 (the torch path's unpack, scale and matmul launches: 4,727 kernels a
step instead of 1,495).

Triton is imported only when a kernel is first run, so ``import think_cache`` never needs it. The kernels are
built for the mode Triton is in at that moment (``TRITON_INTERPRET=1``: interpreted on the CPU with numpy).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from . import quant
from .compact import as_bool_mask
from .quant import QuantKeys, QuantValues
from .storage import CompactStore, FullStore, QuantizedStore

__all__ = [
    "compact_decode_attention",
    "quantized_decode_attention",
    "kernel_available",
    "use_kernel",
    "kernel_choice",
    "store_attention",
    "KERNEL_ENV",
]

#: Environment variable choosing the attention path of a compacted layer: ``torch`` (always the torch path, also
#: instead of the CPU loops of `think_cache.cpu_kernels`), ``triton`` (always the kernel where the store allows it;
#: raises if Triton cannot run), unset or ``auto`` (the kernel on CUDA devices where Triton is installed; on the CPU,
#: the loops over quantized parts).
KERNEL_ENV = "THINK_CACHE_KERNEL"

_LOG2E = math.log2(math.e)

# triton and triton.language, bound by _kernels() on first use; the kernel bodies below read ``tl`` from here
triton = None
tl = None


# ------------------------------------------------------------------------------------------------ availability
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # once: a lookup every decoding step cost 20 µs a layer


def kernel_available(device: torch.device | str) -> bool:
    """Whether the kernel can run on ``device``: Triton is importable, and ``device`` is a CUDA device or
    ``TRITON_INTERPRET=1`` is set (Triton's interpreter, on the CPU)."""
    if not _triton_installed():
        return False
    return _device_type(device) == "cuda" or _interpreting()


def _device_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def kernel_choice() -> str:
    """`KERNEL_ENV`, checked: ``auto`` (also when unset or empty), ``torch`` or ``triton``."""
    choice = os.environ.get(KERNEL_ENV, "auto").lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{KERNEL_ENV}={choice!r}: expected 'auto', 'torch' or 'triton'")
    return choice


def use_kernel(
    store: CompactStore, device: torch.device | str, softcap: float | None = None, sinks: torch.Tensor | None = None
) -> bool:
    """Whether a compacted layer with ``store`` should attend through the kernel, by `KERNEL_ENV`.

    ``auto`` uses it on CUDA devices only: Triton's interpreter is far slower than the torch path on the CPU, so
    it runs only when asked for (``triton``). Stores other than `FullStore` and `QuantizedStore` (and quantized
    layouts the kernel cannot read, `kernel_reads`), and models that cap their attention logits (a ``softcap``,
    Gemma 2) or have attention ``sinks`` (GPT-OSS), which the kernel has not, always take the torch path, even
    under ``triton``.
    """
    choice = kernel_choice()
    if choice == "torch" or not isinstance(store, FullStore | QuantizedStore):
        return False
    if softcap is not None or sinks is not None:
        return False
    if not kernel_reads(store):
        return False
    if choice == "triton":
        if not kernel_available(device):
            raise RuntimeError(
                f"{KERNEL_ENV}=triton but the kernel cannot run on {device}: install triton (pip install "
                "'think-cache[gpu]') and use a CUDA device, or set TRITON_INTERPRET=1 to interpret it on the CPU"
            )
        return True
    return _device_type(device) == "cuda" and kernel_available(device)


# ----------------------------------------------------------------------------------------------------- kernels
def _softmax_step_body(
    s, cols, col_ok, m_i, l_i, mask_rows, row_ok, sm_n, last_visible, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr
):
    """One tile of the online softmax: mask the tile's logits ``s`` (base-2 scaled), then the tile's
    probabilities against the new running max, the factor that rescales what came before, the new max and sum, and
    the masked logits.
    Masked columns sit at float32's minimum as in the torch path (a row that sees nothing gets a uniform softmax),
    columns outside the span at -inf (no weight at all)."""
    if HAS_MASK:
        allowed = tl.load(mask_rows[:, None] + cols[None, :] * sm_n, mask=row_ok[:, None] & col_ok[None, :], other=0)
        s = tl.where(allowed != 0, s, -3.4028234663852886e38)
    elif CAUSAL:
        s = tl.where(cols[None, :] <= last_visible[:, None], s, -3.4028234663852886e38)
    s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1), s


def _scales_body(raw, LOG_SCALES: tl.constexpr):
    """Stored scales as float32: one-byte codes decoded (``LOG_SCALES``, `think_cache.quant.scale_values`: code 0
    is a scale of 0, code ``c`` is ``2 ** ((c - SCALE_BIAS) / SCALE_STEPS)``), else upcast."""
    s = raw.to(tl.float32)
    if LOG_SCALES:
        s = tl.where(s == 0.0, 0.0, tl.exp2((s - _SCALE_BIAS) / _SCALE_STEPS))
    return s


def _keys_tile_body(
    base, cols, col_ok, ck, ck_ok, s_t, s_c, ks_base, kz_base, kb_base, kept_k, k_width, k_block,
    QUANT: tl.constexpr, BITS: tl.constexpr, IRREGULAR: tl.constexpr, TOKEN_BLOCKS: tl.constexpr,
    LOG_SCALES: tl.constexpr,
):  # fmt: skip
    """A tile of compact keys, ``(kept channels, tokens)``: loaded (a `FullStore`), or, under ``QUANT``, the
    tokens' packed codes unpacked in registers (planar: channel ``c`` is byte ``c % k_width``, bits
    ``(c // k_width) * BITS`` on) times their block's scale plus its zero point, in float32. Regular keys: the
    tile is one whole block (the launch makes tiles ``k_block`` tokens, aligned), so its scales and zero points are
    one vector over the channels; ``TOKEN_BLOCKS``: blocks shorter than a tile (8 tokens at 4 bits, tiles of 16),
    each token's block is ``token // k_block``; ``IRREGULAR``: each token's block is read from its
    ``block_index``. ``LOG_SCALES``: the scales are one-byte codes (`_scales`)."""
    tile_ok = ck_ok[:, None] & col_ok[None, :]
    if QUANT:
        byte = tl.load(base + cols[None, :] * s_t + (ck % k_width)[:, None] * s_c, mask=tile_ok, other=0)
        # the plane of each channel; padding lanes past the channels (never kept) stay within the byte's planes
        shift = (((ck // k_width) % (8 // BITS)) * BITS).to(tl.uint8)
        code = ((byte >> shift[:, None]) & ((1 << BITS) - 1)).to(tl.float32)
        if IRREGULAR or TOKEN_BLOCKS:
            if IRREGULAR:
                block = tl.load(kb_base + cols, mask=col_ok, other=0)
            else:
                block = cols // k_block
            at = block[None, :] * kept_k + ck[:, None]
            scale = _scales(tl.load(ks_base + at, mask=tile_ok, other=0), LOG_SCALES)
            zero = tl.load(kz_base + at, mask=tile_ok, other=0.0).to(tl.float32)
            keys = code * scale + zero
        else:
            at = (tl.min(cols, 0) // k_block) * kept_k + ck  # the tile's block: its first token's
            scale = _scales(tl.load(ks_base + at, mask=ck_ok, other=0), LOG_SCALES)
            zero = tl.load(kz_base + at, mask=ck_ok, other=0.0).to(tl.float32)
            keys = code * scale[:, None] + zero[:, None]
    else:  # one return: Triton types every return statement, even those a constexpr branch leaves out
        keys = tl.load(base + cols[None, :] * s_t + ck[:, None] * s_c, mask=tile_ok, other=0.0)
    return keys


def _values_tile_body(
    base, cols, col_ok, cv, cv_ok, s_t, s_c, vs_base, vz_base, v_groups, v_width, like,
    QUANT: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KV: tl.constexpr, V_GROUP: tl.constexpr,
    V_SYMMETRIC: tl.constexpr, LOG_SCALES: tl.constexpr,
):  # fmt: skip
    """A tile of compact values, ``(tokens, kept channels)``: loaded, or, under ``QUANT``, unpacked from the
    tokens' codes times the scale plus the zero point of the channel's group (``c // V_GROUP``), rounded to the
    dtype of ``like`` (a pointer to the query: the model's dtype) as a stored value would be. The scales are
    loaded once per token and group, a ``(tokens, groups)`` tile, and broadcast over each group's channels
    (``V_GROUP`` divides ``BLOCK_KV``).
    ``V_SYMMETRIC``: no zero points are stored; a group's is ``-(2**BITS - 1) / 2`` times its scale.
    ``LOG_SCALES``: the scales are one-byte codes (`_scales`)."""
    tile_ok = col_ok[:, None] & cv_ok[None, :]
    if QUANT:
        byte = tl.load(base + cols[:, None] * s_t + (cv % v_width)[None, :] * s_c, mask=tile_ok, other=0)
        shift = (((cv // v_width) % (8 // BITS)) * BITS).to(tl.uint8)
        code = ((byte >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        g = tl.arange(0, BLOCK_KV // V_GROUP)
        at = cols[:, None] * v_groups + g[None, :]
        at_ok = col_ok[:, None] & (g < v_groups)[None, :]
        scale = _scales(tl.load(vs_base + at, mask=at_ok, other=0), LOG_SCALES)
        if V_SYMMETRIC:
            zero = scale * (-((1 << BITS) - 1) / 2)
        else:
            zero = tl.load(vz_base + at, mask=at_ok, other=0.0).to(tl.float32)
        code = tl.reshape(code, (BLOCK_N, BLOCK_KV // V_GROUP, V_GROUP))
        values = tl.reshape(code * scale[:, :, None] + zero[:, :, None], (BLOCK_N, BLOCK_KV))
        values = values.to(like.dtype.element_ty)
    else:
        values = tl.load(base + cols[:, None] * s_t + cv[None, :] * s_c, mask=tile_ok, other=0.0)
    return values


# bound to the jitted bodies above by _kernels(): the kernel calls them under these names
_softmax_step = None
_scales = None
_keys_tile = None
_values_tile = None
_SCALE_BIAS = None  # tl.constexpr of think_cache.quant.SCALE_BIAS / SCALE_STEPS, also bound by _kernels()
_SCALE_STEPS = None


def _split_pass(
    q_ptr, kch_ptr, ck_ptr, cv_ptr, vch_ptr, rk_ptr, rv_ptr, mask_ptr, out_ptr, part_ptr, count_ptr,
    ks_ptr, kz_ptr, kb_ptr, vs_ptr, vz_ptr, lg_ptr, st_ptr,
    sq_b, sq_h, sq_l, sq_d,
    skc_b, skc_h, skc_c,
    sck_b, sck_h, sck_t, sck_c,
    scv_b, scv_h, scv_t, scv_c,
    svc_b, svc_h, svc_c,
    srk_b, srk_h, srk_t, srk_d,
    srv_b, srv_h, srv_t, srv_d,
    sm_b, sm_h, sm_l, sm_n,
    so_b, so_l, so_h, so_d,
    kv_heads, group, q_len, n_compact, n_recent, kept_k, kept_v, head_dim, split_len, n_splits, row_blocks,
    scale_log2, k_width, k_blocks, k_block, v_width, v_groups,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KK: tl.constexpr,
    BLOCK_KV: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRUNED_V: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    QUANT: tl.constexpr, BITS: tl.constexpr, IRREGULAR: tl.constexpr, V_GROUP: tl.constexpr, SCORES: tl.constexpr,
    V_SYMMETRIC: tl.constexpr, TOKEN_BLOCKS: tl.constexpr, LOG_SCALES: tl.constexpr,
):  # fmt: skip
    """One (batch row, KV head, row block) x one span of tokens: see the module docstring. ``UPCAST``: do the
    products in float32 (Triton's interpreter multiplies bfloat16 operands as raw bits). ``QUANT``: the compact
    part is a `QuantizedStore`'s codes (``ck_ptr``/``cv_ptr``) with their scales and zero points (``ks``/``kz``
    per key block and channel, ``vs``/``vz`` per token and value group; ``LOG_SCALES``: the scales as one-byte
    codes) and, ``IRREGULAR``, each token's key block (``kb``; ``TOKEN_BLOCKS``: blocks shorter than a tile, each
    token's block computed); those tensors are contiguous. ``SCORES``: also write every row's masked logits
    (``lg``, ``(batch, kv_heads, rows, tokens)`` float32, base-2 scaled) and its softmax's final max and sum
    (``st``, ``(..., rows, 2)``), from which `_token_weights` gives each token's attention weight (what H2O
    accumulates)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row_block = pid % row_blocks
    bh = pid // row_blocks
    b = (bh // kv_heads).to(tl.int64)
    kvh = (bh % kv_heads).to(tl.int64)
    n_rows = group * q_len
    n_total = n_compact + n_recent

    # query rows of this KV head's group, laid out group member by member: row r is head kvh*group + r // q_len,
    # position r % q_len
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    pos = rows % q_len
    head = kvh * group + rows // q_len
    q_rows = q_ptr + b * sq_b + head * sq_h + pos * sq_l
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_full = tl.load(q_rows[:, None] + d[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    ck = tl.arange(0, BLOCK_KK)
    ck_ok = ck < kept_k
    channels = tl.load(kch_ptr + b * skc_b + kvh * skc_h + ck * skc_c, mask=ck_ok, other=0).to(tl.int32)
    q_kept = tl.load(q_rows[:, None] + channels[None, :] * sq_d, mask=row_ok[:, None] & ck_ok[None, :], other=0.0)
    if UPCAST:
        q_full, q_kept = q_full.to(tl.float32), q_kept.to(tl.float32)
    cv = tl.arange(0, BLOCK_KV)
    cv_ok = cv < kept_v

    mask_rows = mask_ptr + b * sm_b + kvh * sm_h + pos * sm_l
    last_visible = n_total - q_len + pos  # causal: the queries are the last q_len tokens

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    acc_kept = tl.zeros([BLOCK_R, BLOCK_KV], tl.float32)

    start = split * split_len
    end = tl.minimum(start + split_len, n_total)
    lg_rows = lg_ptr + ((b * kv_heads + kvh) * n_rows + rows).to(tl.int64) * n_total  # SCORES: each row's logits
    st_rows = st_ptr + ((b * kv_heads + kvh) * n_rows + rows) * 2

    # ---- compact part: keys at the kept channels, values at the kept value channels
    compact_end = tl.minimum(end, n_compact)
    ck_base = ck_ptr + b * sck_b + kvh * sck_h
    cv_base = cv_ptr + b * scv_b + kvh * scv_h
    head_row = b * kv_heads + kvh  # the quantized store's scales, zero points and block index are contiguous
    ks_base, kz_base = ks_ptr + head_row * k_blocks * kept_k, kz_ptr + head_row * k_blocks * kept_k
    kb_base = kb_ptr + head_row * n_compact
    vs_base, vz_base = vs_ptr + head_row * n_compact * v_groups, vz_ptr + head_row * n_compact * v_groups
    for first in range(start, compact_end, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        col_ok = cols < compact_end
        k = _keys_tile(
            ck_base, cols, col_ok, ck, ck_ok, sck_t, sck_c, ks_base, kz_base, kb_base, kept_k, k_width, k_block,
            QUANT, BITS, IRREGULAR, TOKEN_BLOCKS, LOG_SCALES,
        )  # fmt: skip
        k = k.to(tl.float32) if UPCAST else k.to(q_kept.dtype)
        s = tl.dot(q_kept, k, input_precision=PRECISION) * scale_log2
        p, alpha, m_new, l_i, s = _softmax_step(
            s, cols, col_ok, m_i, l_i, mask_rows, row_ok, sm_n, last_visible, HAS_MASK, CAUSAL
        )
        if SCORES:
            tl.store(lg_rows[:, None] + cols[None, :], s, mask=row_ok[:, None] & col_ok[None, :])
        v = _values_tile(
            cv_base, cols, col_ok, cv, cv_ok, scv_t, scv_c, vs_base, vz_base, v_groups, v_width, q_ptr, QUANT, BITS,
            BLOCK_N, BLOCK_KV, V_GROUP, V_SYMMETRIC, LOG_SCALES,
        )  # fmt: skip
        p_v = p.to(v.dtype)  # probabilities at the values' precision, as the torch path multiplies them
        if UPCAST:
            p_v, v = p_v.to(tl.float32), v.to(tl.float32)
        pv = tl.dot(p_v, v, input_precision=PRECISION)
        if PRUNED_V:
            acc_kept = acc_kept * alpha[:, None] + pv
            acc = acc * alpha[:, None]
        else:  # kept_v == head_dim: one accumulator
            acc = acc * alpha[:, None] + pv
        m_i = m_new

    # ---- recent part: full width
    rk_base = rk_ptr + b * srk_b + kvh * srk_h
    rv_base = rv_ptr + b * srv_b + kvh * srv_h
    for first in range(tl.maximum(start, n_compact), end, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        t = cols - n_compact
        k = tl.load(rk_base + t[None, :] * srk_t + d[:, None] * srk_d, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q_full, k, input_precision=PRECISION) * scale_log2
        p, alpha, m_new, l_i, s = _softmax_step(
            s, cols, col_ok, m_i, l_i, mask_rows, row_ok, sm_n, last_visible, HAS_MASK, CAUSAL
        )
        if SCORES:
            tl.store(lg_rows[:, None] + cols[None, :], s, mask=row_ok[:, None] & col_ok[None, :])
        v = tl.load(rv_base + t[:, None] * srv_t + d[None, :] * srv_d, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        p_v = p.to(v.dtype)
        if UPCAST:
            p_v, v = p_v.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=PRECISION)
        if PRUNED_V:
            acc_kept = acc_kept * alpha[:, None]
        m_i = m_new

    if PRUNED_V:  # the compact part's output back at its value channels: a one-hot (kept_v, head_dim) product
        v_channels = tl.load(vch_ptr + b * svc_b + kvh * svc_h + cv * svc_c, mask=cv_ok, other=-1).to(tl.int32)
        one_hot = (v_channels[:, None] == d[None, :]).to(tl.float32)
        acc += tl.dot(acc_kept, one_hot, input_precision="ieee")

    o_rows = out_ptr + b * so_b + pos * so_l + head * so_h
    o_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        # the unnormalized partial output, running max and running sum of each row for this span; the last span
        # of these rows to finish combines them all by log-sum-exp (no second launch)
        grow = (b * kv_heads + kvh) * n_rows + rows
        part = part_ptr + (grow * n_splits + split) * (head_dim + 2)
        tl.store(part[:, None] + d[None, :], acc, mask=o_mask)
        tl.store(part + head_dim, m_i, mask=row_ok)
        tl.store(part + head_dim + 1, l_i, mask=row_ok)
        tl.debug_barrier()  # all of this program's partials are written before its count is taken (acq_rel)
        finished = tl.atomic_add(count_ptr + pid, 1)
        if finished == n_splits - 1:  # combine the spans, one row at a time, all spans of a row at once
            spans = tl.arange(0, BLOCK_S)
            spans_ok = spans < n_splits
            for row in range(row_block * BLOCK_R, tl.minimum(row_block * BLOCK_R + BLOCK_R, n_rows)):
                # .cg: read from L2, where the other programs wrote
                row_parts = part_ptr + (((b * kv_heads + kvh) * n_rows + row) * n_splits + spans) * (head_dim + 2)
                m_s = tl.load(row_parts + head_dim, mask=spans_ok, other=float("-inf"), cache_modifier=".cg")
                l_s = tl.load(row_parts + head_dim + 1, mask=spans_ok, other=0.0, cache_modifier=".cg")
                o_s = tl.load(
                    row_parts[:, None] + d[None, :],
                    mask=spans_ok[:, None] & d_ok[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
                w = tl.exp2(m_s - tl.max(m_s, 0))
                o_row = tl.sum(o_s * w[:, None], 0) / tl.sum(w * l_s, 0)
                if SCORES:
                    st_row = st_ptr + ((b * kv_heads + kvh) * n_rows + row) * 2
                    tl.store(st_row, tl.max(m_s, 0))
                    tl.store(st_row + 1, tl.sum(w * l_s, 0))
                o_ptr = out_ptr + b * so_b + (row % q_len) * so_l + (kvh * group + row // q_len) * so_h
                tl.store(o_ptr + d * so_d, o_row.to(out_ptr.dtype.element_ty), mask=d_ok)
            tl.store(count_ptr + pid, 0)  # every span has counted itself: the counter is ready for the next launch
    else:
        tl.store(o_rows[:, None] + d[None, :] * so_d, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
        if SCORES:
            tl.store(st_rows, m_i, mask=row_ok)
            tl.store(st_rows + 1, l_i, mask=row_ok)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """The two kernels, jitted (or wrapped for the interpreter) for the current Triton mode."""
    global triton, tl, _softmax_step, _scales, _keys_tile, _values_tile, _SCALE_BIAS, _SCALE_STEPS
    import triton
    import triton.language as tl

    _SCALE_BIAS, _SCALE_STEPS = tl.constexpr(float(quant.SCALE_BIAS)), tl.constexpr(float(quant.SCALE_STEPS))
    _softmax_step = triton.jit(_softmax_step_body)
    _scales = triton.jit(_scales_body)
    _keys_tile = triton.jit(_keys_tile_body)
    _values_tile = triton.jit(_values_tile_body)
    # what changes with every step (counts, the mask's strides, the key blocks) is not specialized on (== 1,
    # multiple of 16), so that no decoding step recompiles
    return triton.jit(_split_pass, do_not_specialize=GROWING_ARGUMENTS)


#: The kernel's integer arguments that change from one decoding step to the next (see `_kernels`). The strides of
#: the keys and values stay specialized: without knowing that a head's rows start at a multiple of 16 elements the
#: kernel took 84 instead of 48 µs a layer at 32k tokens on an H100 (same process, same inputs). They
#: change little: the recent part's head stride is ``n_recent * head_dim`` (a multiple of 16 for every common head
#: width) and the compact part's ``tokens * kept`` keeps its remainder by 16 from one fold to the next (32 tokens):
#: only a new prompt or an eviction can meet the other variant of a shape, compiled once.
GROWING_ARGUMENTS = ["n_compact", "n_recent", "split_len", "n_splits", "k_blocks", "sm_b", "sm_h", "sm_l"]


# ------------------------------------------------------------------------------------------------- the launch
def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


#: Most spans a context is split into: the program that combines them holds one row's partial outputs of every
#: span at once (``MAX_SPANS * head_dim`` floats).
MAX_SPANS = 64
#: Fewest tokens a span is given (shorter spans cost more partial results to write and combine than they save).
MIN_SPAN_TOKENS = 256


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernel is launched for one head width: tokens per tile (``block_n``; wider heads, smaller tiles:
    registers), warps per program, software-pipelining stages of the token loop (None: Triton's default) and the
    programs per SM the spans of a long context are sized for."""

    block_n: int = 32
    num_warps: int = 4
    num_stages: int | None = None
    programs_per_sm: int = 2


#: The launch of each padded head width (tuned on an H100: ``benchmarks/kernel_check.py --sweep``). Replace an
#: entry (or call `configure`) to launch otherwise; the answers do not depend on it.
LAUNCH = {64: LaunchConfig(block_n=64), 128: LaunchConfig(block_n=32), 256: LaunchConfig(block_n=32)}


def configure(head_dim: int, **changes) -> LaunchConfig:
    """Launch heads of ``head_dim`` channels with ``changes`` (fields of `LaunchConfig`); returns the previous
    config, to restore with ``LAUNCH[_pow2(head_dim)] = previous``. Used by the benchmarks' sweeps."""
    key = _pow2(head_dim)
    previous = LAUNCH.get(key, LaunchConfig())
    LAUNCH[key] = replace(previous, **changes)
    return previous


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_length(n_total: int, tiles: _Tiles, split_tokens: int | None) -> int:
    """Tokens per span, a multiple of the tile: enough spans for the launch config's programs per SM
    (``tiles.spans``), none under `MIN_SPAN_TOKENS` tokens (``split_tokens`` forces a length, for tests)."""
    block_n = tiles.config.block_n
    if split_tokens is None:
        spans = max(1, min(tiles.spans, -(-n_total // MIN_SPAN_TOKENS)))
        split_tokens = -(-n_total // spans)
    return max(block_n, -(-split_tokens // block_n) * block_n)


class _Tiles(NamedTuple):
    """What a launch's shape decides, worked out once per shape (`_tiles`): the padded widths, the query rows per
    program and the programs per (batch row, KV head), the launch config (tiles of one key block when quantized),
    the channels per value scale as a tile sees them, whether a tile spans several key blocks, the launch
    options (warps, pipelining stages), and the most spans a context is split into (programs per SM of the config
    times the device's SMs, over the programs: at most `MAX_SPANS`)."""

    block_d: int
    block_kk: int
    block_kv: int
    block_r: int
    row_blocks: int
    programs: int
    spans: int
    config: LaunchConfig
    v_group: int
    token_blocks: bool
    options: dict


_DEFAULT_LAUNCH = LaunchConfig()


@functools.lru_cache(maxsize=256)
def _tiles(
    head_dim: int, kept_k: int, kept_v: int, rows: int, quant_block: int, irregular: bool, v_group: int | None,
    config: LaunchConfig, heads: int, device: torch.device,
) -> _Tiles:  # fmt: skip
    """The `_Tiles` of a launch: ``rows`` query rows per KV head (group x q_len), ``quant_block`` tokens per key
    block of a quantized store (0: not quantized), ``v_group`` its channels per value scale (None: one group),
    ``config`` the head width's `LAUNCH` entry (a frozen dataclass: `configure` replaces it, so a new config is
    a new key here), ``heads`` the batch's rows times KV heads, ``device`` where it runs. Cached: a decoding step
    meets the same few shapes layer after layer. Raises ValueError for value groups or tiles the kernel cannot read
    (`kernel_reads` keeps layers from asking)."""
    block_kv = _pow2(kept_v)
    block_r = min(_pow2(rows), 32 if head_dim > 128 else 64)
    if quant_block:  # a tile is one key block (one vector of scales per tile), or 16 tokens of shorter ones
        config = replace(config, block_n=max(16, quant_block))
    # channels per value scale as the tile sees them: one group over all lanes when a row has one group
    v_group = block_kv if v_group is None or v_group >= kept_v else v_group
    if block_kv % v_group or config.block_n < 16 or _pow2(config.block_n) != config.block_n:
        raise ValueError(
            f"compact_decode_attention: value groups of {v_group} channels over {kept_v} and tiles of "
            f"{config.block_n} tokens: the kernel needs power-of-two groups and tiles of at least 16 (kernel_reads)"
        )
    options = {"num_warps": config.num_warps}
    if config.num_stages is not None:
        options["num_stages"] = config.num_stages
    row_blocks = -(-rows // block_r)
    programs = heads * row_blocks
    return _Tiles(
        block_d=_pow2(head_dim),
        block_kk=_pow2(kept_k),
        block_kv=block_kv,
        block_r=block_r,
        row_blocks=row_blocks,
        programs=programs,
        spans=min(-(-config.programs_per_sm * _multiprocessors(device) // programs), MAX_SPANS),
        config=config,
        v_group=v_group,
        token_blocks=bool(quant_block) and not irregular and quant_block < config.block_n,
        options=options,
    )


def compact_decode_attention(
    query: torch.Tensor,
    key_channels: torch.Tensor,
    compact_keys: torch.Tensor,
    compact_values: torch.Tensor,
    value_channels: torch.Tensor | None,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    token_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over a compact part then a full-width recent part, in one fused kernel.

    Equal (up to float rounding) to `think_cache.compact.compact_attention` over a `FullStore` holding
    ``compact_keys``/``compact_values`` at ``key_channels``/``value_channels``.

    Parameters
    ----------
    query:
        ``(batch, q_heads, q_len, head_dim)``; query head ``j`` reads KV head ``j // (q_heads // kv_heads)``.
    key_channels:
        ``(batch, kv_heads, kept_k)`` integer indices of the kept key channels (int16 in a layer).
    compact_keys, compact_values:
        ``(batch, kv_heads, n_compact, kept_k)`` and ``(..., kept_v)``; ``n_compact`` may be 0.
    value_channels:
        ``(batch, kv_heads, kept_v)`` kept value channels, or None when values keep all ``head_dim`` channels.
    recent_keys, recent_values:
        ``(batch, kv_heads, n_recent, head_dim)``: the newest tokens at full width.
    mask:
        ``(batch | 1, 1 | kv_heads, q_len, n_compact + n_recent)``, bool (True = attend) or additive float (read
        as attend where above half of its dtype's minimum, as the torch path does), columns compact then recent;
        None is causal with the queries being the last ``q_len`` tokens.
    scale:
        The softmax scale.
    token_weights:
        Also return each stored token's attention weight summed over its KV head's query rows, ``(batch, kv_heads,
        n_compact + n_recent)`` float32, as `think_cache.compact.compact_attention` does with
        ``return_token_weights`` (what H2O accumulates): the kernel writes each row's masked logits and its
        softmax's final max and sum (``batch * q_heads * q_len * (n_compact + n_recent + 2)`` floats), and five
        torch ops turn them into weights.

    Returns
    -------
    ``(batch, q_len, q_heads, head_dim)`` in the query's dtype (and the token weights when asked).
    """
    return _attention(
        query, key_channels, compact_keys, compact_values, value_channels, recent_keys, recent_values, mask, scale,
        token_weights=token_weights,
    )  # fmt: skip


def quantized_decode_attention(
    query: torch.Tensor,
    store: QuantizedStore,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    token_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`compact_decode_attention` over a `QuantizedStore` holding tokens: its keys and values as packed codes with
    their scales and zero points (`think_cache.quant`), unpacked and dequantized tile by tile in registers, so no
    dequantized copy of any token exists outside them. Equal (up to float rounding: the dequantized keys enter the
    products in the query's dtype) to `think_cache.compact.compact_attention` over that store; the other arguments
    are `compact_decode_attention`'s."""
    keys, values = store.keys, store.values
    if keys.bits != values.bits or keys.tokens != values.tokens or keys.log_scales != values.log_scales:
        raise ValueError(
            f"quantized_decode_attention: keys of {keys.bits} bits over {keys.tokens} tokens (one-byte scales: "
            f"{keys.log_scales}) with values of {values.bits} bits over {values.tokens} (one-byte scales: "
            f"{values.log_scales}): expected the same code width, tokens and kind of scales"
        )
    key_channels, value_channels = store.key_channels, store.value_channels
    kept_v = query.shape[-1] if value_channels is None else value_channels.shape[-1]
    if keys.channels != key_channels.shape[-1] or values.channels != kept_v:
        raise ValueError(
            f"quantized_decode_attention: codes of {keys.channels} key / {values.channels} value channels for "
            f"{key_channels.shape[-1]} kept key / {kept_v} value channels: the kernel reads the scales by these"
        )
    return _attention(
        query, key_channels, keys.codes, values.codes, value_channels, recent_keys, recent_values, mask, scale,
        quantized=(keys, values), token_weights=token_weights,
    )  # fmt: skip


_NO_STORE_SIZES = (1, 1, 1, 1, 1)


def _quantized_args(quantized: tuple[QuantKeys, QuantValues] | None, anything: torch.Tensor):
    """The kernel's quantized-store arguments: (key scales, key zero points, key block index, value scales, value
    zero points, or ``anything`` for symmetric values), then (key bytes per token, key blocks, tokens per key
    block, value bytes per token, value groups), bits, irregular, channels per value group, symmetric values,
    one-byte scales. A `FullStore` passes ``anything`` (never read)."""
    if quantized is None:
        return (anything,) * 5, _NO_STORE_SIZES, 8, False, None, False, False
    qk, qv = quantized
    block_index = qk.block_index
    value_zero = anything if qv.symmetric else qv.zero
    tensors = (qk.scale, qk.zero, anything if block_index is None else block_index, qv.scale, value_zero)
    sizes = (qk.codes.shape[-1], qk.n_blocks, qk.block, qv.codes.shape[-1], qv.n_groups)
    return (
        tuple(t.contiguous() for t in tensors),
        sizes,
        qk.bits,
        block_index is not None,
        qv.group_size,
        qv.symmetric,
        qk.log_scales,
    )


def kernel_reads(store: CompactStore) -> bool:
    """Whether the kernel can read ``store``'s layout: any `FullStore`; a `QuantizedStore` whose key blocks are a
    power of two of tokens (a tile is one block, or 16 tokens of shorter blocks) and whose value groups, when a row
    has several, are a power of two of channels (the kernel broadcasts a group's scale by reshaping the tile)."""
    if not isinstance(store, QuantizedStore):
        return True
    block, group = store.key_block, store.group_size
    one_group = store.values is not None and store.values.n_groups == 1
    return _pow2(block, 1) == block and (_pow2(group, 1) == group or one_group)


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}
_SAME_DEVICE = contextlib.nullcontext()  # reusable: it holds nothing


def _counters(device: torch.device, programs: int) -> torch.Tensor:
    """Zeroed int32 span counters for ``programs`` programs, kept per device and stream: the last span of each
    program's rows sets its counter back to 0, so no launch pays for zeroing them (a memset per layer and step
    otherwise); launches on one stream run in order, so they never share a counter at once. Fresh ones while a
    CUDA graph is being captured (its memory is the graph's)."""
    stream = 0
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(programs, dtype=torch.int32, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
    counters = _COUNTERS.get((device, stream))
    if counters is None or counters.numel() < programs:
        counters = _COUNTERS[device, stream] = torch.zeros(max(programs, 1024), dtype=torch.int32, device=device)
    return counters


def _attention(
    query, key_channels, compact_keys, compact_values, value_channels, recent_keys, recent_values, mask, scale,
    split_tokens: int | None = None, quantized: tuple[QuantKeys, QuantValues] | None = None,
    token_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`compact_decode_attention` (``quantized``: `quantized_decode_attention`, the compact tensors being the
    codes), with ``split_tokens`` to force the span length (tests)."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, n_recent = recent_keys.shape[1], recent_keys.shape[2]
    n_compact, kept_k = compact_keys.shape[2], key_channels.shape[-1]
    kept_v = compact_values.shape[3] if quantized is None else quantized[1].channels
    n_total = n_compact + n_recent
    if q_heads % kv_heads or n_total == 0:
        raise ValueError(
            f"compact_decode_attention: {q_heads} query heads over {kv_heads} KV heads and {n_total} tokens; "
            "expected a whole number of query heads per KV head and at least one token"
        )
    if recent_values.shape[-1] != head_dim:
        raise ValueError(
            f"compact_decode_attention: values of {recent_values.shape[-1]} channels with queries of {head_dim}; "
            "the kernel needs equal query, key and value widths (the torch path serves other shapes)"
        )
    group = q_heads // kv_heads
    pruned_v = value_channels is not None
    if not pruned_v and kept_v != head_dim:
        raise ValueError(f"compact values hold {kept_v} channels of {head_dim}: pass their value_channels")
    if n_compact == 0:  # nothing is read from the compact tensors: any valid pointer will do
        compact_keys, compact_values, quantized = recent_keys, recent_values, None
    store_tensors, store_sizes, bits, irregular, v_group, v_symmetric, log_scales = _quantized_args(quantized, query)
    if not pruned_v:
        value_channels = key_channels

    has_mask = mask is not None
    if has_mask:
        mask = as_bool_mask(mask)
        if mask.shape[-1] != n_total or mask.shape[1] not in (1, kv_heads):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} for {n_total} keys and {kv_heads} KV heads: expected "
                f"(batch or 1, 1 or {kv_heads}, {q_len}, {n_total})"
            )
        mask = mask.expand(batch, mask.shape[1], q_len, n_total).view(torch.uint8)
        mask_strides = list(mask.stride())
        if mask.shape[1] == 1:
            mask_strides[1] = 0
    else:
        mask, mask_strides = query, [0, 0, 0, 0]  # never read

    interpreting = _interpreting()
    kernel = _kernels(interpreting)
    config = LAUNCH.get(_pow2(head_dim), _DEFAULT_LAUNCH)
    quant_block = 0 if quantized is None else quantized[0].block
    tiles = _tiles(
        head_dim, kept_k, kept_v, group * q_len, quant_block, irregular, v_group, config, batch * kv_heads, query.device
    )
    programs = tiles.programs
    split_len = _split_length(n_total, tiles, split_tokens)
    n_splits = -(-n_total // split_len)

    out = query.new_empty(batch, q_len, q_heads, head_dim)
    if token_weights:  # each row's masked logits, then its softmax's final max and sum
        logits = torch.empty(batch, kv_heads, group * q_len, n_total, dtype=torch.float32, device=out.device)
        stats = torch.empty(batch, kv_heads, group * q_len, 2, dtype=torch.float32, device=out.device)
    else:
        logits = stats = out  # never touched
    # Triton launches on the current CUDA device and stream: make them the tensors' (a model spread over GPUs)
    on_other_device = query.is_cuda and query.get_device() != torch.cuda.current_device()
    with torch.cuda.device(query.device) if on_other_device else _SAME_DEVICE:
        if n_splits > 1:  # per row and span: partial output, running max and sum; per program: spans finished
            parts = torch.empty(
                batch * q_heads * q_len * n_splits, head_dim + 2, dtype=torch.float32, device=out.device
            )
            counts = _counters(out.device, programs)
        else:
            parts = counts = out  # never touched
        try:
            kernel[(programs, n_splits)](
                query, key_channels, compact_keys, compact_values, value_channels, recent_keys, recent_values, mask,
                out, parts, counts, *store_tensors, logits, stats,
                *query.stride(), *key_channels.stride(), *compact_keys.stride(), *compact_values.stride(),
                *value_channels.stride(), *recent_keys.stride(), *recent_values.stride(), *mask_strides,
                *out.stride(),
                kv_heads, group, q_len, n_compact, n_recent, kept_k, kept_v, head_dim, split_len, n_splits,
                tiles.row_blocks, scale * _LOG2E, *store_sizes,
                BLOCK_R=tiles.block_r, BLOCK_N=tiles.config.block_n, BLOCK_D=tiles.block_d, BLOCK_KK=tiles.block_kk,
                BLOCK_KV=tiles.block_kv, HAS_MASK=has_mask, CAUSAL=q_len > 1, PRUNED_V=pruned_v, SPLIT=n_splits > 1,
                BLOCK_S=_pow2(n_splits),
                PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                UPCAST=interpreting and query.dtype == torch.bfloat16,
                QUANT=quantized is not None, BITS=bits, IRREGULAR=irregular, V_GROUP=tiles.v_group,
                SCORES=token_weights, V_SYMMETRIC=v_symmetric, TOKEN_BLOCKS=tiles.token_blocks,
                LOG_SCALES=log_scales, **tiles.options,
            )  # fmt: skip
        except BaseException:  # a launch that stopped part way may leave counts behind: the next one starts afresh
            _COUNTERS.clear()
            raise
    if token_weights:
        return out, _token_weights(logits, stats)
    return out


def _token_weights(logits: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Each token's softmax weight summed over the rows, ``(batch, kv_heads, tokens)``, from the kernel's masked
    base-2 logits ``(batch, kv_heads, rows, tokens)`` and each row's final max and sum ``(..., rows, 2)`` (in place
    over ``logits``). A row that may see nothing spreads its weight evenly, as the torch path's softmax does."""
    probs = logits.sub_(stats[..., :1]).exp2_().mul_(stats[..., 1:].reciprocal())
    return probs.sum(dim=-2)  # a plain sum: a float32 matmul may run in TF32 (set_float32_matmul_precision)


def store_attention(
    query: torch.Tensor,
    store: FullStore | QuantizedStore,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    token_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel over a layer's compact part ``store`` and full-width part ``keys``/``values`` (the
    arguments of `think_cache.compact.compact_attention`): `compact_decode_attention` for a `FullStore`,
    `quantized_decode_attention` for a `QuantizedStore` (``token_weights``: see `compact_decode_attention`). The
    place a new storage kind's kernel is chosen."""
    if isinstance(store, QuantizedStore) and store.keys is not None:
        return quantized_decode_attention(query, store, keys, values, mask, scale, token_weights)
    compact_keys, compact_values = store.keys, store.values
    if compact_keys is None:  # compacted, nothing folded yet
        batch, kv_heads = keys.shape[:2]
        compact_keys = keys.new_empty(batch, kv_heads, 0, store.key_channels.shape[-1])
        kept_v = keys.shape[-1] if store.value_channels is None else store.value_channels.shape[-1]
        compact_values = values.new_empty(batch, kv_heads, 0, kept_v)
    return compact_decode_attention(
        query, store.key_channels, compact_keys, compact_values, store.value_channels, keys, values, mask, scale,
        token_weights,
    )  # fmt: skip
