"""Build a map directory from places (MapEntry), or append places to an existing map.

The whole map is written into a temporary sibling folder (vpr_ros.atomic.atomic_directory)
and swapped in at the end: a build that fails or is killed leaves the previous map as
it was.  Images are described in batches and streamed to disk, so memory stays flat.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np

from .. import __version__
from ..atomic import atomic_directory, atomic_write_json, write_lock
from ..errors import DatasetError, MapError
from . import format as fmt
from .index import DEFAULT_FACTORY, build_index, write_index
from .local_store import LocalFeatureWriter, check_local_storage, storage_of
from .place_map import PlaceMap, local_model_section, model_section
from .sources import MapEntry

log = logging.getLogger(__name__)

DEFAULT_BATCH = 16


def _created(command: Optional[str]) -> dict:
    return {"utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "host": platform.node(), "vpr_ros_version": __version__,
            "command": command or "python API"}


def _batched(entries: Iterable[MapEntry], size: int):
    batch: List[MapEntry] = []
    for e in entries:
        batch.append(e)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _loaded_batches(entries: Iterable[MapEntry], size: int, workers: int = 2):
    """(batch, images) pairs; the next batch's images are decoded on ``workers`` threads
    while the current one is described.  At most two batches are in memory; a decoding
    error surfaces when its batch is reached."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="map-load")
    pending = None
    try:
        for batch in _batched(entries, size):
            futures = [pool.submit(e.load) for e in batch]
            if pending is not None:
                yield pending[0], [f.result() for f in pending[1]]
            pending = (batch, futures)
        if pending is not None:
            yield pending[0], [f.result() for f in pending[1]]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_descriptors(desc: np.ndarray, batch: List[MapEntry], dim: int) -> np.ndarray:
    desc = np.asarray(desc, dtype=np.float32)
    if desc.shape != (len(batch), dim):
        raise MapError(f"describer returned shape {desc.shape} for {len(batch)} images, "
                       f"expected ({len(batch)}, {dim})")
    bad = ~np.isfinite(desc).all(axis=1)
    if bad.any():
        raise MapError(f"non-finite descriptor for image {batch[int(np.flatnonzero(bad)[0])].name}")
    return desc


def _describe_into(folder: Path, entries: Iterable[MapEntry], describer, local_extractor,
                   descriptor_dtype: str, batch_size: int, progress: bool, total: Optional[int],
                   first_id: int, frame_id: str, seed_descriptors: Optional[np.ndarray] = None,
                   seed_local=None, local_storage: str = "float16"):
    """Describe entries batch by batch into folder/descriptors.npy (+ local features).

    Returns (places of the new entries, {"rows": rows written in total, "local_unit_norm":
    whether every stored local feature point had length 1, or None without local features}).
    """
    from tqdm import tqdm

    dim = int(describer.dim)
    desc_out = fmt.NpyAppender(folder / fmt.DESCRIPTORS_NPY, descriptor_dtype, (dim,))
    local_out = None
    names, positions, orientations, stamps = [], [], [], []
    bar = tqdm(total=total, desc="describing map images", unit="img", disable=not progress)
    try:
        if seed_descriptors is not None:
            for start in range(0, len(seed_descriptors), 4096):
                desc_out.append(np.asarray(seed_descriptors[start:start + 4096]))
        for batch, images in _loaded_batches(entries, batch_size):
            if local_extractor is not None:
                global_sela, local = local_extractor.extract(images)
                if local_out is None:
                    local_out = LocalFeatureWriter(folder, local_storage, local.shape[1:])
                    if seed_local is not None:
                        local_out.copy_from(seed_local)
                local_out.append(np.asarray(local, dtype=np.float32))
            desc = _check_descriptors(describer.describe(images), batch, dim)
            desc_out.append(desc)
            for e in batch:
                names.append(e.name)
                positions.append(np.asarray(e.position, dtype=np.float64).reshape(3))
                orientations.append(np.asarray(e.orientation, dtype=np.float64).reshape(4))
                stamps.append(int(e.stamp_ns))
            bar.update(len(batch))
    finally:
        bar.close()
        desc_out.close()
        if local_out is not None:
            local_out.close()
    if not names:
        raise DatasetError("no images to put in the map (the source is empty, or keyframe "
                           "selection kept nothing)")
    n = len(names)
    places = fmt.PlaceTable(np.arange(first_id, first_id + n, dtype=np.int64), names,
                            np.array(positions), np.array(orientations),
                            np.array(stamps, dtype=np.int64), frame_id)
    unit = local_out.unit_norm if local_out is not None else None
    return places, {"rows": desc_out.rows, "local_unit_norm": unit}


