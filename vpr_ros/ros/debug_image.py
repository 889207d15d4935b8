"""The ``~/debug_image`` view: the query beside its best match, with the scores written.

ROS-free (PIL).  The map stores no images, so the best match is read from
``map_images_dir/<image_name>`` when that folder is given; otherwise its panel shows the
place id only.  With re-ranking the MNN score of the best candidate is written too.
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


def render_debug_image(query_rgb: np.ndarray, result, map_images_dir: str = "",
                       cache: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
    """RGB uint8: query | best match, a caption strip underneath."""
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
    draw.text((4, PANEL_HEIGHT + 4), line1, fill=colour)
    if line2:
        draw.text((4, PANEL_HEIGHT + 22), line2, fill=(200, 200, 255))
    return np.asarray(canvas, dtype=np.uint8)
