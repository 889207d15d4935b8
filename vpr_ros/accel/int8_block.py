"""A whole int8 ViT block run through the fused native kernels (precision ``"int8"``).

After :func:`vpr_ros.accel.int8_linear.convert_to_int8`, a timm ``Block`` holds four
:class:`~vpr_ros.accel.int8_linear.Int8Linear` layers, each with its own quantise and
dequantise passes, and the LayerNorms, GELU and residual adds between them are separate
torch ops again.  :class:`Int8TransformerBlock` runs the same block as this chain, one
pass per row for everything between two integer matmuls:

    LayerNorm + quantise -> int8 qkv -> integer attention (dequantising the int32 sums
    head by head) + quantise (one parallel region) -> int8 proj -> dequantise + bias +
    residual + LayerNorm + quantise -> int8 fc1 -> dequantise + bias + GELU + quantise
    -> int8 fc2 -> dequantise + bias + residual

The attention (``NativeKernels.integer_attention``) computes the scores Q K^T from int16
codes of Q and K (one scale per token and head), the softmax in float32, and the
weighted sum of the values from int16 weights (steps of 1/32767 of the row's total) and
int16 V (one scale per channel of each image and head): both products exact in int32,
with AVX512-VNNI where the CPU has it, within 1e-6 (cosine) of float32 SDPA on random
inputs and a few 1e-3 with an attention sink.  At ViT-B's 257 tokens it takes about 0.6x
the time of float32 SDPA.  With ``AccelOptions(integer_attention=False)`` the block runs
float32 SDPA there instead (:class:`Int8AdaptedBlock` then runs the wrapped block as it is).

Where every layer of a block runs on the native VNNI matmul (and the integer attention
is on), the whole chain is one kernel call instead (``NativeKernels.block_chain``):
one parallel region in which the threads share out the rows, with barriers (spin, then
sleep) only around the attention, and the same row functions, so the same bits.  A
model's block sequence (:class:`FusedBlockSequence`, swapped in for
``vpr_ros.models.dinov2.BlockSequence``) hands consecutive such blocks to one call, so
the threads wake once per chain.  Under ``OMP_WAIT_POLICY=PASSIVE`` (the node's) each
region wakes a sleeping thread, and a step-by-step block has ~9 (plain) or ~17 (adapted)
of them.

Rows stay independent (per-token scales, per-row LayerNorm) and the attention's scales
belong to one image, so descriptors stay batch-invariant.  The block's input is never
written (the multi-layer fusion of SciceVPR keeps earlier blocks' outputs) and its
output is a fresh tensor; everything in between lives in the per-thread workspace of
:mod:`vpr_ros.accel.workspace`, reused by every block and call (about 65 MB at batch 8
for ViT-B): fresh multi-megabyte buffers cost a page fault per 4 KB, as much as the pass
that fills them.  Without the
native kernels (:func:`vpr_ros.accel.int8_kernels.native_kernels` is None), or for
inputs the kernels do not take (an attention mask, a non-float32 or non-CPU tensor), the
wrapped block runs as it is, through the torch path of its int8 layers.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .int8_kernels import BlockBuffers, BlockCall, MAX_ATTENTION_TOKENS, native_kernels
from .int8_linear import InplaceGELU, Int8Linear
from .options import DEFAULT, ENV_INTEGER_ATTENTION, AccelOptions
from .workspace import WORKSPACE, Workspace


ENV_ATTENTION = ENV_INTEGER_ATTENTION   # the override of AccelOptions.integer_attention


def integer_attention_enabled(options: AccelOptions = DEFAULT) -> bool:
    return options.use_integer_attention()


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _is_plain_layer_norm(norm: nn.Module, dim: int) -> bool:
    return (type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (dim,)
            and norm.weight is not None and norm.bias is not None)


def attention_fusable(attn: nn.Module) -> bool:
    """True for a timm ``Attention`` with int8 qkv/proj that the integer attention reproduces:
    no q/k norm, no norm after the heads, no gate, one qkv layer of width 3 x dim."""
    from timm.models.vision_transformer import Attention

    if type(attn) is not Attention:
        return False
    if not (isinstance(attn.qkv, Int8Linear) and isinstance(attn.proj, Int8Linear)):
        return False
    dim = attn.qkv.in_features
    return (all(_is_identity(m) for m in (attn.q_norm, attn.k_norm, attn.norm))
            and getattr(attn, "gate", None) is None
            and attn.qkv.out_features == 3 * dim and attn.proj.in_features == dim
            and attn.num_heads * attn.head_dim == dim)


def fusable(block: nn.Module) -> bool:
    """True for an exact timm ``Block`` whose parts this module reproduces.

    Requires: int8 qkv/proj/fc1/fc2, LayerNorm norms, exact GELU, a fusable attention
    (:func:`attention_fusable`), no norm inside the MLP, and the LayerScales already folded
    away (:func:`~vpr_ros.accel.int8_linear.fold_block_layer_scales`).
    """
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block

    if type(block) is not Block:
        return False
    attn, mlp = block.attn, block.mlp
    if not attention_fusable(attn) or type(mlp) is not Mlp:
        return False
    if not (isinstance(mlp.fc1, Int8Linear) and isinstance(mlp.fc2, Int8Linear)):
        return False
    dim = attn.qkv.in_features
    act = mlp.act
    exact_gelu = (type(act) in (nn.GELU, InplaceGELU) and act.approximate == "none")
    return (_is_plain_layer_norm(block.norm1, dim) and _is_plain_layer_norm(block.norm2, dim)
            and exact_gelu and all(_is_identity(m) for m in (
                block.ls1, block.ls2, block.drop_path1, block.drop_path2, mlp.norm)))


def _mlp_fusable(mlp: nn.Module, dim: int) -> bool:
    from timm.layers import Mlp

    if type(mlp) is not Mlp or not (isinstance(mlp.fc1, Int8Linear)
                                    and isinstance(mlp.fc2, Int8Linear)):
        return False
    act = mlp.act
    return (type(act) in (nn.GELU, InplaceGELU) and act.approximate == "none"
            and _is_identity(mlp.norm) and mlp.fc1.in_features == dim
            and mlp.fc2.out_features == dim)


def _adapter_fusable(adapter: nn.Module, dim: int, skip: bool) -> bool:
    """A bottleneck adapter ``fc2(relu(fc1(x))) (+ x)`` with int8 layers (SelaVPR's)."""
    fc1, fc2 = getattr(adapter, "fc1", None), getattr(adapter, "fc2", None)
    return (isinstance(fc1, Int8Linear) and isinstance(fc2, Int8Linear)
            and getattr(adapter, "skip", None) is skip and fc1.in_features == dim
            and fc2.in_features == fc1.out_features and fc2.out_features == dim)


def adapted_fusable(block: nn.Module) -> bool:
    """True for a SelaVPR adapted block (``vpr_ros.models.selavpr.AdaptedBlock``, recognised
    by its parts) this module reproduces: a fusable attention, LayerNorms, an int8 timm
    ``Mlp`` with exact GELU, a serial adapter (with skip) after the attention and a parallel
    one (no skip, scaled by ``adapter_scale``) beside the MLP, both adapters of one width
    (their work buffers are shared), identity drop-paths."""
    attn = getattr(block, "attn", None)
    if attn is None or not attention_fusable(attn) or not hasattr(block, "adapter_scale"):
        return False
    dim = attn.qkv.in_features
    return (_is_plain_layer_norm(block.norm1, dim) and _is_plain_layer_norm(block.norm2, dim)
            and _mlp_fusable(block.mlp, dim)
            and _adapter_fusable(block.adapter1, dim, True)
            and _adapter_fusable(block.adapter2, dim, False)
            and block.adapter1.fc1.out_features == block.adapter2.fc1.out_features
            and all(_layer_scale_fusable(getattr(block, n, None), dim) for n in ("ls1", "ls2"))
            and all(_is_identity(getattr(block, n, None)) for n in ("drop_path1", "drop_path2")))


def _layer_scale(module: nn.Module) -> Optional[torch.Tensor]:
    """The per-channel factor of a timm ``LayerScale`` (None for an identity)."""
    return None if _is_identity(module) else module.gamma


def _layer_scale_fusable(module: Optional[nn.Module], dim: int) -> bool:
    from timm.models.vision_transformer import LayerScale

    if _is_identity(module):
        return True
    gamma = getattr(module, "gamma", None)
    return (type(module) is LayerScale and isinstance(gamma, torch.Tensor)
            and gamma.dtype == torch.float32 and gamma.is_contiguous()
            and gamma.numel() == dim)


def _kernels_for(x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                 options: AccelOptions):
    """The native kernels if they take this input (a float32 CPU (B, N, C) tensor, no
    mask), else None: the wrapped module then runs as it is."""
    kernels = native_kernels(options.native_kernels, options.kernel_cache)
    if (kernels is None or attn_mask is not None or is_causal or x.dtype != torch.float32
            or x.device.type != "cpu" or x.ndim != 3):
        return None
    return kernels


def _integer_attention_kernels(x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                               is_causal: bool, options: AccelOptions):
    """The native kernels if this input runs the integer attention (:func:`_kernels_for`,
    the switch on, at most MAX_ATTENTION_TOKENS tokens), else None: the wrapped module
    then runs as it is."""
    kernels = _kernels_for(x, attn_mask, is_causal, options)
    if (kernels is None or not integer_attention_enabled(options)
            or x.shape[1] > MAX_ATTENTION_TOKENS):
        return None
    return kernels


def _block_buffers(x: torch.Tensor):
    """(b, n, c) input -> its (m, c) rows and the shared int8 / scale work buffers."""
    b, n, c = x.shape
    m = b * n
    rows = x.reshape(m, c)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    ws = WORKSPACE
    return (rows, ws.get("q_c", (m, c), torch.int8), ws.get("s_a", (m, 1), torch.float32),
            ws.get("s_b", (m, 1), torch.float32))


def _attention(kernels, blk: nn.Module, rows: torch.Tensor, b: int, n: int, q_c: torch.Tensor,
               s_a: torch.Tensor, integer: bool) -> torch.Tensor:
    """LayerNorm + quantise, then :func:`_attention_of_codes`."""
    kernels.layer_norm_quantize(rows, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps, q_c, s_a)
    return _attention_of_codes(kernels, blk.attn, b, n, q_c, s_a, integer)


def _attention_of_codes(kernels, attn: nn.Module, b: int, n: int, q_c: torch.Tensor,
                        s_a: torch.Tensor, integer: bool) -> torch.Tensor:
    """From the int8 codes ``q_c`` / ``s_a`` of the attention's input rows: int8 qkv, then
    the integer attention (or float32 SDPA) and the int8 codes of its output (the proj
    layer's input) into ``q_c`` / ``s_a``; returns the heads' output (m, c) in the
    workspace."""
    m, c = q_c.shape
    acc = attn.qkv.integer_product(q_c, kernels, WORKSPACE.get("acc_qkv", (m, 3 * c), torch.int32))
    mixed = WORKSPACE.get("mixed", (m, c), torch.float32)
    if integer and n <= MAX_ATTENTION_TOKENS:    # dequantised head by head in the kernel
        kernels.integer_attention_acc(acc, s_a, attn.qkv.weight_scale, attn.qkv.bias, b, n,
                                      attn.num_heads, attn.head_dim, attn.scale, out=mixed,
                                      quantized=(q_c, s_a))
    else:
        qkv = kernels.dequantize_(acc, s_a, attn.qkv.weight_scale, attn.qkv.bias)
        qkv = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        heads = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=attn.scale)
        mixed.view(b, n, attn.num_heads, attn.head_dim).copy_(heads.transpose(1, 2))
        kernels.quantize_rows(mixed, q_c, s_a)
    return mixed


