"""Training configuration: YAML file + command-line overrides, checked strictly, typed.

A config is a tree of frozen dataclasses (:class:`TrainConfig` and its sections), as the
model cards are.  Every key a user writes must be a field (a typo such as
``optim.learning_rate`` raises :class:`ConfigError` naming the unknown key and the keys
that are allowed), and values are checked against the field's type.  Keys left out take
the field's default.  Data sources (``data.train``, ``data.val``) are lists/dicts whose
keys depend on the source ``type``; they are checked by :mod:`vpr_ros.training.data`.

Overrides are ``dotted.key=value`` strings; the value is parsed as YAML
(``optim.lr=5e-5``, ``data.places_per_batch=16``, ``freeze.backbone_blocks=all``).

Data paths may start with ``${VPR_SHARED_DIR}``; it stands for the shared data folder:
the ``--shared-dir`` option of ``vpr train`` when given, else the ``VPR_SHARED_DIR``
environment variable, else ``shared/`` beside the repository (``../shared`` of a clone).
Other relative paths resolve against the config file's folder, then the current folder.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import yaml

from ..constants import RADIUS_M, TRAIN_PRECISIONS
from ..errors import ConfigError

STAGES = ("teacher", "student", "selavpr")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "cosine", "constant")
LOCAL_LOSSES = ("mutual_nn", "dual_softmax")

SHARED_DIR_ENV = "VPR_SHARED_DIR"
SHARED_DIR_TOKEN = "${" + SHARED_DIR_ENV + "}"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TeacherConfig:
    """Student stage: the trained Super-CricaVPR teacher."""
    model: Optional[str] = None       # teacher card (name or path)
    weights: Optional[str] = None     # teacher weights (safetensors or official .pth)
    # also start the student's token mixers + GeM from the teacher's (they keep training);
    # the paper copies only backbone + fusion conv (false)
    copy_head: bool = False


@dataclass(frozen=True)
class AugmentConfig:
    color_jitter: float = 0.0         # brightness/contrast/saturation strength (0 = off)
    hue: float = 0.0
    crop_scale: Tuple[float, float] = (1.0, 1.0)   # random resized crop area (1,1 = off)
    crop_ratio: Tuple[float, float] = (0.75, 1.3333333)
    rand_augment_ops: int = 0         # torchvision RandAugment num_ops (official GSV: 3)
    horizontal_flip: bool = False
    grayscale: float = 0.0            # probability of converting to grey

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DataConfig:
    train: Any = None                 # one source dict or a list of them (see data.py)
    val: Any = None                   # one benchmark-layout source or null (no validation)
    places_per_batch: int = 72        # P (per optimisation step, summed over all processes)
    images_per_place: int = 4         # K
    num_workers: int = 2
    batches_per_epoch: Optional[int] = None     # null = every place once per epoch
    avoid_near_places_m: Optional[float] = None  # keep closer places out of one batch
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class FreezeConfig:
    backbone_blocks: Union[str, int] = "all"   # "all" or N: embeddings + first N blocks frozen


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"           # adam | adamw | sgd
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    momentum: float = 0.9             # sgd only
    schedule: str = "step"            # step | cosine | constant
    step_epochs: int = 3              # step: lr *= step_gamma every step_epochs epochs
    step_gamma: float = 0.5
    warmup_steps: int = 0
    min_lr: float = 0.0               # cosine floor
    epochs: int = 10
    grad_accum: int = 1               # micro-batches per optimiser step
    clip_grad_norm: Optional[float] = None
    patience: int = 10                # stop after this many epochs without val R@5 gain


@dataclass(frozen=True)
class LossConfig:
    ms_alpha: float = 1.0             # multi-similarity loss (official: alpha 1, beta 50, base 0)
    ms_beta: float = 50.0
    ms_base: float = 0.0
    miner_epsilon: float = 0.1        # multi-similarity miner margin (official 0.1)
    gamma: float = 1.0                # student: weight of the multi-similarity loss
    eta: float = 1.0                  # student: weight of the distillation loss
    triplet_margin: float = 0.1       # selavpr: global triplet margin (official 0.1)
    local_weight: float = 1.0         # selavpr: weight of the mutual-NN local loss
    negatives_per_anchor: int = 2     # selavpr: hardest in-batch negatives per anchor
    # selavpr local loss: mutual_nn = official max(0, sim_n - sim_p) on the mean dot product
    # of mutual-NN matches (plus local_margin); dual_softmax = max(0, local_margin - s_p +
    # s_n) on the soft mutual-NN count (row-softmax x column-softmax at local_temperature,
    # summed, / points), a differentiable stand-in for the count that re-ranking sorts by
    local_loss: str = "mutual_nn"
    local_margin: float = 0.0
    local_temperature: float = 0.05
    # DDP: MS/distillation loss over the whole batch of all processes (as DataParallel
    # does), not per process
    gather_across_processes: bool = True


@dataclass(frozen=True)
class MiningConfig:
    """selavpr: what mines the triplets (see training/first_stage.py)."""
    model: Optional[str] = None       # first-stage card (e.g. demo_tiny); null = own global
    weights: Optional[str] = None     # its weights (default: the card's)
    neighbour_places: int = 0         # >0: batches of first-stage neighbours (needs model)


@dataclass(frozen=True)
class EvalConfig:
    recall_ns: Tuple[int, ...] = (1, 5, 10, 20)
    batch_size: int = 32
    radius_m: float = RADIUS_M
    # selavpr with mining.model: validate by re-ranking the first stage's top rerank_k
    # (0 = the re-ranker's own global descriptor); the epoch is then picked by R@1
    rerank_k: int = 0


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = 10                        # CSV row + progress-bar refresh
    checkpoint_every_steps: Optional[int] = None  # extra mid-epoch checkpoints (--resume)


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "teacher"            # teacher | student | selavpr
    model: Optional[str] = None       # model card name or path to a card YAML
    # weights to start from: a file (our safetensors, official .pth, or a DINOv2 pretrain
    # file for the backbone only), "card" (the card's own weights), or null (seeded random)
    init_weights: Optional[str] = None
    # re-initialise the backbone for training from scratch (trunc-normal linears,
    # LayerScale 0.1); demo model only
    scratch_init: bool = False
    export_name: Optional[str] = None  # exported card name (default: output folder name)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    seed: int = 0
    deterministic: bool = True        # torch.use_deterministic_algorithms(warn_only) + seeds
    device: str = "auto"              # auto | cpu | cuda | cuda:N (under torchrun: local GPU)
    precision: str = "fp32"           # fp32 | bf16 | fp16 (autocast; fp16 uses a grad scaler)
    data: DataConfig = field(default_factory=DataConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # not settable from YAML: where relative paths resolve, and the shared data folder
    base_dir: Optional[str] = field(default=None, metadata={"internal": True})
    shared_dir: Optional[str] = field(default=None, metadata={"internal": True})

    def to_dict(self) -> Dict[str, Any]:
        """The user-facing keys as plain YAML types (tuples as lists)."""
        return {k: v for k, v in _plain(dataclasses.asdict(self)).items()
                if k not in _INTERNAL}

    def with_overrides(self, *texts: str) -> "TrainConfig":
        """A new config with ``dotted.key=value`` overrides applied (checked as on load)."""
        return build_config(self.to_dict(), texts, base_dir=self.base_dir,
                            shared_dir=self.shared_dir)


_INTERNAL = {f.name for f in fields(TrainConfig) if f.metadata.get("internal")}
FREE_FORM = {"data.train", "data.val"}        # validated by data.py instead


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------ typed merge

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp))


def _check_value(tp: Any, value: Any, path: str) -> Any:
    """``value`` as field type ``tp``, or ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(arg, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"config key {path}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {path}: expected list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(args[0], v, path) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key {path}: expected a list of {len(args)} values "
                              f"[min, max], got {value!r}")
        return tuple(_check_value(a, v, path) for a, v in zip(args, value))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported config field type {tp!r} at {path}")
    if not ok:
        raise ConfigError(f"config key {path}: expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls, user: Any, where: str):
    if not isinstance(user, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(user).__name__}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in fields(cls) if not f.metadata.get("internal")]
    unknown = sorted(set(user) - set(allowed))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s): {', '.join(prefix + k for k in unknown)}; "
            f"allowed keys{' in ' + where if where else ''}: {', '.join(sorted(allowed))}")
    values = {}
    for key, value in user.items():
        path = f"{where}.{key}" if where else key
        tp = hints[key]
        if path in FREE_FORM:
            values[key] = copy.deepcopy(value)
        elif dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value if value is not None else {}, path)
        else:
            values[key] = _check_value(tp, value, path)
    return cls(**values)


