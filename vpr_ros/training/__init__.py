"""Training: Super-CricaVPR teacher, distilled SciceVPR student, SelaVPR adaptation.

Modules: ``config`` (strict YAML config), ``data`` (place-labelled datasets, P x K
sampler, augmentation, validation split), ``losses`` (multi-similarity + miner,
distillation, SelaVPR triplet + mutual-NN local loss), ``stage`` / ``teacher`` /
``student`` / ``selavpr`` (what each stage trains), ``trainer`` (the shared loop:
checkpoints, resume, logs, DDP, autocast, gradient accumulation), ``ddp``.
Entry point: ``vpr train teacher|student|selavpr --config FILE`` or :func:`run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional


def run(config_path, stage: Optional[str] = None, out_dir=None, resume: bool = False,
        overrides: Iterable[str] = (), progress: bool = True, max_steps: Optional[int] = None,
        shared_dir=None):
    """Load a config, apply overrides, train; returns the summary dict.

    ``shared_dir`` replaces ``${VPR_SHARED_DIR}`` in the config's data paths (default: the
    ``VPR_SHARED_DIR`` environment variable, else ``shared/`` beside the repository)."""
    from ..errors import ConfigError
    from .config import load_config
    from .trainer import train

    overrides = list(overrides)
    if stage is not None:
        overrides.append(f"stage={stage}")
    cfg = load_config(config_path, overrides, shared_dir=shared_dir)
    if stage is not None and cfg.stage != stage:
        raise ConfigError(f"config says stage {cfg.stage!r} but {stage!r} was requested")
    if out_dir is None:
        out_dir = Path("runs") / (cfg.export_name or f"{cfg.stage}_{Path(config_path).stem}")
    return train(cfg, out_dir, resume=resume, progress=progress, max_steps=max_steps)
