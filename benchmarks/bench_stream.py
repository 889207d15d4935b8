"""Stream localizer cost per frame and memory per place, at growing map sizes.

    python benchmarks/bench_stream.py [--quick] [--sizes 1000,100000,1000000] [--out DIR]

A synthetic drive: places every 2 m along a smooth random 2-D route; descriptors (dim 256,
the PCA dimension of large maps) drift smoothly along it, so neighbouring places look
alike and far ones do not; a query stream re-drives the route at a changing speed with
noisy descriptors.  Candidates come from an exact FAISS search (not timed).  Timed: the
stream localizer's ``observe`` (prediction, evidence, pruning), median and p95 over the
frames after the first 20.  Memory: the localizer's own arrays per place (positions,
route coordinate, KD-tree is built only for undirected maps) and the process RSS growth
when it is made.

Targets (issue: stream work <= 5 ms per frame at 100k places, <= 20 ms at 1M) are
compared in the printed table; nothing here asserts a wall-clock limit.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_route(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    heading = np.cumsum(rng.normal(0, 0.02, n))
    steps = np.stack([np.cos(heading), np.sin(heading)], 1) * 2.0
    pos = np.zeros((n, 3))
    pos[1:, :2] = np.cumsum(steps[:-1], 0)
    # smooth descriptors: a random walk in descriptor space, renormalised
    base = rng.standard_normal((n // 50 + 2, dim)).astype(np.float32)
    t = np.arange(n) / 50.0
    i0 = np.floor(t).astype(int)
    a = (t - i0)[:, None].astype(np.float32)
    desc = (1 - a) * base[i0] + a * base[i0 + 1]
    desc += 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    return pos, desc


def query_stream(desc: np.ndarray, frames: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    n = len(desc)
    i = float(rng.integers(0, max(n - 4 * frames, 1)))
    idx = []
    speed = 1.0
    for _ in range(frames):
        if rng.random() < 0.1:
            speed = float(rng.choice([0.0, 0.5, 1.0, 2.0]))
        i = min(i + speed, n - 1)
        idx.append(int(i))
    q = desc[idx] + 1.6 * rng.standard_normal((frames, desc.shape[1])).astype(np.float32) / np.sqrt(desc.shape[1])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return np.array(idx), q


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_size(n: int, frames: int, dim: int = 256, k: int = 50) -> dict:
    import faiss

    from vpr_ros.stream import StreamConfig, StreamLocalizer

    pos, desc = synthetic_route(n, dim)
    index = faiss.IndexFlatIP(dim)
    index.add(desc)
    truth, q = query_stream(desc, frames)
    sims, cands = index.search(q, k)
    before = rss_mb()
    t = time.perf_counter()
    stream = StreamLocalizer(pos, descriptors=desc, config=StreamConfig(candidates=k))
    build_s = time.perf_counter() - t
    own_bytes = sum(a.nbytes for a in (stream.route.positions, stream.route.coordinate)
                    if a is not None)
    times, right = [], []
    for f in range(frames):
        est = stream.observe(cands[f], sims[f], descriptor=q[f], stamp_ns=f * 100_000_000)
        times.append(est.timings_ms["stream"])
        right.append(abs(est.place_index - truth[f]) <= 5)
    warm = np.asarray(times[20:] or times)
    return {"places": n, "frames": frames, "dim": dim, "candidates": k,
            "median_ms": round(float(np.median(warm)), 3),
            "p95_ms": round(float(np.percentile(warm, 95)), 3),
            "build_s": round(build_s, 3),
            "own_bytes_per_place": round(own_bytes / n, 1),
            "rss_growth_mb": round(rss_mb() - before, 1),
            "hypotheses_last": int(est.hypotheses),
            "within_10m": round(float(np.mean(right[20:])), 3)}


def run(quick: bool = False, frames: int = 200, sizes=None) -> dict:
    """The rows for run_all.py (``stream`` topic) and for main()."""
    import faiss
    import torch

    faiss.omp_set_num_threads(2)
    torch.set_num_threads(2)
    sizes = sizes or ([1000, 100_000] if quick else [1000, 100_000, 1_000_000])
    rows = []
    for n in sizes:
        r = bench_size(n, frames)
        rows.append(r)
        target = 5.0 if n <= 100_000 else 20.0
        print(f"{n:>9} places: median {r['median_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms per frame "
              f"(target <= {target:g} ms), {r['own_bytes_per_place']:.0f} B/place own arrays, "
              f"{r['hypotheses_last']} hypotheses, within 10 m {r['within_10m']:.2f}", flush=True)
    return {"machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| places | median ms/frame | p95 ms/frame | hypotheses | own arrays |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['places']:,} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['hypotheses_last']} | {r['own_bytes_per_place']:.0f} B/place |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1k and 100k places only")
    p.add_argument("--sizes", default=None, help="comma-separated place counts")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--out", default=None, help="folder for stream.json")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    result = run(args.quick, args.frames, sizes)
    if args.out:
        from vpr_ros.atomic import atomic_write_json

        atomic_write_json(Path(args.out) / "stream.json", result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
