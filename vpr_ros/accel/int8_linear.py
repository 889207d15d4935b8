"""Batch-invariant int8 Linear layers for CPU inference (``precision="int8"``).

Each row of the input (one token of one image) is quantised on its own: symmetric int8
with ``scale = absmax(row) / 127`` computed on every call.  Weights are quantised once,
symmetric int8 with one scale per output channel.  The product of the two int8 matrices
is an exact int32 matrix (the native VNNI matmul ``vpr_int8_gemm`` where the kernels have
it, else ``torch._int_mm``: the same integers), so a row's result depends only on that row
and the weights, never on the other rows of the call: an image's descriptor is
bit-identical whether it is described alone or within a batch.  The int32 result is
turned back into float32 as ``acc * row_scale * col_scale + bias``, element by element.

Why per row and not per tensor: ``torch.ao``'s dynamic quantisation takes one activation
scale from the whole input tensor, which couples the images of a batch (a bright image
changes the rounding of a dark one); it had to run image by image.  Per-row scales are
also a closer fit to transformer activations, whose magnitude varies from token to token.

Where ``torch._int_mm`` refuses a shape (older builds or other CPUs have asked for
M > 16 and K, N multiples of 8), the same integer product is computed as a float matmul
of the int8 values: every product and partial sum is an integer, exact in float32 while
``127 * 127 * K < 2**24`` and in float64 beyond that, so the fallback gives the same
int32 result (and keeps batch invariance) whatever order the BLAS sums in.

:func:`vpr_ros.accel.convert.convert_to_int8` swaps, in place, every ``nn.Linear`` of a
model and every 1x1 ``nn.Conv2d`` (stride 1, no padding, no groups: a pointwise linear over
channels, like the SciceVPR ``fusion`` layer) for these modules. ``nn.MultiheadAttention``
stays float32 (it reads ``out_proj.weight`` directly instead of calling the module), and so
does a whole ``nn.TransformerEncoderLayer`` built with ``batch_first=True`` (torch's fast
path then reads its feed-forward weights directly too); the feed-forward Linears of other
encoder layers (the SciceVPR region encoder's) convert. The GELU after an int8 ``fc1`` of
a timm ``Mlp`` runs in place on that layer's fresh output.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .int8_kernels import native_kernels, pack_int8_weight
from .options import DEFAULT, AccelOptions

INT8_MAX = 127
# float32 integers are exact below 2**24: the largest |sum| of K products is 127*127*K.
_FLOAT32_EXACT_K = (1 << 24) // (INT8_MAX * INT8_MAX)
_TINY_SCALE = 1e-30   # an all-zero row gets this scale (its int8 values are all 0)


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (int8 (M, K), float32 scale (M, 1)), symmetric, one scale per row.

    ``q = round(x * 127 / absmax(row))``, ``scale = absmax(row) / 127``.  The row maxima
    are exact whatever order a kernel reduces in, so a row's int8 values never depend on
    the other rows.
    """
    x = x.float()
    absmax = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())
    absmax.clamp_(min=_TINY_SCALE)
    q = torch.mul(x, INT8_MAX / absmax).round_().to(torch.int8)   # |values| <= 127
    return q, absmax.div_(INT8_MAX)


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (int8 (N, K), float32 scale (N,)), one scale per output channel."""
    q, scale = quantize_rows(weight.detach())
    return q, scale.squeeze(1)


def integer_matmul(a: torch.Tensor, b: torch.Tensor, use_int_mm: bool = True,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact int32 product of int8 ``a`` (M, K) and int8 ``b`` (K, N).

    ``torch._int_mm`` when it accepts the shapes (and ``use_int_mm``), written into
    ``out`` (int32 (M, N)) when given; otherwise a float matmul of the same integers that
    is exact by construction (float64 for long K), in a new tensor.
    """
    if use_int_mm:
        try:
            return torch._int_mm(a, b) if out is None else torch._int_mm(a, b, out=out)
        except (RuntimeError, NotImplementedError):   # a shape this build's kernel refuses
            pass
    k = a.shape[1]
    dtype = torch.float32 if k <= _FLOAT32_EXACT_K else torch.float64
    return torch.mm(a.to(dtype), b.to(dtype)).to(torch.int32)


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with int8 W (per output channel) and int8 x (per row), int32 sums.

    Buffers: ``weight_int8`` (K, N) contiguous (the layout ``torch._int_mm`` runs fastest
    with here), ``weight_scale`` (N,), ``bias`` (N,) or None.  Input (..., K) of any
    float dtype; output (..., N) float32.
    """

    use_int_mm: bool = True   # tests set False on an instance to exercise the float fallback
    # False: torch._int_mm even where the native VNNI matmul runs (tests, benchmarks); read
    # on every call, so setting it on the class switches every layer; the packed weights
    # stay in memory meanwhile
    use_native_gemm: bool = True
    accel: AccelOptions = DEFAULT     # set by convert_to_int8

    def __init__(self, weight_int8_kn: torch.Tensor, weight_scale: torch.Tensor,
                 bias: Optional[torch.Tensor] = None):
        super().__init__()
        if weight_int8_kn.dtype != torch.int8 or weight_int8_kn.ndim != 2:
            raise ValueError("weight_int8_kn must be a 2-D int8 tensor (in_features, out_features)")
        self.in_features, self.out_features = (int(s) for s in weight_int8_kn.shape)
        self.register_buffer("weight_int8", weight_int8_kn.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scale = quantize_weight(linear.weight.float())
        return cls(q.t().contiguous(), scale, linear.bias)

    def integer_product(self, q: torch.Tensor, kernels=None,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The exact int32 product of the int8 rows ``q`` (M, K) with the weight (into
        ``out`` when given): the native VNNI matmul where ``kernels`` (the loaded native
        kernels) has it and the shape fits, else :func:`integer_matmul`.  Same integers
        either way.  The packed weight is built on first use and kept (as much memory
        again as ``weight_int8``)."""
        packed = self.packed_weight(kernels)
        if packed is not None:
            return kernels.int8_gemm(q, packed, out)
        return integer_matmul(q, self.weight_int8, self.use_int_mm, out=out)

    def packed_weight(self, kernels=None):
        """The packed weight the native matmul multiplies with (:meth:`_vnni_weight`), or
        None where this layer's product runs in torch (no kernels or no VNNI, switched
        off, or a shape the kernel does not take)."""
        if (kernels is not None and kernels.has_vnni and self.use_native_gemm
                and self.use_int_mm):
            return self._vnni_weight()
        return None

    def _vnni_weight(self):
        """``weight_int8`` packed for the native matmul (None: a shape it does not take);
        packed again if the weight was replaced (another tensor object) or changed in
        place (its version counter: load_state_dict copies in place).  Tensors made under
        ``torch.inference_mode`` have no version counter: they cannot change in place
        outside it either, so the tensor itself is the key then."""
        w = self.weight_int8
        try:
            version = w._version
        except RuntimeError:        # an inference tensor
            version = None
        cached = self.__dict__.get("_vnni")
        if cached is None or cached[0] is not w or cached[1] != version:
            cached = (w, version, pack_int8_weight(w) if w.is_cpu else None)
            self.__dict__["_vnni"] = cached
        return cached[2]

    def __getstate__(self):
        """Pickles and deep copies leave the packed weight out (built again on use)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.pop("_vnni", None)
        return state

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) float32 weight this layer effectively multiplies with."""
        return (self.weight_int8.float() * self.weight_scale).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        kernels = (native_kernels(self.accel.native_kernels, self.accel.kernel_cache)
                   if rows.device.type == "cpu" else None)
        if kernels is not None:     # same bits as below, one pass per row (int8_kernels.c)
            rows = rows.float().contiguous()
            q, row_scale = kernels.quantize_rows(rows)
            acc = self.integer_product(q, kernels)
            out = kernels.dequantize_(acc, row_scale, self.weight_scale, self.bias)
            return out.reshape(*lead, self.out_features)
        q, row_scale = quantize_rows(rows)
        acc = integer_matmul(q, self.weight_int8, self.use_int_mm)
        # int32 -> float32 in place (same element size, each element read before it is
        # written): no second (M, N) buffer, whose fresh pages cost as much as the pass.
        out = acc.view(torch.float32)
        out.copy_(acc)
        # one rounding per element-wise op (no fused multiply-add), so every row is
        # rounded the same way whatever the number of rows
        out.mul_(row_scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, per-row int8 activations")


class Int8PointwiseConv2d(nn.Module):
    """A 1x1 ``Conv2d`` (stride 1, no padding, groups 1) as an :class:`Int8Linear` over channels.

    (B, C_in, H, W) -> (B, C_out, H, W) float32; each pixel of each image is one row.
    """

    def __init__(self, linear: Int8Linear):
        super().__init__()
        self.linear = linear

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "Int8PointwiseConv2d":
        if not is_pointwise_conv(conv):
            raise ValueError(f"not a pointwise convolution: {conv}")
        weight = conv.weight.detach().float().reshape(conv.out_channels, conv.in_channels)
        q, scale = quantize_weight(weight)
        return cls(Int8Linear(q.t().contiguous(), scale, conv.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.permute(0, 2, 3, 1))           # (B, H, W, C_out)
        return y.permute(0, 3, 1, 2)


class GemmConvTranspose2d(nn.Module):
    """A ``ConvTranspose2d`` (groups 1, zero padding mode) as one matmul and col2im.

    A transposed convolution scatters every input pixel: pixel (iy, ix) adds
    ``x[:, iy, ix] @ W[:, co, ky, kx]`` to output (iy * stride - padding + ky * dilation, ...).
    So the whole layer is one matmul of the pixels (rows) by the weight as
    (C_in, kh * kw * C_out), then the overlapping contributions summed (col2im) and the
    bias added, in float32.  ``compute``:

    * ``"bf16"`` (what ``convert_to_int8`` uses): the matmul in bfloat16 (AVX512-BF16 here),
      products accumulated in float32 by oneDNN, the result rounded to bfloat16 once;
    * ``"int8"``: an :class:`Int8Linear` (one scale per pixel and per weight column),
      exact int32 sums: faster, and an image's output never depends on the batch, but
      ~10x the rounding error of bf16 (docs/fast_paths.md section 2: it changed a
      re-ranked top-1 of the random-weight ViT-L on real images).

    SelaVPR's LocalAdapt (two k3 s2 layers, 1024 -> 256 -> 128 channels) takes 0.46x
    (bf16) / 0.22x (int8) the CPU time of float32 matmuls this way, and the float32 oneDNN
    deconvolution runs at about the float32 matmul rate.

    The weight's columns are in [ky][kx][co] order, so each input pixel's row of the
    matmul holds, per kernel tap, one contiguous vector of output channels.  With the
    native kernels the col2im reads those rows directly (bf16 widened on the fly) and
    writes a channels-last output, returned as an (B, C_out, H, W) view: no float copy of
    the matmul output, no transposed copy for ``F.fold``, and the next layer's (and the
    caller's) channels-last view of it is free.  Without them the rows are reordered for
    ``F.fold`` (as for kernels taller than the native col2im takes,
    ``NativeKernels.col2im_max_kernel_height``).
    """

    accel: AccelOptions = DEFAULT     # set by convert_to_int8

    def __init__(self, conv: nn.ConvTranspose2d, compute: str = "bf16"):
        super().__init__()
        if not is_plain_conv_transpose(conv):
            raise ValueError(f"not a plain transposed convolution: {conv}")
        if compute not in ("bf16", "int8"):
            raise ValueError(f"compute must be 'bf16' or 'int8', got {compute!r}")
        self.compute = compute
        # (C_in, kh * kw * C_out), columns in [ky][kx][co] order
        weight = conv.weight.detach().float().permute(0, 2, 3, 1).reshape(conv.in_channels, -1)
        if compute == "int8":
            q, scale = quantize_weight(weight.t())                           # one scale per column
            self.linear = Int8Linear(q.t().contiguous(), scale)
            self.register_buffer("weight_bf16", None)
        else:
            self.linear = None
            self.register_buffer("weight_bf16", weight.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if conv.bias is None
                             else conv.bias.detach().float().contiguous())
        self.in_channels, self.out_channels = int(conv.in_channels), int(conv.out_channels)
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.output_padding = tuple(conv.padding), tuple(conv.output_padding)
        self.dilation = tuple(conv.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (ph, pw), (oh, ow), (dh, dw) = self.padding, self.output_padding, self.dilation
        rows = x.permute(0, 2, 3, 1).reshape(b, h * w, self.in_channels)
        if self.linear is not None:
            cols = self.linear(rows)                            # (B, h*w, k*k*C_out) float32
        else:
            cols = torch.matmul(rows.to(torch.bfloat16), self.weight_bf16)   # bfloat16
        out_h = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oh + 1
        out_w = (w - 1) * sw - 2 * pw + dw * (kw - 1) + ow + 1
        kernels = (native_kernels(self.accel.native_kernels, self.accel.kernel_cache)
                   if cols.is_cpu else None)
        if kernels is not None and kh <= kernels.col2im_max_kernel_height:
            y = kernels.col2im_channels_last(
                cols.contiguous(), (b, h, w, self.out_channels), (kh, kw), (sh, sw), (ph, pw),
                (dh, dw), (out_h, out_w), self.bias)
            return y.permute(0, 3, 1, 2)                # (B, C_out, H, W), channels last
        cols = (cols.float().view(b, h * w, kh * kw, self.out_channels).permute(0, 3, 2, 1)
                .reshape(b, self.out_channels * kh * kw, h * w))
        y = F.fold(cols, (out_h, out_w), (kh, kw), dilation=(dh, dw),
                   padding=(ph, pw), stride=(sh, sw))
        if self.bias is not None:
            y.add_(self.bias.view(1, -1, 1, 1))
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {self.compute} matmul + col2im")


class GemmPatchEmbed(nn.Module):
    """A patchify ``Conv2d`` (kernel = stride, no padding: a ViT's patch embedding) as a
    bfloat16 matmul of each image's patches.

    Each patch (C_in x kh x kw pixels, in the weight's order) is one row, so the layer is
    one (patches, C_in kh kw) x (C_in kh kw, C_out) product per image: bfloat16 operands
    (AVX512-BF16 here), float32 accumulation by oneDNN, the result rounded to bfloat16
    once, then the float32 bias.  One matmul per image, so an image's output never depends
    on the batch.  Returns (B, C_out, H / kh, W / kw) as a view of channels-last memory:
    the token rows ``flatten(2).transpose(1, 2)`` makes of it are contiguous for free.
    About half the time of the float32 convolution (docs/fast_paths.md section 2).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_patchify_conv(conv):
            raise ValueError(f"not a patchify convolution: {conv}")
        weight = conv.weight.detach().float().reshape(conv.out_channels, -1)  # (C_out, K)
        self.register_buffer("weight_bf16", weight.t().contiguous().to(torch.bfloat16))
        self.register_buffer("bias", None if conv.bias is None
                             else conv.bias.detach().float().contiguous())
        self.in_channels, self.out_channels = int(conv.in_channels), int(conv.out_channels)
        self.kernel_size = tuple(int(k) for k in conv.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        kh, kw = self.kernel_size
        if c != self.in_channels or h % kh or w % kw:
            raise ValueError(f"patch embedding: input {tuple(x.shape)} does not fit "
                             f"{self.in_channels} channels and {kh}x{kw} patches")
        gh, gw = h // kh, w // kw
        out = torch.empty((b, gh, gw, self.out_channels), dtype=torch.float32,
                          device=x.device)
        rows = out.view(b, gh * gw, self.out_channels)
        for i in range(b):
            patches = (x[i].reshape(c, gh, kh, gw, kw).permute(1, 3, 0, 2, 4)
                       .reshape(gh * gw, c * kh * kw).to(torch.bfloat16))
            rows[i].copy_(torch.mm(patches, self.weight_bf16))
        if self.bias is not None:
            out.add_(self.bias)
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"bf16 matmul per image")


def is_patchify_conv(module: nn.Module) -> bool:
    """A ``Conv2d`` whose kernel equals its stride (> 1), without padding, dilation or
    groups: non-overlapping patches, each one row of a matmul (:class:`GemmPatchEmbed`)."""
    return (type(module) is nn.Conv2d and tuple(module.kernel_size) == tuple(module.stride)
            and max(module.kernel_size) > 1 and tuple(module.dilation) == (1, 1)
            and module.groups == 1 and module.padding_mode == "zeros"
            and (module.padding == "valid" or tuple(module.padding) == (0, 0)))


def is_plain_conv_transpose(module: nn.Module) -> bool:
    """A 2-D transposed convolution :class:`GemmConvTranspose2d` reproduces (groups 1,
    zero padding mode, a non-negative integer padding)."""
    return (type(module) is nn.ConvTranspose2d and module.groups == 1
            and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
            and all(int(p) >= 0 for p in module.padding))


class InplaceGELU(nn.Module):
    """GELU that overwrites its input: for the activation right after an :class:`Int8Linear`.

    The int8 layer's output is a fresh tensor nobody else holds, so the activation can
    reuse it instead of allocating another (M, hidden) buffer.  Inference only (autograd
    would need the input).
    """

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


def is_pointwise_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and tuple(module.kernel_size) == (1, 1)
            and tuple(module.stride) == (1, 1) and tuple(module.dilation) == (1, 1)
            and module.groups == 1 and module.padding_mode == "zeros"
            and (module.padding == "valid" or tuple(module.padding) == (0, 0)))


def use_inplace_activation(mlp: nn.Module) -> bool:
    """In a timm ``Mlp`` whose ``fc1`` is int8, run the GELU in place (see :class:`InplaceGELU`)."""
    from timm.layers import Mlp

    if not (isinstance(mlp, Mlp) and isinstance(getattr(mlp, "fc1", None), Int8Linear)
            and type(getattr(mlp, "act", None)) is nn.GELU):
        return False
    mlp.act = InplaceGELU(mlp.act.approximate)
    return True


def fold_block_layer_scales(block: nn.Module) -> bool:
    """Fold ``ls1``/``ls2`` of a timm ``Block`` into its int8 ``attn.proj``/``mlp.fc2``.

    ``gamma * (acc * s_row * s_col + b) == acc * s_row * (gamma * s_col) + gamma * b``: the
    int8 weights stay as they are, the per-channel scale and the bias absorb ``gamma`` and
    the LayerScale becomes an identity, two element-wise passes fewer per block.  Only an
    exact ``timm.models.vision_transformer.Block`` qualifies (subclasses such as SelaVPR's
    adapted block apply the LayerScale to something else).  Returns True if it folded.
    """
    from timm.models.vision_transformer import Block, LayerScale

    if type(block) is not Block:
        return False
    folded = False
    for scale_name, layer in (("ls1", getattr(block.attn, "proj", None)),
                              ("ls2", getattr(block.mlp, "fc2", None))):
        scale = getattr(block, scale_name)
        if not (isinstance(scale, LayerScale) and isinstance(layer, Int8Linear)):
            continue
        gamma = scale.gamma.detach().float().reshape(-1)
        if gamma.numel() != layer.out_features:
            continue
        layer.weight_scale.mul_(gamma)
        if layer.bias is not None:
            layer.bias.mul_(gamma)
        setattr(block, scale_name, nn.Identity())
        folded = True
    return folded


def count_int8_layers(model: nn.Module) -> int:
    """How many :class:`Int8Linear` layers ``model`` holds (pointwise convs included)."""
    return sum(isinstance(m, Int8Linear) for m in model.modules())


__all__ = ["Int8Linear", "Int8PointwiseConv2d", "GemmConvTranspose2d", "GemmPatchEmbed",
           "count_int8_layers", "is_plain_conv_transpose", "is_patchify_conv",
           "fold_block_layer_scales", "use_inplace_activation", "InplaceGELU",
           "integer_matmul", "quantize_rows", "quantize_weight", "is_pointwise_conv"]
