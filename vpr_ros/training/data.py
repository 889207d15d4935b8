"""Place-labelled training data: sources, the P x K batch sampler, augmentation, validation set.

A training set is a list of *places*, each a list of images of the same spot
(GSV-Cities style).  A batch holds P places x K images; the K images of a place are
positives of each other, everything else in the batch is a negative.

Sources (``data.train`` in the config: one dict or a list; ``type`` selects the reader):

``{type: csv, path: FILE, image_root: DIR?}``
    A CSV with a header and at least the columns ``place_id`` and ``image`` (path of the
    image, relative to ``image_root`` or, if that is absent, to the CSV's folder).
    Rows with the same ``place_id`` are one place.  Other columns are ignored; optional
    ``x``/``y`` (metres) give the place position for ``avoid_near_places_m``.

``{type: gsv_cities, path: ROOT, cities: [London, ...]?}``
    The GSV-Cities layout: ``ROOT/Dataframes/<city>.csv`` (columns place_id, year, month,
    northdeg, city_id, lat, lon, panoid) and ``ROOT/Images/<city>/<name>.jpg`` with the
    file name built from those columns.  All cities in Dataframes/ when ``cities`` is left out.

``{type: benchmark, path: DIR, split: test, seq_range: [lo, hi]?, group_by: place_key}``
    The VPR benchmark layout (``images/<split>/{database,queries}`` + optional
    ``poses_database.csv`` / ``poses_queries.csv``).  Database and query images taken at
    the same place form one training place: ``group_by: place_key`` uses the poses CSV's
    ``place_key`` column (Nordland: same frame index in summer and winter), while
    ``group_by: position`` bins the UTM positions into cells of ``place_spacing_m``
    metres.  ``seq_range`` keeps rows with lo <= seq < hi (poses CSV ``seq`` column).

``{type: maps, paths: [MAP_DIR, ...], radius_m: 5.0}``
    Two or more maps of the same route built with ``vpr map build`` (each has
    ``places.csv`` and ``manifest.json``).  Every place of the first map is paired with
    the nearest place of each other map within ``radius_m``; a place seen in at least
    K traversals becomes a training place.  Image paths come from the ``image_path``
    column of places.csv, else ``<image folder>/<image_name>`` with the image folder the
    map's manifest records (``vpr map build --images DIR`` or ``--dataset DIR``); give
    ``image_roots`` (one per map, same order as ``paths``) to override it, e.g. for maps
    built from bags.

Places with fewer than K images raise :class:`DatasetError` naming how many and which
(``min_images: drop`` in a source drops them instead, with a warning).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import DatasetError, ImageError
from ..preprocess import load_image, preprocess

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class TrainPlace:
    """One place: its name, the images that show it, and (optionally) its position (x, y)."""
    name: str
    images: List[Path]
    position: Optional[Tuple[float, float]] = None


@dataclass
class PlaceSet:
    places: List[TrainPlace] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.places)

    @property
    def num_images(self) -> int:
        return sum(len(p.images) for p in self.places)

    def positions(self) -> Optional[np.ndarray]:
        if not self.places or any(p.position is None for p in self.places):
            return None
        return np.asarray([p.position for p in self.places], dtype=np.float64)

    def require_min_images(self, k: int, drop: bool = False,
                           what: str = "training set") -> "PlaceSet":
        small = [p for p in self.places if len(p.images) < k]
        if small and not drop:
            shown = ", ".join(f"{p.name} ({len(p.images)})" for p in small[:8])
            more = f" and {len(small) - 8} more" if len(small) > 8 else ""
            raise DatasetError(
                f"{what}: {len(small)} of {len(self.places)} places have fewer than "
                f"images_per_place={k} images: {shown}{more}. Lower data.images_per_place, "
                f"add images, or set min_images: drop on the source to skip them.")
        if small:
            log.warning("%s: dropping %d places with fewer than %d images", what, len(small), k)
        return PlaceSet([p for p in self.places if len(p.images) >= k])


# --------------------------------------------------------------------------- sources

def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _check_keys(src: dict, allowed: Sequence[str], what: str) -> None:
    unknown = sorted(set(src) - set(allowed) - {"type", "min_images"})
    if unknown:
        from ..errors import ConfigError
        raise ConfigError(f"{what}: unknown key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(sorted(set(allowed) | {'type', 'min_images'}))}")


def places_from_csv(path: Path, image_root: Optional[Path] = None) -> PlaceSet:
    """Read the documented CSV convention (columns ``place_id``, ``image``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"training CSV not found: {path}")
    root = Path(image_root) if image_root else path.parent
    groups: Dict[str, TrainPlace] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = [c for c in ("place_id", "image") if c not in cols]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; the training CSV needs a "
                               f"header with place_id,image (found {cols})")
        for row in reader:
            pid = str(row["place_id"]).strip()
            img = _resolve(root, row["image"].strip())
            pos = None
            if row.get("x") not in (None, "") and row.get("y") not in (None, ""):
                pos = (float(row["x"]), float(row["y"]))
            place = groups.setdefault(pid, TrainPlace(pid, [], pos))
            place.images.append(img)
    if not groups:
        raise DatasetError(f"{path}: no rows")
    return PlaceSet(list(groups.values()))


