"""Degenerate camera frames: black, uniform, tiny, lens cap, heavy blur.

Such a frame carries no place information, yet a retrieval model still returns a nearest
place for it (a 1x1 black image used to be matched with confidence 0.986).  The localizer
therefore checks each frame first: a degenerate frame is never evidence for the stream
localizer and never confident.

The statistics are computed on a grey copy reduced to at most 128 pixels on its long side
(so the check costs well under a millisecond and does not depend on the camera's
resolution):

* ``tiny``: fewer than ``min_side`` pixels on the short side or ``min_pixels`` in all;
* ``dark``: mean grey below ``dark_mean`` (lens cap, black frame, unlit scene);
* ``uniform``: grey spread (standard deviation) below ``min_std`` (fog, a wall, a cap);
* ``blurred``: mean absolute Laplacian below ``min_sharpness`` times the grey spread (a
  contrast-independent measure of edges; heavy motion or focus blur).

The thresholds were chosen so that no image of the shipped sample or the shared dev sets
(Nordland 64x32, GRIEF 640x240) is flagged; docs/evaluation.md gives the measured margins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class QualityLimits:
    min_side: int = 16
    min_pixels: int = 1024
    dark_mean: float = 8.0
    min_std: float = 2.0
    min_sharpness: float = 0.06


@dataclass(frozen=True)
class FrameQuality:
    degenerate: bool
    reason: Optional[str]            # tiny | dark | uniform | blurred, None when fine
    mean: float
    std: float
    sharpness: float

    def to_dict(self) -> dict:
        return {"degenerate": self.degenerate, "reason": self.reason,
                "mean": round(self.mean, 3), "std": round(self.std, 3),
                "sharpness": round(self.sharpness, 4)}


def _grey_small(rgb: np.ndarray, max_side: int = 128) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim == 3:
        a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        a = a.astype(np.float32)
    h, w = a.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    if step > 1:
        hh, ww = (h // step) * step, (w // step) * step
        a = a[:hh, :ww].reshape(hh // step, step, ww // step, step).mean(axis=(1, 3))
    return a


def assess_frame(rgb: np.ndarray, limits: QualityLimits = QualityLimits()) -> FrameQuality:
    """Quality of one RGB (or grey) uint8 frame."""
    a = np.asarray(rgb)
    h, w = a.shape[:2] if a.ndim >= 2 else (0, 0)
    if h < limits.min_side or w < limits.min_side or h * w < limits.min_pixels:
        return FrameQuality(True, "tiny", 0.0, 0.0, 0.0)
    g = _grey_small(a)
    mean, std = float(g.mean()), float(g.std())
    if g.shape[0] >= 3 and g.shape[1] >= 3:
        lap = (4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
        sharp = float(np.abs(lap).mean()) / max(std, 1e-6)
    else:
        sharp = 0.0
    reason = None
    if mean < limits.dark_mean:
        reason = "dark"
    elif std < limits.min_std:
        reason = "uniform"
    elif sharp < limits.min_sharpness:
        reason = "blurred"
    return FrameQuality(reason is not None, reason, mean, std, sharp)