def _finish(folder: Path, manifest: dict, places: fmt.PlaceTable, factory: str,
            pca_dim: Optional[int], local_extractor, written: Optional[dict] = None) -> dict:
    places.write(folder)
    descriptors = np.load(folder / fmt.DESCRIPTORS_NPY, mmap_mode="r")
    index, info = build_index(descriptors, factory, pca_dim)      # memmap, added in blocks
    write_index(index, folder / fmt.INDEX_FAISS)
    manifest["index"] = info
    manifest["counts"] = {"places": len(places)}
    manifest["frame_id"] = places.frame_id
    manifest["descriptors"] = {"file": fmt.DESCRIPTORS_NPY, "dtype": str(descriptors.dtype),
                               "shape": list(descriptors.shape)}
    if (folder / fmt.LOCAL_FEATURES_NPY).exists():
        local = np.load(folder / fmt.LOCAL_FEATURES_NPY, mmap_mode="r")
        if local.shape[0] != len(places):
            raise MapError(f"local features for {local.shape[0]} places, map has {len(places)}")
        storage = "int8" if local.dtype == np.int8 else "float16"
        section = {"present": True, "file": fmt.LOCAL_FEATURES_NPY, "storage": storage,
                   "shape": list(local.shape), "dtype": str(local.dtype),
                   "bytes_per_place": int(local[:1].nbytes)}
        if storage == "int8":
            section["scales_file"] = fmt.LOCAL_SCALES_NPY
            section["unit_norm"] = bool((written or {}).get("local_unit_norm"))
            section["bytes_per_place"] += int(np.prod(local.shape[1:-1])) * 2
        section["model"] = (manifest.get("local_features", {}).get("model")
                            or local_model_section(local_extractor))
        manifest["local_features"] = section
    else:
        manifest["local_features"] = {"present": False}
    manifest["files"] = fmt.file_checksums(folder)
    atomic_write_json(folder / fmt.MANIFEST, manifest)
    fmt.usual_permissions(folder)
    return manifest


def build_map(places: Iterable[MapEntry], out_dir, describer, local_extractor=None,
              index: str = DEFAULT_FACTORY, pca_dim: Optional[int] = None,
              frame_id: str = "map", overwrite: bool = False, batch_size: int = DEFAULT_BATCH,
              descriptor_dtype: str = "float32", progress: bool = True,
              command: Optional[str] = None, total: Optional[int] = None,
              confidence: Optional[dict] = None, source_info=None,
              local_storage: str = "float16", wait_lock: float = 0.0) -> dict:
    """Describe every place and write a complete map to ``out_dir`` atomically.

    Writers of one map exclude each other (vpr_ros.atomic.write_lock): another writer
    makes this one fail at once with LockedError naming its PID, or wait up to
    ``wait_lock`` seconds.

    ``places`` is any iterable of MapEntry (lists, or a streaming BagSource).  With a
    ``local_extractor`` (SelaVPR LocalFeatureExtractor) the dense local features needed for
    re-ranking are stored too, as float16 (``local_storage="float16"``, exact re-ranking) or
    int8 codes with per-point scales (``"int8"``, half the size; maps/local_store.py).
    ``source_info`` (a dict, or a callable returning one after
    the places were read, e.g. ``BagSource.stats``) is stored as the manifest's ``source``.
    Returns the manifest.
    """
    out_dir = Path(out_dir)
    if descriptor_dtype not in ("float32", "float16"):
        raise MapError(f"descriptor dtype must be float32 or float16, got {descriptor_dtype!r}")
    local_storage = check_local_storage(local_storage)
    with write_lock(out_dir, wait_s=wait_lock, what=f"map {out_dir}"):
        return _build_locked(places, out_dir, describer, local_extractor, index, pca_dim,
                             frame_id, overwrite, batch_size, descriptor_dtype, progress,
                             command, total, confidence, source_info, local_storage)