def _whole_block_call(kernels, owner: nn.Module, norms, layers, chain, build,
                      extra: Tuple[Optional[torch.Tensor], ...] = (), scalars: tuple = ()):
    """The ``BlockCall`` of a block for :meth:`NativeKernels.block_chain`, built by
    ``build(norm views, layer views)`` from the C views (``BlockNorm``, ``BlockLinear``)
    of its LayerNorms and int8 layers, or None where a layer's product does not run on
    the native matmul or the shapes do not chain as the kernel reads them (the block then
    runs step by step, which checks every call).  ``chain``: (layer index, K, N) that
    must hold, -1 for "any" (the kernel trusts them).  ``extra``: the other tensors the
    call points to (LayerScales, or None), ``scalars``: the numbers it holds (heads,
    scales).  Cached on ``owner`` with the views while the packed weights, every tensor
    behind the call and the scalars stay the same (a few microseconds per block instead
    of tens)."""
    packed = [layer.packed_weight(kernels) for layer in layers]
    if any(p is None for p in packed):
        return None
    key = (id(kernels), *map(id, packed),
           *((t.data_ptr(), t.numel()) for layer in layers
             for t in (layer.weight_scale, layer.bias) if t is not None),
           *((t.data_ptr(), t.numel()) for norm in norms for t in (norm.weight, norm.bias)
             if t is not None),
           *(float(norm.eps) for norm in norms),
           *((None if t is None else (t.data_ptr(), t.numel())) for t in extra), *scalars)
    cached = owner.__dict__.get("_whole_block")
    if cached is None or cached[0] != key:
        c = norms[0].weight.numel()
        chained = (all(norm.bias is not None and norm.weight.numel() == norm.bias.numel() == c
                       for norm in norms)
                   and all((k < 0 or packed[i].k == k) and (n < 0 or packed[i].n == n)
                           for i, k, n in chain(c, [p.n for p in packed])))
        call = views = None
        if chained:
            views = ([kernels.block_norm(norm) for norm in norms],
                     [kernels.block_linear(layer, p) for layer, p in zip(layers, packed)])
            call = build(*views)
        # the views and extra tensors (which the call points to) and the packed weights
        # (the key holds their ids) are kept with the call
        cached = (key, call, views, packed, extra)
        owner.__dict__["_whole_block"] = cached
    return cached[1]


