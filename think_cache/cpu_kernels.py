"""Decode attention over a quantized compact part on the CPU: two small C loops, built on first use.

`quant.quantized_attention_logits` and `quant.quantized_attention_output` unpack a chunk of codes into a float32
buffer, scale it, then multiply: on a CPU each of those is a pass over memory, and a 4-bit cache decoded slower
than DynamicCache's dense keys. The loops of ``csrc/quant_attention.c`` do the same arithmetic reading every
token's packed codes once: a tile of `TILE` tokens is dequantized into a few KiB of 8-lane float vectors (in the L1
cache) and used against every query row at once. What they compute is what the torch path computes (float32, the
sums in another order: equal within float32 rounding); the torch path stays the reference, the path under
``torch.compile``, with gradients, and for many query rows (`MAX_ROWS`: a matmul serves a later prompt better).

Build: the first call compiles the source with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``;
``-O3 -march=native``, about a second; portable flags where that fails, which is then remembered) into
`build_dir` under a name that hashes the source, the flags and the CPU, and loads it with `ctypes`; later
processes load the built file. Without a compiler, or when the build fails,
a warning says why once and every call takes the torch path. ``THINK_CACHE_KERNEL=torch`` (`kernels.KERNEL_ENV`)
turns the loops off.

Threads: the loops run on the calling thread. Splitting a call's tokens over two pthreads was tried and measured
slower on a 2-core host (4-bit, 4k tokens: 1.74 against 1.15 ms a layer): torch's OpenMP workers keep spinning for
a while after each parallel op (the softmax before the values), taking the second core.

Memory: besides their results (``(batch, kv_heads, rows, tokens)`` logits, ``(batch, kv_heads, rows, channels)``
outputs, as the torch path returns) the loops allocate `work_bytes`: a tile and a few vectors per row, whatever
the context length.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from . import quant
from ._checks import check_int
from .quant import QuantKeys, QuantValues

__all__ = [
    "SOURCE",
    "BUILD_DIR_ENV",
    "MAX_ROWS",
    "TILE",
    "build_dir",
    "library",
    "available",
    "serves",
    "work_bytes",
    "keys_logits",
    "values_output",
]

#: The C source of the loops.
SOURCE = Path(__file__).with_name("csrc") / "quant_attention.c"
#: Environment variable naming the folder of built libraries (default: ``$XDG_CACHE_HOME/think_cache`` or
#: ``~/.cache/think_cache``; a temporary folder when that cannot be written).
BUILD_DIR_ENV = "THINK_CACHE_BUILD_DIR"
#: The most query rows (``group * q_len``) the loops serve: a decoding step has a KV head's group (3 to 8 rows for
#: most models), a few more with assisted or speculative decoding; a later prompt's thousands of rows take the
#: torch path, whose matmuls block for the cache.
MAX_ROWS = 64
#: Tokens the loops dequantize at a time (``TILE`` in the source).
TILE = 32

# -O3 vectorizes the loops; reassociating float sums (without -ffast-math's other assumptions) lets the dot
# products and row sums use vector registers
_FLAGS = (
    "-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
    "-Wno-psabi",  # the portable build: 8-lane vectors passed between always-inlined functions, no ABI crossed
)  # fmt: skip
_NATIVE = ("-march=native",)

_P, _I = ctypes.c_void_p, ctypes.c_int64
_C = ctypes.c_int
_KEYS_ARGS = [_P, _P, _P, _C, _P, _P, _C, _P, _I, _I, _I, _I, _I, _C, _I, _I, ctypes.c_float, _P]
_VALUES_ARGS = [_P, _P, _P, _C, _P, _P, _C, ctypes.c_float, _I, _I, _I, _I, _I, _C, _I, _I, _P]


# ------------------------------------------------------------------------------------------------------ build
def build_dir() -> Path:
    """Where built libraries go: `BUILD_DIR_ENV`, else the user's cache folder. Not inside the folder converted
    models go to (`think_cache.models`, ``~/.cache/think-cache``): transformers makes that one with the user's umask,
    group-writable under 002, and a folder libraries are loaded from must be private down to it (`_own_folder`)."""
    named = os.environ.get(BUILD_DIR_ENV)
    if named:  # absolute: dlopen looks a name without a slash up on the library search path
        return Path(named).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return (Path(base) / "think_cache").absolute()


def _compiler() -> list[str] | None:
    """The compiler's command: ``$CC`` (which may carry arguments: ``ccache gcc``), else the first of ``cc``,
    ``gcc``, ``clang`` found."""
    named = os.environ.get("CC")
    if named:
        return shlex.split(named)
    found = next((path for path in map(shutil.which, ("cc", "gcc", "clang")) if path), None)
    return None if found is None else [found]


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (``/proc/cpuinfo`` where there is one)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("flags", "Features", "model name"))]
    return "\n".join(dict.fromkeys(keep))


def _library_path(compiler: list[str], flags: tuple[str, ...], folder: Path) -> Path:
    key = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(compiler).encode(),
        " ".join(flags).encode(),
        platform.machine().encode(),
    ):
        key.update(part + b"\0")
    key.update(_cpu_signature().encode())
    return folder / f"quant_attention-{key.hexdigest()[:16]}.so"


def _compile(compiler: list[str], flags: tuple[str, ...], target: Path) -> tuple[str | None, bool]:
    """Build ``target``: ``(None, _)`` on success, else the complaint and whether it is the compiler's verdict on
    the flags (not a passing failure: a timeout, a compiler that could not start). Raises OSError when the folder
    cannot be written."""
    handle, name = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)  # a name no other build shares
    os.close(handle)
    partial = Path(name)
    try:
        try:
            done = subprocess.run(
                [*compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.SubprocessError) as error:
            return str(error), False
        if done.returncode:
            return done.stderr.strip() or f"exit status {done.returncode}", True
        os.chmod(partial, 0o700)  # whatever the linker and umask made of it: this user's alone (`_load` checks)
        os.replace(partial, target)  # atomic: a process running beside never loads half a file
        return None, False
    finally:  # also on KeyboardInterrupt
        partial.unlink(missing_ok=True)


def _own_folder(folder: Path) -> None:
    """Create ``folder`` (private) where missing, and refuse one that someone else could have written a library
    into, or swapped for another: another user's, writable by others, or below a folder where another user could
    rename it (the rule OpenSSH applies to ``~/.ssh``)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_own(os.stat(folder, follow_symlinks=False), folder)
    for parent in folder.resolve().parents:  # the real folders above it (~/.cache may be a link elsewhere)
        info = parent.stat()
        shared = info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX  # /tmp is sticky: nobody renames ours
        if info.st_uid not in (0, os.getuid()) or shared:
            raise PermissionError(f"{folder} lies in {parent}, which another user owns or may rename its entries in")


