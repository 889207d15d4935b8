"""Growth: how FAISS search time and memory grow with the number of places and with top-K.

Same synthetic descriptors as ``bench_index.py`` (PCA-256, normalised).  Two indexes:
exact ``Flat`` and ``IVF<nlist>,SQ8`` (nprobe 16, nlist growing with the map as
``bench_index.nlist_for``).  Reported: median single-query latency (k=10) and index
size at each map size, and latency vs k at the largest size.  Plot: growth.png.

Run: ``python benchmarks/bench_growth.py [--quick]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_index import build, nlist_for, single_query_latencies
from benchmarks.common import (DEFAULT_CACHE, DEFAULT_OUT, fmt, md_table, median, save_figure,
                               set_threads, write_json)
from benchmarks.synthetic_map import ReducedMap, build_cache

N_LATENCY_QUERIES = 100


def single_query_ms(index, q: np.ndarray, k: int) -> float:
    return 1000 * median(single_query_latencies(index, q, k, N_LATENCY_QUERIES))


def configs(n: int) -> List[dict]:
    nl = nlist_for(n)
    return [{"name": "Flat@256", "family": "Flat", "d": 256, "factory": "Flat", "params": ""},
            {"name": f"IVF{nl},SQ8@256", "family": "IVF-SQ8 (nprobe 16)", "d": 256,
             "factory": f"IVF{nl},SQ8", "params": "nprobe=16"}]


def load_or_build(cfg: dict, rmap: ReducedMap, n: int, index_dir: Path):
    import faiss
    path = index_dir / f"{cfg['name'].replace(',', '_').replace('@', '_d')}_{n}.faiss"
    if path.exists():
        return faiss.read_index(str(path)), None, path.stat().st_size / 2 ** 20
    index, build_s, path, mb = build(cfg, rmap, n, index_dir)
    return index, build_s, mb


def run(quick: bool, out: Path, cache: Path = DEFAULT_CACHE, max_n: int = None) -> dict:
    import faiss
    set_threads(2)
    sizes = [10_000, 20_000, 50_000] if quick else [10_000, 30_000, 100_000, 300_000, 1_000_000]
    folder = build_cache(max(sizes), [max(sizes)], n_queries=1000, cache_dir=cache,
                         fidelity_places=10_000 if quick else 20_000)
    rmap = ReducedMap(folder)
    q, _ = rmap.queries(max(sizes), 256)
    rows: List[dict] = []
    topk: Dict[str, List[dict]] = {}
    for n in sizes:
        for cfg in configs(n):
            index, build_s, mb = load_or_build(cfg, rmap, n, folder / "indexes")
            if cfg["params"]:
                faiss.ParameterSpace().set_index_parameters(index, cfg["params"])
            ms = single_query_ms(index, q, 10)
            rows.append({"n": n, "family": cfg["family"], "name": cfg["name"], "ms_per_query": ms,
                         "index_mb": mb, "build_s": build_s})
            print(f"[growth] n={n} {cfg['name']}: {ms:.3f} ms, {mb:.0f} MB", flush=True)
            if n == max(sizes):
                topk[cfg["family"]] = []
                for k in (1, 10, 100, 1000):
                    topk[cfg["family"]].append({"k": k, "ms_per_query": single_query_ms(index, q, k)})
            del index
    plot(rows, topk, out / "growth.png")
    return {"sizes": sizes, "rows": rows, "topk_at_max": topk}


def plot(rows: List[dict], topk: Dict[str, List[dict]], path: Path) -> None:
    from vpr_ros.plotting import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for fam in sorted({r["family"] for r in rows}):
        rr = [r for r in rows if r["family"] == fam]
        ax[0].plot([r["n"] for r in rr], [r["ms_per_query"] for r in rr], "o-", label=fam)
        ax[1].plot([r["n"] for r in rr], [r["index_mb"] for r in rr], "o-", label=fam)
    for fam, pts in topk.items():
        ax[2].plot([p["k"] for p in pts], [p["ms_per_query"] for p in pts], "o-", label=fam)
    ax[0].set(xscale="log", yscale="log", xlabel="places", ylabel="ms / query (k=10, batch 1, 1 thread)",
              title="Search time vs map size")
    ax[1].set(xscale="log", yscale="log", xlabel="places", ylabel="index MB", title="Index memory vs map size")
    n_max = max(r["n"] for r in rows)
    ax[2].set(xscale="log", xlabel="top-K", ylabel="ms / query", title=f"Search time vs K ({n_max:,} places)")
    for a in ax:
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    fig.suptitle("Growth, synthetic SciceVPR-B descriptors, PCA-256, single-query search, 1 FAISS thread")
    save_figure(fig, path)
    plt.close(fig)


def markdown(res: dict) -> str:
    lines = ["## Growth with map size and top-K", ""]
    lines.append(md_table(["places", "index", "ms/query (k=10)", "index MB"],
                          [[f"{r['n']:,}", r["name"], fmt(r["ms_per_query"], 3), fmt(r["index_mb"], 0)]
                           for r in res["rows"]]))
    lines += ["", f"Latency vs top-K at {max(res['sizes']):,} places:", ""]
    lines.append(md_table(["index", "k", "ms/query"],
                          [[fam, p["k"], fmt(p["ms_per_query"], 3)] for fam, pts in res["topk_at_max"].items()
                           for p in pts]))
    lines.append("\n![growth](growth.png)\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    a = ap.parse_args()
    res = run(a.quick, a.out, a.cache)
    write_json(a.out / "growth.json", res)
    print(markdown(res))


if __name__ == "__main__":
    main()