def gsv_image_name(city: str, row: Dict[str, str]) -> str:
    """GSV-Cities file name of one Dataframes row."""
    pid = int(float(row["place_id"]))
    return (f"{city}_{pid:07d}_{int(float(row['year'])):04d}_{int(float(row['month'])):02d}_"
            f"{int(float(row['northdeg'])):03d}_{float(row['lat'])}_{float(row['lon'])}_"
            f"{row['panoid']}.jpg")


def places_from_gsv_cities(root: Path, cities: Optional[Sequence[str]] = None) -> PlaceSet:
    root = Path(root)
    frames = root / "Dataframes"
    if not frames.is_dir():
        raise DatasetError(f"{root}: not a GSV-Cities folder (no Dataframes/ inside)")
    if cities is None:
        cities = sorted(p.stem for p in frames.glob("*.csv"))
    places: List[TrainPlace] = []
    for city in cities:
        csv_path = frames / f"{city}.csv"
        if not csv_path.is_file():
            raise DatasetError(f"GSV-Cities: {csv_path} missing (city {city!r})")
        groups: Dict[str, TrainPlace] = {}
        with open(csv_path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                city_id = row.get("city_id") or city
                pid = str(int(float(row["place_id"])))
                img = root / "Images" / city_id / gsv_image_name(city_id, row)
                groups.setdefault(pid, TrainPlace(f"{city}/{pid}", [])).images.append(img)
        places.extend(groups.values())
    return PlaceSet(places)


_NAME_POS = re.compile(r"^@([-+0-9.eE]+)@([-+0-9.eE]+)@")


@dataclass
class BenchmarkImage:
    path: Path
    position: Tuple[float, float]
    seq: Optional[int]
    place_key: Optional[str]


def read_benchmark_split(root: Path, split: str, part: str) -> List[BenchmarkImage]:
    """Images of ``images/<split>/<part>`` with positions (poses CSV, else file names)."""
    root = Path(root)
    folder = root / "images" / split / part
    if not folder.is_dir():
        raise DatasetError(f"{root}: benchmark folder {folder} missing (expected "
                           f"images/<split>/database and images/<split>/queries)")
    poses = root / f"poses_{part}.csv"
    out: List[BenchmarkImage] = []
    if poses.is_file():
        with open(poses, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                path = folder / row["filename"]
                out.append(BenchmarkImage(
                    path, (float(row["east_m"]), float(row["north_m"])),
                    int(row["seq"]) if row.get("seq") not in (None, "") else None,
                    row.get("place_key") or None))
        return out
    for i, path in enumerate(sorted(p for p in folder.iterdir()
                                    if p.suffix.lower() in IMAGE_SUFFIXES)):
        m = _NAME_POS.match(path.name)
        if not m:
            raise DatasetError(f"{path}: no poses_{part}.csv and the name is not of the "
                               "benchmark form @east@north@...")
        out.append(BenchmarkImage(path, (float(m.group(1)), float(m.group(2))), i, None))
    return out


def _in_range(img: BenchmarkImage, seq_range) -> bool:
    if seq_range is None:
        return True
    if img.seq is None:
        raise DatasetError("seq_range needs a poses CSV with a seq column")
    lo, hi = seq_range
    return (lo is None or img.seq >= lo) and (hi is None or img.seq < hi)


def places_from_benchmark(root: Path, split: str = "test", seq_range=None,
                          group_by: str = "place_key", place_spacing_m: float = 10.0) -> PlaceSet:
    images = [im for part in ("database", "queries")
              for im in read_benchmark_split(root, split, part) if _in_range(im, seq_range)]
    if not images:
        raise DatasetError(f"{root}: no images in split {split!r} with seq_range {seq_range}")
    groups: Dict[str, List[BenchmarkImage]] = {}
    for im in images:
        if group_by == "place_key":
            if im.place_key is None:
                raise DatasetError(f"{root}: group_by place_key needs a place_key column in "
                                   "the poses CSV (or use group_by: position)")
            key = im.place_key
        elif group_by == "position":
            key = (f"{math.floor(im.position[0] / place_spacing_m)}_"
                   f"{math.floor(im.position[1] / place_spacing_m)}")
        else:
            from ..errors import ConfigError
            raise ConfigError(f"benchmark source: group_by must be place_key or position, "
                              f"got {group_by!r}")
        groups.setdefault(key, []).append(im)
    places = []
    for key, ims in groups.items():
        pos = tuple(np.mean([im.position for im in ims], axis=0).tolist())
        places.append(TrainPlace(f"{Path(root).name}:{key}", [im.path for im in ims], pos))
    return PlaceSet(places)


def _read_map_places(map_dir: Path, image_root: Optional[Path]) -> Tuple[np.ndarray, List[Path]]:
    table = map_dir / "places.csv"
    if not table.is_file():
        raise DatasetError(f"{map_dir}: not a map folder (no places.csv); build maps with "
                           "`vpr map build`")
    manifest = {}
    if (map_dir / "manifest.json").is_file():
        manifest = json.loads((map_dir / "manifest.json").read_text(encoding="utf-8"))
    root = image_root or _map_image_root(manifest)
    xy, paths = [], []
    with open(table, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            xy.append((float(row["x"]), float(row["y"])))
            if row.get("image_path"):
                p = Path(row["image_path"])
                paths.append(p if p.is_absolute() or root is None else root / p)
            elif root is not None and row.get("image_name"):
                paths.append(Path(root) / row["image_name"])
            else:
                raise DatasetError(f"{map_dir}: places.csv has no image_path column and no "
                                   "image root is known; give image_roots in the maps source")
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2), paths


def _map_image_root(manifest: dict) -> Optional[Path]:
    """Folder of a map's images from its manifest (``vpr map build`` records the source)."""
    src = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    if src.get("type") == "images+csv" and src.get("images"):
        return Path(src["images"])
    if src.get("type") == "benchmark" and src.get("dataset"):
        return Path(src["dataset"]) / "images" / "test" / str(src.get("split", "database"))
    return Path(src["image_root"]) if src.get("image_root") else None


def places_from_maps(map_dirs: Sequence[Path], radius_m: float = 5.0,
                     image_roots: Optional[Sequence[Optional[Path]]] = None) -> PlaceSet:
    from scipy.spatial import cKDTree

    if len(map_dirs) < 2:
        raise DatasetError("maps source needs two or more maps of the same route")
    roots = list(image_roots) if image_roots else [None] * len(map_dirs)
    if len(roots) != len(map_dirs):
        raise DatasetError("maps source: image_roots must list one folder per map")
    loaded = [_read_map_places(Path(m), Path(r) if r else None) for m, r in zip(map_dirs, roots)]
    ref_xy, ref_paths = loaded[0]
    places = [TrainPlace(f"{Path(map_dirs[0]).name}:{i}", [p], tuple(ref_xy[i]))
              for i, p in enumerate(ref_paths)]
    for xy, paths in loaded[1:]:
        if len(xy) == 0:
            continue
        dist, idx = cKDTree(xy).query(ref_xy, k=1)
        for i, (d, j) in enumerate(zip(dist, idx)):
            if d <= radius_m:
                places[i].images.append(paths[j])
    return PlaceSet(places)


def load_source(src: dict, base: Path, k: int) -> PlaceSet:
    from ..errors import ConfigError
    if not isinstance(src, dict) or "type" not in src:
        raise ConfigError(f"a data source must be a mapping with a 'type' key, got {src!r}")
    kind = src["type"]
    drop = src.get("min_images") == "drop"
    if kind == "csv":
        _check_keys(src, ["path", "image_root"], "csv source")
        ps = places_from_csv(_resolve(base, src["path"]),
                             _resolve(base, src["image_root"]) if src.get("image_root") else None)
    elif kind == "gsv_cities":
        _check_keys(src, ["path", "cities"], "gsv_cities source")
        ps = places_from_gsv_cities(_resolve(base, src["path"]), src.get("cities"))
    elif kind == "benchmark":
        _check_keys(src, ["path", "split", "seq_range", "group_by", "place_spacing_m"],
                    "benchmark source")
        ps = places_from_benchmark(_resolve(base, src["path"]), src.get("split", "test"),
                                   src.get("seq_range"), src.get("group_by", "place_key"),
                                   float(src.get("place_spacing_m", 10.0)))
    elif kind == "maps":
        _check_keys(src, ["paths", "radius_m", "image_roots"], "maps source")
        roots = src.get("image_roots")
        ps = places_from_maps([_resolve(base, p) for p in src["paths"]],
                              float(src.get("radius_m", 5.0)),
                              [_resolve(base, r) if r else None for r in roots] if roots else None)
    else:
        raise ConfigError(f"unknown data source type {kind!r}; expected csv, gsv_cities, "
                          "benchmark or maps")
    where = src.get("path") or src.get("paths")
    return ps.require_min_images(k, drop=drop, what=f"{kind} source {where}")


def load_train_places(sources, base: Path, k: int) -> PlaceSet:
    if isinstance(sources, dict):
        sources = [sources]
    out = PlaceSet()
    for src in sources:
        out.places.extend(load_source(src, base, k).places)
    if len(out) < 2:
        raise DatasetError(f"training set has {len(out)} place(s); at least 2 are needed")
    missing = [p for place in out.places for p in place.images[:1] if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} training images not found, e.g. {missing[0]}")
    return out


# --------------------------------------------------------------------------- sampler

class PlaceBatchSampler:
    """Yields batches of P place indices (each with a per-place random seed) per epoch.

    Deterministic in (seed, epoch): every process of a DDP job computes the same global
    batches and takes its own share ``[rank::world_size]``.  ``start_batch`` skips the
    batches already trained when resuming in the middle of an epoch.
    ``avoid_near_m`` keeps two places closer than that out of one batch (they would be
    wrong negatives), deferring the second one to a later batch.
    """

    def __init__(self, num_places: int, places_per_batch: int, seed: int = 0,
                 batches_per_epoch: Optional[int] = None, rank: int = 0, world_size: int = 1,
                 positions: Optional[np.ndarray] = None, avoid_near_m: Optional[float] = None):
        if num_places < 2:
            raise DatasetError(f"need at least 2 places, got {num_places}")
        self.num_places = num_places
        self.p = min(places_per_batch, num_places)
        if self.p < world_size or self.p % world_size:
            from ..errors import ConfigError
            raise ConfigError(f"places_per_batch {self.p} must be a multiple of the number of "
                              f"processes ({world_size})")
        self.seed = seed
        self.rank = rank
        self.world = world_size
        self.positions = positions
        self.avoid = avoid_near_m if positions is not None else None
        full = num_places // self.p + (1 if num_places % self.p >= max(2, world_size) else 0)
        self.batches_per_epoch = batches_per_epoch or max(1, full)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def _chunks(self, order: np.ndarray) -> List[List[int]]:
        if self.avoid is None:
            return [order[i:i + self.p].tolist() for i in range(0, len(order), self.p)]
        batches, pending = [], order.tolist()
        while pending:
            batch, rest = [], []
            for idx in pending:
                if len(batch) < self.p and (not batch or np.min(np.linalg.norm(
                        self.positions[batch] - self.positions[idx], axis=1)) >= self.avoid):
                    batch.append(idx)
                else:
                    rest.append(idx)
            batches.append(batch)
            pending = rest
        return batches

    def global_batches(self) -> List[List[Tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        out: List[List[Tuple[int, int]]] = []
        while len(out) < self.batches_per_epoch:
            before = len(out)
            for chunk in self._chunks(rng.permutation(self.num_places)):
                if len(chunk) < max(2, self.world) or (self.world > 1 and len(chunk) < self.p):
                    continue
                seeds = rng.integers(0, 2**31 - 1, size=len(chunk))
                out.append(list(zip(chunk, seeds.tolist())))
                if len(out) == self.batches_per_epoch:
                    break
            if len(out) == before:
                raise DatasetError(
                    f"cannot form any batch of {self.p} places (avoid_near_places_m="
                    f"{self.avoid} leaves too few far-apart places); lower one of them")
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for batch in self.global_batches()[self.start_batch:]:
            yield batch[self.rank::self.world]


# --------------------------------------------------------------------------- augmentation

class Augmenter:
    """Light photometric/geometric augmentation on RGB uint8 images.

    The crop is resized back to the image's own size, so the final resize to the model's
    input size is always :func:`vpr_ros.preprocess.preprocess` (the eval pipeline).
    """

    def __init__(self, cfg: dict):
        from torchvision.transforms import v2 as T

        ops = []
        scale = tuple(cfg.get("crop_scale", (1.0, 1.0)))
        self.crop = scale != (1.0, 1.0)
        self.crop_scale = scale
        self.crop_ratio = tuple(cfg.get("crop_ratio", (0.75, 4 / 3)))
        if cfg.get("horizontal_flip"):
            ops.append(T.RandomHorizontalFlip())
        cj, hue = float(cfg.get("color_jitter") or 0), float(cfg.get("hue") or 0)
        if cj > 0 or hue > 0:
            ops.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=hue))
        if int(cfg.get("rand_augment_ops") or 0) > 0:
            ops.append(T.RandAugment(num_ops=int(cfg["rand_augment_ops"])))
        if float(cfg.get("grayscale") or 0) > 0:
            ops.append(T.RandomGrayscale(p=float(cfg["grayscale"])))
        self.ops = T.Compose(ops) if ops else None
        self.active = bool(ops) or self.crop

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if not self.active:
            return image
        from torchvision.transforms import v2 as T

        t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        if self.crop:
            h, w = t.shape[-2:]
            t = T.RandomResizedCrop((h, w), scale=self.crop_scale, ratio=self.crop_ratio,
                                    antialias=True)(t)
        if self.ops is not None:
            t = self.ops(t)
        return t.permute(1, 2, 0).contiguous().numpy()


class PlaceImagesDataset(torch.utils.data.Dataset):
    """Item ``(place_index, seed)`` -> (K, 3, H, W) model inputs, K labels and the K
    images' indices in the whole set (place by place, as :func:`image_offsets`)."""

    def __init__(self, places: PlaceSet, images_per_place: int, input_size: Tuple[int, int],
                 augment: Optional[dict] = None):
        self.places = places
        self.k = images_per_place
        self.input_size = tuple(input_size)
        self.augmenter = Augmenter(augment or {})
        self.offsets = image_offsets(places)

    def __len__(self) -> int:
        return len(self.places)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        place = self.places.places[index]
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(place.images), size=self.k, replace=False)
        tensors = []
        ids = [int(self.offsets[index]) + j for j in sorted(chosen.tolist())]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for j in sorted(chosen.tolist()):
                try:
                    img = np.array(load_image(place.images[j]))  # writable copy for torch
                except ImageError as exc:
                    raise DatasetError(f"place {place.name}: {exc}") from None
                tensors.append(preprocess(self.augmenter(img), self.input_size))
        return (torch.cat(tensors, 0), torch.full((self.k,), index, dtype=torch.long),
                torch.tensor(ids, dtype=torch.long))


def image_offsets(places: PlaceSet) -> np.ndarray:
    """Index of every place's first image when all images are listed place by place."""
    sizes = [len(p.images) for p in places.places]
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else \
        np.zeros(0, dtype=np.int64)


def collate_places(items):
    """(images, labels, image indices) of a batch of places."""
    images = torch.cat([it[0] for it in items], 0)
    labels = torch.cat([it[1] for it in items], 0)
    ids = torch.cat([it[2] for it in items], 0)
    return images, labels, ids


def make_train_loader(places: PlaceSet, sampler: PlaceBatchSampler, images_per_place: int,
                      input_size, augment: dict, num_workers: int):
    ds = PlaceImagesDataset(places, images_per_place, input_size, augment)
    return torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_places,
        persistent_workers=False, pin_memory=torch.cuda.is_available())


