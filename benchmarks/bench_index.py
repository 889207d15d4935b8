"""Map scale: FAISS search latency, memory, build time and recall at 10k / 100k / 1M places.

Descriptors are synthetic SciceVPR-B-sized (10752-D) place descriptors with route
structure (see ``synthetic_map.py``), reduced with PCA to 256 or 512 dimensions and
L2-normalised.  For every index the script reports:

* ``recall@1`` / ``recall@10`` against *exact* search on the same reduced vectors
  (``Flat`` inner product at the same dimension): top-1 identical / top-10 overlap;
* ``place R@1`` (retrieved place within 2 places of the true one) and its ratio to the
  exact search's place R@1 (the "ANN recall >= 0.98 of exact" goal);
* ms/query at batch 1 (one camera frame at a time, 2 threads), build time, index size
  (the RAM the index occupies once loaded);
* a recall-vs-latency PNG over the search parameter sweep (nprobe, efSearch);
* PCA fidelity: exact search in PCA space vs exact search on the full 10752-D vectors
  (on a subset generated at full dimension);
* open time of a 100k-place map: ``faiss.read_index`` with and without
  ``IO_FLAG_MMAP`` and ``np.load(mmap_mode="r")`` of the 10752-D descriptor matrix.

Run: ``python benchmarks/bench_index.py [--quick] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from common import (DEFAULT_CACHE, DEFAULT_OUT, fmt, md_table, median, peak_rss_mb,
                    rss_mb, save_figure, set_threads, time_calls, write_json)
from synthetic_map import ReducedMap, agreement_recall, build_cache, place_recall

QUERIES_LATENCY = 100     # single-query latency measured over this many queries


def nlist_for(n: int) -> int:
    if n <= 20_000:
        return 128
    if n <= 200_000:
        return 1024
    return 2048


def index_configs(n: int, quick: bool) -> List[dict]:
    """Index candidates for a map of n places: factory string, dimension, parameter sweep."""
    nl = nlist_for(n)
    cfgs = [
        {"name": "Flat@256", "d": 256, "factory": "Flat", "sweep": [""]},
        {"name": "Flat@512", "d": 512, "factory": "Flat", "sweep": [""]},
        {"name": f"IVF{nl},SQ8@256", "d": 256, "factory": f"IVF{nl},SQ8",
         "sweep": ["nprobe=4", "nprobe=8", "nprobe=16", "nprobe=32", "nprobe=64"]},
        {"name": f"IVF{nl},Flat@256", "d": 256, "factory": f"IVF{nl},Flat",
         "sweep": ["nprobe=4", "nprobe=8", "nprobe=16", "nprobe=32", "nprobe=64"]},
        {"name": f"IVF{nl},PQ32@256", "d": 256, "factory": f"IVF{nl},PQ32",
         "sweep": ["nprobe=16", "nprobe=64"]},
        {"name": f"IVF{nl},PQ32@256 + mmap re-score", "d": 256, "factory": f"IVF{nl},PQ32",
         "mmap_refine": True,
         "sweep": ["nprobe=16,refine=4", "nprobe=16,refine=10", "nprobe=32,refine=10",
                   "nprobe=64,refine=20"]},
        {"name": "HNSW32@256", "d": 256, "factory": "HNSW32",
         "sweep": ["efSearch=16", "efSearch=32", "efSearch=64", "efSearch=128"],
         "max_n": 100_000},
    ]
    if quick:
        for c in cfgs:
            c["sweep"] = c["sweep"][::2] if len(c["sweep"]) > 2 else c["sweep"]
    return [c for c in cfgs if n <= c.get("max_n", 10 ** 12)]


class MmapRescored:
    """IVF-PQ in RAM, exact re-scoring of its top ``refine * k`` from vectors on disk.

    The 10M-place recipe: compressed codes (32 B/place) stay in RAM, the PCA vectors
    stay in a memory-mapped file and only ``refine * k`` rows per query are read.
    """

    def __init__(self, base, rmap: ReducedMap, d: int):
        self.base, self.rmap, self.d = base, rmap, d
        self.refine = 10

    def search(self, q: np.ndarray, k: int):
        _, cand = self.base.search(q, k * self.refine)
        sims = np.full((len(q), k), -np.inf, np.float32)
        idx = np.full((len(q), k), -1, np.int64)
        for i in range(len(q)):
            c = cand[i][cand[i] >= 0]
            order = np.argsort(c)
            rows = c[order]
            vec = self.rmap._post(self.rmap.db[rows], self.d, False)
            s = vec @ q[i]
            top = np.argsort(-s, kind="stable")[:k]
            sims[i, :len(top)] = s[top]
            idx[i, :len(top)] = rows[top]
        return sims, idx


def build(cfg: dict, rmap: ReducedMap, n: int, index_dir: Path):
    """Train + add in chunks; returns (index, build seconds, index file, file MB)."""
    import faiss
    d = cfg["d"]
    index = faiss.index_factory(d, cfg["factory"], faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    if not index.is_trained:
        nl = nlist_for(n)
        n_train = min(n, max(32 * nl, 20_000), 100_000)
        rows = np.sort(np.random.default_rng(0).choice(n, size=n_train, replace=False))
        xt = rmap._post(rmap.db[rows], d, False)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.max_points_per_centroid = 64
            ivf.cp.niter = 12
            ivf = faiss.downcast_index(ivf)
            if hasattr(ivf, "do_polysemous_training"):
                # polysemous code re-ordering is only for Hamming pre-filtering, which we do
                # not use, and takes minutes on 2 cores
                ivf.do_polysemous_training = False
        index.train(xt)
        del xt
    for chunk in rmap.database_chunks(n, d):
        index.add(chunk)
    build_s = time.perf_counter() - t0
    index_dir.mkdir(parents=True, exist_ok=True)
    stem = cfg["name"].split(" ")[0].replace(",", "_").replace("@", "_d")
    path = index_dir / f"{stem}_{n}.faiss"
    faiss.write_index(index, str(path))
    mb = path.stat().st_size / 2 ** 20
    if cfg.get("mmap_refine"):
        index = MmapRescored(index, rmap, d)
    return index, build_s, path, mb


def single_query_latencies(index, q: np.ndarray, k: int, n: int = QUERIES_LATENCY) -> List[float]:
    """Seconds per single-query search (one camera frame at a time) with ONE FAISS thread.

    One thread on purpose: a single query has little parallel work, and on a loaded
    machine OpenMP threads that wait for each other's time slices make 2-thread
    single-query latency erratic (measured: 10k-place Flat 0.19 ms with 1 thread vs
    12-150 ms with 2 threads at load average 14).  Batch searches use all threads.
    """
    import faiss
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        lat = []
        for i in range(min(n, len(q))):
            t0 = time.perf_counter()
            index.search(q[i:i + 1], k)
            lat.append(time.perf_counter() - t0)
    finally:
        faiss.omp_set_num_threads(before)
    return lat


def search_eval(index, params: str, q: np.ndarray, targets: np.ndarray,
                exact_I: Optional[np.ndarray], k: int = 10) -> dict:
    import faiss
    ps = faiss.ParameterSpace()
    rest = []
    for tok in [t for t in params.split(",") if t]:
        if tok.startswith("refine="):
            index.refine = int(tok.split("=")[1])
        else:
            rest.append(tok)
    if rest:
        ps.set_index_parameters(index.base if isinstance(index, MmapRescored) else index, ",".join(rest))
    _, I = index.search(q, k)
    lat = single_query_latencies(index, q, k)
    out = {"params": params, "ms_per_query": 1000 * median(lat),
           "ms_per_query_p90": 1000 * float(np.percentile(lat, 90))}
    out.update({f"place_{k_}": v for k_, v in place_recall(I, targets).items()})
    if exact_I is not None:
        out.update(agreement_recall(I, exact_I))
    return out, I


def pca_fidelity(rmap: ReducedMap) -> List[dict]:
    import faiss
    rows = []
    for d in (256, 512):
        db, q, t, gt = rmap.fidelity_set(d)
        ix = faiss.IndexFlatIP(d)
        ix.add(db)
        _, I = ix.search(q, 10)
        r = {"d": d, "places": len(db), "queries": len(q)}
        r.update({f"place_{k}": v for k, v in place_recall(I, t).items()})
        r.update({f"fullD_place_{k}": v for k, v in place_recall(gt, t).items()})
        r.update({f"vs_fullD_{k}": v for k, v in agreement_recall(I, gt).items()})
        rows.append(r)
    return rows


def _evict(path: Path) -> None:
    """Drop a file from the page cache (best effort), so an open measures disk, not RAM."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except (OSError, AttributeError):
        pass


