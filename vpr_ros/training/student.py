"""Stage 2: the SciceVPR student, distilled from the frozen Super-CricaVPR teacher.

The student starts from the teacher's backbone and 1x1 fusion conv, which stay frozen
(as the paper states and ``train_scicevpr.py`` does); its token mixers, GeM and
single-image encoder are trained with

    L_T = gamma * L_MS + eta * L_D,   L_D = mean_batch ||d_student - d_teacher||^2

(gamma = eta = 1 in the official code).  The teacher runs in eval mode on the same
batch, so its descriptors carry the cross-image correlation the student learns to
reproduce from one image alone.

Because backbone and fusion conv are identical frozen copies, the backbone runs once
per batch and both heads read the same fused feature map.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from ..models.cards import load_card
from ..models.factory import load_model
from ..models.scicevpr import TOKEN_GRID, regional_gem
from .config import TrainConfig, resolve_card_spec, resolve_path
from .losses import MultiSimilarity, distillation_loss
from .stage import Stage, freeze_backbone, set_requires_grad

SHARED_PREFIXES = ("backbone.", "fusion.")
HEAD_PREFIXES = ("token_mixers.", "gem.")


def head_from_fused(model: nn.Module, fused: torch.Tensor) -> torch.Tensor:
    """SciceVPR/Super-CricaVPR descriptor from the ReLU'd fusion map (B, C, 16, 16)."""
    b, c = fused.shape[:2]
    mixed = model.token_mixers(fused.flatten(2)).reshape(b, c, TOKEN_GRID, TOKEN_GRID)
    regions = regional_gem(mixed, model.gem.p, model.gem.eps)
    return F.normalize(model.encode(regions).flatten(1), p=2, dim=-1)


def copy_shared_weights(teacher: nn.Module, student: nn.Module, teacher_name: str,
                        student_name: str, prefixes=SHARED_PREFIXES) -> int:
    """Copy backbone + fusion conv from teacher to student; CheckpointError on mismatch."""
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    shared = [k for k in s_state if k.startswith(prefixes)]
    missing = [k for k in shared if k not in t_state]
    shapes = [f"{k} {tuple(t_state[k].shape)} vs {tuple(s_state[k].shape)}"
              for k in shared if k in t_state and t_state[k].shape != s_state[k].shape]
    extra = [k for k in t_state if k.startswith(prefixes) and k not in s_state]
    if missing or shapes or extra:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} tensors differ in shape (e.g. {'; '.join(shapes[:3])})")
        if missing:
            parts.append(f"{len(missing)} student tensors absent from the teacher "
                         f"(e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} teacher tensors the student lacks "
                         f"(e.g. {', '.join(extra[:3])})")
        raise CheckpointError(
            f"teacher {teacher_name!r} does not match student {student_name!r}: the student "
            f"copies the teacher's {', '.join(p.rstrip('.') for p in prefixes)}, but "
            + "; ".join(parts) +
            ". Use a student card with the teacher's backbone sizes, out_indices and mix_in_dim.")
    with torch.no_grad():
        for k in shared:
            s_state[k].copy_(t_state[k])
    return len(shared)


class StudentTrainModule(nn.Module):
    """forward(images) -> (student descriptors, teacher descriptors)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, shared: bool):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.shared = shared

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()            # the teacher is frozen: no dropout
        return self

    def forward(self, images: torch.Tensor):
        if self.shared:
            with torch.no_grad():
                feats = torch.cat(self.student.backbone.get_intermediate_layers(
                    images, self.student.out_indices), dim=1)
                fused = F.relu(self.student.fusion(feats))
                teacher_desc = head_from_fused(self.teacher, fused)
            return head_from_fused(self.student, fused), teacher_desc
        with torch.no_grad():
            teacher_desc = self.teacher(images)
        return self.student(images), teacher_desc


class StudentStage(Stage):
    name = "student"
    architecture = "scicevpr"
    metric_names = ("ms_loss", "distill_loss", "mined_fraction")

    def __init__(self, cfg: TrainConfig, device: torch.device):
        super().__init__(cfg, device)
        tcfg = cfg.teacher
        t_model_spec = tcfg.model
        t_weights = resolve_path(cfg, tcfg.weights)
        if t_model_spec is None:
            sidecar = t_weights.with_name(t_weights.name + ".card.yaml")
            if not sidecar.is_file():
                raise ConfigError("teacher.model (the teacher's card) is required when the "
                                  "teacher weights have no .card.yaml next to them")
            t_model_spec = str(sidecar)
        else:
            t_model_spec = resolve_card_spec(cfg, t_model_spec)
        t_card = load_card(t_model_spec)
        if t_card.architecture != "super_cricavpr":
            raise CheckpointError(f"teacher card {t_card.name!r} is {t_card.architecture}; the "
                                  "student distils from a super_cricavpr teacher")
        if not t_weights.is_file():
            raise CheckpointError(f"teacher weights not found: {t_weights}")
        self.teacher, self.teacher_card, _ = load_model(t_card, t_weights, device=device)
        set_requires_grad(self.teacher.parameters(), False)
        self.teacher.eval()
        copy_shared_weights(self.teacher, self.model, t_card.name, self.card.name)
        if tcfg.copy_head:
            copy_shared_weights(self.teacher, self.model, t_card.name, self.card.name,
                                HEAD_PREFIXES)
        freeze_backbone(self.model.backbone, cfg.freeze.backbone_blocks)
        set_requires_grad(self.model.fusion.parameters(), False)
        shared = cfg.freeze.backbone_blocks == "all"
        self.train_module = StudentTrainModule(self.model, self.teacher, shared)
        loss = cfg.loss
        self.gamma, self.eta = loss.gamma, loss.eta
        self.criterion = MultiSimilarity(loss.ms_alpha, loss.ms_beta, loss.ms_base,
                                         loss.miner_epsilon)

    def compute_loss(self, outputs, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        student_desc, teacher_desc = outputs
        ms = self.criterion(student_desc, labels)
        distill = distillation_loss(student_desc, teacher_desc)
        loss = self.gamma * ms + self.eta * distill
        return loss, {"ms_loss": float(ms.detach()), "distill_loss": float(distill.detach()),
                      "mined_fraction": self.criterion.last_mined_fraction}

    def gather(self, outputs, labels, info):
        from .ddp import gather_no_grad, gather_with_grad
        if not (info.enabled and self.cfg.loss.gather_across_processes):
            return outputs, labels
        student_desc, teacher_desc = outputs
        return ((gather_with_grad(info, student_desc), gather_no_grad(info, teacher_desc)),
                gather_no_grad(info, labels))

    @torch.no_grad()
    def describe(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
