"""Model cards: one small YAML file per model, describing how to build it.

A card names the architecture (``scicevpr`` student, ``super_cricavpr`` teacher or
``selavpr``), the DINOv2 backbone sizes, the head settings, the input size and where
its weights are.  The schema is documented in ``docs/architecture.md``; the shipped
cards live in the package's ``models/`` folder, found (first hit wins):

1. ``$VPR_MODELS_DIR`` when set,
2. ``<share>/vpr_ros/models`` of the installed ROS package (``ament_index_python``),
3. ``<sys.prefix>/share/vpr_ros/models`` (pip/setup.py install into a venv),
4. ``models/`` next to the ``vpr_ros`` package folder (source checkout).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from ..errors import ModelCardError

ARCHITECTURES = ("scicevpr", "super_cricavpr", "selavpr")
DEMO_CARD_NAME = "demo_tiny"
FALLBACK_CARD_NAME = "scicevpr_tiny_random"
DEMO_RERANK_CARD_NAME = "demo_tiny_selavpr"
FALLBACK_RERANK_CARD_NAME = "selavpr_tiny_random"

_SCICE_HEAD_KEYS = {"out_indices", "mix_in_dim", "token_num", "token_ratio",
                    "encoder_layers", "encoder_heads", "encoder_ffn"}
_SELA_HEAD_KEYS = {"adapter_dim", "adapter_scale", "local_hidden_dim", "local_dim"}
# optional: LocalAdapt stride-2 stages (default 2 = official; fewer = smaller local maps)
_SELA_OPTIONAL_HEAD_KEYS = {"local_upsample"}
_CARD_KEYS = {"name", "architecture", "description", "input_size", "backbone", "head",
              "descriptor_dim", "weights", "random_init_seed", "notes", "official_files",
              "inferred"}


@dataclass(frozen=True)
class BackboneSpec:
    """DINOv2 ViT sizes."""
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    mlp_ratio: float = 4.0
    num_register_tokens: int = 0
    pos_embed_grid: int = 37          # side of the stored positional-embedding grid
    interpolate_offset: float = 0.1   # official DINOv2 resampling offset (0 = plain size)


@dataclass(frozen=True)
class ModelCard:
    name: str
    architecture: str
    backbone: BackboneSpec
    head: Dict[str, Any]
    input_size: Tuple[int, int] = (224, 224)
    descriptor_dim: int = 0
    description: str = ""
    weights: Optional[str] = None          # file name, relative to the card's folder
    random_init_seed: Optional[int] = None
    notes: str = ""
    official_files: Tuple[str, ...] = ()
    inferred: bool = False                 # settings inferred, not stated by the authors
    path: Optional[Path] = field(default=None, compare=False)  # the YAML file, if any

    # -- derived sizes -------------------------------------------------------------
    @property
    def grid(self) -> Tuple[int, int]:
        h, w = self.input_size
        return h // self.backbone.patch_size, w // self.backbone.patch_size

    @property
    def local_upsample(self) -> int:
        """SelaVPR LocalAdapt's stride-2 stages (the official model: 2)."""
        return int(self.head.get("local_upsample", 2))

    @property
    def local_shape(self) -> Optional[Tuple[int, int, int]]:
        """(H, W, C) of SelaVPR dense local features, None for other architectures: each
        stride-2 stage of LocalAdapt maps a side s to 2s - 1."""
        if self.architecture != "selavpr":
            return None
        gh, gw = self.grid
        scale = 2 ** self.local_upsample
        return (gh - 1) * scale + 1, (gw - 1) * scale + 1, int(self.head["local_dim"])

    @property
    def weights_path(self) -> Optional[Path]:
        """Absolute path of the card's weights file (may not exist), or None."""
        if not self.weights:
            return None
        p = Path(os.path.expanduser(self.weights))
        if not p.is_absolute() and self.path is not None:
            p = self.path.parent / p
        return p

    @property
    def has_weights(self) -> bool:
        p = self.weights_path
        return p is not None and p.is_file()

    def weights_status(self) -> str:
        if self.weights:
            return "present" if self.has_weights else f"missing ({self.weights})"
        if self.random_init_seed is not None:
            return f"random (seed {self.random_init_seed})"
        return "user-supplied (--weights)"

    def to_dict(self) -> Dict[str, Any]:
        d = {
            "name": self.name,
            "architecture": self.architecture,
            "description": self.description,
            "input_size": list(self.input_size),
            "backbone": dataclasses.asdict(self.backbone),
            "head": dict(self.head),
            "descriptor_dim": self.descriptor_dim,
            "weights": self.weights,
            "random_init_seed": self.random_init_seed,
        }
        if self.notes:
            d["notes"] = self.notes
        if self.official_files:
            d["official_files"] = list(self.official_files)
        if self.inferred:
            d["inferred"] = True
        return d

    def replace(self, **changes) -> "ModelCard":
        return dataclasses.replace(self, **changes)