def _check_own(info: os.stat_result, path: Path) -> None:
    if info.st_uid != os.getuid() or info.st_mode & 0o022 or stat.S_ISLNK(info.st_mode):
        raise PermissionError(f"{path} is not this user's alone (owned by another user, writable by others, or a link)")


def _load(path: Path) -> ctypes.CDLL:
    # the file checked is the file loaded: opened once (not through a link), checked, then loaded by its descriptor
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        _check_own(info, path)
        if not stat.S_ISREG(info.st_mode):
            raise PermissionError(f"{path} is not a regular file")
        by_descriptor = f"/proc/self/fd/{fd}"
        lib = ctypes.CDLL(by_descriptor if os.path.exists(by_descriptor) else str(path))
    finally:
        os.close(fd)
    lib.think_keys_logits.argtypes, lib.think_keys_logits.restype = _KEYS_ARGS, ctypes.c_int
    lib.think_values_output.argtypes, lib.think_values_output.restype = _VALUES_ARGS, ctypes.c_int
    return lib


def _build() -> ctypes.CDLL:
    """The library, built where needed (native flags first, then portable ones); raises with the reasons."""
    if sys.platform == "win32":
        raise RuntimeError("building the loops is not supported on Windows")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install cc, gcc or clang)")
    folders = [build_dir(), Path(tempfile.gettempdir()) / f"think_cache-{os.getuid()}"]
    complaints = []
    for flags in (_FLAGS + _NATIVE, _FLAGS):
        for folder in folders:
            target = _library_path(compiler, flags, folder)
            try:
                _own_folder(folder)
            except OSError as error:
                complaints.append(str(error))
                continue
            # a native build that failed here (a compiler without -march=native) is not retried in every process
            failed = target.with_suffix(".failed")
            if not target.exists():
                try:
                    complaint, lasting = (
                        (failed.read_text(), False) if failed.exists() else _compile(compiler, flags, target)
                    )
                except OSError as error:  # the folder cannot be written: try the next
                    complaints.append(f"{folder}: {error}")
                    continue
                if complaint is not None:
                    complaints.append(f"{' '.join(compiler)} {' '.join(flags)}: {complaint}")
                    # not the portable build (a compiler upgrade must be able to build it), nor a passing failure
                    if lasting and flags == _FLAGS + _NATIVE:
                        with contextlib.suppress(OSError):
                            failed.write_text(complaint)
                    break  # the flags, not the folder: try the portable ones
            try:
                return _load(target)
            except OSError as error:
                complaints.append(f"{target}: {error}")
    raise RuntimeError("; ".join(complaints))


