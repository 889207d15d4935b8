"""Compare stream localization methods on a dataset and on synthetic drives made from it.

    python -m vpr_ros.evaluation.stream_study --dataset DS [--model CARD] [--from-index 1000]
        [--drives normal,stops,crawl,speedup,reverse,kidnap,variable,shuffled] [--markdown]

The study describes the database and the queries once (queries in driving order), builds
each synthetic drive (:mod:`vpr_ros.evaluation.drives`) from the recorded queries, and
runs every method on the same retrievals:

* ``single``: the frame's own top-1;
* ``seqslam``: a naive causal SeqSLAM (the last 20 frames, three fixed speeds 0.8/1/1.25
  frames per place, each frame's similarities z-scored over the whole map): the
  reference a sequence matcher must reach on a steady drive;
* ``belief``: the earlier place-belief filter (:mod:`vpr_ros.temporal`);
* ``stream``: :class:`vpr_ros.stream.StreamLocalizer` on images alone;
* ``stream+odometry``: the same with simulated wheel odometry (5 % distance error).

For each it reports R@1 and the recall at 100 % precision of its own confidence (raw,
uncalibrated).  ``--from-index K`` keeps database and queries from sequence index K on (for
Nordland part 1, K = 1000 keeps only places the demo model never trained on).  The
measured tables are in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

import numpy as np

from ..datasets import read_split
from .drives import KINDS, make_drive, simulated_odometry
from .metrics import positives_within, precision_recall

METHODS = ("single", "seqslam", "belief", "stream", "stream+odometry")


def naive_seqslam(sims: np.ndarray, window: int = 20, speeds=(0.8, 1.0, 1.25)):
    """Causal SeqSLAM over a full (Q, N) similarity matrix -> (answers, scores)."""
    z = (sims - sims.mean(1, keepdims=True)) / np.maximum(sims.std(1, keepdims=True), 1e-9)
    q, n = z.shape
    answers, scores = np.zeros(q, dtype=np.int64), np.zeros(q)
    for t in range(q):
        best, best_j = -np.inf, 0
        for v in speeds:
            acc = np.zeros(n)
            frames = min(window, t + 1)
            for i in range(frames):
                shift = int(round(v * i))
                if shift < n:
                    acc[shift:] += z[t - i, :n - shift]
            acc /= frames
            j = int(np.argmax(acc))
            if acc[j] > best:
                best, best_j = acc[j], j
        answers[t], scores[t] = best_j, best
    return answers, scores


def _score(answers, conf, positives) -> Dict[str, float]:
    ok = np.array([a in set(p.tolist()) for a, p in zip(answers, positives)], dtype=bool)
    pr = precision_recall(np.asarray(conf, dtype=np.float64), ok)
    return {"r1": round(float(ok.mean()), 4),
            "r_at_100p": round(float(pr["recall_at_100_precision"]), 4)}


def run_methods(db_desc, db_pos, q_desc, q_pos, methods=METHODS, k: int = 50) -> dict:
    from ..temporal import PlaceBeliefFilter
    from .stream_eval import run_stream

    sims = q_desc @ db_desc.T
    k = min(k, sims.shape[1])
    top = np.argsort(-sims, axis=1)[:, :k]
    top_s = np.take_along_axis(sims, top, 1)
    positives = positives_within(q_pos[:, :2], db_pos[:, :2], 25.0)
    out = {}
    if "single" in methods:
        out["single"] = _score(top[:, 0], top_s[:, 0], positives)
    if "seqslam" in methods:
        out["seqslam"] = _score(*naive_seqslam(sims), positives)
    if "belief" in methods:
        f = PlaceBeliefFilter(db_pos)
        res = [f.update(top[i, :20], top_s[i, :20]) for i in range(len(top))]
        out["belief"] = _score([r[0] for r in res], [r[1] for r in res], positives)
    for name, odo in (("stream", None), ("stream+odometry", simulated_odometry(q_pos))):
        if name not in methods:
            continue
        run = run_stream(db_pos, top, top_s, map_descriptors=db_desc, query_descriptors=q_desc,
                         odometry=odo)
        out[name] = dict(_score(run["answer"], run["raw"], positives),
                         ms=round(float(np.median(run["ms"])), 2))
    return out


def run_study(dataset, model: Optional[str] = None, from_index: int = 0,
              drives: List[str] = ("normal",), device: str = "cpu", seed: int = 0) -> dict:
    from ..inference import GlobalDescriber

    db = read_split(dataset, "database")
    q = read_split(dataset, "queries")
    describer = GlobalDescriber(model, device=device, batch_size=16)
    db_desc = describer.describe_files(db.paths[from_index:])
    q_desc = describer.describe_files(q.paths[from_index:])
    db_pos, q_pos = db.positions[from_index:], q.positions[from_index:]
    result = {"dataset": str(dataset), "model": describer.card.name, "from_index": from_index,
              "database": len(db_pos), "queries": len(q_pos), "drives": {}}
    for kind in drives:
        order = make_drive(len(q_pos), kind, seed)
        r = run_methods(db_desc, db_pos, q_desc[order], q_pos[order])
        result["drives"][kind] = {"frames": int(len(order)), "methods": r}
    return result


def markdown(result: dict) -> str:
    head = "| drive (frames) | " + " | ".join(METHODS) + " |"
    lines = [head, "|" + "---|" * (len(METHODS) + 1)]
    for kind, r in result["drives"].items():
        cells = []
        for m in METHODS:
            v = r["methods"].get(m)
            cells.append("-" if v is None else f"{100 * v['r1']:.1f} / {100 * v['r_at_100p']:.1f}")
        lines.append(f"| {kind} ({r['frames']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", default=None, help="model card (default: the default card)")
    p.add_argument("--from-index", type=int, default=0, metavar="K")
    p.add_argument("--drives", default="normal", help=f"comma-separated, of {','.join(KINDS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = p.parse_args(argv)
    result = run_study(args.dataset, args.model, args.from_index,
                       [d.strip() for d in args.drives.split(",") if d.strip()], args.device)
    if args.markdown:
        print(markdown(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
