"""DINOv2 vision transformer built from timm blocks, numerically equal to the official one.

Parameter names follow the official DINOv2 state dict (``cls_token``, ``pos_embed``,
``register_tokens``, ``mask_token``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv,
attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``), so pretrain
files load without renaming.  Attention uses timm's fused
``scaled_dot_product_attention``.

Positional embedding: the stored table covers a ``pos_embed_grid`` x ``pos_embed_grid``
grid (37 for the official 518-pixel models).  For another token grid it is resampled
exactly as the official code does: float32 bicubic (``align_corners=False``, no
antialias) called with ``scale_factor = (grid + offset) / stored_grid`` rather than with
a target size, the cls row passed through unchanged.  When the stored grid already
equals the token grid (e.g. the demo model trained at its own input size) it is used
as is.  In eval mode the resampled table is cached per token grid; the cache is keyed on
the parameter's storage and version counter, so loading new weights, ``.to()`` or an
optimiser step invalidates it.  Register tokens are inserted after the cls token once
the positional embedding has been added (they get none).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

LAYER_NORM_EPS = 1e-6


def dinov2_block(dim: int, num_heads: int, mlp_ratio: float) -> nn.Module:
    """One standard DINOv2 block (LayerScale, exact GELU, biases everywhere)."""
    return Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                 proj_bias=True, init_values=1.0,
                 norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS), act_layer=nn.GELU)


def resample_position_embedding(pos_embed: torch.Tensor, stored_grid: int,
                                grid: Tuple[int, int], offset: float) -> torch.Tensor:
    """Official DINOv2 resampling of a (1, 1 + G*G, D) table to a (gh, gw) token grid."""
    gh, gw = grid
    if (gh, gw) == (stored_grid, stored_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    cls_row = table[:, :1]
    patch = table[:, 1:].reshape(1, stored_grid, stored_grid, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": (float(gh + offset) / stored_grid,
                                   float(gw + offset) / stored_grid)}
    else:
        kwargs = {"size": (gh, gw)}
    patch = F.interpolate(patch, mode="bicubic", align_corners=False, antialias=False, **kwargs)
    if tuple(patch.shape[-2:]) != (gh, gw):
        raise RuntimeError(f"position embedding resampled to {tuple(patch.shape[-2:])}, "
                           f"expected {(gh, gw)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
    return torch.cat((cls_row, patch), dim=1).to(pos_embed.dtype)


class BlockSequence(nn.ModuleList):
    """A ViT's blocks, in order (a ``ModuleList``: the official ``blocks.N.`` keys).

    :meth:`run` is the one loop over them; the int8 layer (:mod:`vpr_ros.accel`) swaps in
    a sequence whose ``run`` hands consecutive fused blocks to one native call."""

    def run(self, tokens: torch.Tensor, count: int,
            keep: Sequence[int] = ()) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``tokens`` through blocks 0..count-1 -> the last output and the outputs of the
        blocks in ``keep`` (block order)."""
        kept = []
        for i, block in enumerate(list(self)[:count]):
            tokens = block(tokens)
            if i in keep:
                kept.append(tokens)
        return tokens, kept


class DinoV2(nn.Module):
    """DINOv2 ViT; ``block_factory(dim, heads, mlp_ratio)`` lets SelaVPR swap in adapted blocks."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int = 14,
                 mlp_ratio: float = 4.0, num_register_tokens: int = 0,
                 pos_embed_grid: int = 37, interpolate_offset: float = 0.1,
                 in_chans: int = 3,
                 block_factory: Optional[Callable[[int, int, float], nn.Module]] = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.pos_embed_grid = pos_embed_grid
        self.interpolate_offset = interpolate_offset
        self.patch_embed = PatchEmbed(img_size=pos_embed_grid * patch_size, patch_size=patch_size,
                                      in_chans=in_chans, embed_dim=embed_dim,
                                      strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_embed_grid ** 2, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_tokens = None
        # unused at inference; kept so that the official keys load
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        factory = block_factory or dinov2_block
        self.blocks = BlockSequence(factory(embed_dim, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self._pos_cache: Dict[tuple, torch.Tensor] = {}
        self.init_weights()

    def init_weights(self) -> None:
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    def token_grid(self, height: int, width: int) -> Tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def position_embedding(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The (1, 1 + gh*gw, D) embedding added for a token grid (cached in eval mode)."""
        pe = self.pos_embed
        if tuple(grid) == (self.pos_embed_grid, self.pos_embed_grid):
            return pe  # stored grid = token grid: used as is, nothing to resample
        cacheable = not self.training and not (torch.is_grad_enabled() and pe.requires_grad)
        if not cacheable:
            return resample_position_embedding(pe, self.pos_embed_grid, grid,
                                               self.interpolate_offset)
        state = (pe.device, pe.dtype, pe.data_ptr(), pe._version)
        key = (tuple(grid),) + state
        cached = self._pos_cache.get(key)
        if cached is None:
            with torch.no_grad(), torch.autocast(device_type=pe.device.type, enabled=False):
                cached = resample_position_embedding(pe.detach(), self.pos_embed_grid, grid,
                                                     self.interpolate_offset).clone()
            # Drop entries of older weights; keep a few grids (cameras of other sizes).
            fresh = {k: v for k, v in self._pos_cache.items() if k[1:] == state}
            if len(fresh) >= 8:
                fresh.pop(next(iter(fresh)))
            fresh[key] = cached
            self._pos_cache = fresh
        return cached

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, 1 + R + N, D) tokens entering the first block."""
        b, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        grid = self.token_grid(h, w)
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.position_embedding(grid).to(tokens.dtype)
        if self.register_tokens is not None:
            tokens = torch.cat((tokens[:, :1],
                                self.register_tokens.expand(b, -1, -1).to(tokens.dtype),
                                tokens[:, 1:]), dim=1)
        return tokens

    def _patch_map(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Normalised tokens -> (B, D, gh, gw), cls and registers dropped, row-major."""
        patches = tokens[:, self.num_prefix_tokens:]
        b, _, d = patches.shape
        return patches.reshape(b, grid[0], grid[1], d).permute(0, 3, 1, 2)

    def get_intermediate_layers(self, x: torch.Tensor,
                                indices: Sequence[int]) -> List[torch.Tensor]:
        """Outputs of the listed blocks (block order), each through the final norm, as
        (B, D, gh, gw)."""
        wanted = sorted(set(int(i) for i in indices))
        if not wanted or wanted[0] < 0 or wanted[-1] >= self.depth:
            raise ValueError(f"block indices {list(indices)} outside 0..{self.depth - 1}")
        grid = self.token_grid(*x.shape[-2:])
        _, kept = self.blocks.run(self.prepare_tokens(x), wanted[-1] + 1, wanted)
        return [self._patch_map(self.norm(tokens), grid) for tokens in kept]

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Official-style outputs: normalised cls / register / patch tokens after the last block."""
        tokens, _ = self.blocks.run(self.prepare_tokens(x), len(self.blocks))
        normed = self.norm(tokens)
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:self.num_prefix_tokens],
            "x_norm_patchtokens": normed[:, self.num_prefix_tokens:],
            "x_prenorm": tokens,
        }

    def forward_patch_map(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalised patch tokens as (B, D, gh, gw)."""
        grid = self.token_grid(*x.shape[-2:])
        tokens, _ = self.blocks.run(self.prepare_tokens(x), len(self.blocks))
        return self._patch_map(self.norm(tokens), grid)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.forward_features(x)
