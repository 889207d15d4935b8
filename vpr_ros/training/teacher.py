"""Stage 1: the Super-CricaVPR teacher, trained with the multi-similarity loss + miner.

Official recipe (SciceVPR ``train_super_cricavpr.py``): DINOv2 backbone frozen as a
whole, 1x1 fusion conv + token mixers + GeM + 2-layer cross-image encoder trained,
multi-similarity loss (alpha 1, beta 50, base 0) on pairs mined with epsilon 0.1,
Adam lr 1e-4 halved every 3 epochs, GSV-Cities batches of 72 places x 4 images.
The cross-image encoder attends across the images of the (per-process) batch.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .config import TrainConfig
from .losses import MultiSimilarity
from .stage import Stage, freeze_backbone


class TeacherStage(Stage):
    name = "teacher"
    architecture = "super_cricavpr"
    metric_names = ("ms_loss", "mined_fraction")

    def __init__(self, cfg: TrainConfig, device: torch.device):
        super().__init__(cfg, device)
        freeze_backbone(self.model.backbone, cfg.freeze.backbone_blocks)
        loss = cfg.loss
        self.criterion = MultiSimilarity(loss.ms_alpha, loss.ms_beta, loss.ms_base,
                                         loss.miner_epsilon)

    def compute_loss(self, outputs: torch.Tensor, labels: torch.Tensor
                     ) -> Tuple[torch.Tensor, Dict[str, float]]:
        loss = self.criterion(outputs, labels)
        return loss, {"ms_loss": float(loss.detach()),
                      "mined_fraction": self.criterion.last_mined_fraction}

    def gather(self, outputs, labels, info):
        from .ddp import gather_no_grad, gather_with_grad
        if not (info.enabled and self.cfg.loss.gather_across_processes):
            return outputs, labels
        return gather_with_grad(info, outputs), gather_no_grad(info, labels)

    @torch.no_grad()
    def describe(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
