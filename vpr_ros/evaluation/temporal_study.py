"""Measure the temporal filter on a benchmark dataset whose queries form one drive.

    python -m vpr_ros.evaluation.temporal_study --dataset DS [--model CARD | --thumbnail]

The study describes database and queries once, searches the top 20 per query, then runs
:class:`vpr_ros.temporal.PlaceBeliefFilter` over the queries in driving order for a grid
of ``sigma_m`` x ``kidnap_prob``.  It prints one JSON object: single-frame Recall@N,
filtered Recall@1 per setting, and how many queries the default filter fixed and broke.

``--thumbnail`` uses a non-learned descriptor instead of a network: grey 32x16
thumbnails, normalised per 8x8 patch (as SeqSLAM does).  It is a *measurement baseline*
for the filter (it has real but weak place signal on Nordland), not a VPR model of this
package.  The results are in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import numpy as np

from ..preprocess import load_image
from ..temporal import PlaceBeliefFilter
from .datasets import read_split
from .metrics import correct_at_n, positives_within, recall_at_n

SIGMAS = (15.0, 30.0, 60.0, 120.0)
KIDNAP = (0.01, 0.05, 0.2)


def thumbnail_descriptor(path) -> np.ndarray:
    from PIL import Image

    rgb = load_image(path)
    grey = np.asarray(Image.fromarray(rgb).convert("L").resize((32, 16), Image.BILINEAR),
                      dtype=np.float32)
    out = np.empty_like(grey)
    for r in range(0, 16, 8):
        for c in range(0, 32, 8):
            block = grey[r:r + 8, c:c + 8]
            out[r:r + 8, c:c + 8] = (block - block.mean()) / (block.std() + 1e-3)
    v = out.ravel()
    return v / (np.linalg.norm(v) + 1e-9)


def run_study(dataset, model: Optional[str] = None, thumbnail: bool = False,
              device: str = "cpu", batch_size: int = 16) -> dict:
    from ..maps.index import build_index, search

    db = read_split(dataset, "database")
    q = read_split(dataset, "queries")
    if thumbnail:
        d_db = np.stack([thumbnail_descriptor(p) for p in db.paths])
        d_q = np.stack([thumbnail_descriptor(p) for p in q.paths])
        name = "thumbnail (32x16 patch-normalised, non-learned)"
    else:
        from ..inference import GlobalDescriber

        describer = GlobalDescriber(model, device=device, batch_size=batch_size)
        d_db = _describe(describer, db.paths)
        d_q = _describe(describer, q.paths)
        name = describer.card.name
    index, _ = build_index(d_db, "Flat")
    sims, idx = search(index, d_q, 20)
    pos = positives_within(q.positions, db.positions, 25.0)
    out = {"dataset": str(dataset), "descriptor": name, "queries": len(q), "database": len(db),
           "single_frame_recall": recall_at_n(idx, pos), "filtered_recall_at_1": {}}
    for sigma in SIGMAS:
        for kidnap in KIDNAP:
            f = PlaceBeliefFilter(db.positions, sigma_m=sigma, kidnap_prob=kidnap)
            preds = np.array([[f.update(idx[i], sims[i])[0]] for i in range(len(idx))])
            out["filtered_recall_at_1"][f"sigma={sigma:g} kidnap={kidnap:g}"] = round(
                recall_at_n(preds, pos, ns=(1,))["1"], 4)
    f = PlaceBeliefFilter(db.positions)
    filtered = np.array([[f.update(idx[i], sims[i])[0]] for i in range(len(idx))])
    single_ok = correct_at_n(idx[:, :1], pos)[:, 0]
    filt_ok = correct_at_n(filtered, pos)[:, 0]
    out["default_filter"] = {"recall_at_1": round(float(filt_ok.mean()), 4),
                             "fixed": int((~single_ok & filt_ok).sum()),
                             "broken": int((single_ok & ~filt_ok).sum())}
    return out


def _describe(describer, paths) -> np.ndarray:
    parts = []
    for start in range(0, len(paths), 64):
        parts.append(describer.describe([load_image(p) for p in paths[start:start + 64]]))
    return np.concatenate(parts)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", default=None, help="model card (default: the default card)")
    p.add_argument("--thumbnail", action="store_true", help="non-learned baseline descriptor")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    print(json.dumps(run_study(args.dataset, args.model, args.thumbnail, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
