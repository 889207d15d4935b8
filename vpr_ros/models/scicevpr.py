"""SciceVPR (single-image student) and Super-CricaVPR (cross-image teacher) heads.

Both share the same pipeline on a 16x16 token grid:

1. DINOv2 intermediate blocks ``out_indices`` (final norm applied, cls dropped),
   concatenated on channels;
2. ``fusion``: 1x1 conv with bias, ReLU;
3. ``token_mixers``: x + MLP(LayerNorm_C(x)) with the MLP acting along the 256 tokens;
4. GeM (learned p) on 14 regions (whole map, 2x2 split at 8, 3x3 split at 5 and 11),
   each region vector L2-normalised;
5. a PyTorch ``TransformerEncoder`` (post-norm, exact GELU) over the region vectors;
6. flatten region-major to (B, 14*C), L2-normalise.

They differ in step 5.  The student feeds every region token as its own length-1
sequence, so attention reduces to ``out_proj(V x)`` and an image's descriptor never
depends on the rest of the batch; in eval mode we compute exactly that per-token
function (same parameters, PyTorch-compatible keys ``encoder.layers.N.self_attn.*``).
The teacher attends, per region, across the B images of the batch, as the official
model does, so its descriptors depend on which images share a batch.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dinov2 import DinoV2

GEM_EPS = 1e-6
TOKEN_GRID = 16
NUM_REGIONS = 14

# [row0, row1) x [col0, col1) on the 16x16 map, in the official order.
REGIONS: Tuple[Tuple[int, int, int, int], ...] = (
    (0, 16, 0, 16),
    (0, 8, 0, 8), (0, 8, 8, 16), (8, 16, 0, 8), (8, 16, 8, 16),
    (0, 5, 0, 5), (0, 5, 5, 11), (0, 5, 11, 16),
    (5, 11, 0, 5), (5, 11, 5, 11), (5, 11, 11, 16),
    (11, 16, 0, 5), (11, 16, 5, 11), (11, 16, 11, 16),
)


class GeM(nn.Module):
    """Generalised-mean pooling with a learned exponent ``p`` (one scalar)."""

    def __init__(self, p: float = 3.0, eps: float = GEM_EPS):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C)."""
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class TokenMixer(nn.Module):
    """x + MLP(LayerNorm over channels) where the MLP mixes the token axis."""

    def __init__(self, channels: int, tokens: int = TOKEN_GRID * TOKEN_GRID, ratio: float = 1.0):
        super().__init__()
        hidden = int(tokens * ratio)
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(tokens, hidden), nn.ReLU(), nn.Linear(hidden, tokens))
        for m in self.mlp:
            if isinstance(m, nn.Linear) and not m.weight.is_meta:
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T)."""
        return x + self.mlp(self.norm(x.transpose(1, 2)).transpose(1, 2))


def regional_gem(x: torch.Tensor, p: torch.Tensor, eps: float = GEM_EPS) -> torch.Tensor:
    """(B, C, 16, 16) -> (B, 14, C): GeM of every region, each L2-normalised."""
    powered = x.clamp(min=eps).pow(p)
    pooled = [powered[:, :, r0:r1, c0:c1].mean(dim=(-2, -1)) for r0, r1, c0, c1 in REGIONS]
    regions = torch.stack(pooled, dim=1).pow(1.0 / p)
    return F.normalize(regions, p=2, dim=-1)


def encoder_layer_per_token(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """A post-norm TransformerEncoderLayer applied to length-1 sequences, token by token.

    With one token per sequence the softmax weight is exactly 1, so self-attention is
    out_proj(W_v x + b_v); the query/key projections do not matter.  Eval mode only
    (dropout inactive).
    """
    c = x.shape[-1]
    attn = layer.self_attn
    value = F.linear(x, attn.in_proj_weight[2 * c:], attn.in_proj_bias[2 * c:])
    x = layer.norm1(x + attn.out_proj(value))
    x = layer.norm2(x + layer.linear2(layer.activation(layer.linear1(x))))
    return x


class SciceVPR(nn.Module):
    """SciceVPR student (``cross_image=False``) or Super-CricaVPR teacher (``True``)."""

    def __init__(self, backbone: DinoV2, out_indices: Sequence[int], mix_in_dim: int,
                 token_num: int = 2, token_ratio: float = 1.0, encoder_layers: int = 1,
                 encoder_heads: int = 16, encoder_ffn: int = 2048, cross_image: bool = False):
        super().__init__()
        self.backbone = backbone
        self.out_indices = sorted(int(i) for i in out_indices)
        self.cross_image = cross_image
        in_dim = backbone.embed_dim * len(self.out_indices)
        self.fusion = nn.Conv2d(in_dim, mix_in_dim, kernel_size=1)
        self.token_mixers = nn.Sequential(*[
            TokenMixer(mix_in_dim, TOKEN_GRID * TOKEN_GRID, token_ratio)
            for _ in range(token_num)])
        self.gem = GeM(p=3.0)
        layer = nn.TransformerEncoderLayer(d_model=mix_in_dim, nhead=encoder_heads,
                                           dim_feedforward=encoder_ffn, dropout=0.1,
                                           activation="gelu", batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers=encoder_layers,
                                             enable_nested_tensor=False)
        self.descriptor_dim = NUM_REGIONS * mix_in_dim

    def region_vectors(self, x: torch.Tensor, keep: Dict[str, torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, 224, 224) -> (B, 14, C) region vectors (batch independent in both models)."""
        grid = self.backbone.token_grid(*x.shape[-2:])
        if grid != (TOKEN_GRID, TOKEN_GRID):
            raise ValueError(f"SciceVPR needs a {TOKEN_GRID}x{TOKEN_GRID} token grid "
                             f"({TOKEN_GRID * self.backbone.patch_size} px input), got {grid}")
        feats = torch.cat(self.backbone.get_intermediate_layers(x, self.out_indices), dim=1)
        fused = F.relu(self.fusion(feats))
        b, c = fused.shape[:2]
        mixed = self.token_mixers(fused.flatten(2)).reshape(b, c, TOKEN_GRID, TOKEN_GRID)
        regions = regional_gem(mixed, self.gem.p, self.gem.eps)
        if keep is not None:
            keep.update(backbone_features=feats, fused=fused, tokenmixed=mixed, regions=regions)
        return regions

    def encode(self, regions: torch.Tensor) -> torch.Tensor:
        """(B, 14, C) region vectors -> (B, 14, C) encoder output (before the final norm)."""
        if self.cross_image:
            return self.encoder(regions)  # (seq=B, batch=14, C): attention across the batch
        if self.training:
            b, r, c = regions.shape
            return self.encoder(regions.reshape(1, b * r, c)).reshape(b, r, c)
        out = regions
        for layer in self.encoder.layers:
            out = encoder_layer_per_token(layer, out)
        return out

    def forward_intermediates(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        keep: Dict[str, torch.Tensor] = {}
        regions = self.region_vectors(x, keep)
        encoded = self.encode(regions)
        keep["encoder_out"] = encoded
        keep["descriptor"] = F.normalize(encoded.flatten(1), p=2, dim=-1)
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> (B, 14*C) unit descriptors."""
        encoded = self.encode(self.region_vectors(x))
        return F.normalize(encoded.flatten(1), p=2, dim=-1)