# ------------------------------------------------------------------ overrides and files

def parse_override(text: str) -> Dict[str, Any]:
    """``"optim.lr=1e-5"`` -> ``{"optim": {"lr": 1e-5}}``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value: {exc}") from None
    node: Dict[str, Any] = {}
    root = node
    parts = key.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return root


def _deep_update(base: Dict[str, Any], upd: Dict[str, Any]) -> Dict[str, Any]:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def _parse_scientific(obj: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; accept it as a float."""
    if isinstance(obj, dict):
        return {k: _parse_scientific(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_parse_scientific(v) for v in obj]
    if isinstance(obj, str):
        try:
            if any(c in obj for c in "eE") and obj.strip()[0] in "0123456789.-+":
                return float(obj)
        except ValueError:
            return obj
    return obj


def build_config(user: Optional[Dict[str, Any]] = None,
                 overrides: Iterable[str] = (),
                 base_dir: Optional[Union[str, Path]] = None,
                 shared_dir: Optional[Union[str, Path]] = None) -> TrainConfig:
    """Merge a user dict and overrides into the defaults; ConfigError on any bad key/value."""
    user = copy.deepcopy(user or {})
    for text in overrides:
        _deep_update(user, parse_override(text))
    user = _parse_scientific(user)
    cfg = _build(TrainConfig, user, "")
    validate(cfg)
    return dataclasses.replace(cfg, base_dir=str(base_dir) if base_dir else None,
                               shared_dir=str(shared_dir) if shared_dir else None)


def load_config(path: Union[str, Path], overrides: Iterable[str] = (),
                shared_dir: Optional[Union[str, Path]] = None) -> TrainConfig:
    """Read a YAML training config; relative paths in it resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    try:
        user = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    try:
        return build_config(user, overrides, base_dir=path.resolve().parent,
                            shared_dir=shared_dir)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def validate(cfg: TrainConfig) -> None:
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    if not cfg.model:
        raise ConfigError("config key 'model' (model card name or path) is required")
    if cfg.precision not in TRAIN_PRECISIONS:
        raise ConfigError(f"precision must be fp32, bf16 or fp16, got {cfg.precision!r}")
    d = cfg.data
    for key in ("places_per_batch", "images_per_place", "num_workers"):
        value = getattr(d, key)
        if value < (0 if key == "num_workers" else 1):
            raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")
    if d.images_per_place < 2:
        raise ConfigError("data.images_per_place must be >= 2 (a place needs a positive pair)")
    if d.train is None:
        raise ConfigError("data.train (one or more training sources) is required")
    fb = cfg.freeze.backbone_blocks
    if not (fb == "all" or (isinstance(fb, int) and fb >= 0)):
        raise ConfigError(f"freeze.backbone_blocks must be 'all' or an integer >= 0, got {fb!r}")
    o = cfg.optim
    if o.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optim.optimizer must be adam, adamw or sgd, got {o.optimizer!r}")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be step, cosine or constant, got {o.schedule!r}")
    if o.epochs < 1:
        raise ConfigError("optim.epochs must be >= 1")
    if o.grad_accum < 1:
        raise ConfigError("optim.grad_accum must be >= 1")
    if o.lr <= 0:
        raise ConfigError("optim.lr must be > 0")
    if cfg.loss.local_loss not in LOCAL_LOSSES:
        raise ConfigError(f"loss.local_loss must be one of {LOCAL_LOSSES}, got "
                          f"{cfg.loss.local_loss!r}")
    if cfg.loss.local_temperature <= 0:
        raise ConfigError("loss.local_temperature must be > 0")
    _validate_first_stage(cfg)
    if cfg.stage == "student" and not cfg.teacher.weights:
        raise ConfigError("stage student needs teacher.weights (the trained Super-CricaVPR "
                          "teacher) and teacher.model (its card)")


# ------------------------------------------------------------------ paths

def default_shared_dir() -> Path:
    """``VPR_SHARED_DIR`` when set, else ``shared/`` beside the repository."""
    env = os.environ.get(SHARED_DIR_ENV)
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared"


def shared_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.shared_dir).expanduser() if cfg.shared_dir else default_shared_dir()


def expand_shared(cfg: TrainConfig, value: str) -> str:
    """Replace a leading ``${VPR_SHARED_DIR}`` by the shared data folder."""
    text = str(value)
    if text.startswith(SHARED_DIR_TOKEN):
        folder = shared_dir(cfg)
        if not folder.is_dir():
            raise ConfigError(f"{text}: the shared data folder {folder} does not exist; pass "
                              f"vpr train --shared-dir DIR or set {SHARED_DIR_ENV}")
        return str(folder) + text[len(SHARED_DIR_TOKEN):]
    return text


def resolve_card_spec(cfg: TrainConfig, spec: str) -> str:
    """A model card given in the config: a card name as it is, a card YAML resolved like
    any config path (:func:`resolve_path`)."""
    return str(resolve_path(cfg, spec)) if str(spec).endswith((".yaml", ".yml")) else spec


def resolve_path(cfg: TrainConfig, value: Optional[str]) -> Optional[Path]:
    """A path from the config: ``${VPR_SHARED_DIR}/...``, absolute, or relative to the
    config file's folder (when it exists there) or the current folder."""
    if value is None:
        return None
    p = Path(expand_shared(cfg, value)).expanduser()
    if p.is_absolute():
        return p
    if cfg.base_dir and (Path(cfg.base_dir) / p).exists():
        return Path(cfg.base_dir) / p
    return p.resolve()


def resolve_sources(cfg: TrainConfig, sources: Any) -> Any:
    """Data source dict(s) with ``${VPR_SHARED_DIR}`` expanded in their ``path``."""
    if sources is None:
        return None
    if isinstance(sources, list):
        return [resolve_sources(cfg, s) for s in sources]
    if isinstance(sources, dict) and isinstance(sources.get("path"), str):
        return {**sources, "path": expand_shared(cfg, sources["path"])}
    return sources


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _validate_first_stage(cfg: "TrainConfig") -> None:
    """The first-stage settings of stage selavpr (mining.*, eval.rerank_k)."""
    m = cfg.mining
    if m.neighbour_places < 0 or cfg.eval.rerank_k < 0:
        raise ConfigError("mining.neighbour_places and eval.rerank_k must be >= 0")
    if (m.neighbour_places or cfg.eval.rerank_k or m.weights) and not m.model:
        raise ConfigError("mining.neighbour_places, mining.weights and eval.rerank_k need "
                          "mining.model (the first-stage card, e.g. demo_tiny)")
    if cfg.eval.rerank_k and 1 not in cfg.eval.recall_ns:
        raise ConfigError("eval.rerank_k picks the epoch by re-ranked R@1: eval.recall_ns "
                          "must include 1")
    if m.model and cfg.stage != "selavpr":
        raise ConfigError("mining.model is a setting of stage selavpr")