# --------------------------------------------------------------------------- validation

@dataclass
class ValidationSet:
    """Benchmark-layout validation split: database/query images and query positives."""
    name: str
    database: List[Path]
    queries: List[Path]
    positives: List[np.ndarray]


def load_validation_set(src: dict, base: Path, radius_m: float = 25.0) -> ValidationSet:
    from ..errors import ConfigError
    if not isinstance(src, dict) or src.get("type", "benchmark") != "benchmark":
        raise ConfigError("data.val must be a benchmark source: {type: benchmark, path: DIR, "
                          "split: test, seq_range: [lo, hi]}")
    _check_keys(src, ["path", "split", "seq_range", "radius_m"], "validation source")
    root = _resolve(base, src["path"])
    split = src.get("split", "test")
    radius = float(src.get("radius_m", radius_m))
    db = [im for im in read_benchmark_split(root, split, "database")
          if _in_range(im, src.get("seq_range"))]
    qs = [im for im in read_benchmark_split(root, split, "queries")
          if _in_range(im, src.get("seq_range"))]
    if not db or not qs:
        raise DatasetError(f"validation set {root}: {len(db)} database and {len(qs)} query "
                           f"images in seq_range {src.get('seq_range')}; both must be > 0")
    positives = _positives_within(np.asarray([q.position for q in qs]),
                                  np.asarray([d.position for d in db]), radius)
    return ValidationSet(f"{root.name}[{src.get('seq_range')}]", [d.path for d in db],
                         [q.path for q in qs], positives)


def _positives_within(q_xy: np.ndarray, db_xy: np.ndarray, radius: float) -> List[np.ndarray]:
    try:
        from ..evaluation.metrics import positives_within
    except ImportError:  # the evaluation package is written by another engineer
        from scipy.spatial import cKDTree
        tree = cKDTree(db_xy)
        return [np.asarray(sorted(tree.query_ball_point(p, radius)), dtype=np.int64) for p in q_xy]
    return positives_within(q_xy, db_xy, radius_m=radius)