def _plain_chain(c, n):
    """qkv c -> 3c, proj c -> c, fc1 c -> hidden, fc2 hidden -> c (n: each layer's N)."""
    return [(0, c, 3 * c), (1, c, c), (2, c, -1), (3, n[2], c)]


def _adapted_chain(c, n):
    """qkv, proj (0, 1) and the MLP (4, 5) as in the plain chain; adapter1 (2, 3) and
    adapter2 (6, 7) both c -> h -> c with one width h."""
    return [(0, c, 3 * c), (1, c, c), (2, c, -1), (3, n[2], c), (4, c, -1), (5, n[4], c),
            (6, c, n[2]), (7, n[2], c)]


def _whole_block_state(module: nn.Module) -> dict:
    """A block's state for pickles and copies, without its cached C views (pointers)."""
    state = dict(module.__dict__)
    state.pop("_whole_block", None)
    return state


def _whole_block_buffers(m: int, c: int, hidden: int, adapter_hidden: int = 0) -> BlockBuffers:
    """The work buffers of a block-chain call: the step-by-step path's, by role."""
    ws = WORKSPACE
    shapes = {"q_c": ((m, c), torch.int8), "s_a": ((m, 1), torch.float32),
              "s_b": ((m, 1), torch.float32), "acc_qkv": ((m, 3 * c), torch.int32),
              "mixed": ((m, c), torch.float32), "acc_c": ((m, c), torch.int32),
              "q_h": ((m, hidden), torch.int8), "acc_h": ((m, hidden), torch.int32)}
    if adapter_hidden:
        shapes.update({"q_ad": ((m, adapter_hidden), torch.int8),
                       "s_ad": ((m, 1), torch.float32),
                       "acc_ad": ((m, adapter_hidden), torch.int32),
                       "acc_x1": ((m, c), torch.int32)})
    return BlockBuffers(**{role: ws.get(role, shape, dtype).data_ptr()
                           for role, (shape, dtype) in shapes.items()})


