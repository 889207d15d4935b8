"""Convert a float model to the int8 layers of this package (the entry point of the layer).

:func:`convert_to_int8` imports both :mod:`.int8_linear` (the layers) and
:mod:`.int8_block` (fused blocks, which use the layers); neither imports this module.
"""

from __future__ import annotations

from typing import Iterable, Optional, Type

import torch.nn as nn

from .int8_block import fuse_transformer_blocks
from .int8_linear import (GemmConvTranspose2d, GemmPatchEmbed, Int8Linear, Int8PointwiseConv2d,
                          fold_block_layer_scales, is_patchify_conv, is_plain_conv_transpose,
                          is_pointwise_conv, use_inplace_activation)
from .options import DEFAULT, AccelOptions


def convert_to_int8(model: nn.Module,
                    keep_float: Iterable[Type[nn.Module]] = (nn.MultiheadAttention,),
                    fold_layer_scales: bool = True, fuse_blocks: bool = True,
                    options: Optional[AccelOptions] = None) -> nn.Module:
    """Swap every ``nn.Linear`` and pointwise ``nn.Conv2d`` of ``model`` for int8 layers, and
    every ``nn.ConvTranspose2d`` (groups 1) for a matmul + col2im in ``options.conv_transpose``
    precision (``"bf16"`` or ``"int8"``; :class:`~vpr_ros.accel.int8_linear.GemmConvTranspose2d`),
    and, with ``options.patch_conv="bf16"`` (default; ``"fp32"`` keeps them), every patchify
    ``nn.Conv2d`` (a ViT's patch embedding) for a bf16 matmul per image
    (:class:`~vpr_ros.accel.int8_linear.GemmPatchEmbed`), in place; return it.

    Subtrees whose type is in ``keep_float`` stay untouched (by default
    ``nn.MultiheadAttention``, which reads its projection weights directly; the
    feed-forward Linears of an ``nn.TransformerEncoderLayer`` around it are called as
    modules and convert: SciceVPR's region encoder, 0.87 ms of 2.49 saved per image).
    An ``nn.TransformerEncoderLayer`` with ``batch_first=True`` stays float whole: torch's
    inference fast path (taken only for ``batch_first`` layers) reads its Linear weights
    directly.  With
    ``fold_layer_scales``, the LayerScale of a plain timm ViT ``Block`` is folded into the
    int8 layer before it (see :func:`fold_block_layer_scales`); with ``fuse_blocks``, such
    blocks then run through the fused native kernels
    (:class:`vpr_ros.accel.int8_block.Int8TransformerBlock`).  ``options``: the switches
    every converted layer and block uses (:class:`~vpr_ros.accel.options.AccelOptions`;
    None: environment overrides, then defaults).  Meant for inference: the converted
    layers hold buffers, not trainable parameters.
    """
    keep = tuple(keep_float)
    # AccelOptions checks both choices when it is made
    conv_transpose = (options or DEFAULT).conv_transpose
    patch_conv = (options or DEFAULT).patch_conv

    def convert(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if keep and isinstance(child, keep):
                continue
            if isinstance(child, nn.TransformerEncoderLayer) and child.self_attn.batch_first:
                continue            # the fast path reads linear1 / linear2 .weight itself
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear.from_linear(child).to(child.weight.device))
            elif is_pointwise_conv(child):
                setattr(parent, name, Int8PointwiseConv2d.from_conv(child).to(child.weight.device))
            elif patch_conv == "bf16" and is_patchify_conv(child):
                setattr(parent, name, GemmPatchEmbed(child).to(child.weight.device))
            elif is_plain_conv_transpose(child):
                setattr(parent, name,
                        GemmConvTranspose2d(child, conv_transpose).to(child.weight.device))
            else:
                convert(child)

    if type(model) is nn.Linear or is_pointwise_conv(model) or is_plain_conv_transpose(model):
        raise ValueError("convert_to_int8 converts the layers inside a model; wrap a bare layer "
                         "with Int8Linear.from_linear / Int8PointwiseConv2d.from_conv / "
                         "GemmConvTranspose2d")
    convert(model)
    for module in model.modules():
        if fold_layer_scales:
            fold_block_layer_scales(module)
        use_inplace_activation(module)
    if fold_layer_scales and fuse_blocks:
        fuse_transformer_blocks(model)
    if options is not None:
        for module in model.modules():      # every layer class that declares its options
            if isinstance(getattr(type(module), "accel", None), AccelOptions):
                module.accel = options
    return model


__all__ = ["convert_to_int8"]
