"""The switches of the acceleration layer, and their environment overrides (one place).

Every switch is an explicit option: :class:`AccelOptions` is an argument of
:class:`vpr_ros.inference.GlobalDescriber` / :class:`~vpr_ros.inference.LocalFeatureExtractor`
(``accel=``) and of :func:`vpr_ros.accel.convert.convert_to_int8`; the ``vpr`` commands
that run models take ``--native-kernels on|off``, ``--integer-attention on|off``,
``--kernel-cache DIR``, ``--conv-transpose bf16|int8`` and ``--patch-conv bf16|fp32``
(:func:`vpr_ros.cli.common.add_accel_args`), the localizer node the parameters of the
same names; the re-ranking takes ``native=``
(:func:`vpr_ros.models.rerank.mutual_nn_counts`).

A switch field left at None falls back to its environment override, then to the default.
The overrides exist for deployments that cannot change a command line (a container image
without a compiler, a read-only home); they are all listed here (``conv_transpose`` and
``patch_conv`` choose a numerical trade-off of one model, not a property of the
deployment: they have none):

=============================  ==================================  =========================
variable                       option it overrides                 default
=============================  ==================================  =========================
``VPR_ROS_NATIVE_KERNELS``     ``native_kernels`` (0/off/false/no)  on (where a C compiler
                                                                   exists)
``VPR_ROS_INTEGER_ATTENTION``  ``integer_attention`` (0/off/...)   on
``VPR_ROS_KERNEL_CACHE``       ``kernel_cache``                    ``$XDG_CACHE_HOME`` or
                                                                   ``~/.cache``, then
                                                                   ``vpr_ros/kernels``
``CC``                         the C compiler that builds them     ``cc``
=============================  ==================================  =========================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

# absolute: benchmarks/bench_int8_forward.py imports an earlier commit's copy of this
# package under another name, where ``..constants`` would not resolve
from vpr_ros.constants import CONV_TRANSPOSE_COMPUTES, PATCH_CONV_COMPUTES

ENV_NATIVE_KERNELS = "VPR_ROS_NATIVE_KERNELS"
ENV_INTEGER_ATTENTION = "VPR_ROS_INTEGER_ATTENTION"
ENV_KERNEL_CACHE = "VPR_ROS_KERNEL_CACHE"
ENV_OVERRIDES = (ENV_NATIVE_KERNELS, ENV_INTEGER_ATTENTION, ENV_KERNEL_CACHE, "CC")

_OFF = ("0", "off", "false", "no")


def env_flag(name: str) -> bool:
    """A switch's environment override: False only for 0/off/false/no (default on)."""
    return os.environ.get(name, "1").strip().lower() not in _OFF


@dataclass(frozen=True)
class AccelOptions:
    """Switches of the acceleration layer; None = environment override, else default.

    * ``native_kernels``: build and use the C kernels (fused int8 passes, the int8
      matmuls where the CPU has AVX-512 VNNI, integer attention, verified exact
      re-ranking).  Off: the same int8 quantisation on torch
      ops, the plain float32 re-ranking - slower, same counts.
    * ``integer_attention``: int16 integer attention in the int8 models (off: float32 SDPA).
    * ``kernel_cache``: folder of the compiled kernels.
    * ``conv_transpose``: int8 models' transposed convolutions (SelaVPR's LocalAdapt) as a
      matmul + col2im in ``"bf16"`` (default) or ``"int8"`` (faster, ~10x the rounding
      error; :class:`~vpr_ros.accel.int8_linear.GemmConvTranspose2d`).
    * ``patch_conv``: int8 models' patchify convolutions (a ViT's patch embedding) as one
      ``"bf16"`` matmul per image (default; about half the time) or the ``"fp32"``
      convolution (:class:`~vpr_ros.accel.int8_linear.GemmPatchEmbed`).
    docs/fast_paths.md section 2 has the measurements behind both defaults.
    """

    native_kernels: Optional[bool] = None
    integer_attention: Optional[bool] = None
    kernel_cache: Optional[str] = None
    conv_transpose: str = "bf16"
    patch_conv: str = "bf16"

    def __post_init__(self):
        if self.conv_transpose not in CONV_TRANSPOSE_COMPUTES:
            raise ValueError(f"conv_transpose must be one of {', '.join(CONV_TRANSPOSE_COMPUTES)}"
                             f", got {self.conv_transpose!r}")
        if self.patch_conv not in PATCH_CONV_COMPUTES:
            raise ValueError(f"patch_conv must be one of {', '.join(PATCH_CONV_COMPUTES)}, got "
                             f"{self.patch_conv!r}")

    def use_native_kernels(self) -> bool:
        return env_flag(ENV_NATIVE_KERNELS) if self.native_kernels is None else self.native_kernels

    def use_integer_attention(self) -> bool:
        return (env_flag(ENV_INTEGER_ATTENTION) if self.integer_attention is None
                else self.integer_attention)


DEFAULT = AccelOptions()

__all__ = ["AccelOptions", "DEFAULT", "ENV_OVERRIDES", "ENV_NATIVE_KERNELS",
           "ENV_INTEGER_ATTENTION", "ENV_KERNEL_CACHE", "env_flag"]