def _mlp_acc(kernels, mlp: nn.Module, q_c: torch.Tensor, s_a: torch.Tensor,
             s_b: torch.Tensor) -> torch.Tensor:
    """int8 fc1 + dequantise + GELU + quantise, int8 fc2 -> its int32 sums (a fresh tensor;
    dequantise with ``s_b``)."""
    m, hidden = q_c.shape[0], mlp.fc1.out_features
    q_h = WORKSPACE.get("q_h", (m, hidden), torch.int8)
    acc = mlp.fc1.integer_product(q_c, kernels, WORKSPACE.get("acc_h", (m, hidden), torch.int32))
    kernels.dequantize_gelu_quantize(acc, s_a, mlp.fc1.weight_scale, mlp.fc1.bias, q_h, s_b)
    return mlp.fc2.integer_product(q_h, kernels, None)


class ChainLink(NamedTuple):
    """One block of a block chain: the kernels, its ``BlockCall`` and the widths its work
    buffers need (MLP hidden, adapter hidden or 0)."""
    kernels: object
    call: BlockCall
    hidden: int
    adapter_hidden: int


def _chain_kernels(block: nn.Module, x: torch.Tensor):
    """The native kernels if ``block`` (a fused block with ``whole`` set) runs input ``x``
    through the whole-block kernels: a float32 CPU (B, N, C) tensor of at most
    MAX_ATTENTION_TOKENS tokens of the block's width, the integer attention on, VNNI."""
    kernels = _kernels_for(x, None, False, block.accel)
    if (kernels is None or not block.whole or not integer_attention_enabled(block.accel)
            or not kernels.has_vnni or x.shape[1] > MAX_ATTENTION_TOKENS
            or x.shape[-1] != block.block.norm1.weight.numel()):
        return None
    return kernels


