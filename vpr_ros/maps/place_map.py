"""PlaceMap: an opened map directory (places, descriptors, FAISS index, local features)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from ..errors import MapError, MapMismatchError
from . import format as fmt
from .index import place_index_on_device, read_index, search
from .local_store import LocalFeatures, open_local_features

log = logging.getLogger(__name__)

VERIFY_MODES = {True: "full", False: "none", "full": "full", "size": "size", "none": "none"}


def model_section(describer) -> dict:
    """The manifest's ``model`` section for a GlobalDescriber-like object."""
    card = describer.card
    return {
        "card": card.name,
        "architecture": getattr(card, "architecture", None),
        "fingerprint": describer.fingerprint,
        "descriptor_dim": int(describer.dim),
        "input_size": [int(s) for s in describer.input_size],
        "precision": getattr(describer, "precision", None),
        **int8_choices(describer),
    }


def local_model_section(extractor) -> dict:
    card = extractor.card
    return {"card": card.name, "architecture": getattr(card, "architecture", None),
            "fingerprint": extractor.fingerprint,
            "input_size": [int(s) for s in extractor.input_size],
            "precision": getattr(extractor, "precision", None),
            **int8_choices(extractor)}


def int8_choices(model) -> dict:
    """The numerical choices of an int8 model (``AccelOptions.conv_transpose`` /
    ``patch_conv``) for the manifest: {} for other precisions.  Maps record them so that a
    map built with one choice and queried with another can be told apart (the queries
    still work: the choices move features by rounding, like a change of precision)."""
    if getattr(model, "precision", None) != "int8":
        return {}
    from ..accel.options import DEFAULT

    accel = getattr(model, "accel", None) or DEFAULT
    return {"int8_compute": {"conv_transpose": accel.conv_transpose,
                             "patch_conv": accel.patch_conv}}