_BUILDING = threading.Lock()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built loops, or None (with one warning saying why) when they cannot be built here."""
    try:
        with _BUILDING:  # threads asking at once: one builds, the others then find the file
            return _build()
    except RuntimeError as error:
        warnings.warn(
            f"think-cache: the CPU attention loops could not be built ({error}); quantized caches attend through "
            "the slower torch path",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def available() -> bool:
    """Whether the loops are built (building them now if need be)."""
    return library() is not None


# ---------------------------------------------------------------------------------------------------- dispatch
def _plain(t: torch.Tensor | None, grad: bool) -> bool:
    """A tensor whose memory the loops may read: a plain strided CPU tensor (not a subclass: fake, functional or
    meta tensors have no data), not asking for gradients (None: an absent field)."""
    if t is None:
        return True
    return type(t) is torch.Tensor and t.is_cpu and t.layout == torch.strided and not (grad and t.requires_grad)


def serves(x: torch.Tensor, rows: int, packed: QuantKeys | QuantValues | None = None) -> bool:
    """Whether the loops compute attention of ``rows`` query rows with ``x`` (the query or the weights) over
    ``packed``: every tensor a plain CPU tensor, at most `MAX_ROWS` rows, no gradient wanted (nor a forward-mode
    one), a key block index as stored (int32), not while torch.compile or torch.jit traces, not turned off by
    ``THINK_CACHE_KERNEL=torch``, and built. Elsewhere the torch path answers (or says what is wrong)."""
    from .kernels import kernel_choice

    if rows > MAX_ROWS or torch.autograd.forward_ad._current_level >= 0:
        return False
    grad = torch.is_grad_enabled()
    if not _plain(x, grad):
        return False
    if packed is not None:  # the fields one by one: this runs twice a layer in every decoding step
        index = getattr(packed, "block_index", None)
        if index is not None and index.dtype != torch.int32:
            return False
        if not (_plain(packed.codes, grad) and _plain(packed.scale, grad) and _plain(packed.zero, grad)):
            return False
        if not _plain(index, grad):
            return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or kernel_choice() == "torch":
        return False
    return library() is not None


def work_bytes(rows: int, lanes: int) -> int:
    """Bytes the loops allocate for one call, besides its result: a tile of `TILE` tokens, the query rows (keys)
    or their sums (values), and a few vectors, over ``lanes`` float32 lanes (the channels rounded up per plane to
    8): no term grows with the context."""
    return (TILE + rows + 2) * lanes * 4


#: The loops' codes for how scales and zero points are stored (``*_kind`` in the source).
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3}


def _stored(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Scales or zero points as the loops read them, in place (no float32 copy of a context-sized array): the tensor
    (contiguous; upcast only from a dtype the loops do not read) and its kind."""
    if t.dtype not in _KINDS:
        t = t.float()
    return t.contiguous(), _KINDS[t.dtype]


