"""What every training stage shares: building the model from its card, freezing, init.

A stage (teacher, student, SelaVPR) exposes

* ``model``: the model being trained and exported (an :mod:`vpr_ros.models` module);
* ``train_module``: the module the trainer runs (and wraps in DDP); its ``forward(images)``
  returns whatever ``compute_loss`` needs;
* ``compute_loss(outputs, labels) -> (loss, {name: float})``;
* ``describe(images) -> (B, D)`` global descriptors for validation (eval mode);
* ``card``: the model card of ``model``.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..models.cards import ModelCard, load_card
from ..models.checkpoint import load_weights
from ..models.factory import build_model
from .config import TrainConfig, resolve_card_spec, resolve_path

log = logging.getLogger(__name__)


def set_requires_grad(params: Iterable[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def freeze_backbone(backbone: nn.Module, blocks, keep_trainable=lambda name: False) -> None:
    """Freeze the embeddings and the first ``blocks`` blocks ("all": everything).

    ``keep_trainable(name)`` exempts parameters (SelaVPR's adapters) from freezing.
    """
    depth = len(backbone.blocks)
    n = depth if blocks == "all" else int(blocks)
    if n > depth:
        raise ConfigError(f"freeze.backbone_blocks={n} but the backbone has {depth} blocks")
    for name, p in backbone.named_parameters():
        if keep_trainable(name):
            p.requires_grad_(True)
            continue
        if name.startswith("blocks."):
            frozen = int(name.split(".")[1]) < n
        elif name.startswith("norm."):
            frozen = blocks == "all"
        else:  # patch_embed, cls_token, pos_embed, register_tokens, mask_token
            frozen = n > 0 or blocks == "all"
        p.requires_grad_(not frozen)
    # mask_token is never used by the forward pass: keep it out of the optimiser.
    if hasattr(backbone, "mask_token"):
        backbone.mask_token.requires_grad_(False)


def scratch_init_backbone(backbone: nn.Module, seed: int, layer_scale: float = 0.1) -> None:
    """ViT initialisation for training from scratch (no pretrained weights exist).

    Linear layers trunc-normal(0.02) with zero bias, LayerScale gammas ``layer_scale``
    (instead of the 1.0 that loaded checkpoints overwrite anyway).
    """
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, m in backbone.named_modules():
            if isinstance(m, nn.Linear):
                w = torch.empty_like(m.weight)
                nn.init.trunc_normal_(w, std=0.02, generator=g)
                m.weight.copy_(w)
                if m.bias is not None:
                    m.bias.zero_()
        for name, p in backbone.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(layer_scale)


class Stage:
    name = "stage"
    architecture = ""          # the card architecture this stage trains
    metric_names: Tuple[str, ...] = ()
    # indices of the current batch's images in the training set (set by the trainer)
    batch_image_ids: Optional[torch.Tensor] = None

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.card: ModelCard = load_card(resolve_card_spec(cfg, cfg.model))
        if self.architecture and self.card.architecture != self.architecture:
            raise ConfigError(f"stage {self.name} trains a {self.architecture} card; "
                              f"{self.card.name!r} is {self.card.architecture}")
        self.model: nn.Module = self._build(self.card)
        self.train_module: nn.Module = self.model

    # -- building --------------------------------------------------------------------
    def _build(self, card: ModelCard) -> nn.Module:
        seed = self.cfg.seed
        model = build_model(card, seed=seed)
        init = self.cfg.init_weights
        if self.cfg.scratch_init:
            scratch_init_backbone(model.backbone, seed)
        if init == "card":
            if not card.has_weights:
                raise CheckpointError(f"init_weights: card, but card {card.name!r} has no "
                                      f"weights file ({card.weights_status()})")
            load_weights(model, card, card.weights_path, strict=True)
            log.info("initialised %s from the card's weights %s", card.name, card.weights_path)
        elif init:
            path = resolve_path(self.cfg, init)
            if not path.is_file():
                raise CheckpointError(f"init_weights file not found: {path}")
            kind = load_weights(model, card, path, strict=True)
            log.info("initialised %s from %s (%s)", card.name, path, kind)
        return model.to(self.device)

    # -- parameters --------------------------------------------------------------------
    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.train_module.parameters() if p.requires_grad]

    def trainable_names(self) -> List[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    # -- interface -------------------------------------------------------------------
    def gather(self, outputs, labels: torch.Tensor, info):
        """Outputs and labels of all DDP processes (default: unchanged, per process)."""
        return outputs, labels

    def compute_loss(self, outputs, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        raise NotImplementedError

    @torch.no_grad()
    def describe(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def summary(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (f"{self.name}: card {self.card.name} ({self.card.architecture}), "
                f"{train:,} of {total:,} parameters trainable")
