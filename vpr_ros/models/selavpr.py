"""SelaVPR: DINOv2 with adapters, a GeM global descriptor and dense local features.

Every backbone block gets two adapters (bottleneck Linear-ReLU-Linear):

* ``adapter1`` (serial, with its own skip) after attention:
  ``x = x + ls1(adapter1(attn(norm1(x))))``;
* ``adapter2`` (parallel, no skip) beside the MLP, scaled by ``adapter_scale`` (0.2):
  ``x = x + ls2(mlp(norm2(x)) + 0.2 * adapter2(norm2(x)))``.

Global branch: patch tokens (final norm) as (B, D, h, w), L2-normalise every patch
over channels, GeM with learned p, L2-normalise.  Local branch ("LocalAdapt"), on the
*un-normalised* patch map: ConvTranspose2d(k3, s2, p1) -> ReLU -> ConvTranspose2d(k3,
s2, p1), i.e. 16 -> 31 -> 61 cells, channels-last, L2-normalised per point.
``local_upsample`` (card ``head.local_upsample``, default 2 = official) makes the last
2 - n of the two convolutions stride 1 (k3, p1: same size), for smaller local maps:
n = 1 gives 2h - 1 cells, n = 0 the token grid itself.
"""

from __future__ import annotations

from functools import partial
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .dinov2 import LAYER_NORM_EPS, DinoV2
from .scicevpr import GeM


class Adapter(nn.Module):
    """Bottleneck adapter; ``skip`` adds the input back (serial adapter)."""

    def __init__(self, dim: int, hidden: int, skip: bool):
        super().__init__()
        self.skip = skip
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.relu(self.fc1(x)))
        return x + y if self.skip else y


class AdaptedBlock(Block):
    """A DINOv2 block with SelaVPR's serial and parallel adapters inside the LayerScales."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, adapter_dim: int,
                 adapter_scale: float = 0.2):
        super().__init__(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                         proj_bias=True, init_values=1.0,
                         norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS),
                         act_layer=nn.GELU)
        self.adapter_scale = adapter_scale
        self.adapter1 = Adapter(dim, adapter_dim, skip=True)
        self.adapter2 = Adapter(dim, adapter_dim, skip=False)
        if not self.adapter1.fc2.weight.is_meta:
            # As the official training starts: adapters begin as identity / zero.
            for adapter in (self.adapter1, self.adapter2):
                nn.init.zeros_(adapter.fc2.weight)
                nn.init.zeros_(adapter.fc2.bias)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.adapter1(self.attn(self.norm1(x)))))
        h = self.norm2(x)
        x = x + self.drop_path2(self.ls2(self.mlp(h) + self.adapter_scale * self.adapter2(h)))
        return x


class LocalAdapt(nn.Module):
    """Two transposed convolutions (k3, p1); the first ``upsample`` of them stride 2:
    (B, D, h, w) -> (B, C, 4h-3, 4w-3) with the official two."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, upsample: int = 2):
        super().__init__()
        if upsample not in (0, 1, 2):
            raise ValueError(f"LocalAdapt upsample must be 0, 1 or 2, got {upsample}")
        self.upsample = upsample
        self.upconv1 = nn.ConvTranspose2d(in_dim, hidden_dim, kernel_size=3,
                                          stride=2 if upsample >= 1 else 1, padding=1)
        self.upconv2 = nn.ConvTranspose2d(hidden_dim, out_dim, kernel_size=3,
                                          stride=2 if upsample >= 2 else 1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upconv2(F.relu(self.upconv1(x)))


class SelaVPR(nn.Module):
    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int = 14,
                 mlp_ratio: float = 4.0, num_register_tokens: int = 0, pos_embed_grid: int = 37,
                 interpolate_offset: float = 0.1, adapter_dim: int = 512,
                 adapter_scale: float = 0.2, local_hidden_dim: int = 256, local_dim: int = 128,
                 local_upsample: int = 2):
        super().__init__()

        def factory(dim, heads, ratio):
            return AdaptedBlock(dim, heads, ratio, adapter_dim, adapter_scale)

        self.backbone = DinoV2(embed_dim, depth, num_heads, patch_size=patch_size,
                               mlp_ratio=mlp_ratio, num_register_tokens=num_register_tokens,
                               pos_embed_grid=pos_embed_grid,
                               interpolate_offset=interpolate_offset, block_factory=factory)
        self.gem = GeM(p=3.0)
        self.local_adapt = LocalAdapt(embed_dim, local_hidden_dim, local_dim, local_upsample)
        self.global_dim = embed_dim
        self.local_dim = local_dim

    def global_descriptor(self, patch_map: torch.Tensor) -> torch.Tensor:
        pooled = self.gem(F.normalize(patch_map, p=2, dim=1))
        return F.normalize(pooled, p=2, dim=-1)

    def local_features(self, patch_map: torch.Tensor) -> torch.Tensor:
        dense = self.local_adapt(patch_map).permute(0, 2, 3, 1)
        return F.normalize(dense, p=2, dim=-1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (global (B, D), local (B, 4h-3, 4w-3, C)), both unit-norm."""
        patch_map = self.backbone.forward_patch_map(x)
        return self.global_descriptor(patch_map), self.local_features(patch_map)

    def forward_global(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_descriptor(self.backbone.forward_patch_map(x))