def run_block_chain(x: torch.Tensor, links: Sequence[ChainLink],
                    keep: Sequence[int] = ()) -> List[Optional[torch.Tensor]]:
    """``x`` (b, n, c) through the blocks of ``links`` (one kernels object) in one parallel
    region (``NativeKernels.block_chain``) -> each block's output: a fresh tensor for the
    last block and the indices in ``keep``, None for the others (their outputs live in
    two work buffers used in turn: a block reads only its own thread's rows of the one
    before)."""
    kernels = links[0].kernels
    b, n, c = x.shape
    buffers = _whole_block_buffers(b * n, c, max(link.hidden for link in links),
                                   max(link.adapter_hidden for link in links))
    last = len(links) - 1
    outs = [torch.empty((b, n, c), dtype=torch.float32) if i == last or i in keep
            else WORKSPACE.get(f"chain_out{i % 2}", (b, n, c), torch.float32)
            for i in range(len(links))]
    kernels.block_chain(x if x.is_contiguous() else x.contiguous(),
                        [link.call for link in links], buffers, outs)
    return [out if i == last or i in keep else None for i, out in enumerate(outs)]


class FusedBlockSequence(nn.ModuleList):
    """A model's block sequence (a ``ModuleList`` with ``run``, as
    ``vpr_ros.models.dinov2.BlockSequence``) whose consecutive fused blocks run as one
    block chain (:func:`run_block_chain`): the threads wake once per chain instead of once
    per block.  The same modules and state-dict keys; iterating runs them one by one."""

    def run(self, tokens: torch.Tensor, count: int,
            keep: Sequence[int] = ()) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``tokens`` through blocks 0..count-1 -> the last output and the outputs of the
        blocks in ``keep`` (block order)."""
        blocks, kept, i = list(self)[:count], [], 0

        def link_of(block):       # depends on the input's shape, dtype and device only
            chain_link = getattr(block, "chain_link", None)
            return chain_link(tokens) if chain_link is not None else None

        link = link_of(blocks[0]) if blocks else None
        while i < len(blocks):
            if link is None:
                tokens = blocks[i](tokens)
                kept += [tokens] if i in keep else []
                i += 1
                link = link_of(blocks[i]) if i < len(blocks) else None
                continue
            links, nxt = [link], None
            while i + len(links) < len(blocks):
                nxt = link_of(blocks[i + len(links)])
                if nxt is None or nxt.kernels is not link.kernels:
                    break
                links.append(nxt)
                nxt = None
            outs = run_block_chain(tokens, links, [j - i for j in keep if j >= i])
            kept += [out for j, out in enumerate(outs) if i + j in keep]
            # the block that ended the chain keeps its link (None: it runs alone)
            tokens, i, link = outs[-1], i + len(links), nxt
        return tokens, kept


class Int8TransformerBlock(nn.Module):
    """Inference-only stand-in for a fusable timm ``Block`` (see :func:`fusable`)."""

    accel: AccelOptions = DEFAULT     # set by convert_to_int8
    whole: bool = True                # one parallel region per block where the kernels can

    def __getstate__(self):
        """Pickles and deep copies leave the cached C views out (rebuilt on use)."""
        return _whole_block_state(self)

    def __init__(self, block: nn.Module):
        super().__init__()
        if not fusable(block):
            raise ValueError("not a fusable int8 timm Block (convert_to_int8 it first)")
        self.block = block

    def chain_link(self, x: torch.Tensor) -> Optional["ChainLink"]:
        """This block's link of a block chain for input ``x`` (:func:`run_block_chain`), or
        None where it runs on its own (no whole-block kernels for this input)."""
        kernels = _chain_kernels(self, x)
        if kernels is None:
            return None
        blk = self.block
        attn, mlp = blk.attn, blk.mlp

        def build(norms, linears):
            (norm1, norm2), (qkv, proj, fc1, fc2) = norms, linears
            return kernels.block_call(norm1, qkv, proj, norm2, fc1, fc2, attn.num_heads,
                                      attn.head_dim, attn.scale)

        call = _whole_block_call(kernels, self, (blk.norm1, blk.norm2),
                                 (attn.qkv, attn.proj, mlp.fc1, mlp.fc2), _plain_chain, build,
                                 scalars=(attn.num_heads, attn.head_dim, float(attn.scale)))
        return None if call is None else ChainLink(kernels, call, mlp.fc1.out_features, 0)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        link = self.chain_link(x) if attn_mask is None and not is_causal else None
        if link is not None:
            return run_block_chain(x, [link])[-1]
        kernels = _kernels_for(x, attn_mask, is_causal, self.accel)
        if kernels is None:
            return self.block(x, attn_mask=attn_mask, is_causal=is_causal)
        blk = self.block
        attn, mlp = blk.attn, blk.mlp
        b, n, c = x.shape
        rows, q_c, s_a, s_b = _block_buffers(x)

        # attention: LayerNorm + quantise, qkv, integer attention, proj + residual, and
        # the MLP's LayerNorm + quantise in the same pass
        _attention(kernels, blk, rows, b, n, q_c, s_a, integer_attention_enabled(self.accel))
        acc = attn.proj.integer_product(q_c, kernels,
                                        WORKSPACE.get("acc_c", (b * n, c), torch.int32))
        rows = kernels.residual_layer_norm_quantize(
            acc, s_a, attn.proj.weight_scale, attn.proj.bias, rows,
            (blk.norm2.weight, blk.norm2.bias, blk.norm2.eps), q=q_c, scale=s_a)

        # MLP: fc1 + GELU + quantise, fc2 + residual (a fresh output)
        acc = _mlp_acc(kernels, mlp, q_c, s_a, s_b)
        out = kernels.dequantize_add_(acc, s_b, mlp.fc2.weight_scale, mlp.fc2.bias, rows)
        return out.reshape(b, n, c)


class Int8AdaptedBlock(nn.Module):
    """Inference-only stand-in for a SelaVPR adapted block (see :func:`adapted_fusable`):

    ``x1 = x + ls1(a + adapter1(a))`` with ``a = attn(norm1(x))``, then
    ``out = x1 + ls2(mlp(h) + s * adapter2(h))`` with ``h = norm2(x1)``, as this chain of
    integer matmuls and one-pass kernels (``h`` quantised once for the MLP and the
    parallel adapter):

        LayerNorm + quantise -> int8 qkv -> integer attention -> quantise -> int8 proj
        -> dequantise + quantise (a) -> int8 adapter1.fc1 -> dequantise + ReLU + quantise
        -> int8 adapter1.fc2 -> dequantise + skip (a) + LayerScale + residual (x1)
           + LayerNorm + quantise (h)
        -> int8 fc1 -> dequantise + GELU + quantise -> int8 fc2 ---------------------.
        -> int8 adapter2.fc1 -> dequantise + ReLU + quantise -> int8 adapter2.fc2 -> both
           dequantised, s * adapter + MLP, LayerScale, residual (x1): the output
    """

    accel: AccelOptions = DEFAULT     # set by convert_to_int8
    whole: bool = True                # one parallel region per block where the kernels can

    def __getstate__(self):
        """Pickles and deep copies leave the cached C views out (rebuilt on use)."""
        return _whole_block_state(self)

    def __init__(self, block: nn.Module):
        super().__init__()
        if not adapted_fusable(block):
            raise ValueError("not a fusable int8 adapted block (convert_to_int8 it first)")
        self.block = block

    def chain_link(self, x: torch.Tensor) -> Optional["ChainLink"]:
        """As :meth:`Int8TransformerBlock.chain_link`."""
        kernels = _chain_kernels(self, x)
        if kernels is None:
            return None
        blk = self.block
        attn, mlp, ad1, ad2 = blk.attn, blk.mlp, blk.adapter1, blk.adapter2

        gammas = (_layer_scale(blk.ls1), _layer_scale(blk.ls2))

        def build(norms, linears):
            (norm1, norm2), (qkv, proj, a1f1, a1f2, fc1, fc2, a2f1, a2f2) = norms, linears
            return kernels.block_call(norm1, qkv, proj, norm2, fc1, fc2, attn.num_heads,
                                      attn.head_dim, attn.scale, (a1f1, a1f2, a2f1, a2f2),
                                      *gammas, blk.adapter_scale)

        call = _whole_block_call(kernels, self, (blk.norm1, blk.norm2),
                                 (attn.qkv, attn.proj, ad1.fc1, ad1.fc2, mlp.fc1, mlp.fc2,
                                  ad2.fc1, ad2.fc2), _adapted_chain, build, extra=gammas,
                                 scalars=(attn.num_heads, attn.head_dim, float(attn.scale),
                                          float(blk.adapter_scale)))
        return None if call is None else ChainLink(kernels, call, mlp.fc1.out_features,
                                                   ad1.fc1.out_features)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        link = self.chain_link(x) if attn_mask is None and not is_causal else None
        if link is not None:
            return run_block_chain(x, [link])[-1]
        kernels = _integer_attention_kernels(x, attn_mask, is_causal, self.accel)
        if kernels is None:
            return self.block(x, attn_mask=attn_mask, is_causal=is_causal)
        blk = self.block
        attn, mlp, ad1, ad2 = blk.attn, blk.mlp, blk.adapter1, blk.adapter2
        b, n, c = x.shape
        m, hidden = b * n, ad1.fc1.out_features
        rows, q_c, s_a, s_b = _block_buffers(x)
        ws = WORKSPACE
        q_ad, s_ad = ws.get("q_ad", (m, hidden), torch.int8), ws.get("s_ad", (m, 1), torch.float32)
        acc_ad = ws.get("acc_ad", (m, hidden), torch.int32)

        # attention, then the serial adapter with its skip, LayerScale and residual:
        # x1 = x + ls1(a + adapter1(a)), and h = norm2(x1) quantised in the same pass
        _attention(kernels, blk, rows, b, n, q_c, s_a, True)
        acc = attn.proj.integer_product(q_c, kernels, ws.get("acc_c", (m, c), torch.int32))
        a, _, _ = kernels.dequantize_quantize(acc, s_a, attn.proj.weight_scale, attn.proj.bias,
                                              False, q_c, s_b)
        kernels.dequantize_quantize(ad1.fc1.integer_product(q_c, kernels, acc_ad), s_b,
                                    ad1.fc1.weight_scale, ad1.fc1.bias, True, q_ad, s_ad)
        x1 = kernels.residual_layer_norm_quantize(
            ad1.fc2.integer_product(q_ad, kernels, ws.get("acc_x1", (m, c), torch.int32)), s_ad,
            ad1.fc2.weight_scale, ad1.fc2.bias, rows,
            (blk.norm2.weight, blk.norm2.bias, blk.norm2.eps), skip=a,
            gamma=_layer_scale(blk.ls1), q=q_c, scale=s_a)

        # MLP and parallel adapter on h, LayerScale, residual: a fresh output
        acc = _mlp_acc(kernels, mlp, q_c, s_a, s_b)
        kernels.dequantize_quantize(ad2.fc1.integer_product(q_c, kernels, acc_ad), s_a,
                                    ad2.fc1.weight_scale, ad2.fc1.bias, True, q_ad, s_ad)
        side = ad2.fc2.integer_product(q_ad, kernels, ws.get("acc_c", (m, c), torch.int32))
        out = kernels.dequantize_pair_residual(
            acc, side, (s_b, mlp.fc2.weight_scale, mlp.fc2.bias),
            (s_ad, ad2.fc2.weight_scale, ad2.fc2.bias), blk.adapter_scale,
            _layer_scale(blk.ls2), x1)
        return out.reshape(b, n, c)


class IntegerAttention(nn.Module):
    """Inference-only stand-in for a timm ``Attention`` of a block that is not fusable as a
    whole: int8 qkv, the integer attention kernel, int8 proj.

    The same route as the fused blocks (:func:`_attention_of_codes`: the attention reads
    the qkv layer's int32 sums and quantises its output for proj in the same parallel
    region), with the bits of the layer-by-layer chain ``proj(integer_attention(qkv(x)))``
    (``test_integer_attention_module_is_the_layer_by_layer_chain``)."""

    accel: AccelOptions = DEFAULT     # set by convert_to_int8

    def __init__(self, attn: nn.Module):
        super().__init__()
        if not attention_fusable(attn):
            raise ValueError("not a fusable int8 timm Attention (convert_to_int8 it first)")
        self.attn = attn

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        kernels = _integer_attention_kernels(x, attn_mask, is_causal, self.accel)
        if kernels is None:
            return self.attn(x, attn_mask=attn_mask, is_causal=is_causal)
        attn = self.attn
        b, n, c = x.shape
        rows, q_c, s_a, _ = _block_buffers(x)
        kernels.quantize_rows(rows, q_c, s_a)
        _attention_of_codes(kernels, attn, b, n, q_c, s_a, True)
        out = kernels.dequantize_(attn.proj.integer_product(q_c, kernels, None), s_a,
                                  attn.proj.weight_scale, attn.proj.bias)
        return out.view(b, n, c)                        # a fresh tensor


def fuse_transformer_blocks(model: nn.Module) -> int:
    """Wrap every fusable block of ``model`` (in place) in :class:`Int8TransformerBlock`,
    every fusable SelaVPR adapted block in :class:`Int8AdaptedBlock`, and the fusable
    attention of every other block in :class:`IntegerAttention`.

    Returns how many modules were wrapped.
    """
    count = 0

    def visit(parent: nn.Module) -> None:
        nonlocal count
        for name, child in list(parent.named_children()):
            if isinstance(child, (Int8TransformerBlock, Int8AdaptedBlock, IntegerAttention)):
                continue
            if fusable(child):
                setattr(parent, name, Int8TransformerBlock(child))
                count += 1
            elif adapted_fusable(child):
                setattr(parent, name, Int8AdaptedBlock(child))
                count += 1
            elif attention_fusable(child):
                setattr(parent, name, IntegerAttention(child))
                count += 1
            else:
                visit(child)

    visit(model)

    def swap_sequences(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.ModuleList) and type(child) is not FusedBlockSequence
                    and callable(getattr(child, "run", None))
                    and any(hasattr(m, "chain_link") for m in child)):
                setattr(parent, name, FusedBlockSequence(list(child)))
            swap_sequences(child)

    swap_sequences(model)
    return count


__all__ = ["IntegerAttention", "Int8TransformerBlock", "Int8AdaptedBlock", "adapted_fusable",
           "ChainLink", "FusedBlockSequence", "run_block_chain",
           "Workspace", "WORKSPACE", "ENV_ATTENTION",
           "attention_fusable", "fusable", "fuse_transformer_blocks", "integer_attention_enabled"]