def expected_descriptor_dim(architecture: str, backbone: BackboneSpec, head: Dict[str, Any]) -> int:
    if architecture in ("scicevpr", "super_cricavpr"):
        return 14 * int(head["mix_in_dim"])
    return int(backbone.embed_dim)


def card_from_dict(data: Dict[str, Any], path: Optional[Path] = None) -> ModelCard:
    where = f" in {path}" if path else ""
    if not isinstance(data, dict):
        raise ModelCardError(f"model card{where} is not a mapping")
    unknown = set(data) - _CARD_KEYS
    if unknown:
        raise ModelCardError(f"unknown key(s) {sorted(unknown)} in model card{where}; "
                             f"allowed: {sorted(_CARD_KEYS)}")
    for key in ("name", "architecture", "backbone", "head"):
        if key not in data:
            raise ModelCardError(f"model card{where} lacks the required key {key!r}")
    arch = data["architecture"]
    if arch not in ARCHITECTURES:
        raise ModelCardError(f"model card{where}: unknown architecture {arch!r}; "
                             f"expected one of {ARCHITECTURES}")
    try:
        backbone = BackboneSpec(**data["backbone"])
    except TypeError as exc:
        raise ModelCardError(f"model card{where}: bad backbone section: {exc}") from None
    head = dict(data["head"] or {})
    needed = _SELA_HEAD_KEYS if arch == "selavpr" else _SCICE_HEAD_KEYS
    missing = needed - set(head)
    extra = set(head) - needed - (_SELA_OPTIONAL_HEAD_KEYS if arch == "selavpr" else set())
    if missing or extra:
        raise ModelCardError(f"model card{where}: head of a {arch} card needs exactly "
                             f"{sorted(needed)} (missing {sorted(missing)}, "
                             f"unknown {sorted(extra)})")
    if "local_upsample" in head:
        up = head["local_upsample"]
        if isinstance(up, bool) or not isinstance(up, int) or up not in (0, 1, 2):
            raise ModelCardError(f"model card{where}: head.local_upsample must be 0, 1 or 2 "
                                 f"(LocalAdapt stride-2 stages), got {up!r}")
    if arch != "selavpr":
        head["out_indices"] = [int(i) for i in head["out_indices"]]
        bad = [i for i in head["out_indices"] if not 0 <= i < backbone.depth]
        if bad:
            raise ModelCardError(f"model card{where}: out_indices {bad} outside the "
                                 f"backbone's {backbone.depth} blocks")
    size = data.get("input_size", [224, 224])
    if isinstance(size, int):
        size = [size, size]
    if len(size) != 2 or any(int(s) % backbone.patch_size for s in size):
        raise ModelCardError(f"model card{where}: input_size {size} must be [H, W], each a "
                             f"multiple of the patch size {backbone.patch_size}")
    input_size = (int(size[0]), int(size[1]))
    dim = expected_descriptor_dim(arch, backbone, head)
    if data.get("descriptor_dim") not in (None, dim):
        raise ModelCardError(f"model card{where}: descriptor_dim {data['descriptor_dim']} "
                             f"does not match the architecture ({dim})")
    if arch != "selavpr" and tuple(s // backbone.patch_size for s in input_size) != (16, 16):
        raise ModelCardError(f"model card{where}: SciceVPR heads need a 16x16 token grid "
                             f"(input_size = 16 x patch_size), got {input_size}")
    seed = data.get("random_init_seed")
    return ModelCard(
        name=str(data["name"]), architecture=arch, backbone=backbone, head=head,
        input_size=input_size, descriptor_dim=dim,
        description=str(data.get("description") or ""),
        weights=data.get("weights") or None,
        random_init_seed=None if seed is None else int(seed),
        notes=str(data.get("notes") or ""),
        official_files=tuple(data.get("official_files") or ()),
        inferred=bool(data.get("inferred", False)),
        path=path)


def _candidate_model_dirs() -> List[Path]:
    dirs: List[Path] = []
    env = os.environ.get("VPR_MODELS_DIR")
    if env:
        dirs.append(Path(env))
    try:
        from ament_index_python.packages import get_package_share_directory
        dirs.append(Path(get_package_share_directory("vpr_ros")) / "models")
    except Exception:  # not importable, or vpr_ros not installed as a ROS package
        pass
    dirs.append(Path(sys.prefix) / "share" / "vpr_ros" / "models")
    dirs.append(Path(__file__).resolve().parents[2] / "models")
    return dirs


def models_dir() -> Path:
    """The folder holding the shipped model cards."""
    for d in _candidate_model_dirs():
        if d.is_dir() and any(d.glob("*.yaml")):
            return d
    raise ModelCardError("cannot find the models/ folder with the model cards (looked in "
                         + ", ".join(str(d) for d in _candidate_model_dirs())
                         + "); set VPR_MODELS_DIR")


def load_card(name_or_path: Union[str, os.PathLike, ModelCard, None] = None) -> ModelCard:
    """A card by name (from :func:`models_dir`) or by YAML path; None = the default card."""
    if isinstance(name_or_path, ModelCard):
        return name_or_path
    if name_or_path is None:
        name_or_path = default_card_name()
    text = str(name_or_path)
    p = Path(os.path.expanduser(text))
    if text.endswith((".yaml", ".yml")) or p.is_file():
        path = p
    else:
        path = models_dir() / f"{text}.yaml"
        if not path.is_file():
            known = ", ".join(c.name for c in list_cards()) or "none"
            raise ModelCardError(f"unknown model card {text!r} (known: {known}); pass a card "
                                 "name or the path of a .yaml card")
    if not path.is_file():
        raise ModelCardError(f"model card file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelCardError(f"cannot read model card {path}: {exc}") from None
    return card_from_dict(data, path.resolve())


def list_cards() -> List[ModelCard]:
    """Every card in the models folder, sorted by name (broken cards are skipped)."""
    try:
        folder = models_dir()
    except ModelCardError:
        return []
    cards = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name.endswith(".card.yaml"):  # sidecars of saved weights, not catalogue entries
            continue
        try:
            cards.append(load_card(path))
        except ModelCardError:
            continue
    return cards


def _shipped_or(name: str, fallback: str) -> str:
    try:
        folder = models_dir()
    except ModelCardError:
        return fallback
    card = folder / f"{name}.yaml"
    if card.is_file():
        try:
            if load_card(card).has_weights:
                return name
        except ModelCardError:
            pass
    return fallback


def default_card_name() -> str:
    """The shipped demo model if its weights are present, else the tiny random card."""
    return _shipped_or(DEMO_CARD_NAME, FALLBACK_CARD_NAME)


def default_rerank_card_name() -> str:
    """The shipped demo re-ranker (SelaVPR) if its weights are present, else the tiny
    random SelaVPR card."""
    return _shipped_or(DEMO_RERANK_CARD_NAME, FALLBACK_RERANK_CARD_NAME)


def write_card(card: ModelCard, path: Union[str, os.PathLike]) -> None:
    """Write a card as YAML, atomically."""
    from ..atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(card.to_dict(), sort_keys=False))


def card_from_reference_config(config: Dict[str, Any], name: str = "reference") -> ModelCard:
    """A card from a ``<model>_tiny.config.json`` of the reference fixtures.

    Those files describe the official constructor arguments (SciceVPR / Super-CricaVPR
    ``official_class`` ``scicevpr.SciceVPR`` / ``super_cricavpr.Super_CricaVPR``, SelaVPR
    ``network.GeoLocalizationNet``); this maps them onto our schema so tests build the
    tiny models from the fixture itself, never from hard-coded sizes.
    """
    bb = config["backbone"]
    grid = bb["pos_embed_grid"]
    grid = int(grid[0] if isinstance(grid, (list, tuple)) else grid)
    interp = bb.get("pos_embed_interpolation", {})
    offset = 0.1
    scale_factor = interp.get("scale_factor")
    if isinstance(scale_factor, str) and "interpolate_offset" in scale_factor:
        import re
        m = re.search(r"interpolate_offset\s*([0-9.]+)", interp["scale_factor"])
        offset = float(m.group(1)) if m else 0.1
    backbone = dict(embed_dim=int(bb["embed_dim"]), depth=int(bb["depth"]),
                    num_heads=int(bb["num_heads"]), patch_size=int(bb["patch_size"]),
                    mlp_ratio=float(bb["mlp_ratio"]),
                    num_register_tokens=int(bb.get("num_register_tokens", 0)),
                    pos_embed_grid=grid, interpolate_offset=offset)
    official = config.get("official_class", "")
    inp = config.get("input", {})
    size = [int(inp.get("height", 224)), int(inp.get("width", 224))]
    if "GeoLocalizationNet" in official:
        adapters = config["adapters"]
        local = config["local_branch"]
        head = dict(adapter_dim=int(adapters["serial_adapter1"]["hidden"]),
                    adapter_scale=float(adapters["parallel_adapter2"].get("scale", 0.2)),
                    local_hidden_dim=int(local["upconv1"]["out"]),
                    local_dim=int(local["upconv2"]["out"]))
        arch = "selavpr"
    else:
        enc = config["encoder"]
        head = dict(out_indices=[int(i) for i in config["out_indices"]],
                    mix_in_dim=int(config["fusion"]["out"]),
                    token_num=int(config["token_mixers"]["count"]),
                    token_ratio=float(config["token_mixers"]["ratio"]),
                    encoder_layers=int(enc["num_layers"]), encoder_heads=int(enc["nhead"]),
                    encoder_ffn=int(enc["dim_feedforward"]))
        arch = "super_cricavpr" if "cricavpr" in official.lower() else "scicevpr"
    return card_from_dict(dict(name=name, architecture=arch, backbone=backbone, head=head,
                               input_size=size))
