"""Decode-step attention over quantized compact keys/values against plain fp32 attention, on this machine.

    python -m benchmarks.quant_attention --tokens 4096,8192 --threads 2

Each quantized variant runs through the CPU loops of `think_cache.cpu_kernels` ("loops") and through the torch
path ("chunk N": ``THINK_CACHE_KERNEL=torch``, N tokens unpacked at a time). Shapes are SmolLM2-135M's decode
step: batch 1, 3 KV heads, a group of 3 query heads flattened into 3 query rows, head_dim 64, ThinK keeping 32 key
channels. Variants run interleaved, round after round, each timed as the mean of
``--inner`` calls; the table gives the minimum and the median over rounds (the minimum is the least disturbed by
other processes on a shared machine). ``--layers N`` cycles through N layers' worth of distinct tensors, so that
the plain baseline reads its keys from memory as a real decode step does, not from a warm cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from think_cache import cpu_kernels, kernels, quant

B, H, ROWS, HEAD_DIM, KEPT = 1, 3, 3, 64, 32


def torch_path(fn):
    """``fn`` through the torch path of `quant` (``THINK_CACHE_KERNEL=torch``), not the CPU loops."""

    def run():
        before = os.environ.get(kernels.KERNEL_ENV)
        os.environ[kernels.KERNEL_ENV] = "torch"
        try:
            return fn()
        finally:  # as it was: a setting of the caller's stays
            if before is None:
                del os.environ[kernels.KERNEL_ENV]
            else:
                os.environ[kernels.KERNEL_ENV] = before

    return run


def compare(fns: dict, rounds: int, inner: int, clock=time.perf_counter) -> dict:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = clock()
            for _ in range(inner):
                fn()
            times[name].append((clock() - t) / inner * 1e6)
    return {name: (min(v), statistics.median(v)) for name, v in times.items()}


# ------------------------------------------------------------------------- alternatives to the chosen kernel
def logits_dequant_chunks(q, qk: quant.QuantKeys, scaling, chunk=1024):
    """Dequantize a chunk of keys to a ``(n, C)`` float buffer (planes interleaved back), then one matmul."""
    per, width = 8 // qk.bits, qk.codes.shape[-1]
    b, h, rows, c = q.shape
    q = q.float() * scaling
    s, z = qk.scales(), qk.zero.float()
    out = torch.empty(b, h, rows, qk.tokens)
    planes = torch.empty(per, b, h, chunk, width)
    keys = torch.empty(b, h, chunk, per * width)
    for start in range(0, qk.tokens, chunk):
        n = min(chunk, qk.tokens - start)
        nb, first = n // qk.block, start // qk.block
        quant._unpack_planes(qk.codes[:, :, start : start + n], qk.bits, planes[:, :, :, :n])
        k = keys[:, :, :n].view(b, h, n, per, width)
        k.copy_(planes[:, :, :, :n].permute(1, 2, 3, 0, 4))
        k = keys[:, :, :n].view(b, h, nb, qk.block, c)
        k.mul_(s[:, :, first : first + nb, None]).add_(z[:, :, first : first + nb, None])
        out[..., start : start + n] = torch.matmul(q, keys[:, :, :n].transpose(-1, -2))
    return out


def logits_fold_bmm(q, qk: quant.QuantKeys, scaling, chunk=1024):
    """Fold each block's scales into the query: per block ``(q * scale_b) @ codes_b^T``, one bmm over blocks."""
    per, width = 8 // qk.bits, qk.codes.shape[-1]
    b, h, rows, c = q.shape
    qs = (q.float() * scaling)[:, :, None] * qk.scales()[:, :, :, None]  # (B, H, nb, rows, C)
    qs = qs.view(b, h, qk.n_blocks, rows, per, width).permute(4, 0, 1, 2, 3, 5)  # (per, B, H, nb, rows, w)
    bias = torch.matmul(q.float() * scaling, qk.zero.float().transpose(-1, -2))
    out = torch.empty(b, h, rows, qk.tokens)
    buf = torch.empty(per, b, h, chunk, width)
    for start in range(0, qk.tokens, chunk):
        n = min(chunk, qk.tokens - start)
        nb, first = n // qk.block, start // qk.block
        k = quant._unpack_planes(qk.codes[:, :, start : start + n], qk.bits, buf[:, :, :, :n])
        lg = torch.matmul(qs[:, :, :, first : first + nb], k.view(per, b, h, nb, qk.block, width).transpose(-1, -2))
        lg = lg.sum(0)  # (B, H, nb, rows, block)
        lg += bias.transpose(-1, -2)[:, :, first : first + nb, :, None]
        out[..., start : start + n] = lg.permute(0, 1, 3, 2, 4).reshape(b, h, rows, n)
    return out


