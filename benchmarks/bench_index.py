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
  ``IO_FLAG_MMAP`` and ``np.load(mmap_mode="r")`` of the 10752-D descriptor matrix;
* the package's real path on a complete 100k-place map folder (``map_open_times``, not
  with --quick): ``PlaceMap.open`` per verify mode with the page cache dropped, RSS,
  first / steady search, first ``Localizer.localize``, LocalizerNode configure+activate.

Run: ``python benchmarks/bench_index.py [--quick] [--out benchmarks/results]``
Only the map-open part: ``python benchmarks/bench_index.py --only-open [--open-places N]
[--no-node]`` (writes <out>/index_map_open.json; needs ~3 GB free under --cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (DEFAULT_CACHE, DEFAULT_OUT, REPO_ROOT, fmt, md_table, median,
                               peak_rss_mb, rss_mb, save_figure, set_threads, time_calls,
                               write_json)
from benchmarks.synthetic_map import ReducedMap, agreement_recall, build_cache, place_recall

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


# --------------------------------------------------------------------------- real map open

MAP_OPEN_CARD = "scicevpr_b"                  # 10752-D descriptors, random weights (seed 0)
MAP_OPEN_FACTORY = "PCA256,IVF1024,Flat"      # docs/performance.md: the 100k-place choice
MAP_OPEN_BLOCK = 2500                         # rows generated / written / added at a time
MAP_OPEN_PCA_TRAIN = 2048                     # PCA trained on this many places (n < dim: Gram)
MAP_OPEN_IVF_TRAIN = 20_000                   # IVF k-means trained on this many places
MAP_OPEN_BASELINE = 2_000                     # small map of the same kind, for node start-up


def _status_mb(key: str) -> float:
    """A field of /proc/self/status in MB (VmRSS, RssAnon, RssFile, ...)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _map_files(folder: Path) -> List[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file())


def _cached_mb(paths: List[Path]) -> Optional[float]:
    """MB of these files in the page cache (util-linux ``fincore``), None if unavailable."""
    import subprocess
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              *map(str, paths)], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return None
        return sum(int(v) for v in out.stdout.split()) / 2 ** 20
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _evict_map(folder: Path) -> Optional[float]:
    """Drop every file of the map from the page cache; returns the MB still cached."""
    files = _map_files(folder)
    for p in files:
        _evict(p)
    return _cached_mb(files)


def write_synthetic_map(folder: Path, n: int, describer, factory: str = MAP_OPEN_FACTORY,
                        block: int = MAP_OPEN_BLOCK) -> dict:
    """Write a complete n-place vpr_ros map without describing any image.

    Same files and manifest as ``vpr_ros.maps.builder.build_map`` with
    ``--descriptor-dtype float16 --index <factory>``: descriptors come from the structured
    synthetic generator (benchmarks/synthetic_map.py, 10752-D, unit length) and are
    streamed to descriptors.npy block by block; the index is trained on a subsample of
    the map's own (float16-rounded) descriptors, because ``build_index`` trains on all of
    them (4.3 GB float32 at 100k) and then all n are added block by block.  The model
    section is the describer's, so ``PlaceMap.open_for`` / the node accept the map.
    """
    import faiss
    from tqdm import tqdm

    from synthetic_map import SyntheticPlaces, SyntheticSpec
    from vpr_ros.atomic import atomic_directory, atomic_write_json
    from vpr_ros.maps import format as mfmt
    from vpr_ros.maps.builder import _created
    from vpr_ros.maps.index import _pca_dim, normalized_factory, tune_search, write_index
    from vpr_ros.maps.place_map import model_section

    dim = int(describer.dim)
    gen = SyntheticPlaces(SyntheticSpec(dim=dim))
    n_ivf = min(n, MAP_OPEN_IVF_TRAIN)
    train_rows = np.unique(np.linspace(0, n - 1, n_ivf).round().astype(np.int64))
    stats: dict = {"places": n, "dim": dim, "descriptor_dtype": "float16", "block": block}
    manifest = {"format_version": mfmt.FORMAT_VERSION,
                "created": _created("benchmarks/bench_index.py map_open_times (synthetic)"),
                "model": model_section(describer)}
    t_all = time.perf_counter()
    with atomic_directory(folder, overwrite=True) as tmp:
        # 1. descriptors, streamed; keep the IVF training rows as they are stored (float16)
        t0 = time.perf_counter()
        train = np.empty((len(train_rows), dim), np.float32)
        filled = 0
        with mfmt.NpyAppender(tmp / mfmt.DESCRIPTORS_NPY, np.float16, (dim,)) as out, \
                tqdm(total=n, desc="synthetic map descriptors", unit="place") as bar:
            for start in range(0, n, block):
                stop = min(n, start + block)
                x16 = gen.places(start, stop).astype(np.float16)
                out.append(x16)
                sel = train_rows[(train_rows >= start) & (train_rows < stop)]
                train[filled:filled + len(sel)] = x16[sel - start]
                filled += len(sel)
                bar.update(stop - start)
        stats["descriptors_write_s"] = time.perf_counter() - t0
        # 2. index: PCA on a small spread subsample, IVF on n_ivf rows, then add all n
        t0 = time.perf_counter()
        spec = normalized_factory(factory)
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        pre = faiss.downcast_index(index)
        n_pca = 0
        if isinstance(pre, faiss.IndexPreTransform):
            first = faiss.downcast_VectorTransform(pre.chain.at(0))
            if isinstance(first, faiss.PCAMatrix):
                pick = np.linspace(0, len(train) - 1, min(len(train), MAP_OPEN_PCA_TRAIN)).round()
                pca_x = train[np.unique(pick.astype(np.int64))]
                first.train(pca_x)                 # IndexPreTransform.train keeps it as is
                n_pca = len(pca_x)
                del pca_x
        index.train(train)
        del train
        stats["index_train_s"] = time.perf_counter() - t0
        stats["pca_training_places"], stats["ivf_training_places"] = n_pca, n_ivf
        t0 = time.perf_counter()
        stored = np.load(tmp / mfmt.DESCRIPTORS_NPY, mmap_mode="r")
        for start in tqdm(range(0, n, block), desc="adding to index", unit="block"):
            index.add(np.asarray(stored[start:start + block], dtype=np.float32))
        del stored
        tune_search(index)
        write_index(index, tmp / mfmt.INDEX_FAISS)
        stats["index_add_s"] = time.perf_counter() - t0
        # 3. places table and manifest, in the layout of builder._finish
        L = gen.spec.route_len
        i = np.arange(n)
        positions = np.c_[5.0 * (i % L), 200.0 * (i // L), np.zeros(n)]
        places = mfmt.PlaceTable(i.astype(np.int64), [f"synthetic_{k:06d}.jpg" for k in i],
                                 positions, np.tile([0.0, 0.0, 0.0, 1.0], (n, 1)),
                                 np.full(n, -1, np.int64), "map")
        places.write(tmp)
        manifest["index"] = {"factory": spec, "metric": "inner_product", "trained": True,
                             "pca_dim": _pca_dim(spec), "ntotal": int(index.ntotal)}
        manifest["counts"] = {"places": n}
        manifest["frame_id"] = places.frame_id
        manifest["descriptors"] = {"file": mfmt.DESCRIPTORS_NPY, "dtype": "float16",
                                   "shape": [n, dim]}
        manifest["local_features"] = {"present": False}
        t0 = time.perf_counter()
        manifest["files"] = mfmt.file_checksums(tmp)
        stats["checksums_s"] = time.perf_counter() - t0
        atomic_write_json(tmp / mfmt.MANIFEST, manifest)
        mfmt.usual_permissions(tmp)
        del index
    stats["total_s"] = time.perf_counter() - t_all
    stats["index_factory"] = manifest["index"]["factory"]
    stats["files_mb"] = {name: info["bytes"] / 2 ** 20 for name, info in manifest["files"].items()}
    return stats


_FRESH_PROCESS_OPEN = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import faiss
from vpr_ros.maps import PlaceMap
t1 = time.perf_counter()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
before = {"rss_before_open_mb": status("VmRSS"), "rss_anon_before_open_mb": status("RssAnon")}
pm = PlaceMap.open(sys.argv[1], verify="size", device="cpu")
t2 = time.perf_counter()
q = np.load(sys.argv[2])
pm.search(q[:1], 10)
t3 = time.perf_counter()
print(json.dumps({**before, "import_s": t1 - t0, "open_s": t2 - t1, "first_search_s": t3 - t2,
                  "rss_mb": status("VmRSS"), "rss_anon_mb": status("RssAnon"),
                  "rss_file_mb": status("RssFile"), "peak_rss_mb": status("VmHWM")}))
"""


def _timed_open(folder: Path, verify: str, cold: bool, **kw) -> dict:
    """One PlaceMap.open (device cpu, as the node) with RSS around it; map closed again."""
    import gc

    from vpr_ros.maps import PlaceMap
    gc.collect()
    res = {"verify": verify, "cold": cold, **{k: str(v) for k, v in kw.items()}}
    if cold:
        res["cached_mb_before"] = _evict_map(folder)
    rss0, anon0, file0 = rss_mb(), _status_mb("RssAnon"), _status_mb("RssFile")
    t0 = time.perf_counter()
    pm = PlaceMap.open(folder, verify=verify, device="cpu", **kw)
    res["open_s"] = time.perf_counter() - t0
    res["rss_delta_mb"] = rss_mb() - rss0
    res["rss_anon_delta_mb"] = _status_mb("RssAnon") - anon0
    res["rss_file_delta_mb"] = _status_mb("RssFile") - file0
    res["descriptors_is_memmap"] = isinstance(pm.descriptors, np.memmap)
    del pm
    gc.collect()
    return res


def _node_ready_times(folder: Path, card_path: Path) -> dict:
    """LocalizerNode on the map: trigger_configure + trigger_activate, map cache dropped."""
    import random
    import threading

    os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(110, 200)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vpr_ros.inference import GlobalDescriber
    from vpr_ros.ros.localizer_node import LocalizerNode

    out: dict = {}
    # the model alone, right before, with everything imported: the node builds the same
    t0 = time.perf_counter()
    d = GlobalDescriber(str(card_path), device="cpu", batch_size=1)
    out["model_load_s"] = time.perf_counter() - t0
    del d
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(os.environ["ROS_DOMAIN_ID"]))
    try:
        params = {"map_path": str(folder), "device": "cpu", "autostart": False,
                  "model": str(card_path)}
        node = LocalizerNode(context=context,
                             parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        ex = MultiThreadedExecutor(num_threads=2, context=context)
        ex.add_node(node)
        th = threading.Thread(target=ex.spin, daemon=True)
        th.start()
        out["cached_mb_before"] = _evict_map(folder)
        rss0 = rss_mb()
        t0 = time.perf_counter()
        ok = node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        out["configure_s"] = time.perf_counter() - t0
        if not ok:
            out["error"] = node.configure_error
        else:
            t0 = time.perf_counter()
            ok = node.trigger_activate() == TransitionCallbackReturn.SUCCESS
            out["activate_s"] = time.perf_counter() - t0
            out["ready_s"] = out["configure_s"] + out["activate_s"]
            out["state"] = node.state_label
            out["map_size"] = node.info.get("map_size")
        out["rss_delta_mb"] = rss_mb() - rss0
        out["configure_minus_model_load_s"] = out["configure_s"] - out["model_load_s"]
        ex.shutdown(timeout_sec=5)
        node._stop_worker()
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
    return out


def _node_process_ready(folder: Path, card_path: Path, timeout_s: float = 300.0) -> dict:
    """A fresh ``python -m vpr_ros.ros.localizer_node`` (autostart) on the map, cache dropped:
    seconds from process start to its "active" log line, including every import."""
    import re
    import signal
    import subprocess
    import sys
    import threading

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
           "RCUTILS_LOGGING_BUFFERED_STREAM": "0"}
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("ROS_DOMAIN_ID", str(110 + os.getpid() % 90))
    cmd = [sys.executable, "-m", "vpr_ros.ros.localizer_node", "--ros-args",
           "-p", f"map_path:={folder}", "-p", f"model:={card_path}", "-p", "device:=cpu"]
    out: dict = {"cached_mb_before": _evict_map(folder)}
    lines: List[tuple] = []
    active = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)

    def reader():
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))
            if "active: listening" in line:
                active.set()
        active.set()                            # process ended: stop waiting
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        active.wait(timeout_s)
        hit = [t for t, s in lines if "active: listening" in s]
        if hit:
            out["process_ready_s"] = hit[0]
            for t, s in lines:
                m = re.search(r"configured in ([0-9.]+) s", s)
                if m:
                    out["log_configured_in_s"] = float(m.group(1))
                    out["configured_log_at_s"] = t
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                for key in ("VmRSS", "RssAnon", "RssFile"):
                    m = re.search(rf"^{key}:\s+(\d+)", status, re.M)
                    if m:
                        out[f"{key}_mb"] = int(m.group(1)) / 1024.0
            except OSError:
                pass
        else:
            out["error"] = "no 'active' line: " + " | ".join(s for _, s in lines[-5:])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        th.join(5)
    return out


