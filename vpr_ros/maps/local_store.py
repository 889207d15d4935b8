"""Dense local features on disk: float16 maps, or int8 codes with a float16 scale per point.

A SelaVPR ViT-L/14 map of one place is 61 x 61 x 128 values: 0.95 MB in float16, which
is what a map stores by default and what the re-ranking reads unchanged (exact counts).
``int8`` storage halves that to 0.48 MB per place (61*61*128 int8 codes + 61*61 float16
scales): every point (one 128-vector) is scaled by its own largest magnitude so that it
uses the full int8 range, ``code = round(x / s)`` with ``s = max|x| / 127`` rounded to
float16 (the stored value, so quantisation and dequantisation use the same ``s``).
SelaVPR's local features are unit vectors; when every stored point was (the manifest's
``unit_norm``), dequantised points are scaled back to unit length, so that a point's own
copy keeps the highest similarity with it (without that, quantisation noise in the
norms lets a neighbouring point out-score it and near-duplicate places lose matches).  It is
lossy: the counts of the mutual-nearest-neighbour re-ranking move by about half a
percent (benchmarks/bench_rerank.py measures the effect on counts and on the re-ranked
order; docs/fast_paths.md has the numbers).

Both are memory-mapped .npy files, read one candidate at a time:

* float16: ``local_features.npy`` (N, H, W, C) float16, opened as a read-only memmap;
* int8: ``local_features.npy`` (N, H, W, C) int8 codes + ``local_scales.npy`` (N, H, W)
  float16, opened as :class:`Int8LocalFeatures`, whose items are dequantised float32 maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import MapError
from . import format as fmt

LOCAL_STORAGES = ("float16", "int8")
INT8_MAX = 127


def check_local_storage(storage: Optional[str]) -> str:
    key = "float16" if storage is None else str(storage).strip().lower()
    if key not in LOCAL_STORAGES:
        raise MapError(f"unknown local feature storage {storage!r}: use one of "
                       f"{', '.join(LOCAL_STORAGES)} (float16 = exact re-ranking counts, "
                       "int8 = half the size, counts change by ~0.5%)")
    return key


def quantize_int8(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(..., C) float features -> (codes (..., C) int8, scales (...) float16).

    Symmetric per-point quantisation; a point of all zeros gets scale 0 and codes 0.
    """
    x = np.asarray(features, dtype=np.float32)
    if not np.isfinite(x).all():
        raise MapError("local features contain NaN or infinity; cannot store them")
    amax = np.abs(x).max(axis=-1)
    scales = (amax / INT8_MAX).astype(np.float16)
    if not np.isfinite(scales).all():
        raise MapError("local feature magnitudes overflow float16 scales (|x| > 8e6)")
    s = scales.astype(np.float32)
    safe = np.where(s > 0, s, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scales


def dequantize_int8(codes: np.ndarray, scales: np.ndarray, unit_norm: bool = False) -> np.ndarray:
    """codes (..., C) int8, scales (...) float16 -> (..., C) float32.

    ``unit_norm``: rescale every non-zero point to length 1 (the scales then cancel out).
    """
    x = np.asarray(codes, dtype=np.float32)
    if unit_norm:
        norm = np.sqrt(np.einsum("...c,...c->...", x, x))
        return x / np.where(norm > 0, norm, 1.0)[..., None]
    return x * np.asarray(scales, dtype=np.float32)[..., None]


def is_unit_norm(features: np.ndarray, tol: float = 1e-3) -> bool:
    """True when every point (last axis) has length 1 within ``tol``."""
    x = np.asarray(features, dtype=np.float32)
    norm = np.sqrt(np.einsum("...c,...c->...", x, x))
    return bool(np.all(np.abs(norm - 1.0) <= tol))


class Int8LocalFeatures:
    """Read-only view of int8 local features: ``store[i]`` is place i's float32 map.

    Indexing with an int, a slice or an index array dequantises only those places, so a
    re-ranking over K candidates touches K maps of the memory-mapped files.
    """

    storage = "int8"

    def __init__(self, codes: np.ndarray, scales: np.ndarray, unit_norm: bool = False):
        if codes.dtype != np.int8 or codes.shape[:-1] != scales.shape:
            raise MapError(f"int8 local features: codes {codes.shape} {codes.dtype} do not "
                           f"match scales {scales.shape} {scales.dtype}")
        self.codes = codes
        self.scales = scales
        self.unit_norm = bool(unit_norm)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.codes.dtype

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __getitem__(self, key) -> np.ndarray:
        return dequantize_int8(self.codes[key], self.scales[key], self.unit_norm)


LocalFeatures = Union[np.ndarray, Int8LocalFeatures]


class PlaceSubset:
    """The maps of some places of a store, read (and dequantised) only when indexed.

    ``PlaceSubset(store, ids)[k]`` is ``store[ids[k]]``: re-ranking K candidates holds one
    float32 map at a time instead of K of them.
    """

    def __init__(self, store: LocalFeatures, ids: Sequence[int]):
        self.store = store
        self.ids = [int(i) for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.store[self.ids[k]]


def storage_of(local: Optional[LocalFeatures]) -> Optional[str]:
    if local is None:
        return None
    return "int8" if isinstance(local, Int8LocalFeatures) else "float16"


class LocalFeatureWriter:
    """Append local features to a map folder in the chosen storage (rows of (H, W, C))."""

    def __init__(self, folder: Path, storage: str, row_shape: Sequence[int]):
        self.storage = check_local_storage(storage)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.unit_norm = True          # every appended point had length 1
        folder = Path(folder)
        if self.storage == "float16":
            self._values = fmt.NpyAppender(folder / fmt.LOCAL_FEATURES_NPY, np.float16,
                                           self.row_shape)
            self._scales = None
        else:
            self._values = fmt.NpyAppender(folder / fmt.LOCAL_FEATURES_NPY, np.int8,
                                           self.row_shape)
            self._scales = fmt.NpyAppender(folder / fmt.LOCAL_SCALES_NPY, np.float16,
                                           self.row_shape[:-1])

    def append(self, block: np.ndarray) -> None:
        """Float features (B, H, W, C) -> stored (quantised when int8)."""
        if self._scales is None:
            self._values.append(np.asarray(block, dtype=np.float16))
        else:
            self.unit_norm = self.unit_norm and is_unit_norm(block)
            codes, scales = quantize_int8(block)
            self._values.append(codes)
            self._scales.append(scales)

    def copy_from(self, local: LocalFeatures, chunk: int = 256) -> None:
        """Copy a whole stored array (an existing map's) without re-quantising it."""
        if storage_of(local) != self.storage:
            raise MapError(f"cannot append {storage_of(local)} local features to a "
                           f"{self.storage} store")
        if self._scales is not None:
            self.unit_norm = self.unit_norm and local.unit_norm
        for start in range(0, len(local), chunk):
            if self._scales is None:
                self._values.append(np.asarray(local[start:start + chunk]))
            else:
                self._values.append(np.asarray(local.codes[start:start + chunk]))
                self._scales.append(np.asarray(local.scales[start:start + chunk]))

    def close(self) -> None:
        self._values.close()
        if self._scales is not None:
            self._scales.close()


def open_local_features(folder: Path, section: dict, n_places: int) -> LocalFeatures:
    """Memory-map a map's local features as described by its manifest section."""
    folder = Path(folder)
    storage = check_local_storage(section.get("storage", "float16"))
    values = fmt.load_npy(folder, fmt.LOCAL_FEATURES_NPY)
    scales = fmt.load_npy(folder, fmt.LOCAL_SCALES_NPY) if storage == "int8" else None
    if values.dtype != np.dtype(storage):
        raise MapError(f"map {folder}: {fmt.LOCAL_FEATURES_NPY} holds {values.dtype}, the "
                       f"manifest says {storage} storage; {fmt.REBUILD}")
    expected = list(section.get("shape", values.shape))
    if values.shape[0] != n_places or list(values.shape) != expected:
        raise MapError(f"map {folder}: {fmt.LOCAL_FEATURES_NPY} has shape {values.shape}, the "
                       f"manifest says {section.get('shape')} for {n_places} places; {fmt.REBUILD}")
    if scales is None:
        return values
    if scales.shape != values.shape[:-1] or scales.dtype != np.float16:
        raise MapError(f"map {folder}: {fmt.LOCAL_SCALES_NPY} has shape {scales.shape} "
                       f"{scales.dtype}, expected {values.shape[:-1]} float16; {fmt.REBUILD}")
    return Int8LocalFeatures(values, scales, unit_norm=bool(section.get("unit_norm", False)))
