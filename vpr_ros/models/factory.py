"""Build a model from its card, with seeded initialisation and weights loaded safely."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from ..errors import CheckpointError
from .cards import ModelCard, load_card
from .checkpoint import file_sha256, load_weights
from .dinov2 import DinoV2
from .scicevpr import SciceVPR
from .selavpr import SelaVPR

log = logging.getLogger(__name__)

DEFAULT_INIT_SEED = 0

CardLike = Union[str, os.PathLike, ModelCard, None]


def build_model(card: CardLike, seed: Optional[int] = None) -> nn.Module:
    """An untrained model for ``card`` (in train mode, on the current default device).

    With ``seed`` the initialisation is reproducible (torch's global RNG is left as it
    was).  Works on the meta device (``with torch.device("meta"): build_model(card)``).
    """
    card = load_card(card)
    if seed is None:
        return _construct(card)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        return _construct(card)


def _construct(card: ModelCard) -> nn.Module:
    bb = dataclasses.asdict(card.backbone)
    head = card.head
    if card.architecture == "selavpr":
        return SelaVPR(**bb, adapter_dim=int(head["adapter_dim"]),
                       adapter_scale=float(head["adapter_scale"]),
                       local_hidden_dim=int(head["local_hidden_dim"]),
                       local_dim=int(head["local_dim"]),
                       local_upsample=card.local_upsample)
    backbone = DinoV2(**bb)
    return SciceVPR(backbone, out_indices=head["out_indices"], mix_in_dim=int(head["mix_in_dim"]),
                    token_num=int(head["token_num"]), token_ratio=float(head["token_ratio"]),
                    encoder_layers=int(head["encoder_layers"]),
                    encoder_heads=int(head["encoder_heads"]),
                    encoder_ffn=int(head["encoder_ffn"]),
                    cross_image=card.architecture == "super_cricavpr")


def resolve_weights(card: ModelCard, weights: Union[str, os.PathLike, None]) -> Optional[Path]:
    """The weights file to use: the explicit one, else the card's; None = seeded random."""
    if weights is not None and str(weights) != "":
        p = Path(os.path.expanduser(str(weights)))
        if not p.is_file():
            raise CheckpointError(f"weights file not found: {p}")
        return p
    if card.weights:
        p = card.weights_path
        if p is None or not p.is_file():
            raise CheckpointError(
                f"model card {card.name!r} points at weights {card.weights!r}, which are not "
                f"there ({p}); download/copy the file there or pass --weights FILE")
        return p
    if card.random_init_seed is None:
        hint = f" ({', '.join(card.official_files)})" if card.official_files else ""
        raise CheckpointError(
            f"model card {card.name!r} ships no weights: pass --weights FILE with the official "
            f"checkpoint{hint} or a file saved by vpr_ros (see models/README.md)")
    return None


def model_fingerprint(card: ModelCard, weights_path: Optional[Path]) -> str:
    """``sha256:<hex>`` of the weights file, or ``random:<seed>:<card>`` for seeded models."""
    if weights_path is not None:
        return "sha256:" + file_sha256(weights_path)
    return f"random:{card.random_init_seed}:{card.name}"


def load_model(card: CardLike, weights: Union[str, os.PathLike, None] = None,
               device: Union[str, torch.device] = "cpu", strict: bool = True
               ) -> Tuple[nn.Module, ModelCard, str]:
    """(model in eval mode on ``device``, card, fingerprint).

    Weights: ``weights`` if given, else the card's file, else (tiny test cards) the
    card's ``random_init_seed``.  A DINOv2 pretrain file fills the backbone only; the
    head keeps the seeded initialisation (seed = card seed or 0).
    """
    card = load_card(card)
    path = resolve_weights(card, weights)
    seed = card.random_init_seed if card.random_init_seed is not None else DEFAULT_INIT_SEED
    model = build_model(card, seed=seed)
    if path is not None:
        load_weights(model, card, path, strict=strict)
    model.eval()
    if isinstance(device, str):
        from ..device import resolve_device
        device = resolve_device(device)
    model.to(device)
    return model, card, model_fingerprint(card, path)
