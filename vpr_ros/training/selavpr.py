"""SelaVPR adaptation: adapters + LocalAdapt trained, the DINOv2 backbone frozen.

Official recipe (SelaVPR ``train.py``): every backbone parameter whose name lacks
"adapter" is frozen; the adapters' second linear layers start at zero (the model does
that when built, and a DINOv2 pretrain file leaves them untouched); GeM and LocalAdapt
train.  Loss = global triplet margin loss (L2, margin 0.1) + the mutual-nearest-
neighbour local loss, each averaged over the triplets; Adam lr 1e-5.

Difference from the official data pipeline: triplets are mined inside each P x K
batch (anchor = first image of each place, positive = its nearest same-place image,
negatives = the ``loss.negatives_per_anchor`` nearest other-place images) instead of
from a cache of 1000 random negatives refreshed every 1000 queries.

Options beyond the official recipe (defaults keep it): ``mining.model`` mines on the
first-stage model's descriptors (training/first_stage.py); ``loss.local_loss:
dual_softmax`` and ``loss.local_margin`` change the local loss (losses.py).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .config import TrainConfig
from .losses import selavpr_losses, triplet_indices
from .stage import Stage, freeze_backbone


class SelaVPRStage(Stage):
    name = "selavpr"
    architecture = "selavpr"
    metric_names = ("global_loss", "local_loss", "triplets")

    def __init__(self, cfg: TrainConfig, device: torch.device):
        super().__init__(cfg, device)
        freeze_backbone(self.model.backbone, cfg.freeze.backbone_blocks,
                        keep_trainable=lambda name: "adapter" in name)
        loss = cfg.loss
        self.margin = loss.triplet_margin
        self.local_weight = loss.local_weight
        self.negatives = loss.negatives_per_anchor
        self.local = loss.local_loss
        self.local_margin = loss.local_margin
        self.temperature = loss.local_temperature
        # mining.model: first-stage descriptors of every training image, indexed by the
        # batch's image ids (set by the trainer: first_stage.FirstStage)
        self.mining_descriptors: Optional[torch.Tensor] = None

    def compute_loss(self, outputs, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        global_desc, local_feats = outputs
        mine_on = global_desc
        if self.mining_descriptors is not None:
            ids = self.batch_image_ids
            mine_on = self.mining_descriptors[ids.cpu()].to(global_desc.device)
        triplets = triplet_indices(mine_on, labels, self.negatives)
        g, loc = selavpr_losses(global_desc, local_feats, triplets, self.margin, self.local,
                                self.local_margin, self.temperature)
        loss = g + self.local_weight * loc
        return loss, {"global_loss": float(g.detach()), "local_loss": float(loc.detach()),
                      "triplets": float(len(triplets))}

    @torch.no_grad()
    def describe(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_global(images)