class PlaceMap:
    """A map opened for search.  Use :meth:`open`."""

    def __init__(self, path: Path, manifest: dict, places: fmt.PlaceTable,
                 descriptors: np.ndarray, index, local_features: Optional[LocalFeatures],
                 index_device: str = "cpu"):
        self.path = Path(path)
        self.manifest = manifest
        self.places = places
        self.descriptors = descriptors
        self.index = index
        self.local_features = local_features
        self.index_device = index_device

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path, expect_fingerprint: Optional[str] = None,
             expect_dim: Optional[int] = None, verify: Union[bool, str] = True,
             device: str = "auto", expect_card: Optional[str] = None,
             mmap_index: Optional[bool] = None) -> "PlaceMap":
        """Open a map directory.

        Refuses (MapMismatchError, naming which) a map whose format version, model card,
        weights fingerprint or descriptor dimension differ from the expected ones.
        ``verify``: True/"full" checks the sha256 of every file (MapError naming the
        corrupt one), "size" only compares file sizes (fast for huge maps: catches
        truncation, not bit flips), False/"none" skips the check.
        """
        path = Path(path)
        manifest = fmt.read_manifest(path)
        version = manifest.get("format_version")
        if version != fmt.FORMAT_VERSION:
            raise MapMismatchError(
                f"map {path} has format version {version}, this vpr_ros reads version "
                f"{fmt.FORMAT_VERSION}; rebuild it with `vpr map build`")
        model = manifest.get("model") or {}
        if expect_card is not None and model.get("card") != expect_card:
            raise MapMismatchError(
                f"map {path} was built with model card {model.get('card')!r}, but the model in "
                f"use is {expect_card!r}; use --model {model.get('card')} or rebuild the map")
        if expect_fingerprint is not None and model.get("fingerprint") != expect_fingerprint:
            raise MapMismatchError(
                f"map {path} was built with model weights {model.get('fingerprint')}, but the "
                f"weights in use are {expect_fingerprint}; pass the weights the map was built "
                "with or rebuild the map")
        if expect_dim is not None and model.get("descriptor_dim") != int(expect_dim):
            raise MapMismatchError(
                f"map {path} holds {model.get('descriptor_dim')}-dimensional descriptors, the "
                f"model in use gives {expect_dim}; rebuild the map with this model")
        mode = VERIFY_MODES.get(verify)
        if mode is None:
            raise ValueError("verify must be True, False, 'full', 'size' or 'none', got "
                             f"{verify!r}")
        files = manifest.get("files") or {}
        for required in (fmt.PLACES_CSV, fmt.POSES_NPY, fmt.STAMPS_NPY, fmt.DESCRIPTORS_NPY,
                         fmt.INDEX_FAISS):
            if required not in files:
                raise MapError(f"map {path}: {fmt.MANIFEST} lists no {required}; {fmt.REBUILD}")
        fmt.verify_files(path, files, mode)
        places = fmt.PlaceTable.read(path)
        descriptors = fmt.load_npy(path, fmt.DESCRIPTORS_NPY)
        n = len(places)
        dim = model.get("descriptor_dim")
        if descriptors.shape != (n, dim):
            raise MapError(f"map {path}: descriptors.npy has shape {descriptors.shape}, expected "
                           f"({n}, {dim}) from places.csv and the manifest; {fmt.REBUILD}")
        index = read_index(path / fmt.INDEX_FAISS, mmap=mmap_index)
        if index.ntotal != n:
            raise MapError(f"map {path}: index.faiss holds {index.ntotal} vectors, the map has "
                           f"{n} places; {fmt.REBUILD}")
        local = None
        lf = manifest.get("local_features") or {}
        if lf.get("present"):
            local = open_local_features(path, lf, n)
        index, index_device = place_index_on_device(index, device)
        return cls(path, manifest, places, descriptors, index, local, index_device)

    @classmethod
    def open_for(cls, path, describer, local_extractor=None, verify: Union[bool, str] = True,
                 device: str = "auto") -> "PlaceMap":
        """Open a map and check it against the describer (and re-ranking model) in use."""
        place_map = cls.open(path, expect_fingerprint=describer.fingerprint,
                             expect_dim=describer.dim, verify=verify, device=device,
                             expect_card=describer.card.name)
        if local_extractor is not None:
            place_map.check_local_extractor(local_extractor)
        return place_map

    def check_local_extractor(self, extractor) -> None:
        lf = self.manifest.get("local_features") or {}
        if not lf.get("present"):
            raise MapError(f"map {self.path} has no local features, so re-ranking is not "
                           "possible; rebuild it with --local-features or run without re-ranking")
        model = lf.get("model") or {}
        if model.get("card") != extractor.card.name:
            raise MapMismatchError(
                f"map {self.path} local features come from card {model.get('card')!r}, the "
                f"re-ranking model in use is {extractor.card.name!r}")
        if model.get("fingerprint") != extractor.fingerprint:
            raise MapMismatchError(
                f"map {self.path} local features come from weights {model.get('fingerprint')}, "
                f"the re-ranking weights in use are {extractor.fingerprint}")

    # ------------------------------------------------------------------ use
    def __len__(self) -> int:
        return len(self.places)

    @property
    def dim(self) -> int:
        return int(self.manifest["model"]["descriptor_dim"])

    @property
    def has_local_features(self) -> bool:
        return self.local_features is not None

    @property
    def confidence_params(self) -> Optional[dict]:
        return self.manifest.get("confidence")

    def search(self, descriptors: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """(similarities (Q,k) float32, indices (Q,k) int64), best first."""
        return search(self.index, descriptors, k)

    def summary(self) -> dict:
        m = self.manifest
        return {
            "path": str(self.path),
            "format_version": m.get("format_version"),
            "places": len(self),
            "frame_id": self.places.frame_id,
            "model": m.get("model"),
            "index": m.get("index"),
            "index_device": self.index_device,
            "local_features": m.get("local_features"),
            "created": m.get("created"),
            "updates": m.get("updates", []),
            "confidence": m.get("confidence"),
            "extent_m": _extent(self.places.positions),
            "files": {k: v["bytes"] for k, v in (m.get("files") or {}).items()},
        }


def _extent(positions: np.ndarray) -> Optional[dict]:
    if len(positions) == 0:
        return None
    lo, hi = positions.min(axis=0), positions.max(axis=0)
    return {"min": [float(v) for v in lo], "max": [float(v) for v in hi]}
