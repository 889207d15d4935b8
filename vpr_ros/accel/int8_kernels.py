"""Native fused kernels for the int8 path, built once with the machine's C compiler.

The int8 layers of :mod:`vpr_ros.accel.int8_linear` spend as much time in element-wise
torch ops around each integer matmul (quantise a row, turn int32 back into float, add
the bias, GELU, LayerNorm, residual add) as in half of the matmuls themselves: each op
is one more pass over memory.  ``int8_kernels.c`` does each of those chains in one pass
per row, and holds a multi-head attention on integer (int16) Q, K, V and softmax
weights (:meth:`NativeKernels.integer_attention`, used by :mod:`vpr_ros.accel.int8_block`).
It is plain C (no torch headers; AVX512-VNNI intrinsics where the compiler targets them,
the same results from plain loops elsewhere), so it compiles in about a second:

* on first use, with ``$CC`` (default ``cc``) ``-O3 -march=native -fopenmp`` and IEEE
  semantics kept (``-ffp-contract=off``, no ``-ffast-math``);
* into a cache folder keyed by the source, flags, compiler and CPU
  (``$VPR_ROS_KERNEL_CACHE``, default ``~/.cache/vpr_ros/kernels``), written atomically so
  concurrent processes never load a half-written library;
* linked against ``libgomp.so.1``, the OpenMP runtime torch's Linux wheels already load,
  so the kernels share torch's threads; the thread count is torch's, passed on each call.

Without a compiler, or switched off (``AccelOptions(native_kernels=False)``, override
``VPR_ROS_NATIVE_KERNELS=0``), :func:`native_kernels` returns
None and the int8 layers use their torch implementation: the same quantisation and
dequantisation bit for bit (the tests check it), slower.  Only the GELU (a rational
``erf`` within 5e-7 of the exact one) and the LayerNorm (a fixed 16-way summation order)
differ from torch's own, by float32 rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .options import ENV_KERNEL_CACHE, ENV_NATIVE_KERNELS, env_flag
from .workspace import WORKSPACE

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_kernels.c")
ENV_SWITCH = ENV_NATIVE_KERNELS     # "0" / "off" / "false": never build or load
ENV_CACHE = ENV_KERNEL_CACHE
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
    """The environment override of the ``native_kernels`` option (see :mod:`.options`)."""
    return env_flag(ENV_SWITCH)


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


class BlockLinear(ctypes.Structure):
    """``vpr_linear`` of the C source: one int8 layer of a whole-block call (its packed
    weight, column scales, bias or NULL, K, N)."""
    _fields_ = [("w", ctypes.c_void_p), ("neg_zero", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("k", ctypes.c_int64), ("n", ctypes.c_int64)]


class BlockNorm(ctypes.Structure):
    """``vpr_norm`` of the C source: a LayerNorm's weight, bias and eps."""
    _fields_ = [("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("eps", ctypes.c_float)]


BLOCK_BUFFERS = ("q_c", "s_a", "s_b", "acc_qkv", "mixed", "acc_c", "q_h", "acc_h", "q_ad", "s_ad",
                 "acc_ad", "acc_x1")


class BlockBuffers(ctypes.Structure):
    """``vpr_block_buffers`` of the C source: the work buffers of a block-chain call."""
    _fields_ = [(name, ctypes.c_void_p) for name in BLOCK_BUFFERS]


class BlockCall(ctypes.Structure):
    """``vpr_block_call`` of the C source: one block of a chain (pointers to its
    ``BlockNorm`` / ``BlockLinear`` views; the adapters' NULL for a plain block) and its
    output (set by :meth:`NativeKernels.block_chain`)."""
    _fields_ = [(name, ctypes.c_void_p) for name in (
                    "norm1", "norm2", "qkv", "proj", "fc1", "fc2", "ad1_fc1", "ad1_fc2",
                    "ad2_fc1", "ad2_fc2", "gamma1", "gamma2")]
    _fields_ += [("adapter_scale", ctypes.c_float), ("att_scale", ctypes.c_float),
                 ("heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                 ("out", ctypes.c_void_p)]


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
            "vpr_mnn_top2": [vp, _I64, vp, _I64, _I64, vp, vp, vp, vp, vp, vp, i32, i32],
            "vpr_exact_argmax": [vp, vp, _I64, _I64, vp, _I64, vp, vp, i32, i32],
            "vpr_point_norms": [vp, _I64, _I64, vp, vp, i32],
            "vpr_pack_panels": [vp, _I64, _I64, vp],
            "vpr_codes16": [vp, _I64, _I64, _I64, ctypes.c_double, vp, vp, vp, i32],
            "vpr_mnn_exact_counts": [vp, vp, _I64, vp, _I64, _I64, _I64, vp, i32, i32],
            "vpr_fma_matrix": [vp, _I64, vp, _I64, _I64, vp, i32],
            "vpr_codes_8_16": [vp, _I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_float, i32,
                               vp, vp, vp, i32],
            "vpr_mnn_int8_count": [vp, vp, vp, _I64, vp, vp, vp, vp, _I64, _I64, _I64, _I64,
                                   vp, vp, vp, vp, _I64, vp, i32],
            "vpr_have_vnni": [],
            "vpr_absmax": [vp, _I64],
            # fused block steps (int8_block.py)
            "vpr_residual_layer_norm_quantize": [vp, _I64, _I64, vp, vp, vp, vp, vp, vp, vp,
                                                 vp, ctypes.c_float, vp, vp, vp, i32],
            "vpr_dequantize_quantize": [vp, _I64, _I64, vp, vp, vp, i32, vp, vp, i32],
            "vpr_dequantize_pair_residual": [vp, vp, _I64, _I64, vp, vp, vp, vp, vp, vp,
                                             ctypes.c_float, vp, vp, i32],
            "vpr_integer_attention_acc": [vp, vp, vp, vp, _I64, _I64, _I64, _I64,
                                          ctypes.c_float, vp, vp, vp, i32, i32],
            "vpr_col2im_channels_last": [vp, i32] + [_I64] * 14 + [vp, vp, i32],
            "vpr_col2im_max_kernel_height": [],
            "vpr_int8_gemm": [vp, _I64, _I64, vp, vp, _I64, vp, i32],
            "vpr_int8_slacks": [vp, _I64, vp, _I64] + [ctypes.c_double] * 6 + [vp] * 4,
            "vpr_half_to_float": [vp, _I64, vp],
            # consecutive blocks in one parallel region (an array of BlockCall)
            "vpr_block_chain": [vp, _I64, _I64, _I64, vp, _I64, vp, i32],
        }
        returns = {"vpr_integer_attention": ctypes.c_int, "vpr_mnn_top2": ctypes.c_int,
                   "vpr_mnn_exact_counts": ctypes.c_int, "vpr_mnn_int8_count": ctypes.c_int,
                   "vpr_have_vnni": ctypes.c_int, "vpr_absmax": ctypes.c_float,
                   "vpr_integer_attention_acc": ctypes.c_int,
                   "vpr_col2im_max_kernel_height": ctypes.c_int, "vpr_int8_gemm": ctypes.c_int,
                   "vpr_block_chain": ctypes.c_int}
        for name, args in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, returns.get(name)
        self._lib = lib
        self.has_vnni = bool(lib.vpr_have_vnni())    # built with AVX-512 VNNI (else plain C)
        # the tallest kernel col2im_channels_last takes (COL2IM_MAX_KH in the C source)
        self.col2im_max_kernel_height = int(lib.vpr_col2im_max_kernel_height())

    # -- checks ---------------------------------------------------------------------
    @staticmethod
    def _check(t: torch.Tensor, dtype: torch.dtype, name: str, numel: Optional[int] = None) -> int:
        # is_cpu, not device.type: this runs ~20 times per ViT block (a few us per forward)
        if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
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
        scratch = self._scratch(k, threads)
        self._lib.vpr_layer_norm_quantize(
            self._check(x, torch.float32, "x"), m, k,
            self._check(weight, torch.float32, "weight", k),
            self._check(bias, torch.float32, "bias", k), float(eps),
            q.data_ptr(), scale.data_ptr(), scratch.data_ptr(), threads)
        return q, scale

    # -- fused block steps (int8_block.py) -------------------------------------------
    @staticmethod
    def _scratch(n: int, threads: int) -> torch.Tensor:
        """One float row of ``n`` per OpenMP thread for the LayerNorm kernels, from the
        calling thread's workspace (:mod:`.workspace`), reused by every call."""
        return WORKSPACE.get("layer_norm_rows", (threads * n,), torch.float32)

    def residual_layer_norm_quantize(
            self, acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
            bias: Optional[torch.Tensor], residual: torch.Tensor,
            norm: Tuple[torch.Tensor, torch.Tensor, float],
            skip: Optional[torch.Tensor] = None, gamma: Optional[torch.Tensor] = None,
            q: Optional[torch.Tensor] = None,
            scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x = residual + gamma * (dequantise(acc) + skip)`` (gamma, skip optional), written
        into ``acc`` as float32 and returned, and the int8 codes of ``LayerNorm(x)``
        (``norm = (weight, bias, eps)``) into ``q`` / ``scale``: the same bits as
        :meth:`dequantize_add_` (+ the torch ops) then :meth:`layer_norm_quantize`.
        ``row_scale`` may be ``scale`` itself (each row's scale is read before it is written).
        A residual step without a LayerNorm after it is :meth:`dequantize_add_`."""
        m, n = acc.shape
        threads = torch.get_num_threads()
        q, scale = self._outputs(m, n, q, scale)
        self._lib.vpr_residual_layer_norm_quantize(
            self._check(acc, torch.int32, "acc"), m, n,
            self._check(row_scale, torch.float32, "row_scale", m),
            self._check(col_scale, torch.float32, "col_scale", n), self._opt(bias, n, "bias"),
            self._opt(skip, m * n, "skip"), self._opt(gamma, n, "gamma"),
            self._check(residual, torch.float32, "residual", m * n),
            self._check(norm[0], torch.float32, "norm weight", n),
            self._check(norm[1], torch.float32, "norm bias", n), float(norm[2]),
            q.data_ptr(), scale.data_ptr(), self._scratch(n, threads).data_ptr(), threads)
        return acc.view(torch.float32)

    def dequantize_quantize(self, acc: torch.Tensor, row_scale: torch.Tensor,
                            col_scale: torch.Tensor, bias: Optional[torch.Tensor], relu: bool,
                            q: Optional[torch.Tensor] = None,
                            scale: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantise ``acc`` in place (+ ReLU if ``relu``) and quantise the rows: returns
        (the float32 rows (``acc``'s memory), codes, scales); the bits of
        :meth:`dequantize_` (+ ``relu_``) then :meth:`quantize_rows`."""
        m, n = acc.shape
        q, scale = self._outputs(m, n, q, scale)
        self._lib.vpr_dequantize_quantize(
            self._check(acc, torch.int32, "acc"), m, n,
            self._check(row_scale, torch.float32, "row_scale", m),
            self._check(col_scale, torch.float32, "col_scale", n), self._opt(bias, n, "bias"),
            int(bool(relu)), q.data_ptr(), scale.data_ptr(), torch.get_num_threads())
        return acc.view(torch.float32), q, scale

    def dequantize_pair_residual(self, acc: torch.Tensor, side: torch.Tensor,
                                 scales: Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
                                 side_scales: Tuple[torch.Tensor, torch.Tensor,
                                                    Optional[torch.Tensor]],
                                 side_weight: float, gamma: Optional[torch.Tensor],
                                 residual: torch.Tensor) -> torch.Tensor:
        """``residual + gamma * (deq(acc) + side_weight * deq(side))`` into ``acc`` (float32,
        returned); ``scales`` = (row scales, column scales, bias) of each accumulator.
        ``side`` is overwritten."""
        m, n = acc.shape
        if tuple(side.shape) != (m, n):
            raise ValueError(f"side: expected {(m, n)}, got {tuple(side.shape)}")
        rs, cs, b = scales
        srs, scs, sb = side_scales
        self._lib.vpr_dequantize_pair_residual(
            self._check(acc, torch.int32, "acc"), self._check(side, torch.int32, "side"), m, n,
            self._check(rs, torch.float32, "row_scale", m),
            self._check(cs, torch.float32, "col_scale", n), self._opt(b, n, "bias"),
            self._check(srs, torch.float32, "side row_scale", m),
            self._check(scs, torch.float32, "side col_scale", n), self._opt(sb, n, "side bias"),
            float(side_weight), self._opt(gamma, n, "gamma"),
            self._check(residual, torch.float32, "residual", m * n), torch.get_num_threads())
        return acc.view(torch.float32)

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
        out = self._attention_output(qkv, torch.float32, "qkv", batch, tokens, heads * head_dim,
                                     out)
        if out.numel():
            self._attention_status(self._lib.vpr_integer_attention(
                qkv.data_ptr(), batch, tokens, heads, head_dim, float(scale), out.data_ptr(),
                int(generic), torch.get_num_threads()))
        return out

    @staticmethod
    def _attention_output(src: torch.Tensor, dtype: torch.dtype, name: str, batch: int,
                          tokens: int, width: int, out: Optional[torch.Tensor]) -> torch.Tensor:
        """Check an attention input (batch * tokens, 3 * width) and its output buffer (new if
        None); refuses more than MAX_ATTENTION_TOKENS tokens (unless there are no rows)."""
        m = batch * tokens
        NativeKernels._check(src, dtype, name, m * 3 * width)
        if out is None:
            out = torch.empty((m, width), dtype=torch.float32)
        NativeKernels._check(out, torch.float32, "out", m * width)
        if m and tokens > MAX_ATTENTION_TOKENS:
            raise ValueError(f"integer attention: {tokens} tokens, at most {MAX_ATTENTION_TOKENS}")
        return out

    @staticmethod
    def _attention_status(status: int) -> None:
        if status != 0:
            raise MemoryError("integer attention: could not allocate its scratch memory")

    def integer_attention_acc(self, acc: torch.Tensor, row_scale: torch.Tensor,
                              col_scale: torch.Tensor, bias: Optional[torch.Tensor], batch: int,
                              tokens: int, heads: int, head_dim: int, scale: float,
                              out: Optional[torch.Tensor] = None,
                              generic: bool = False,
                              quantized: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                              ) -> torch.Tensor:
        """:meth:`integer_attention` of the qkv layer's int32 sums ``acc`` (dequantised with
        ``row_scale``, ``col_scale``, ``bias`` head by head inside the kernel): the bits of
        ``integer_attention(dequantize_(acc, ...))`` without the float qkv matrix.  ``acc``
        is not written.  ``quantized = (q, scale)``: also the int8 codes of the output rows
        (the bits of :meth:`quantize_rows`), in the same parallel region."""
        m, width = batch * tokens, heads * head_dim
        out = self._attention_output(acc, torch.int32, "acc", batch, tokens, width, out)
        q_ptr = s_ptr = None
        if quantized is not None:
            q, q_scale = self._outputs(m, width, *quantized)
            q_ptr, s_ptr = q.data_ptr(), q_scale.data_ptr()
        if m:
            self._attention_status(self._lib.vpr_integer_attention_acc(
                acc.data_ptr(), self._check(row_scale, torch.float32, "row_scale", m),
                self._check(col_scale, torch.float32, "col_scale", 3 * width),
                self._opt(bias, 3 * width, "bias"), batch, tokens, heads, head_dim,
                float(scale), out.data_ptr(), q_ptr, s_ptr, int(generic),
                torch.get_num_threads()))
        return out

    def col2im_channels_last(self, cols: torch.Tensor, size: Tuple[int, int, int, int],
                             kernel: Tuple[int, int], stride: Tuple[int, int],
                             padding: Tuple[int, int], dilation: Tuple[int, int],
                             out_size: Tuple[int, int], bias: Optional[torch.Tensor],
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The col2im of a transposed convolution, channels last: ``cols`` (b, h * w,
        kh * kw * c) bfloat16 or float32, each input pixel's row in [ky][kx][co] order ->
        (b, oh, ow, c) float32 (``out`` if given), each output pixel the sum of its
        contributions in (ky, kx) order, then ``bias`` (``vpr_col2im_channels_last``).
        ``size`` = (b, h, w, c); at most :attr:`col2im_max_kernel_height` kernel rows."""
        b, h, w, c = size
        (kh, kw), (oh, ow) = kernel, out_size
        if cols.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"cols: expected bfloat16 or float32, got {cols.dtype}")
        if kh > self.col2im_max_kernel_height:
            raise ValueError(f"col2im: kernel height {kh} > {self.col2im_max_kernel_height}")
        self._check(cols, cols.dtype, "cols", b * h * w * kh * kw * c)
        if out is None:
            out = torch.empty((b, oh, ow, c), dtype=torch.float32)
        self._check(out, torch.float32, "out", b * oh * ow * c)
        self._lib.vpr_col2im_channels_last(
            cols.data_ptr(), int(cols.dtype == torch.bfloat16), b, h, w, c, kh, kw, *stride,
            *padding, *dilation, oh, ow, self._opt(bias, c, "bias"), out.data_ptr(),
            torch.get_num_threads())
        return out

    # -- blocks in one parallel region (vpr_block_chain) ------------------------------
    def block_linear(self, layer, packed: "VnniWeight") -> BlockLinear:
        """The C view of an int8 layer (``Int8Linear``) with its packed weight; the layer
        keeps the tensors alive."""
        n = packed.n
        return BlockLinear(packed.pointers[0], packed.pointers[1],
                           self._check(layer.weight_scale, torch.float32, "weight_scale", n),
                           self._opt(layer.bias, n, "bias"), packed.k, n)

    def block_norm(self, norm) -> BlockNorm:
        n = norm.weight.numel()
        return BlockNorm(self._check(norm.weight, torch.float32, "norm weight"),
                         self._check(norm.bias, torch.float32, "norm bias", n), float(norm.eps))

    def block_call(self, norm1: BlockNorm, qkv: BlockLinear, proj: BlockLinear,
                   norm2: BlockNorm, fc1: BlockLinear, fc2: BlockLinear, heads: int,
                   head_dim: int, scale: float, adapters=None, gamma1=None, gamma2=None,
                   adapter_scale: float = 0.0) -> BlockCall:
        """One block of :meth:`block_chain`: a timm ``Block``, or with ``adapters`` (the
        views of adapter1's fc1, fc2 and adapter2's fc1, fc2) a SelaVPR adapted block
        (``gamma1`` / ``gamma2``: its LayerScales, None: none).  The caller keeps the views
        and tensors alive while the call is used."""
        ref = ctypes.addressof
        call = BlockCall(ref(norm1), ref(norm2), ref(qkv), ref(proj), ref(fc1), ref(fc2))
        if adapters is not None:
            call.ad1_fc1, call.ad1_fc2, call.ad2_fc1, call.ad2_fc2 = map(ref, adapters)
            c = qkv.k                                   # the block's width
            call.gamma1 = self._opt(gamma1, c, "gamma1")
            call.gamma2 = self._opt(gamma2, c, "gamma2")
            call.adapter_scale = float(adapter_scale)
        call.att_scale, call.heads, call.head_dim = float(scale), int(heads), int(head_dim)
        return call

    def block_chain(self, x: torch.Tensor, calls: Sequence[BlockCall], buffers: BlockBuffers,
                    outs: Sequence[torch.Tensor]) -> None:
        """Consecutive int8 blocks (integer attention) in one parallel region: ``x`` (b, n,
        c) float32 through ``calls`` in turn, block i's output into ``outs[i]`` ((b, n, c)
        float32, the next block's input; two blocks apart may share a buffer), with the
        bits of the step-by-step path (``vpr_block_chain``).  ``buffers``: work buffers for
        the widest block.  Needs VNNI (:attr:`has_vnni`)."""
        b, n, c = x.shape
        self._check(x, torch.float32, "x")
        if len(outs) != len(calls) or not calls:
            raise ValueError("block_chain: one output per block, at least one block")
        array = (BlockCall * len(calls))(*calls)
        for i, (item, out) in enumerate(zip(array, outs)):
            item.out = self._check(out, torch.float32, f"outs[{i}]", b * n * c)
        status = self._lib.vpr_block_chain(x.data_ptr(), b, n, c, array, len(calls),
                                           ctypes.byref(buffers), torch.get_num_threads())
        if status == -1:
            raise MemoryError("int8 blocks: could not allocate their scratch memory")
        if status != 0:
            raise ValueError(f"int8 blocks: the native kernel declined ({status})")

    def mnn_top2(self, x_codes: np.ndarray, n_x: int, q_vnni: np.ndarray, n_q: int,
                 generic: bool = False, threads: Optional[int] = None) -> Tuple[np.ndarray, ...]:
        """Fused top-2 of the int16 code similarities ``x_codes @ q_codes.T``, never stored.

        ``x_codes``: (n_x rounded up to a multiple of 4, c_pad) int16, zero rows at the end;
        ``q_vnni``: the query codes in the layout of :func:`mnn_query_layout`.  Returns
        ``(row_best, row_idx, row_second, col_best, col_idx, col_second)`` int32 arrays: per
        candidate point (row) the largest code similarity over the query points, the first
        index where it occurs and the largest of the rest, and the same per query point
        (column) over the candidate points.  An exact tie shows as ``second == best``.
        ``vpr_mnn_top2`` in ``int8_kernels.c``.  ``threads``: OpenMP threads (default
        torch's count), as for the other re-ranking kernels.
        """
        c_pad = x_codes.shape[1]
        if (x_codes.dtype != np.int16 or not x_codes.flags.c_contiguous
                or x_codes.shape[0] != -(-n_x // MNN_ROWS) * MNN_ROWS):
            raise ValueError(f"x_codes: expected C-contiguous int16 rows padded to a multiple of "
                             f"{MNN_ROWS}, got {x_codes.shape} {x_codes.dtype}")
        if (q_vnni.dtype != np.int16 or not q_vnni.flags.c_contiguous or q_vnni.ctypes.data % 64
                or q_vnni.size != -(-n_q // MNN_GROUP) * MNN_GROUP * c_pad or c_pad % 2):
            raise ValueError(f"q_vnni: expected the int16 VNNI layout of {n_q} query points of "
                             f"{c_pad} channels, got {q_vnni.shape} {q_vnni.dtype}")
        rows = [np.empty(n_x, dtype=np.int32) for _ in range(3)]
        cols = [np.empty(n_q, dtype=np.int32) for _ in range(3)]
        status = self._lib.vpr_mnn_top2(x_codes.ctypes.data, n_x, q_vnni.ctypes.data, n_q, c_pad,
                                        *(a.ctypes.data for a in rows + cols), int(generic),
                                        _threads(threads))
        if status != 0:
            raise MemoryError("mnn_top2: could not allocate its scratch memory")
        return tuple(rows + cols)

    def point_norms(self, x: np.ndarray, threads: Optional[int] = None) -> Tuple[np.ndarray, float]:
        """(n, c) float32 -> (the points' norms (n,) float64, the largest |component|)."""
        self._check_np(x, np.float32, "x")
        norm = np.empty(x.shape[0], dtype=np.float64)
        amax = np.zeros(1, dtype=np.float64)
        self._lib.vpr_point_norms(x.ctypes.data, x.shape[0], x.shape[1], norm.ctypes.data,
                                  amax.ctypes.data, _threads(threads))
        return norm, float(amax[0])

    def codes16(self, x: np.ndarray, scale: float, rows: int, c_pad: int,
                threads: Optional[int] = None):
        """int16 codes ``rint(x / scale)`` in ``rows`` (>= n) rows of ``c_pad`` (zero padding),
        and per point ``|x - scale * code|`` and ``|scale * code|`` in float64."""
        self._check_np(x, np.float32, "x")
        n, c = x.shape
        if rows < n or c_pad < c:
            raise ValueError("codes16: the padded shape is smaller than x")
        codes = np.zeros((rows, c_pad), dtype=np.int16)
        err, hat = np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64)
        self._lib.vpr_codes16(x.ctypes.data, n, c, c_pad, float(scale), codes.ctypes.data,
                              err.ctypes.data, hat.ctypes.data, _threads(threads))
        return codes, err, hat

    @staticmethod
    def _check_np(arr: np.ndarray, dtype, name: str) -> None:
        if arr.dtype != dtype or not arr.flags.c_contiguous or arr.ndim != 2:
            raise ValueError(f"{name}: expected a C-contiguous 2-D {np.dtype(dtype)} array, got "
                             f"{arr.shape} {arr.dtype}")

    def pack_panels(self, b: np.ndarray) -> "Panels":
        """(n_b, c) float32 points -> the panel layout :meth:`exact_argmax` reads."""
        self._check_np(b, np.float32, "b")
        n_b, c = b.shape
        out = aligned_empty((-(-n_b // EXACT_PANEL), c, EXACT_PANEL), np.float32)
        self._lib.vpr_pack_panels(b.ctypes.data, n_b, c, out.ctypes.data)
        return Panels(out, n_b)

    def exact_argmax(self, a: np.ndarray, b: "Panels", selected: np.ndarray,
                     generic: bool = False, values: bool = False,
                     threads: Optional[int] = None):
        """For each selected row s of ``a`` (n_a, c): the first index of the largest float32
        dot product of ``a[s]`` with the points of ``b`` (:meth:`pack_panels`), each one chain
        of fused multiply-adds in channel order (``vpr_exact_argmax`` in ``int8_kernels.c``).
        ``values=True``: also the largest values, ``(index, value)``."""
        self._check_np(a, np.float32, "a")
        if a.shape[1] != b.data.shape[1] or b.n == 0:
            raise ValueError(f"a {a.shape} and the packed points ({b.n}, {b.data.shape[1]}) "
                             f"do not fit")
        sel = np.ascontiguousarray(selected, dtype=np.int64)
        if sel.size and (sel.min() < 0 or sel.max() >= a.shape[0]):
            raise ValueError("selected rows out of range")
        out = np.zeros(sel.size, dtype=np.int64)
        best = np.zeros(sel.size, dtype=np.float32)
        if sel.size:
            self._lib.vpr_exact_argmax(a.ctypes.data, b.data.ctypes.data, b.n, a.shape[1],
                                       sel.ctypes.data, sel.size, out.ctypes.data,
                                       best.ctypes.data, int(generic), _threads(threads))
        return (out, best) if values else out

    def mnn_exact_counts(self, candidates, q: "Panels", splits: int = 1,
                         generic: bool = False) -> np.ndarray:
        """Exact mutual-nearest-neighbour counts of the packed query ``q`` against each of
        ``candidates`` (C-contiguous (n_x, c) float32 arrays, finite, small enough that no
        product overflows), fused: every similarity one in-order FMA chain (the BLAS value,
        as :meth:`exact_argmax`), both argmaxes first index on ties, the matrix never stored.
        ``splits``: ranges of candidate points per candidate (work items for the threads
        when there are few candidates).  ``vpr_mnn_exact_counts`` in ``int8_kernels.c``."""
        c = q.data.shape[1]
        for x in candidates:
            self._check_np(x, np.float32, "candidate")
            if x.shape[1] != c:
                raise ValueError(f"candidate {x.shape} and the packed query ({q.n}, {c}) "
                                 "do not fit")
        counts = np.zeros(len(candidates), dtype=np.int64)
        if not len(candidates) or q.n == 0:
            return counts
        ptrs = np.array([x.ctypes.data for x in candidates], dtype=np.int64)
        n_x = np.array([x.shape[0] for x in candidates], dtype=np.int64)
        status = self._lib.vpr_mnn_exact_counts(ptrs.ctypes.data, n_x.ctypes.data, len(ptrs),
                                                q.data.ctypes.data, q.n, c, int(splits),
                                                counts.ctypes.data, int(generic),
                                                torch.get_num_threads())
        if status != 0:
            raise MemoryError("mnn_exact_counts: could not allocate its scratch memory")
        return counts

    def finite_absmax(self, x: np.ndarray) -> Optional[float]:
        """The largest |x| of a C-contiguous float32 array, or None if any value is NaN or
        infinite (``vpr_absmax``: one vectorised pass)."""
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError(f"x: expected a C-contiguous float32 array, got {x.dtype}")
        value = float(self._lib.vpr_absmax(x.ctypes.data, x.size))
        return value if math.isfinite(value) else None

    def codes_8_16(self, x: np.ndarray, s8: float, s16: float, rows: int, offset8: int,
                   generic: bool = False):
        """Both code sets of ``x`` (n, c) float32 for :meth:`mnn_int8_count`:
        int8 codes ``rint(x / s8)`` + ``offset8`` (128: u8, 0: s8) as uint8 in ``rows``
        (>= n) rows of c rounded up to 4 (padding code 0); int16 codes ``rint(x / s16)`` in
        ``rows`` rows of c rounded up to 2 (padding 0); and per point (n, 5) float64:
        ``|x - s8 code8|, |s8 code8|, |x - s16 code16|, |s16 code16|, |x|``
        (``vpr_codes_8_16``).  The scales are float32 values; the caller keeps the int8
        codes within +-127 and the int16 code vectors' norms below 46340."""
        self._check_np(x, np.float32, "x")
        n, c = x.shape
        c4, c_pad = -(-c // 4) * 4, c + c % 2
        if rows < n:
            raise ValueError("codes_8_16: fewer rows than points")
        # the kernel writes every real row whole (padding channels included): only the
        # padding rows are filled here
        codes8 = np.empty((rows, c4), dtype=np.uint8)
        codes16 = np.empty((rows, c_pad), dtype=np.int16)
        codes8[n:] = offset8
        codes16[n:] = 0
        out = np.empty((n, 5), dtype=np.float64)
        self._lib.vpr_codes_8_16(x.ctypes.data, n, c, c4, c_pad, float(s8), float(s16),
                                 int(offset8), codes8.ctypes.data, codes16.ctypes.data,
                                 out.ctypes.data, int(generic))
        return codes8, codes16, out

    def half_to_float(self, h: np.ndarray) -> np.ndarray:
        """float16 array (any shape, C-contiguous) -> the same values as float32."""
        if h.dtype != np.float16 or not h.flags.c_contiguous:
            raise ValueError("half_to_float: expected a C-contiguous float16 array")
        if not self.has_vnni:
            return h.astype(np.float32)
        out = np.empty(h.shape, dtype=np.float32)
        self._lib.vpr_half_to_float(h.ctypes.data, h.size, out.ctypes.data)
        return out

    def int8_slacks(self, x_terms: np.ndarray, q_terms: np.ndarray, x_scales: Tuple[float, float],
                    q_scales: Tuple[float, float], gamma: float, margin: float):
        """The bounds of :meth:`mnn_int8_count` (``vpr_int8_slacks``: the float64 operations
        of ``rerank._slacks`` in its order, so the same values) from the per-point terms of
        :meth:`codes_8_16` of the candidate and of the query (unscaled, (n, 5) float64) and
        their (int8, int16) scales -> (row8, col8) int32 and (row16, col16) int64."""
        for name, t in (("x_terms", x_terms), ("q_terms", q_terms)):
            if t.dtype != np.float64 or not t.flags.c_contiguous or t.ndim != 2 or t.shape[1] != 5:
                raise ValueError(f"{name}: expected a contiguous (n, 5) float64 array")
        n_x, n_q = x_terms.shape[0], q_terms.shape[0]
        row8, col8 = np.empty(n_x, np.int32), np.empty(n_q, np.int32)
        row16, col16 = np.empty(n_x, np.int64), np.empty(n_q, np.int64)
        self._lib.vpr_int8_slacks(x_terms.ctypes.data, n_x, q_terms.ctypes.data, n_q,
                                  float(x_scales[0]), float(q_scales[0]), float(x_scales[1]),
                                  float(q_scales[1]), float(gamma), float(margin),
                                  row8.ctypes.data, col8.ctypes.data, row16.ctypes.data,
                                  col16.ctypes.data)
        return row8, col8, row16, col16

    def mnn_int8_count(self, x_codes: np.ndarray, x16: np.ndarray, x: np.ndarray,
                       q_layout: np.ndarray, q_zero: np.ndarray, q16: np.ndarray,
                       q: np.ndarray, row_slack: np.ndarray, col_slack: np.ndarray,
                       row_slack16: np.ndarray, col_slack16: np.ndarray, max_pairs: int,
                       generic: bool = False) -> Optional[np.ndarray]:
        """Exact mutual-nearest-neighbour count of one candidate map ``x`` (n_x, c) against
        the query ``q`` (n_q, c), both float32 (``vpr_mnn_int8_count`` in
        ``int8_kernels.c``, one thread): int8 code similarities for every pair, then int16
        code similarities and float32 values only where the int8 bounds cannot decide.
        ``x_codes``/``x16``: :meth:`codes_8_16` of ``x`` (offset 128, rows padded to 4);
        ``q_layout``/``q_zero``: :func:`mnn_query_layout8` of the query's s8 codes;
        ``q16``: the query's int16 codes; ``row_slack``/``col_slack`` (int32, n_x / n_q)
        and ``row_slack16``/``col_slack16`` (int64): the bounds in code units.  Returns
        int64 ``[count, ambiguous rows, ambiguous columns, int16 products, float32
        products, column entries kept while running]``, or None when the candidate pairs
        exceed ``max_pairs`` (near-duplicate maps: the fused path is cheaper there)."""
        self._check_np(x, np.float32, "x")
        self._check_np(q, np.float32, "q")
        n_x, c = x.shape
        n_q = q.shape[0]
        c4, c_pad = -(-c // 4) * 4, c + c % 2
        if q.shape[1] != c or not n_x or not n_q or max(n_x, n_q) * max(c4, c_pad) >= 2 ** 31:
            raise ValueError(f"candidate {x.shape} and query {q.shape} do not fit")
        rows = -(-n_x // MNN_ROWS) * MNN_ROWS
        checks = ((x_codes, np.uint8, (rows, c4), "x_codes"), (x16, np.int16, None, "x16"),
                  (q16, np.int16, None, "q16"), (q_zero, np.int32, None, "q_zero"),
                  (row_slack, np.int32, (n_x,), "row_slack"),
                  (col_slack, np.int32, (n_q,), "col_slack"),
                  (row_slack16, np.int64, (n_x,), "row_slack16"),
                  (col_slack16, np.int64, (n_q,), "col_slack16"))
        for arr, dtype, shape, name in checks:
            if arr.dtype != dtype or not arr.flags.c_contiguous or (shape and arr.shape != shape):
                raise ValueError(f"{name}: expected a contiguous {np.dtype(dtype)} array"
                                 f"{' of shape ' + str(shape) if shape else ''}, got "
                                 f"{arr.shape} {arr.dtype}")
        if (x16.shape[1] != c_pad or x16.shape[0] < n_x or q16.shape != (n_q, c_pad)
                or q_layout.dtype != np.int8 or q_layout.ctypes.data % 64
                or q_layout.size != -(-n_q // MNN_GROUP) * MNN_GROUP * c4
                or q_zero.size < -(-n_q // MNN_GROUP) * MNN_GROUP):
            raise ValueError("mnn_int8_count: the code arrays do not fit the maps")
        out = np.zeros(6, dtype=np.int64)
        status = self._lib.vpr_mnn_int8_count(
            x_codes.ctypes.data, x16.ctypes.data, x.ctypes.data, n_x, q_layout.ctypes.data,
            q_zero.ctypes.data, q16.ctypes.data, q.ctypes.data, n_q, c, c4, c_pad,
            row_slack.ctypes.data, col_slack.ctypes.data, row_slack16.ctypes.data,
            col_slack16.ctypes.data, int(max_pairs), out.ctypes.data, int(generic))
        if status < 0:
            raise MemoryError("mnn_int8_count: could not allocate its scratch memory")
        return out if status == 0 else None

    def fma_matrix(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a @ b.T`` (float32) with every dot product one in-order FMA chain (plain C):
        what the exact re-ranking paths compute, to check numpy's BLAS against."""
        self._check_np(a, np.float32, "a")
        self._check_np(b, np.float32, "b")
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"a {a.shape} and b {b.shape} do not fit")
        out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
        self._lib.vpr_fma_matrix(a.ctypes.data, a.shape[0], b.ctypes.data, b.shape[0],
                                 a.shape[1], out.ctypes.data, torch.get_num_threads())
        return out

    def int8_gemm(self, a: torch.Tensor, weight: "VnniWeight",
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The exact int32 product of int8 ``a`` (M, K) and the weight packed by
        :func:`pack_int8_weight` (what ``torch._int_mm(a, weight_kn)`` gives), into ``out``
        (int32 (M, N)) when given.  Needs the kernels built with VNNI (``has_vnni``)."""
        m, k = a.shape
        if k != weight.k:
            raise ValueError(f"int8_gemm: input has {k} channels, the weight {weight.k}")
        if out is None:
            out = torch.empty((m, weight.n), dtype=torch.int32)
        elif tuple(out.shape) != (m, weight.n):
            raise ValueError(f"int8_gemm: out has shape {tuple(out.shape)}, expected "
                             f"{(m, weight.n)}")
        layout, neg_zero = weight.pointers
        status = self._lib.vpr_int8_gemm(
            self._check(a, torch.int8, "a"), m, k, layout, neg_zero, weight.n,
            self._check(out, torch.int32, "out"), torch.get_num_threads())
        if status < 0:
            raise MemoryError("int8_gemm: could not allocate its scratch memory")
        if status:
            raise RuntimeError("int8_gemm: the kernels were built without AVX-512 VNNI")
        return out


def _threads(threads: Optional[int]) -> int:
    """OpenMP threads of a kernel call: the given count, else torch's."""
    return int(threads) if threads is not None else torch.get_num_threads()


class Panels:
    """Points packed for :meth:`NativeKernels.exact_argmax` (``data``: [panels][c][32])."""

    __slots__ = ("data", "n")

    def __init__(self, data: np.ndarray, n: int):
        self.data, self.n = data, int(n)


EXACT_PANEL = 32    # points per panel (EXACT_PANEL in int8_kernels.c)
MNN_ROWS = 4        # candidate points per tile (ROWS in int8_kernels.c)
MNN_GROUP = 64      # query points per tile (MNN_GROUP in int8_kernels.c)


def _vnni_layout(codes: np.ndarray, per: int) -> Tuple[np.ndarray, np.ndarray]:
    """(n_q, c) codes -> [n_q_pad/16][c/per][16][per] (the groups of ``per`` channels one
    VNNI lane multiplies, 16 query points per vector; n_q rounded up to 64 with zero
    points), and the zero-padded codes themselves."""
    n_q, c = codes.shape
    n_pad = -(-n_q // MNN_GROUP) * MNN_GROUP
    padded = np.zeros((n_pad, c), dtype=codes.dtype)
    padded[:n_q] = codes
    # [block][point 16][group][per] -> [block][group][point 16][per]
    out = aligned_empty((n_pad // 16, c // per, 16, per), codes.dtype)
    out[...] = padded.reshape(n_pad // 16, 16, c // per, per).transpose(0, 2, 1, 3)
    return out, padded


def mnn_query_layout(codes: np.ndarray) -> np.ndarray:
    """(n_q, c_pad) int16 query codes -> the VNNI layout of ``vpr_mnn_top2``,
    [n_q_pad/16][c_pad/2][16][2] (n_q rounded up to 64 with zero points)."""
    return _vnni_layout(codes, 2)[0]


def mnn_query_layout8(codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(n_q, c4) s8 query codes (:meth:`NativeKernels.codes_8_16` with offset 0, viewed as
    int8) -> the layout of ``vpr_mnn_int8_count``, [n_q_pad/16][c4/4][16][4] (n_q rounded
    up to 64 with zero points), and the zero-point sums 128 * sum(codes) per point (int32,
    n_q_pad)."""
    out, padded = _vnni_layout(codes, 4)
    return out, (128 * padded.astype(np.int32).sum(axis=1)).astype(np.int32)


class VnniWeight:
    """An int8 weight packed for :meth:`NativeKernels.int8_gemm`: the (N, K) weight in the
    layout of :func:`mnn_query_layout8` and ``neg_zero`` = -128 x each output channel's
    sum (the u8 offset of ``vpdpbusd``)."""

    __slots__ = ("layout", "neg_zero", "k", "n", "pointers")

    def __init__(self, layout: np.ndarray, neg_zero: np.ndarray, k: int, n: int):
        if (layout.ctypes.data % 64 or not layout.flags.c_contiguous or neg_zero.size != n
                or neg_zero.dtype != np.int32 or layout.size != n * (-(-k // 4) * 4)):
            raise ValueError("VnniWeight: a 64-byte aligned layout of n x k codes and n "
                             "int32 offsets expected (pack_int8_weight)")
        self.layout, self.neg_zero, self.k, self.n = layout, neg_zero, int(k), int(n)
        # numpy's .ctypes.data costs microseconds: read once (the arrays are never replaced)
        self.pointers = (layout.ctypes.data, neg_zero.ctypes.data)

    def __reduce__(self):
        """Pickles and copies get fresh aligned arrays and their own pointers."""
        return _restore_vnni_weight, (np.asarray(self.layout), self.neg_zero.copy(), self.k,
                                      self.n)


def _restore_vnni_weight(layout: np.ndarray, neg_zero: np.ndarray, k: int, n: int):
    aligned = aligned_empty(layout.shape, layout.dtype)
    aligned[...] = layout
    return VnniWeight(aligned, neg_zero, k, n)


def pack_int8_weight(weight_kn: torch.Tensor) -> Optional[VnniWeight]:
    """(K, N) int8 weight (``Int8Linear.weight_int8``) -> :class:`VnniWeight`, or None for
    shapes the kernel does not take (K not a multiple of 4, N not a multiple of 64)."""
    k, n = weight_kn.shape
    if k % 4 or n % MNN_GROUP or not k or not n:
        return None
    codes = np.ascontiguousarray(weight_kn.detach().cpu().numpy().T)
    layout, zero = mnn_query_layout8(codes)
    return VnniWeight(layout, np.ascontiguousarray(-zero[:n], dtype=np.int32), k, n)


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary
    (the kernels load it with aligned 512-bit loads)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + n].view(dtype).reshape(shape)


def native_kernels(enabled: Optional[bool] = None,
                   cache: Union[str, os.PathLike, None] = None) -> Optional[NativeKernels]:
    """The loaded kernels, building them on first call; None if disabled or unavailable.

    ``enabled`` / ``cache``: the options (:class:`vpr_ros.accel.options.AccelOptions`
    ``native_kernels`` / ``kernel_cache``); None takes the documented environment override
    (``VPR_ROS_NATIVE_KERNELS``, ``VPR_ROS_KERNEL_CACHE``) or the default (on,
    ``~/.cache/vpr_ros/kernels``).  A failure is logged once (with the reason) and
    remembered for the process.  Called by every int8 layer on every forward, so the
    common case is a few lookups and a dict hit.
    """
    if enabled is False or (enabled is None and not globals()["enabled"]()):
        return None
    key = (None if cache is None else str(cache), os.environ.get(ENV_CACHE),
           os.environ.get("XDG_CACHE_HOME"))
    loaded = _loaded.get(key, _NOT_LOADED)
    if loaded is not _NOT_LOADED:
        return loaded
    with _lock:
        if key not in _loaded:
            try:
                _loaded[key] = NativeKernels(build(None if cache is None else Path(cache)))
            except (KernelBuildError, OSError, subprocess.SubprocessError) as exc:
                log.warning("native kernels unavailable, using the slower torch path (and the "
                            "plain float32 re-ranking): %s", exc)
                _loaded[key] = None
        return _loaded[key]


__all__ = ["NativeKernels", "Panels", "VnniWeight", "pack_int8_weight", "mnn_query_layout",
           "mnn_query_layout8", "MNN_ROWS",
           "MNN_GROUP", "EXACT_PANEL", "KernelBuildError", "MAX_ATTENTION_TOKENS",
           "native_kernels", "build", "cache_dir", "enabled", "SOURCE", "ENV_SWITCH", "ENV_CACHE"]
