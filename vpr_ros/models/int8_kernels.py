"""Native fused kernels for the int8 path, built once with the machine's C compiler.

The int8 layers of :mod:`vpr_ros.models.int8_linear` spend as much time in element-wise
torch ops around each integer matmul (quantise a row, turn int32 back into float, add
the bias, GELU, LayerNorm, residual add) as in half of the matmuls themselves: each op
is one more pass over memory.  ``int8_kernels.c`` does each of those chains in one pass
per row, and holds a multi-head attention on integer (int16) Q, K, V and softmax
weights (:meth:`NativeKernels.integer_attention`, used by :mod:`vpr_ros.models.int8_block`).
It is plain C (no torch headers; AVX512-VNNI intrinsics where the compiler targets them,
the same results from plain loops elsewhere), so it compiles in about a second:

* on first use, with ``$CC`` (default ``cc``) ``-O3 -march=native -fopenmp`` and IEEE
  semantics kept (``-ffp-contract=off``, no ``-ffast-math``);
* into a cache folder keyed by the source, flags, compiler and CPU
  (``$VPR_ROS_KERNEL_CACHE``, default ``~/.cache/vpr_ros/kernels``), written atomically so
  concurrent processes never load a half-written library;
* linked against ``libgomp.so.1``, the OpenMP runtime torch's Linux wheels already load,
  so the kernels share torch's threads; the thread count is torch's, passed on each call.

Without a compiler, or with ``VPR_ROS_NATIVE_KERNELS=0``, :func:`native_kernels` returns
None and the int8 layers use their torch implementation: the same quantisation and
dequantisation bit for bit (the tests check it), slower.  Only the GELU (a rational
``erf`` within 5e-7 of the exact one) and the LayerNorm (a fixed 16-way summation order)
differ from torch's own, by float32 rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_kernels.c")
ENV_SWITCH = "VPR_ROS_NATIVE_KERNELS"     # "0" / "off" / "false": never build or load
ENV_CACHE = "VPR_ROS_KERNEL_CACHE"
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
              "-ffp-contract=off", "-fno-strict-aliasing")
# tried in order: the first set the compiler accepts is used
FLAG_SETS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())

_lock = threading.Lock()
_loaded: dict = {}
_NOT_LOADED = object()


class KernelBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded (the torch path is used)."""


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vpr_ros" / "kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: a library built for one CPU must not run on another."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    text += line
                if key == "flags" or key == "Features":
                    break
    except OSError:
        pass
    return text


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc)
    if path is None:
        raise KernelBuildError(f"no C compiler: {cc!r} is not on PATH (set $CC)")
    return path


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def build(cache: Optional[Path] = None) -> Path:
    """Compile ``int8_kernels.c`` (or reuse the cached build) and return the library path."""
    cc = _compiler()
    source = SOURCE.read_bytes()
    version = _compiler_version(cc)
    folder = Path(cache) if cache is not None else cache_dir()
    errors = []
    for extra in FLAG_SETS:
        flags = BASE_FLAGS + extra
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        target = folder / f"vpr_int8_kernels_{key}.so"
        if target.is_file():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                errors.append(f"{' '.join(extra) or 'plain'}: {proc.stderr.strip()[-400:]}")
                continue
            os.replace(tmp, target)           # atomic: other processes see all or nothing
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise KernelBuildError("could not compile int8_kernels.c: " + " | ".join(errors))


MAX_ATTENTION_TOKENS = 32767      # int32 sums of int16 weights x int16 values stay exact
_F32P = ctypes.POINTER(ctypes.c_float)
_I64 = ctypes.c_int64


