"""The switches of the acceleration layer, and their environment overrides (one place).

Every switch is an explicit option: :class:`AccelOptions` is an argument of
:class:`vpr_ros.inference.GlobalDescriber` / :class:`~vpr_ros.inference.LocalFeatureExtractor`
(``accel=``) and of :func:`vpr_ros.accel.convert.convert_to_int8`; the ``vpr`` commands
that run models take ``--native-kernels on|off``, ``--integer-attention on|off`` and
``--kernel-cache DIR`` (:func:`vpr_ros.cli.common.add_accel_args`); the re-ranking takes
``native=`` (:func:`vpr_ros.models.rerank.mutual_nn_counts`).

A field left at None falls back to its environment override, then to the default.  The
overrides exist for deployments that cannot change a command line (a container image
without a compiler, a read-only home); they are all listed here:

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

    * ``native_kernels``: build and use the C kernels (fused int8 passes, integer
      attention, verified exact re-ranking).  Off: the same int8 quantisation on torch
      ops, the plain float32 re-ranking - slower, same counts.
    * ``integer_attention``: int16 integer attention in the int8 models (off: float32 SDPA).
    * ``kernel_cache``: folder of the compiled kernels.
    """

    native_kernels: Optional[bool] = None
    integer_attention: Optional[bool] = None
    kernel_cache: Optional[str] = None

    def use_native_kernels(self) -> bool:
        return env_flag(ENV_NATIVE_KERNELS) if self.native_kernels is None else self.native_kernels

    def use_integer_attention(self) -> bool:
        return (env_flag(ENV_INTEGER_ATTENTION) if self.integer_attention is None
                else self.integer_attention)


DEFAULT = AccelOptions()

__all__ = ["AccelOptions", "DEFAULT", "ENV_OVERRIDES", "ENV_NATIVE_KERNELS",
           "ENV_INTEGER_ATTENTION", "ENV_KERNEL_CACHE", "env_flag"]
