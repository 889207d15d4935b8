"""Model options shared by every `vpr` subcommand that runs a network.

``add_model_args(parser)`` adds ``--model``, ``--weights``, ``--device``,
``--precision`` and ``--batch-size``; with ``local=True`` also ``--local-model`` and
``--local-weights`` for SelaVPR re-ranking features, and the acceleration switches
``--native-kernels``, ``--integer-attention``, ``--kernel-cache`` (:func:`add_accel_args`).
``describer_from_args(args)`` / ``local_extractor_from_args(args)`` build the inference
objects from them.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

from ..constants import MAX_IMAGE_PIXELS as DEFAULT_MAX_PIXELS  # torch-free (--help stays light)
from ..constants import (CONV_TRANSPOSE_COMPUTES, PATCH_CONV_COMPUTES, PRECISIONS,
                         RERANK_COMPUTES)


# --------------------------------------------------------------------------- argument types
# argparse types: a bad value is refused while parsing, before any model or file is
# touched, with argparse's one-line usage error (exit status 2).

def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        value = _number(text, int, f"expected an integer >= {low}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer>={low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in [low, high] (``*_open``: that end excluded)."""
    lo = ("(" if low_open else "[") + f"{low:g}"
    hi = f"{high:g}" + (")" if high_open else "]")
    what = f"expected a number in {lo}, {hi}"

    def parse(text: str) -> float:
        value = _number(text, float, what)
        if value < low or value > high or (low_open and value == low) or (
                high_open and value == high):
            raise argparse.ArgumentTypeError(f"{what}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


positive_float = float_in(0.0, low_open=True)
non_negative_float = float_in(0.0)
probability = float_in(0.0, 1.0)


def add_image_args(parser: argparse.ArgumentParser) -> None:
    """``--max-pixels N``: refuse image files above N pixels (read from the header)."""
    parser.add_argument("--max-pixels", type=non_negative_int, default=DEFAULT_MAX_PIXELS,
                        metavar="N",
                        help=f"refuse images with more than N pixels, checked from the file "
                             f"header before decoding (default {DEFAULT_MAX_PIXELS:,}; "
                             "0 = no limit)")


def add_lock_arg(parser: argparse.ArgumentParser) -> None:
    """``--wait-lock S``: wait for another writer of the same map instead of failing."""
    parser.add_argument("--wait-lock", type=non_negative_float, default=0.0, metavar="S",
                        help="when another process is writing the same map, wait up to S "
                             "seconds for it (default 0: fail at once, naming its PID)")


def add_model_args(parser: argparse.ArgumentParser, local: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="CARD", default=None,
                       help="model card name (see `vpr models`) or path of a card .yaml; "
                            "default: the shipped demo model, else scicevpr_tiny_random")
    group.add_argument("--weights", metavar="FILE", default=None,
                       help="weights file: official .pth (training checkpoint or bare state "
                            "dict), DINOv2 pretrain .pth, or a vpr_ros .safetensors; "
                            "default: the card's own weights")
    group.add_argument("--device", default="auto",
                       help="auto | cpu | cuda | cuda:N (default auto)")
    group.add_argument("--precision", default="fp32", choices=PRECISIONS,
                       help="fp32 (exact), bf16 (CPU: bf16 weights; CUDA: autocast), fp16 "
                            "(CUDA only) or int8 (CPU only: int8 Linear layers, per-token scales); "
                            "see docs/fast_paths.md")
    group.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                       help="images per forward pass (default 8)")
    if local:
        group.add_argument("--local-model", metavar="CARD", default=None,
                           help="SelaVPR card for re-ranking local features (e.g. "
                                "selavpr_vitl14); default: none (no local features)")
        group.add_argument("--local-weights", metavar="FILE", default=None,
                           help="weights for --local-model (official SelaVPR .pth)")
    add_accel_args(parser)


def add_accel_args(parser: argparse.ArgumentParser) -> None:
    """The switches of vpr_ros.accel (AccelOptions); unset = environment override / default."""
    group = parser.add_argument_group("acceleration (see docs/fast_paths.md)")
    group.add_argument("--native-kernels", choices=("on", "off"), default=None,
                       help="C kernels built on first use: fused int8 passes, int8 "
                            "matmuls (AVX-512 VNNI), integer attention, verified exact "
                            "re-ranking (default on; off: torch "
                            "ops and the plain float32 re-ranking, same results, slower; "
                            "override: VPR_ROS_NATIVE_KERNELS)")
    group.add_argument("--integer-attention", choices=("on", "off"), default=None,
                       help="int8 models: int16 integer attention (default on) or float32 "
                            "SDPA (override: VPR_ROS_INTEGER_ATTENTION)")
    group.add_argument("--kernel-cache", metavar="DIR", default=None,
                       help="folder of the compiled kernels (default ~/.cache/vpr_ros/kernels; "
                            "override: VPR_ROS_KERNEL_CACHE)")
    group.add_argument("--conv-transpose", choices=CONV_TRANSPOSE_COMPUTES, default=None,
                       help="int8 models: transposed convolutions (SelaVPR's LocalAdapt) as a "
                            "bf16 (default) or int8 matmul + col2im (int8: faster, ~10x the "
                            "rounding error)")
    group.add_argument("--patch-conv", choices=PATCH_CONV_COMPUTES, default=None,
                       help="int8 models: the ViT patch embedding as one bf16 matmul per image "
                            "(default, about half the time) or the fp32 convolution")


def accel_from_args(args: argparse.Namespace):
    """AccelOptions from the flags of :func:`add_accel_args` (absent flags: None)."""
    from ..accel.options import AccelOptions

    def flag(name):
        value = getattr(args, name, None)
        return None if value is None else value == "on"

    computes = {name: getattr(args, name) for name in ("conv_transpose", "patch_conv")
                if getattr(args, name, None) is not None}        # absent: the defaults
    return AccelOptions(native_kernels=flag("native_kernels"),
                        integer_attention=flag("integer_attention"),
                        kernel_cache=getattr(args, "kernel_cache", None), **computes)


def add_rerank_compute_arg(parser: argparse.ArgumentParser) -> None:
    """``--rerank-compute fp32|bf16``: precision of the re-ranking similarity matmul."""
    parser.add_argument("--rerank-compute", default="fp32", choices=RERANK_COMPUTES,
                        help="re-ranking similarity matmul: fp32 (default, exact official "
                             "counts) or bf16 (faster on CPUs with bf16 matrix units; counts "
                             "approximate, see docs/fast_paths.md)")


def describer_from_args(args: argparse.Namespace):
    from ..inference import GlobalDescriber

    return GlobalDescriber(card=args.model, weights=args.weights, device=args.device,
                           precision=args.precision, batch_size=args.batch_size,
                           accel=accel_from_args(args))


def local_extractor_from_args(args: argparse.Namespace):
    """A LocalFeatureExtractor from --local-model/--local-weights, or None without them."""
    from ..inference import LocalFeatureExtractor

    card: Optional[str] = getattr(args, "local_model", None)
    if card is None:
        return None
    return LocalFeatureExtractor(card=card, weights=getattr(args, "local_weights", None),
                                 device=args.device, precision=args.precision,
                                 batch_size=args.batch_size, accel=accel_from_args(args))
