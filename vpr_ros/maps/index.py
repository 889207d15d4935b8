"""FAISS search index over L2-normalised global descriptors (inner product = cosine).

The index is described by a FAISS factory string (docs/maps.md lists good choices):

* ``Flat`` (default): exact search, no training, the right choice up to ~1e5-1e6 places.
* ``PCA256,Flat`` / ``PCAW256,Flat``: project to 256 dimensions (W = whitening) first.
  A ``L2norm`` step is inserted after every PCA so inner product stays cosine similarity.
* ``HNSW32``: graph search, fast for big maps, no training.
* ``IVF1024,PQ64``, ``OPQ64,IVF256,PQ64``: compressed, for millions of places; need
  at least as many training vectors as clusters (the map's own descriptors train them).

``pca_dim`` is a shortcut that prefixes ``PCA<n>,`` to the factory string.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..errors import DeviceError, MapError

log = logging.getLogger(__name__)
# FAISS logs its CPU-feature probing (AVX512/AVX2 fallbacks) at INFO: noise for users.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

DEFAULT_FACTORY = "Flat"
MMAP_MIN_BYTES = 256 << 20      # memory-map index files larger than this when FAISS can
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
DEFAULT_MAX_TRAIN = 65536       # training sample of a trained index (PCA, IVF, PQ)
ADD_BLOCK = 16384               # rows converted to float32 and added at a time

_PCA_RE = re.compile(r"^(PCAW?R?)(\d+)$")


def normalized_factory(factory: str, pca_dim: Optional[int] = None) -> str:
    """Apply the ``pca_dim`` shortcut and put ``L2norm`` after PCA steps."""
    factory = (factory or DEFAULT_FACTORY).replace(" ", "")
    parts = [p for p in factory.split(",") if p]
    if not parts:
        raise MapError("empty index factory string")
    if pca_dim is not None:
        if pca_dim < 1:
            raise MapError(f"--pca-dim must be >= 1, got {pca_dim}")
        if any(_PCA_RE.match(p) for p in parts):
            raise MapError(f"--pca-dim {pca_dim} given but the factory {factory!r} already "
                           "has a PCA step")
        parts.insert(0, f"PCA{pca_dim}")
    out = []
    for i, part in enumerate(parts):
        out.append(part)
        if _PCA_RE.match(part) and (i + 1 >= len(parts) or parts[i + 1] != "L2norm"):
            out.append("L2norm")
    return ",".join(out)


def _min_training_vectors(factory: str) -> Tuple[int, str]:
    """The number of training vectors the factory needs at least, and why."""
    need, why = 1, ""
    for part in factory.split(","):
        m = re.match(r"^IVF(\d+)", part)
        if m and int(m.group(1)) > need:
            need, why = int(m.group(1)), f"{part} has {m.group(1)} clusters"
        m = re.match(r"^(?:PQ|OPQ)(\d+)(?:x(\d+))?", part)
        if m:
            bits = int(m.group(2)) if m.group(2) else 8
            if 2 ** bits > need:
                need, why = 2 ** bits, f"{part} trains {2 ** bits} centroids per sub-quantizer"
        m = _PCA_RE.match(part)
        if m and int(m.group(2)) > need:
            need = int(m.group(2))
            why = f"{part} needs at least {m.group(2)} vectors for its components"
    return need, why


def build_index(descriptors: np.ndarray, factory: str = DEFAULT_FACTORY,
                pca_dim: Optional[int] = None, max_train: int = DEFAULT_MAX_TRAIN):
    """Create, train (on the map's own descriptors) and fill an inner-product index.

    ``descriptors`` may be a memory-mapped float16/float32 array: it is converted to
    float32 and added ``ADD_BLOCK`` rows at a time, never copied whole (a million
    SciceVPR-B descriptors are 43 GB as float32).  A trained index (PCA, IVF, PQ) is
    trained on all rows up to ``max_train``, else on ``max_train`` rows drawn evenly
    at random with a fixed seed (the same map gives the same index).

    Returns (index, info) where info is the manifest's ``index`` section.
    """
    import faiss

    shape = tuple(getattr(descriptors, "shape", np.shape(descriptors)))
    if len(shape) != 2 or shape[0] == 0:
        raise MapError(f"cannot build an index from descriptors of shape {shape}")
    n, dim = shape
    spec = normalized_factory(factory, pca_dim)
    for part in spec.split(","):
        m = _PCA_RE.match(part)
        if m and int(m.group(2)) > dim:
            raise MapError(f"index {spec!r}: {part} projects to more dimensions than the "
                           f"descriptors have ({dim})")
    try:
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise MapError(f"invalid index factory string {spec!r}: {reason} "
                       "(examples: Flat, PCA256,Flat, HNSW32, IVF1024,PQ64)") from None
    trained = not index.is_trained
    if trained:
        need, why = _min_training_vectors(spec)
        if n < need:
            raise MapError(
                f"index {spec!r} cannot be trained on {n} places: {why}, so it needs at least "
                f"{need} descriptors. Use --index Flat (exact) or HNSW32 for a map this small, "
                "or a smaller IVF/PQ setting")
        rows = (np.arange(n) if n <= max_train else
                np.sort(np.random.default_rng(0).choice(n, int(max_train), replace=False)))
        sample = np.ascontiguousarray(descriptors[rows], dtype=np.float32)
        try:
            index.train(sample)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1]
            raise MapError(f"training index {spec!r} on {len(sample)} descriptors failed: "
                           f"{reason}") from None
        del sample
    for start in range(0, n, ADD_BLOCK):
        index.add(np.ascontiguousarray(descriptors[start:start + ADD_BLOCK], dtype=np.float32))
    tune_search(index)
    info = {"factory": spec, "metric": "inner_product", "trained": bool(trained),
            "pca_dim": _pca_dim(spec), "ntotal": int(index.ntotal)}
    if trained:
        info["train_size"] = int(min(n, max_train))
    return index, info


def _pca_dim(spec: str) -> Optional[int]:
    for part in spec.split(","):
        m = _PCA_RE.match(part)
        if m:
            return int(m.group(2))
    return None


def tune_search(index, nprobe: int = DEFAULT_NPROBE, ef_search: int = DEFAULT_EF_SEARCH) -> None:
    """Search-time settings that are not stored in the file: IVF nprobe, HNSW efSearch."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(nprobe, ivf.nlist)
    except (RuntimeError, AttributeError):
        pass
    inner = index
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = max(ef_search, inner.hnsw.efSearch)


def write_index(index, path: Path) -> None:
    """faiss.write_index; its write errors (a RuntimeError) become one OutputError line."""
    import faiss
    import shutil

    from ..errors import OutputError

    try:
        faiss.write_index(_to_cpu(index), str(path))
    except RuntimeError as exc:
        try:
            free = f"{shutil.disk_usage(Path(path).parent).free / 1e6:.1f} MB free"
        except OSError:
            free = "free space unknown"
        reason = (str(exc).strip().splitlines() or ["write error"])[-1]
        raise OutputError(f"cannot write {path}: FAISS write failed ({reason}; {free}); the "
                          "disk may be full or the folder not writable") from None


def read_index(path: Path, mmap: Optional[bool] = None):
    """Read an index file; big files are memory-mapped when the index type allows it."""
    import faiss

    path = Path(path)
    if not path.is_file():
        raise MapError(f"map {path.parent} is incomplete: {path.name} is missing; rebuild the "
                       "map with `vpr map build`")
    if mmap is None:
        mmap = path.stat().st_size >= MMAP_MIN_BYTES
    try:
        if mmap:
            try:
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                index = faiss.read_index(str(path))
        else:
            index = faiss.read_index(str(path))
    except (RuntimeError, MemoryError, OverflowError) as exc:
        reason = " ".join(((str(exc).strip().splitlines() or ["unreadable"])[-1]).split())
        raise MapError(f"map {path.parent}: {path.name} is corrupt (FAISS: {reason}); rebuild "
                       "the map with `vpr map build`") from None
    tune_search(index)
    return index


def _to_cpu(index):
    import faiss

    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


def faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def place_index_on_device(index, device: str = "auto"):
    """Move the index to a GPU when asked (or "auto" and possible); otherwise keep it on CPU.

    Returns (index, "cpu" | "cuda:N").  Asking for CUDA without a GPU build of FAISS
    falls back to CPU with a log line (search on CPU is still exact); asking for a GPU
    that torch does not see raises DeviceError.
    """
    import faiss

    device = (device or "auto").lower()
    if device == "cpu":
        log.info("FAISS index on CPU")
        return index, "cpu"
    want_gpu = device.startswith("cuda")
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if want_gpu and not cuda:
        raise DeviceError(f"device {device!r} requested but CUDA is not available; "
                          "use --device cpu")
    if cuda and faiss_has_gpu():
        gpu_id = int(device.split(":")[1]) if ":" in device else 0
        res = faiss.StandardGpuResources()
        try:
            gpu_index = faiss.index_cpu_to_gpu(res, gpu_id, index)
        except RuntimeError as exc:
            log.info("FAISS index stays on CPU (GPU copy not supported: %s)",
                     str(exc).strip().splitlines()[-1])
            return index, "cpu"
        gpu_index.referenced_resources = res   # keep the resources alive with the index
        log.info("FAISS index on GPU cuda:%d", gpu_id)
        return gpu_index, f"cuda:{gpu_id}"
    log.info("FAISS index on CPU (%s)", "faiss-cpu build" if cuda else "no CUDA")
    return index, "cpu"


def search(index, descriptors: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search -> (similarities (Q,k) float32, indices (Q,k) int64).

    k is clipped to the number of places. Approximate indexes (IVF, HNSW) may return
    fewer than k hits: those slots hold index -1 and similarity -inf or a FAISS sentinel.
    """
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.shape[1] != index.d:
        raise MapError(f"query descriptors have dimension {x.shape[1]}, the map index {index.d}")
    k = int(max(1, min(k, index.ntotal)))
    sims, ids = index.search(x, k)
    return sims.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)