def _summarize_process_runs(runs: List[dict]) -> dict:
    ok = [r for r in runs if "process_ready_s" in r]
    res: dict = {"runs": runs}
    if not ok:
        res["error"] = runs[-1].get("error") if runs else "no runs"
        return res
    ready = [r["process_ready_s"] for r in ok]
    res.update({"process_ready_s": median(ready), "process_ready_s_min": min(ready),
                "process_ready_s_max": max(ready),
                "log_configured_in_s": median([r.get("log_configured_in_s", float("nan")) for r in ok]),
                "VmRSS_mb": ok[-1].get("VmRSS_mb"), "RssAnon_mb": ok[-1].get("RssAnon_mb")})
    return res


def map_open_times(n: int = 100_000, work: Optional[Path] = None, node: bool = True,
                   repeats: int = 5, keep: bool = False) -> dict:
    """Open a complete n-place map the way the package does, and answer the first query.

    Writes a real map folder (``write_synthetic_map``, float16 10752-D descriptors,
    PCA256 + IVF1024 index) under ``work``, then times with the page cache of the map's
    files dropped first: ``PlaceMap.open`` with verify size / full / none (and the index
    memory-mapped), RSS around the open, a fresh Python process that imports the package
    and opens the map, the first and steady-state ``search`` of a 10752-D query, the first
    ``Localizer.localize`` answer, the LocalizerNode's configure + activate in this process
    and a fresh node process's time to "active" (imports included).  The
    multi-GB folder is deleted at the end unless ``keep``.
    """
    import shutil
    import subprocess
    import sys
    import tempfile

    import faiss

    from synthetic_map import SyntheticPlaces, SyntheticSpec, place_recall
    from bench_descriptors import random_card
    from vpr_ros.inference import GlobalDescriber
    from vpr_ros.localizer import Localizer
    from vpr_ros.maps import PlaceMap
    from vpr_ros.maps import format as mfmt
    from vpr_ros.maps.index import read_index
    from vpr_ros.models.cards import write_card
    from vpr_ros.preprocess import load_image

    work = Path(work) if work is not None else Path(tempfile.gettempdir()) / "vpr_bench_map_open"
    work.mkdir(parents=True, exist_ok=True)
    folder = work / f"map_{n}"
    usage = shutil.disk_usage(work)
    need = n * 10752 * 2 * 1.2 + (1 << 30)
    if usage.free < need:
        raise RuntimeError(f"{work}: {usage.free / 2 ** 30:.1f} GB free, the {n}-place map "
                           f"needs about {need / 2 ** 30:.1f} GB")
    out: dict = {"places": n, "card": MAP_OPEN_CARD, "work": str(work),
                 "faiss_threads": faiss.omp_get_max_threads()}
    try:
        card_path = work / f"{MAP_OPEN_CARD}_seed0.yaml"
        write_card(random_card(MAP_OPEN_CARD).replace(weights=None), card_path)
        t0 = time.perf_counter()
        describer = GlobalDescriber(str(card_path), device="cpu", batch_size=1)
        out["model_load_first_s"] = time.perf_counter() - t0
        out["build"] = write_synthetic_map(folder, n, describer)
        print(f"[open] wrote {n}-place map in {out['build']['total_s']:.0f} s: "
              + ", ".join(f"{k} {v:.0f} MB" for k, v in out["build"]["files_mb"].items()), flush=True)
        gen = SyntheticPlaces(SyntheticSpec(dim=describer.dim))
        targets = np.random.default_rng(3).choice(n, 50, replace=False)
        queries = gen.queries(targets, tag=7).astype(np.float32)
        qfile = work / "queries.npy"
        np.save(qfile, queries)

        # --- PlaceMap.open per verify mode, cold (cache dropped) and warm, interleaved
        opens: List[dict] = []
        for r in range(repeats):
            opens.append(_timed_open(folder, "size", cold=True))
            opens.append(_timed_open(folder, "none", cold=True))
            opens.append(_timed_open(folder, "size", cold=True, mmap_index=True))
            opens.append(_timed_open(folder, "size", cold=False))
        opens.append(_timed_open(folder, "full", cold=True))   # sha256 of 2+ GB: once
        out["opens"] = opens
        summary = {}
        for o in opens:
            key = f"{o['verify']}_{'cold' if o['cold'] else 'warm'}" + \
                  ("_mmap_index" if o.get("mmap_index") == "True" else "")
            summary.setdefault(key, []).append(o["open_s"])
        out["open_median_s"] = {k: median(v) for k, v in summary.items()}
        print("[open] PlaceMap.open median s: " + ", ".join(
            f"{k} {v:.3f}" for k, v in out["open_median_s"].items()), flush=True)

        # --- pieces of the open (cold each): where the time goes
        pieces = {}
        _evict_map(folder)
        t0 = time.perf_counter()
        manifest = mfmt.read_manifest(folder)
        mfmt.verify_files(folder, manifest["files"], "size")
        pieces["manifest_and_size_check_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mfmt.PlaceTable.read(folder)
        pieces["places_table_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        np.load(folder / mfmt.DESCRIPTORS_NPY, mmap_mode="r")
        pieces["descriptors_mmap_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_index(folder / mfmt.INDEX_FAISS)
        pieces["index_read_s"] = time.perf_counter() - t0
        out["open_pieces_cold_s"] = pieces

        # --- a fresh process: imports + open + first search, and its RSS
        _evict_map(folder)
        proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_OPEN, str(folder), str(qfile)],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        if proc.returncode == 0:
            out["fresh_process"] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            out["fresh_process"] = {"error": proc.stderr.strip().splitlines()[-1:]}

        # --- first and steady-state search after a cold open; sanity of the answers
        _evict_map(folder)
        rss0 = rss_mb()
        place_map = PlaceMap.open_for(folder, describer, verify="size", device="cpu")
        out["open_for_rss_delta_mb"] = rss_mb() - rss0
        t0 = time.perf_counter()
        place_map.search(queries[:1], 10)
        out["first_search_s"] = time.perf_counter() - t0
        lat = []
        for i in range(1, len(queries)):
            t0 = time.perf_counter()
            place_map.search(queries[i:i + 1], 10)
            lat.append(time.perf_counter() - t0)
        out["steady_search_ms"] = 1000 * median(lat)
        _, I = place_map.search(queries, 10)
        out["query_place_recall"] = place_recall(I, targets)
        out["rss_after_search_mb"] = rss_mb()
        out["rss_anon_mb"], out["rss_file_mb"] = _status_mb("RssAnon"), _status_mb("RssFile")

        # --- the first Localizer answer on a real image (SciceVPR-B, random weights)
        img_dir = REPO_ROOT / "samples" / "nordland_mini" / "images" / "test" / "queries"
        images = [load_image(p) for p in sorted(img_dir.glob("*.jpg"))[:4]]
        loc = Localizer(place_map, describer, top_k=10)
        t0 = time.perf_counter()
        first = loc.localize(images[0])
        out["first_localize_s"] = time.perf_counter() - t0
        out["first_localize_timings_ms"] = first.timings_ms
        steady = []
        for img in images[1:]:
            t0 = time.perf_counter()
            res = loc.localize(img)
            steady.append(time.perf_counter() - t0)
        out["steady_localize_s"] = median(steady)
        out["steady_localize_timings_ms"] = res.timings_ms
        del loc, place_map
        print(f"[open] first search {out['first_search_s'] * 1000:.1f} ms, steady "
              f"{out['steady_search_ms']:.2f} ms; first localize {out['first_localize_s']:.2f} s",
              flush=True)

        if node:
            try:
                out["node"] = _node_ready_times(folder, card_path)
            except Exception as exc:  # noqa: BLE001 - report, keep the other numbers
                out["node"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"[open] node: {out['node']}", flush=True)
            # fresh node processes, interleaved with the same on a small map of the same
            # kind: the difference is what the map's size costs, the rest is start-up
            targets_proc = {"node_process": folder}
            if n >= 2 * MAP_OPEN_BASELINE:
                small = work / f"map_{MAP_OPEN_BASELINE}"
                out["baseline_build"] = write_synthetic_map(small, MAP_OPEN_BASELINE, describer)
                targets_proc["node_process_baseline"] = small
            runs: Dict[str, List[dict]] = {k: [] for k in targets_proc}
            for _ in range(3):
                for key, path in targets_proc.items():
                    try:
                        runs[key].append(_node_process_ready(path, card_path))
                    except Exception as exc:  # noqa: BLE001
                        runs[key].append({"error": f"{type(exc).__name__}: {exc}"})
                    print(f"[open] {key}: {runs[key][-1]}", flush=True)
            for key, rs in runs.items():
                out[key] = _summarize_process_runs(rs)
                out[key]["places"] = n if key == "node_process" else MAP_OPEN_BASELINE
        out["peak_rss_mb"] = peak_rss_mb()
    finally:
        if not keep:
            for f in (folder, work / f"map_{MAP_OPEN_BASELINE}"):
                shutil.rmtree(f, ignore_errors=True)
                for stale in work.glob(f".{f.name}.*"):
                    shutil.rmtree(stale, ignore_errors=True)
            for f in (work / "queries.npy", work / f"{MAP_OPEN_CARD}_seed0.yaml"):
                f.unlink(missing_ok=True)
            try:
                work.rmdir()
            except OSError:
                pass
    return out


def markdown_map_open(o: dict) -> str:
    b = o["build"]
    lines = [f"### Opening a complete {o['places']:,}-place map (PlaceMap.open, node ready)", "",
             f"A real map folder written with the package's own writers: {o['places']:,} synthetic "
             f"{b['dim']}-D descriptors stored as float16 "
             f"({b['files_mb'].get('descriptors.npy', 0) / 1024:.2f} GB), index "
             f"`{b['index_factory']}` ({b['files_mb'].get('index.faiss', 0):.0f} MB, PCA trained on "
             f"{b['pca_training_places']} places, IVF on {b['ivf_training_places']}), model card "
             f"{o['card']} with random weights (seed 0).  Cold = the map's files dropped from the "
             "page cache first (posix_fadvise DONTNEED, checked with fincore); device cpu.", ""]
    rows = []
    by_key: Dict[str, List[dict]] = {}
    for r in o["opens"]:
        key = (r["verify"], r["cold"], r.get("mmap_index") == "True")
        by_key.setdefault(str(key), []).append(r)
    for runs in by_key.values():
        r0 = runs[0]
        rows.append([r0["verify"] + (" (index mmap)" if r0.get("mmap_index") == "True" else ""),
                     "cold" if r0["cold"] else "warm", len(runs),
                     fmt(median([r["open_s"] for r in runs]), 3),
                     fmt(max(r["open_s"] for r in runs), 3),
                     fmt(r0["rss_delta_mb"], 0), fmt(r0["rss_anon_delta_mb"], 0),
                     fmt(r0.get("cached_mb_before"), 1)])
    lines.append(md_table(["verify", "cache", "runs", "open s (median)", "open s (max)",
                           "RSS +MB (1st run)", "anon +MB", "MB cached before"], rows))
    lines += ["", "RSS +MB is measured in this long-lived process with the map open; the allocator "
              "reuses memory freed by earlier opens, so it understates.  The fresh-process numbers "
              "below are the clean ones (RSS stays flat over repeated open/close: no leak)."]
    p = o["open_pieces_cold_s"]
    lines += ["", "Where a cold `verify=\"size\"` open spends its time: manifest + size check "
              f"{p['manifest_and_size_check_s'] * 1000:.1f} ms, places table (CSV + npy) "
              f"{p['places_table_s'] * 1000:.0f} ms, descriptors np.load(mmap) "
              f"{p['descriptors_mmap_s'] * 1000:.1f} ms, index read {p['index_read_s'] * 1000:.0f} ms."]
    f = o.get("fresh_process", {})
    if "open_s" in f:
        lines += ["", f"A fresh Python process (cold map): `import faiss, vpr_ros.maps` {f['import_s']:.2f} s "
                  "(vpr_ros.maps imports torch through maps.sources -> preprocess), "
                  f"open {f['open_s']:.2f} s, first search {f['first_search_s'] * 1000:.0f} ms; RSS "
                  f"{f['rss_before_open_mb']:.0f} MB after the imports, {f['rss_mb']:.0f} MB after the open ({f['rss_anon_mb']:.0f} MB anonymous, "
                  f"{f['rss_file_mb']:.0f} MB file-backed), i.e. the "
                  f"{b['files_mb'].get('descriptors.npy', 0) / 1024:.1f} GB descriptor file is not read."]
    lines += ["", f"After a cold `open_for`: first search of a 10752-D query "
              f"{o['first_search_s'] * 1000:.1f} ms, steady {o['steady_search_ms']:.2f} ms "
              f"(place R@1 of 50 synthetic queries {fmt(o['query_place_recall'].get('R@1'), 2)}); "
              f"first `Localizer.localize` of an image {o['first_localize_s']:.2f} s, steady "
              f"{o['steady_localize_s']:.2f} s (SciceVPR-B at 224x224 on the CPU dominates).  "
              f"Model construction alone: {o['model_load_first_s']:.1f} s (first, cold imports)."]
    nd = o.get("node")
    if nd:
        if "ready_s" in nd:
            lines += ["", f"LocalizerNode (map_verify size, device cpu, autostart false): configure "
                      f"{nd['configure_s']:.2f} s + activate {nd['activate_s'] * 1000:.0f} ms = active after "
                      f"{nd['ready_s']:.2f} s.  Building the model alone (measured just before, same process) "
                      f"takes {nd['model_load_s']:.2f} s, so configure minus model is "
                      f"{nd['configure_minus_model_load_s']:.2f} s (the map open plus noise: the two are "
                      "timed separately on a shared machine)."]
        else:
            lines += ["", f"LocalizerNode: failed ({nd.get('error')})."]
    for key in ("node_process", "node_process_baseline"):
        npr = o.get(key)
        if not npr:
            continue
        what = (f"A fresh `python -m vpr_ros.ros.localizer_node` process on the {npr['places']:,}-place "
                "map (autostart, cold map")
        if "process_ready_s" in npr:
            lines += ["", what + f", {len(npr['runs'])} runs interleaved with the other map): \"active\" "
                      f"{npr['process_ready_s']:.2f} s (median; {npr['process_ready_s_min']:.2f}-"
                      f"{npr['process_ready_s_max']:.2f}) after the process started; its log says "
                      f"configured in {fmt(npr.get('log_configured_in_s'), 1)} s (the lazy torch/timm "
                      "imports, the model and the map; before that: Python start-up, rclpy and the "
                      f"node module); RSS then {fmt(npr.get('VmRSS_mb'), 0)} MB "
                      f"({fmt(npr.get('RssAnon_mb'), 0)} MB anonymous)."]
        else:
            lines += ["", what + f"): failed ({npr.get('error')})."]
    big, small = o.get("node_process", {}), o.get("node_process_baseline", {})
    if "process_ready_s" in big and "process_ready_s" in small:
        lines += ["", f"So in a fresh node the {big['places']:,}-place map costs "
                  f"{big['process_ready_s'] - small['process_ready_s']:+.2f} s over a "
                  f"{small['places']:,}-place map of the same kind (medians; the rest is start-up)."]
    lines += ["", f"Writing the map: descriptors {b['descriptors_write_s']:.0f} s, index training "
              f"{b['index_train_s']:.0f} s, adding {b['index_add_s']:.0f} s, sha256 of all files "
              f"{b['checksums_s']:.0f} s."]
    return "\n".join(lines)


def plot_tradeoff(results: List[dict], path: Path) -> None:
    from vpr_ros.plotting import pyplot
    plt = pyplot()
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
    map_open = None if quick else map_open_times(100_000, work=cache / "map_open")
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
            "open_100k": opened, "map_open_100k": map_open, "pca_projection_ms_per_query": proj_ms, "best_under_goals": best, "peak_rss_mb": peak_rss_mb(),
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
    if res.get("map_open_100k"):
        lines += ["", markdown_map_open(res["map_open_100k"])]
    lines.append("\n![trade-off](index_tradeoff.png)\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--only-open", action="store_true",
                    help="only write a complete map and time opening it (map_open_times); "
                         "results in <out>/index_map_open.json")
    ap.add_argument("--open-places", type=int, default=100_000,
                    help="places of the map for --only-open (default 100000, 2.2 GB)")
    ap.add_argument("--open-work", type=Path, default=None,
                    help="folder for the temporary map (default <cache>/map_open); deleted after")
    ap.add_argument("--no-node", action="store_true", help="--only-open without the ROS node")
    ap.add_argument("--keep-map", action="store_true", help="do not delete the map afterwards")
    a = ap.parse_args()
    if a.only_open:
        from benchmarks.common import machine_info
        set_threads(2)
        res = {"machine": machine_info(),
               "map_open": map_open_times(a.open_places, work=a.open_work or a.cache / "map_open",
                                          node=not a.no_node, keep=a.keep_map)}
        write_json(a.out / "index_map_open.json", res)
        print(markdown_map_open(res["map_open"]))
        return
    res = run(a.quick, a.out, a.cache)
    write_json(a.out / "index.json", res)
    print(markdown(res))


if __name__ == "__main__":
    main()