def open_times(rmap: ReducedMap, n: int, index_files: Dict[str, Path], work: Path) -> dict:
    """Open a map of n places: FAISS indexes (normal vs mmap) and the 10752-D descriptors."""
    import faiss
    out: dict = {"places": n, "indexes": {}}
    for name, path in index_files.items():
        res = {"file_mb": path.stat().st_size / 2 ** 20}
        for mode, flag in (("read", 0), ("mmap", faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY),
                           ("mmap_ifc", faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)):
            _evict(path)
            t0 = time.perf_counter()
            try:
                ix = faiss.read_index(str(path), flag)
                res[f"{mode}_open_s"] = time.perf_counter() - t0
                q, _ = rmap.queries(n, ix.d)
                t0 = time.perf_counter()
                ix.search(q[:1], 10)
                res[f"{mode}_first_query_s"] = time.perf_counter() - t0
                del ix
            except RuntimeError as exc:           # not every index type supports mmap
                res[f"{mode}_error"] = str(exc).splitlines()[-1][:200]
        out["indexes"][name] = res
    # the map's full descriptor matrix (n x 10752 float32), as a map stores it
    desc = work / f"descriptors_{n}x10752.npy"
    work.mkdir(parents=True, exist_ok=True)
    if not desc.exists():
        # plain writes, not a writable memmap: dirty mapped pages would count as this
        # process's RSS (4 GB at 100k places) and inflate the reported peak
        block = np.random.default_rng(0).standard_normal((1000, 10752)).astype(np.float32)
        with open(desc, "wb") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                     "fortran_order": False, "shape": (n, 10752)})
            for s in range(0, n, 1000):
                fh.write(block[: min(1000, n - s)].tobytes())
    _evict(desc)
    t0 = time.perf_counter()
    arr = np.load(desc, mmap_mode="r")
    out["descriptors_file_gb"] = desc.stat().st_size / 2 ** 30
    out["descriptors_mmap_open_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = np.random.default_rng(1).choice(n, 20, replace=False)
    _ = np.asarray(arr[np.sort(rows)]).sum()
    out["descriptors_read_20_random_rows_s"] = time.perf_counter() - t0
    del arr
    desc.unlink()
    return out


def plot_tradeoff(results: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted({r["n"] for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.2), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for r in [r for r in results if r["n"] == n]:
            xs = [p["ms_per_query"] for p in r["points"]]
            ys = [p.get("recall@1", np.nan) for p in r["points"]]
            ax.plot(xs, ys, "o-", label=f"{r['name']} ({r['index_mb']:.0f} MB)")
        ax.set_xscale("log")
        ax.set_xlabel("ms / query (batch 1, 1 FAISS thread)")
        ax.set_ylabel("recall@1 vs exact (same PCA dim)")
        ax.set_title(f"{n:,} places")
        ax.axhline(0.98, color="grey", ls=":", lw=1)
        ax.axvline(10, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Recall vs latency, synthetic SciceVPR-B descriptors (10752-D -> PCA)")
    save_figure(fig, path)
    plt.close(fig)


def run(quick: bool, out: Path, cache: Path = DEFAULT_CACHE) -> dict:
    import faiss
    set_threads(2)
    sizes = [10_000, 50_000] if quick else [10_000, 100_000, 1_000_000]
    t0 = time.perf_counter()
    folder = build_cache(max(sizes), sizes, n_queries=1000, cache_dir=cache,
                         fidelity_places=10_000 if quick else 20_000)
    gen_s = time.perf_counter() - t0
    rmap = ReducedMap(folder)
    results: List[dict] = []
    index_dir = folder / "indexes"
    open_files: Dict[str, Path] = {}
    open_n = max(n for n in sizes if n <= 100_000)
    for n in sizes:
        exact: Dict[int, np.ndarray] = {}
        prev = None
        for cfg in index_configs(n, quick):
            d = cfg["d"]
            q, targets = rmap.queries(n, d)
            rss0 = rss_mb()
            if cfg.get("mmap_refine") and prev is not None and prev[0] == (cfg["factory"], d):
                _, base, build_s, path, mb = prev          # same IVF-PQ index, re-scored
                index = MmapRescored(base, rmap, d)
            else:
                index, build_s, path, mb = build(cfg, rmap, n, index_dir)
            prev = ((cfg["factory"], d), index, build_s, path, mb) if "PQ" in cfg["factory"] else None
            rss1 = rss_mb()
            entry = {"n": n, "name": cfg["name"], "factory": cfg["factory"], "d": d,
                     "build_s": build_s, "index_mb": mb, "rss_delta_mb": rss1 - rss0, "points": []}
            for params in cfg["sweep"]:
                res, I = search_eval(index, params, q, targets, exact.get(d))
                if cfg["factory"] == "Flat":
                    exact[d] = I
                    res.update({"recall@1": 1.0, "recall@10": 1.0})
                entry["points"].append(res)
            exact_place = None
            for r in results + [entry]:
                if r["n"] == n and r["factory"] == "Flat" and r["d"] == d:
                    exact_place = r["points"][0]["place_R@1"]
            for p in entry["points"]:
                p["place_R@1_ratio_to_exact"] = (p["place_R@1"] / exact_place) if exact_place else None
            results.append(entry)
            print(f"[index] n={n} {cfg['name']}: build {build_s:.1f}s, {mb:.0f} MB, "
                  + "; ".join(f"{p['params'] or '-'}: {p['ms_per_query']:.2f} ms R1 {p.get('recall@1', 0):.3f}"
                              for p in entry["points"]), flush=True)
            if n == open_n and cfg["name"] in ("Flat@512", f"IVF{nlist_for(n)},SQ8@256"):
                open_files[cfg["name"]] = path
            del index
        prev = None
    fidelity = pca_fidelity(rmap)
    pca = faiss.read_VectorTransform(str(folder / "pca.faissmatrix"))
    x1 = np.random.default_rng(0).standard_normal((1, pca.d_in)).astype(np.float32)
    faiss.omp_set_num_threads(1)
    proj_ms = 1000 * median(time_calls(lambda: pca.apply_py(x1), 50, warmup=3))
    faiss.omp_set_num_threads(2)
    opened = open_times(rmap, open_n, open_files, folder / "open_test")
    plot_tradeoff(results, out / "index_tradeoff.png")
    # best configuration per size under the goals: <= 2 GB, <= 10 ms, place R@1 >= 0.98 of exact
    best = {}
    for n in sizes:
        cands = []
        for r in results:
            if r["n"] != n:
                continue
            for p in r["points"]:
                ok = (r["index_mb"] <= 2048 and p["ms_per_query"] <= 10
                      and p.get("recall@1", 0) >= 0.98 and (p["place_R@1_ratio_to_exact"] or 0) >= 0.98)
                if ok:
                    cands.append((p["ms_per_query"], r["name"], p["params"], r["index_mb"],
                                  p.get("recall@1"), p["place_R@1_ratio_to_exact"]))
        best[n] = sorted(cands)[0] if cands else None
    return {"sizes": sizes, "cache": str(folder), "generation_s": gen_s,
            "synthetic": rmap.meta, "results": results, "pca_fidelity": fidelity,
            "open_100k": opened, "pca_projection_ms_per_query": proj_ms, "best_under_goals": best, "peak_rss_mb": peak_rss_mb(),
            "faiss_threads": faiss.omp_get_max_threads()}


def markdown(res: dict) -> str:
    lines = ["## Map scale (FAISS)", "",
             "Synthetic 10752-D descriptors (route-structured; see benchmarks/synthetic_map.py), "
             "PCA to d, L2-normalised. recall@k = agreement with exact Flat search on the same "
             "d-dim vectors; place R@1 = true place within +-2 places; ms = median single-query "
             "latency with 1 FAISS thread (PCA projection of the query not included, see below).", ""]
    rows = []
    for r in res["results"]:
        for p in r["points"]:
            rows.append([f"{r['n']:,}", r["name"], p["params"] or "-", fmt(p["ms_per_query"], 3),
                         fmt(p.get("recall@1"), 3), fmt(p.get("recall@10"), 3),
                         fmt(p["place_R@1"], 3), fmt(p["place_R@1_ratio_to_exact"], 3),
                         fmt(r["index_mb"], 0), fmt(r["build_s"], 1)])
    lines.append(md_table(["places", "index", "params", "ms/query", "recall@1", "recall@10",
                           "place R@1", "ratio to exact", "index MB", "build s"], rows))
    lines += ["", f"Projecting a 10752-D query to PCA-512 (faiss.PCAMatrix, 1 thread) adds "
              f"{res['pca_projection_ms_per_query']:.2f} ms per query.", ""]
    lines += ["", "Best configuration per size under the goals (<= 2 GB, <= 10 ms, recall >= 0.98 of exact):", ""]
    for n, b in res["best_under_goals"].items():
        lines.append(f"- {int(n):,} places: " + (f"{b[1]} {b[2]}: {b[0]:.2f} ms, {b[3]:.0f} MB, "
                                                  f"recall@1 {fmt(b[4], 3)}, place ratio {fmt(b[5], 3)}"
                                                  if b else "none met all goals"))
    lines += ["", "PCA fidelity (exact search in PCA space vs exact search on the full 10752-D vectors):", ""]
    lines.append(md_table(["d", "places", "place R@1 (PCA)", "place R@1 (10752-D)", "top-1 same as 10752-D", "top-10 overlap"],
                          [[f["d"], f["places"], fmt(f["place_R@1"], 3), fmt(f["fullD_place_R@1"], 3),
                            fmt(f["vs_fullD_recall@1"], 3), fmt(f["vs_fullD_recall@10"], 3)]
                           for f in res["pca_fidelity"]]))
    o = res["open_100k"]
    lines += ["", f"Opening a {o['places']:,}-place map (page cache dropped first, best effort):", ""]
    rows = [[name, fmt(v["file_mb"], 0), fmt(v.get("read_open_s"), 3), fmt(v.get("mmap_open_s"), 3),
             fmt(v.get("mmap_ifc_open_s"), 3), fmt(v.get("mmap_ifc_first_query_s"), 3),
             "; ".join(v[k] for k in ("mmap_error", "mmap_ifc_error") if k in v)]
            for name, v in o["indexes"].items()]
    lines.append(md_table(["index", "file MB", "read_index s", "IO_FLAG_MMAP s", "IO_FLAG_MMAP_IFC s",
                           "first query after MMAP_IFC s", "note"], rows))
    lines.append(f"\nnp.load(mmap_mode='r') of the {o['descriptors_file_gb']:.1f} GB {o['places']:,}x10752 "
                 f"float32 descriptor matrix: {o['descriptors_mmap_open_s'] * 1000:.1f} ms; reading 20 random "
                 f"rows: {o['descriptors_read_20_random_rows_s'] * 1000:.1f} ms.")
    lines.append("\n![trade-off](index_tradeoff.png)\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    a = ap.parse_args()
    res = run(a.quick, a.out, a.cache)
    write_json(a.out / "index.json", res)
    print(markdown(res))


if __name__ == "__main__":
    main()