class NativeKernels:
    """ctypes bindings of the fused kernels, taking and returning CPU torch tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        lib = ctypes.CDLL(str(self.path))
        vp, i32 = ctypes.c_void_p, ctypes.c_int
        signatures = {
            "vpr_quantize_rows": [vp, _I64, _I64, vp, vp, i32],
            "vpr_dequantize": [vp, _I64, _I64, vp, vp, vp, i32],
            "vpr_dequantize_add": [vp, _I64, _I64, vp, vp, vp, vp, i32],
            "vpr_dequantize_gelu_quantize": [vp, _I64, _I64, vp, vp, vp, vp, vp, i32],
            "vpr_layer_norm_quantize": [vp, _I64, _I64, vp, vp, ctypes.c_float, vp, vp, vp, i32],
            "vpr_integer_attention": [vp, _I64, _I64, _I64, _I64, ctypes.c_float, vp, i32, i32],
        }
        returns = {"vpr_integer_attention": ctypes.c_int}
        for name, args in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, returns.get(name)
        self._lib = lib

    # -- checks ---------------------------------------------------------------------
    @staticmethod
    def _check(t: torch.Tensor, dtype: torch.dtype, name: str, numel: Optional[int] = None) -> int:
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous CPU {dtype} tensor, got "
                             f"{t.dtype} on {t.device} (contiguous={t.is_contiguous()})")
        if numel is not None and t.numel() != numel:
            raise ValueError(f"{name}: expected {numel} elements, got {t.numel()}")
        return t.data_ptr()

    @staticmethod
    def _opt(t: Optional[torch.Tensor], n: int, name: str) -> Optional[int]:
        return None if t is None else NativeKernels._check(t, torch.float32, name, n)

    # -- kernels --------------------------------------------------------------------
    @staticmethod
    def _outputs(m: int, k: int, q: Optional[torch.Tensor], scale: Optional[torch.Tensor]):
        """(m, k) int8 codes and (m, 1) float32 scales: the given buffers, checked, or new ones."""
        q = torch.empty((m, k), dtype=torch.int8) if q is None else q
        scale = torch.empty((m, 1), dtype=torch.float32) if scale is None else scale
        NativeKernels._check(q, torch.int8, "q", m * k)
        NativeKernels._check(scale, torch.float32, "scale", m)
        return q, scale

    def quantize_rows(self, x: torch.Tensor, q: Optional[torch.Tensor] = None,
                      scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        m, k = x.shape
        q, scale = self._outputs(m, k, q, scale)
        self._lib.vpr_quantize_rows(self._check(x, torch.float32, "x"), m, k, q.data_ptr(),
                                    scale.data_ptr(), torch.get_num_threads())
        return q, scale

    def dequantize_(self, acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
        m, n = acc.shape
        self._lib.vpr_dequantize(self._check(acc, torch.int32, "acc"), m, n,
                                 self._check(row_scale, torch.float32, "row_scale", m),
                                 self._check(col_scale, torch.float32, "col_scale", n),
                                 self._opt(bias, n, "bias"), torch.get_num_threads())
        return acc.view(torch.float32)

    def dequantize_add_(self, acc: torch.Tensor, row_scale: torch.Tensor,
                        col_scale: torch.Tensor, bias: Optional[torch.Tensor],
                        residual: torch.Tensor) -> torch.Tensor:
        m, n = acc.shape
        self._lib.vpr_dequantize_add(self._check(acc, torch.int32, "acc"), m, n,
                                     self._check(row_scale, torch.float32, "row_scale", m),
                                     self._check(col_scale, torch.float32, "col_scale", n),
                                     self._opt(bias, n, "bias"),
                                     self._check(residual, torch.float32, "residual", m * n),
                                     torch.get_num_threads())
        return acc.view(torch.float32)

    def dequantize_gelu_quantize(self, acc: torch.Tensor, row_scale: torch.Tensor,
                                 col_scale: torch.Tensor, bias: Optional[torch.Tensor],
                                 q: Optional[torch.Tensor] = None,
                                 scale: Optional[torch.Tensor] = None
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        m, n = acc.shape
        q, scale = self._outputs(m, n, q, scale)
        self._lib.vpr_dequantize_gelu_quantize(
            self._check(acc, torch.int32, "acc"), m, n,
            self._check(row_scale, torch.float32, "row_scale", m),
            self._check(col_scale, torch.float32, "col_scale", n),
            self._opt(bias, n, "bias"), q.data_ptr(), scale.data_ptr(), torch.get_num_threads())
        return q, scale

    def layer_norm_quantize(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float, q: Optional[torch.Tensor] = None,
                            scale: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
        m, k = x.shape
        threads = torch.get_num_threads()
        q, scale = self._outputs(m, k, q, scale)
        scratch = torch.empty((threads, k), dtype=torch.float32)
        self._lib.vpr_layer_norm_quantize(
            self._check(x, torch.float32, "x"), m, k,
            self._check(weight, torch.float32, "weight", k),
            self._check(bias, torch.float32, "bias", k), float(eps),
            q.data_ptr(), scale.data_ptr(), scratch.data_ptr(), threads)
        return q, scale

    def integer_attention(self, qkv: torch.Tensor, batch: int, tokens: int, heads: int,
                          head_dim: int, scale: float, out: Optional[torch.Tensor] = None,
                          generic: bool = False) -> torch.Tensor:
        """Multi-head self-attention with int16 codes and exact int32 products.

        ``qkv``: the qkv layer's output, ``(batch * tokens, 3 * heads * head_dim)`` float32
        (timm's ``(b, n, 3, h, d)`` order).  Returns ``(batch * tokens, heads * head_dim)``
        float32 in ``(b, n, h, d)`` order, the proj layer's input (``out`` if given).
        Q and K are quantised per token (5792 steps a side at head_dim 64), V per channel
        of each image and the softmax weights in steps of 1/32767 of their sum; see
        ``vpr_integer_attention`` in ``int8_kernels.c``.  ``generic=True`` runs the plain-C
        loops instead of the AVX512-VNNI ones (same result).  At most
        ``MAX_ATTENTION_TOKENS`` tokens.
        """
        m, width = batch * tokens, heads * head_dim
        self._check(qkv, torch.float32, "qkv", m * 3 * width)
        if out is None:
            out = torch.empty((m, width), dtype=torch.float32)
        self._check(out, torch.float32, "out", m * width)
        if m == 0:
            return out
        if tokens > MAX_ATTENTION_TOKENS:
            raise ValueError(f"integer attention: {tokens} tokens, at most {MAX_ATTENTION_TOKENS}")
        status = self._lib.vpr_integer_attention(qkv.data_ptr(), batch, tokens, heads, head_dim,
                                                 float(scale), out.data_ptr(), int(generic),
                                                 torch.get_num_threads())
        if status != 0:
            raise MemoryError("integer attention: could not allocate its scratch memory")
        return out


def native_kernels() -> Optional[NativeKernels]:
    """The loaded kernels, building them on first call; None if disabled or unavailable.

    A failure is logged once (with the reason) and remembered for the process.  Called by
    every int8 layer on every forward, so the common case is two environment lookups
    and a dict hit (the key is the raw settings that decide the cache folder).
    """
    if not enabled():
        return None
    key = (os.environ.get(ENV_CACHE), os.environ.get("XDG_CACHE_HOME"))
    loaded = _loaded.get(key, _NOT_LOADED)
    if loaded is not _NOT_LOADED:
        return loaded
    with _lock:
        if key not in _loaded:
            try:
                _loaded[key] = NativeKernels(build())
            except (KernelBuildError, OSError, subprocess.SubprocessError) as exc:
                log.warning("int8 native kernels unavailable, using the slower torch path: %s",
                            exc)
                _loaded[key] = None
        return _loaded[key]


__all__ = ["NativeKernels", "KernelBuildError", "MAX_ATTENTION_TOKENS", "native_kernels", "build",
           "cache_dir", "enabled", "SOURCE", "ENV_SWITCH", "ENV_CACHE"]