def _check_layout(
    name: str, codes: torch.Tensor, channels: int, bits: int, fields: dict, rows: int, columns: int
) -> None:
    """What the loops trust and the torch path would have refused: the packed width, and scales and zero points
    (floats; scales also one-byte codes) with a row per block (keys) or token (values) of every batch row and head:
    a wrong layout would read past them."""
    width = quant.packed_width(channels, bits)
    if codes.dtype != torch.uint8 or codes.dim() != 4 or codes.shape[-1] != width:
        raise ValueError(
            f"{name}: {channels} codes of {bits} bits pack into {width} bytes, got {tuple(codes.shape)} {codes.dtype}"
        )
    for field, t in fields.items():
        readable = t.is_floating_point() or (field == "scale" and t.dtype == torch.uint8)
        if not readable or tuple(t.shape) != (*codes.shape[:2], rows, columns):
            raise ValueError(
                f"{name}: {field} of shape {tuple(t.shape)} ({t.dtype}) does not fit codes {tuple(codes.shape)}"
            )


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int, what: str) -> None:
    if status == 1:
        raise MemoryError(f"think-cache: the CPU {what} loop could not allocate its work buffer")
    if status == 3:
        raise ValueError(f"think-cache: a key block index past the stored blocks ({what})")
    if status:
        raise RuntimeError(f"think-cache: the CPU {what} loop failed (status {status})")


def keys_logits(query: torch.Tensor, qk: QuantKeys, scaling: float) -> torch.Tensor:
    """`quant.quantized_attention_logits` through the loops: ``(batch, kv_heads, rows, tokens)`` float32.
    ``query`` is ``(batch, kv_heads, rows, channels)``, already checked against ``qk``."""
    batch, heads, rows, channels = query.shape
    _check_layout("keys", qk.codes, channels, qk.bits, {"scale": qk.scale, "zero": qk.zero}, qk.n_blocks, channels)
    check_int("block", qk.block, 1)
    if qk.block_index is None and qk.n_blocks * qk.block < qk.tokens:
        raise ValueError(f"{qk.n_blocks} key blocks of {qk.block} tokens do not cover {qk.tokens} tokens")
    if qk.block_index is not None and tuple(qk.block_index.shape) != tuple(qk.codes.shape[:3]):
        raise ValueError(
            f"keys: a block index of shape {tuple(qk.block_index.shape)} for codes {tuple(qk.codes.shape)}: "
            "expected one block per (batch row, head, token)"
        )
    out = torch.empty(batch, heads, rows, qk.tokens, dtype=torch.float32, device="cpu")
    (scale, scale_kind), (zero, zero_kind) = _stored(qk.scale), _stored(qk.zero)
    q = query.float().contiguous()
    keys = qk.codes.contiguous()
    index = None if qk.block_index is None else qk.block_index.contiguous()  # int32 (`serves`)
    table = quant.scale_table()
    status = library().think_keys_logits(
        q.data_ptr(), keys.data_ptr(), scale.data_ptr(), scale_kind, table.data_ptr(), zero.data_ptr(), zero_kind,
        _ptr(index),
        batch * heads, rows, qk.tokens, channels, keys.shape[-1], qk.bits, qk.block, qk.n_blocks, float(scaling),
        out.data_ptr(),
    )  # fmt: skip
    _check(status, "key logits")
    return out


def values_output(weights: torch.Tensor, qv: QuantValues) -> torch.Tensor:
    """`quant.quantized_attention_output` through the loops: ``(batch, kv_heads, rows, channels)`` float32.
    ``weights`` is ``(batch, kv_heads, rows, tokens)``, already checked against ``qv``."""
    batch, heads, rows, tokens = weights.shape
    check_int("group_size", qv.group_size, 1)
    fields = {"scale": qv.scale} if qv.zero is None else {"scale": qv.scale, "zero": qv.zero}
    groups = -(-qv.channels // qv.group_size)  # `quant.value_groups`, also for no channels
    _check_layout("values", qv.codes, qv.channels, qv.bits, fields, tokens, groups)
    out = torch.empty(batch, heads, rows, qv.channels, dtype=torch.float32, device="cpu")
    scale, scale_kind = _stored(qv.scale)
    zero, zero_kind = (None, 0) if qv.zero is None else _stored(qv.zero)
    w = weights.float().contiguous()
    values = qv.codes.contiguous()
    offset = quant.symmetric_offset(qv.bits) if qv.zero is None else 0.0
    table = quant.scale_table()
    status = library().think_values_output(
        w.data_ptr(), values.data_ptr(), scale.data_ptr(), scale_kind, table.data_ptr(), _ptr(zero), zero_kind,
        offset,
        batch * heads, rows, tokens, qv.channels, values.shape[-1], qv.bits, qv.group_size, qv.n_groups,
        out.data_ptr(),
    )  # fmt: skip
    _check(status, "value output")
    return out