def _build_locked(places, out_dir: Path, describer, local_extractor, index, pca_dim, frame_id,
                  overwrite, batch_size, descriptor_dtype, progress, command, total,
                  confidence, source_info, local_storage) -> dict:
    from ..atomic import clean_leftovers

    clean_leftovers(out_dir)          # a map left missing by a killed swap comes back first
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MapError(f"{out_dir} already exists; pass --overwrite to replace it or choose "
                       "another folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / fmt.MANIFEST).exists():
        raise MapError(f"{out_dir} exists and is not a vpr_ros map; refusing to replace it")
    if total is None and hasattr(places, "__len__"):
        total = len(places)
    manifest = {"format_version": fmt.FORMAT_VERSION, "created": _created(command),
                "model": model_section(describer)}
    if local_extractor is not None:
        manifest["local_features"] = {"model": local_model_section(local_extractor)}
    if confidence is not None:
        manifest["confidence"] = confidence
    with atomic_directory(out_dir, overwrite=True) as tmp:
        table, written = _describe_into(tmp, places, describer, local_extractor,
                                        descriptor_dtype, batch_size, progress, total, 0,
                                        frame_id, local_storage=local_storage)
        if source_info is not None:
            manifest["source"] = source_info() if callable(source_info) else source_info
        manifest = _finish(tmp, manifest, table, index, pca_dim, local_extractor, written)
    log.info("map %s: %d places, index %s", out_dir, len(table), manifest["index"]["factory"])
    return manifest


def add_to_map(map_dir, places: Iterable[MapEntry], describer, local_extractor=None,
               batch_size: int = DEFAULT_BATCH, progress: bool = True,
               command: Optional[str] = None, total: Optional[int] = None,
               verify="full", source_info=None, wait_lock: float = 0.0) -> dict:
    """Append places to an existing map: only the new images are described, with the map's
    own model (a different model is refused), and the index is rebuilt with the map's
    factory string.  Atomic like build_map; the writer lock is held from reading the old
    map to swapping in the new one, so two concurrent adds never lose an update.
    Returns the new manifest."""
    map_dir = Path(map_dir)
    with write_lock(map_dir, wait_s=wait_lock, what=f"map {map_dir}"):
        return _add_locked(map_dir, places, describer, local_extractor, batch_size, progress,
                           command, total, verify, source_info)


def _add_locked(map_dir: Path, places, describer, local_extractor, batch_size, progress,
                command, total, verify, source_info) -> dict:
    from ..atomic import clean_leftovers

    clean_leftovers(map_dir)
    old = PlaceMap.open_for(map_dir, describer, verify=verify, device="cpu")
    has_local = old.has_local_features
    if has_local and local_extractor is None:
        raise MapError(f"map {map_dir} stores local features for re-ranking: pass the same "
                       "--rerank-model/--rerank-weights so the new places get them too")
    if local_extractor is not None:
        if not has_local:
            raise MapError(f"map {map_dir} has no local features; adding places with local "
                           "features would leave the old ones without; rebuild the map instead")
        old.check_local_extractor(local_extractor)
    manifest = dict(old.manifest)
    descriptor_dtype = manifest.get("descriptors", {}).get("dtype", "float32")
    if total is None and hasattr(places, "__len__"):
        total = len(places)
    first_id = int(old.places.ids.max()) + 1 if len(old.places) else 0
    with atomic_directory(map_dir, overwrite=True) as tmp:
        new_table, written = _describe_into(
            tmp, places, describer, local_extractor if has_local else None, descriptor_dtype,
            batch_size, progress, total, first_id, old.places.frame_id,
            seed_descriptors=old.descriptors, seed_local=old.local_features if has_local else None,
            local_storage=storage_of(old.local_features) or "float16")
        table = old.places.concat(new_table)
        updates = list(manifest.get("updates", []))
        update = {**_created(command), "added_places": len(new_table)}
        if source_info is not None:
            update["source"] = source_info() if callable(source_info) else source_info
        updates.append(update)
        manifest["updates"] = updates
        factory = manifest["index"]["factory"]
        manifest = _finish(tmp, manifest, table, factory, None, local_extractor, written)
    log.info("map %s: added %d places, now %d", map_dir, len(new_table), len(table))
    return manifest


def set_confidence_params(map_dir, params: dict) -> None:
    """Store fitted confidence calibration in the map's manifest (atomic; data untouched)."""
    _update_manifest(map_dir, "confidence", params)


def set_stream_calibration(map_dir, params: dict) -> None:
    """Store the stream localizer's fitted calibration (``stream_calibration``), as above."""
    _update_manifest(map_dir, "stream_calibration", params)


def _update_manifest(map_dir, key: str, value) -> None:
    """Set one manifest key under the map's writer lock (atomic; data files untouched)."""
    with write_lock(map_dir, what=f"map {map_dir}"):
        manifest = fmt.read_manifest(map_dir)
        manifest[key] = value
        atomic_write_json(Path(map_dir) / fmt.MANIFEST, manifest)
        fmt.usual_permissions(Path(map_dir))
