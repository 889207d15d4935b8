"""The ``~/debug_image`` view: the query beside its best match, with the scores written.

ROS-free (PIL).  The map stores no images, so the best match is read from
``map_images_dir/<image_name>`` when that folder is given; otherwise its panel shows the
place id only.  With re-ranking the MNN score of the best candidate is written too, and
the strongest mutual-nearest-neighbour correspondences between the query's and the best
place's dense local features are drawn as lines between the panels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

PANEL_HEIGHT = 192


def _panel(rgb: np.ndarray, height: int = PANEL_HEIGHT):
    from PIL import Image

    im = Image.fromarray(rgb, "RGB")
    width = max(1, round(im.width * height / im.height))
    return im.resize((width, height), Image.BILINEAR)


def _match_image(name: str, folder: str, cache: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
    if not folder:
        return None
    if name in cache:
        return cache[name]
    from ..errors import ImageError
    from ..preprocess import load_image

    try:
        img = load_image(Path(folder) / name)
    except ImageError:
        img = None
    if len(cache) > 256:
        cache.clear()
    cache[name] = img
    return img


def mutual_nn_pairs(query_local: np.ndarray, place_local: np.ndarray, max_pairs: int = 40
                    ) -> np.ndarray:
    """Strongest mutual nearest neighbours of two (H, W, C) feature grids.

    Returns (M, 4) float: query (y, x) and place (y, x) as fractions of the grid (cell
    centres), strongest first, at most ``max_pairs``.
    """
    q = np.asarray(query_local, dtype=np.float32)
    c = np.asarray(place_local, dtype=np.float32)
    h, w = q.shape[:2]
    hc, wc = c.shape[:2]
    q2 = q.reshape(-1, q.shape[-1])
    c2 = c.reshape(-1, c.shape[-1])
    sim = q2 @ c2.T
    a = sim.argmax(axis=1)
    b = sim.argmax(axis=0)
    mutual = np.flatnonzero(b[a] == np.arange(len(a)))
    if mutual.size == 0:
        return np.zeros((0, 4))
    strength = sim[mutual, a[mutual]]
    keep = mutual[np.argsort(-strength, kind="stable")[:max_pairs]]
    qi, ci = keep, a[keep]
    return np.stack([(qi // w + 0.5) / h, (qi % w + 0.5) / w,
                     (ci // wc + 0.5) / hc, (ci % wc + 0.5) / wc], axis=1)


def render_debug_image(query_rgb: np.ndarray, result, map_images_dir: str = "",
                       cache: Optional[Dict[str, np.ndarray]] = None,
                       correspondences: Optional[np.ndarray] = None) -> np.ndarray:
    """RGB uint8: query | best match, a caption strip underneath; ``correspondences``
    (from mutual_nn_pairs) are drawn as lines across the two panels."""
    from PIL import Image, ImageDraw

    cache = {} if cache is None else cache
    left = _panel(query_rgb)
    match = _match_image(result.image_name, map_images_dir, cache)
    right = _panel(match) if match is not None else Image.new("RGB", left.size, (60, 60, 60))
    strip = 44
    canvas = Image.new("RGB", (left.width + right.width + 4, PANEL_HEIGHT + strip), (0, 0, 0))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 4, 0))
    draw = ImageDraw.Draw(canvas)
    if correspondences is not None and len(correspondences):
        x0 = left.width + 4
        for k, (qy, qx, cy, cx) in enumerate(np.asarray(correspondences)):
            hue = (int(255 * (1 - k / len(correspondences))), 200,
                   int(255 * k / len(correspondences)))
            draw.line([(qx * left.width, qy * PANEL_HEIGHT),
                       (x0 + cx * right.width, cy * PANEL_HEIGHT)], fill=hue, width=1)
    colour = (80, 220, 80) if result.confident else (230, 160, 40)
    draw.text((4, 4), "query", fill=(255, 255, 0))
    draw.text((left.width + 8, 4), f"place {result.place_id}", fill=(255, 255, 0))
    if match is None:
        draw.text((left.width + 8, PANEL_HEIGHT // 2), result.image_name[:40], fill=(200, 200, 200))
    line1 = f"score {result.similarity:.3f}  confidence {result.confidence:.2f}  " \
            f"{'CONFIDENT' if result.confident else 'unsure'}"
    best = result.candidates[0] if result.candidates else None
    line2 = ""
    if getattr(result, "reranked", False) and best is not None and best.rerank_score is not None:
        line2 = f"re-ranked: MNN score {best.rerank_score:.3f}"
        if correspondences is not None:
            line2 += f", {len(correspondences)} strongest mutual matches drawn"
    draw.text((4, PANEL_HEIGHT + 4), line1, fill=colour)
    if line2:
        draw.text((4, PANEL_HEIGHT + 22), line2, fill=(200, 200, 255))
    return np.asarray(canvas, dtype=np.uint8)