def variants(tokens: int, layers: int, chunks: list[int], alternatives: bool) -> dict:
    """The timed functions for one context length, each cycling through ``layers`` layers' tensors."""
    scaling = HEAD_DIM**-0.5
    k64 = [torch.randn(B, H, tokens, HEAD_DIM) for _ in range(layers)]
    v64 = [torch.randn(B, H, tokens, HEAD_DIM) for _ in range(layers)]
    k32 = [x[..., :KEPT].contiguous() for x in k64]
    q64, q32 = torch.randn(B, H, ROWS, HEAD_DIM), torch.randn(B, H, ROWS, KEPT)
    w = torch.softmax(torch.randn(B, H, ROWS, tokens), -1)

    def cycle(fn):
        return lambda: [fn(i) for i in range(layers)]

    def plain_attention(k, v, q):
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, -1), v)

    def quant_attention(qk, qv, chunk):
        p = torch.softmax(quant.quantized_attention_logits(q32, qk, scaling, chunk), -1)
        return quant.quantized_attention_output(p, qv, chunk)

    fns = {
        "logits plain C=32": cycle(lambda i: torch.matmul(q32, k32[i].transpose(-1, -2)) * scaling),
        "logits plain C=64": cycle(lambda i: torch.matmul(q64, k64[i].transpose(-1, -2)) * scaling),
        "output plain C=64": cycle(lambda i: torch.matmul(w, v64[i])),
        "attention plain C=64": cycle(lambda i: plain_attention(k64[i], v64[i], q64)),
        "attention plain, keys C=32": cycle(lambda i: plain_attention(k32[i], v64[i], q32)),
    }
    for bits in (2, 4, 8):
        log_scales = quant.LOG_SCALES[bits]
        qk = [quant.quantize_keys(x, bits, quant.key_block(bits), log_scales=log_scales) for x in k32]  # the store's
        qv = [
            quant.quantize_values(
                x, bits, quant.default_group_size(bits), symmetric=quant.SYMMETRIC_VALUES[bits], log_scales=log_scales
            )
            for x in v64
        ]
        if cpu_kernels.available():  # the CPU loops (chunks do not apply)
            fns[f"logits {bits}b loops"] = cycle(lambda i, qk=qk: quant.quantized_attention_logits(q32, qk[i], scaling))
            fns[f"output {bits}b loops"] = cycle(lambda i, qv=qv: quant.quantized_attention_output(w, qv[i]))
            fns[f"attention {bits}b loops"] = cycle(lambda i, qk=qk, qv=qv: quant_attention(qk[i], qv[i], 1))
        for c in chunks:  # the torch path
            fns[f"logits {bits}b chunk {c}"] = torch_path(
                cycle(lambda i, qk=qk, c=c: quant.quantized_attention_logits(q32, qk[i], scaling, c))
            )
            fns[f"output {bits}b chunk {c}"] = torch_path(
                cycle(lambda i, qv=qv, c=c: quant.quantized_attention_output(w, qv[i], c))
            )
            fns[f"attention {bits}b chunk {c}"] = torch_path(
                cycle(lambda i, qk=qk, qv=qv, c=c: quant_attention(qk[i], qv[i], c))
            )
            if alternatives:
                fns[f"logits {bits}b fold-bmm chunk {c}"] = cycle(
                    lambda i, qk=qk, c=c: logits_fold_bmm(q32, qk[i], scaling, c)
                )
                fns[f"logits {bits}b dequant chunk {c}"] = cycle(
                    lambda i, qk=qk, c=c: logits_dequant_chunks(q32, qk[i], scaling, c)
                )
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,8192")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--chunks", default="1024,2048,4096")
    parser.add_argument("--alternatives", action="store_true", help="also time the fold-bmm and dequant kernels")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time CPU seconds of this process (steadier on a shared machine)"
    )
    args = parser.parse_args()
    clock = (time.thread_time if args.threads == 1 else time.process_time) if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads} layers={args.layers} clock={clock.__name__} load={os.getloadavg()[0]:.1f}")
    for tokens in map(int, args.tokens.split(",")):
        fns = variants(tokens, args.layers, [int(c) for c in args.chunks.split(",")], args.alternatives)
        results = compare(fns, args.rounds, args.inner, clock)
        print(f"\ntokens={tokens}  (us per layer: min / median over rounds)")
        for name, (lo, med) in results.items():
            print(f"  {name:36s} {lo / args.layers:9.1f} {med / args.layers:9.1f}")


if __name__ == "__main__":
    main()
