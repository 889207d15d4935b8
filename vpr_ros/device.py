"""Turn the user's device and precision words into torch objects, with clear errors.

``resolve_device("auto")`` picks the first CUDA GPU when one is usable, else the CPU.
Asking for CUDA on a machine without it is a :class:`DeviceError`, not a silent
fallback: a robot that should run on its GPU must not quietly run on the CPU.

Precisions: ``fp32`` (default, exact parity with the official models), ``bf16``
(CUDA: autocast; CPU: the network's weights are cast to bfloat16 once, see
:mod:`vpr_ros.inference`; outputs are returned as float32), ``fp16`` (CUDA only) and
``int8`` (CPU only: the Linear layers and the 1x1 ``fusion`` convolution run with int8
weights, one scale per output channel, and int8 activations quantised on every call with
one scale per token, multiplied exactly in int32 by ``torch._int_mm``; see
:mod:`vpr_ros.accel.int8_linear`.  No scale is shared between images, so batches stay
batch-invariant.  ``torch.qint8`` is only the marker dtype of this precision).
"""

from __future__ import annotations

import re
from typing import Union

import torch

from .constants import PRECISIONS
from .errors import DeviceError


_PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                     "int8": torch.qint8}


def resolve_device(spec: Union[str, torch.device, None] = "auto") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" (or a torch.device) -> torch.device."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise DeviceError(f"unknown device {spec!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {spec!r} was requested but CUDA is not available on this machine "
            "(no NVIDIA GPU/driver, or a CPU-only torch build); use --device cpu or auto")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {spec!r} was requested but only {count} CUDA device(s) "
                          f"exist (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """"fp32" | "bf16" | "fp16" | "int8" -> compute dtype, checked against the device.

    int8 maps to ``torch.qint8`` as a marker (the int8 layers themselves hold plain int8
    tensors, see :mod:`vpr_ros.accel.int8_linear`).
    """
    key = (name or "fp32").strip().lower()
    if key not in _PRECISION_DTYPES:
        raise DeviceError(f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}")
    if key == "fp16" and device.type != "cuda":
        raise DeviceError("precision fp16 needs a CUDA device (half-precision matrix kernels "
                          "on the CPU are slow and inexact); use bf16 or fp32 on the CPU")
    if key == "int8" and device.type != "cpu":
        raise DeviceError(f"precision int8 (integer matmuls) runs on the CPU only, not on "
                          f"{device}; use fp16 or bf16 on a GPU")
    if key == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"precision bf16 is not supported by {device}; use fp16 or fp32")
    return _PRECISION_DTYPES[key]


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Autocast for reduced precision; a no-op context for fp32."""
    import contextlib

    if dtype in (torch.float32, torch.qint8):   # int8: quantised modules, no autocast
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
