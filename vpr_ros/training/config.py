"""Training configuration: YAML file + command-line overrides, checked strictly.

A config is a nested dict whose shape is fixed by :data:`DEFAULTS`.  Every key a user
writes must exist there (a typo such as ``optim.learning_rate`` raises
:class:`ConfigError` naming the unknown key and the keys that are allowed), and values
are checked for type.  Keys left out take the default.  Data sources (``data.train``,
``data.val``) are lists/dicts whose keys depend on the source ``type``; they are
checked by :mod:`vpr_ros.training.data`.

Overrides are ``dotted.key=value`` strings; the value is parsed as YAML
(``optim.lr=5e-5``, ``data.places_per_batch=16``, ``freeze.backbone_blocks=all``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import yaml

from ..errors import ConfigError

STAGES = ("teacher", "student", "selavpr")

# Sections whose value is free-form (validated elsewhere) instead of key-checked here.
FREE_FORM = {("data", "train"), ("data", "val")}

DEFAULTS: Dict[str, Any] = {
    "stage": "teacher",            # teacher | student | selavpr
    "model": None,                 # model card name or path to a card YAML
    "init_weights": None,          # weights to start from: a file (our safetensors, official
                                   # .pth, or a DINOv2 pretrain file for the backbone only),
                                   # "card" (the card's own weights), or null (seeded random)
    "scratch_init": False,         # re-initialise the backbone for training from scratch
                                   # (trunc-normal linears, LayerScale 0.1); demo model only
    "export_name": None,           # name of the exported model card (default: output folder name)
    "teacher": {                   # student stage: the trained Super-CricaVPR teacher
        "model": None,             # teacher card (name or path)
        "weights": None,           # teacher weights (safetensors or official .pth)
        "copy_head": False,        # also start the student's token mixers + GeM from the
                                   # teacher's (they keep training); the paper copies only
                                   # backbone + fusion conv (false)
    },
    "seed": 0,
    "deterministic": True,         # torch.use_deterministic_algorithms(warn_only) + fixed seeds
    "device": "auto",              # auto | cpu | cuda | cuda:N (under torchrun: the local GPU)
    "precision": "fp32",           # fp32 | bf16 | fp16 (autocast; fp16 uses a grad scaler)
    "data": {
        "train": None,             # one source dict or a list of them (see data.py)
        "val": None,               # one benchmark-layout source or null (no validation)
        "places_per_batch": 72,    # P (per optimisation step, summed over all processes)
        "images_per_place": 4,     # K
        "num_workers": 2,
        "batches_per_epoch": None, # null = every place once per epoch
        "avoid_near_places_m": None,  # keep places closer than this out of one batch
        "augment": {
            "color_jitter": 0.0,   # brightness/contrast/saturation strength (0 = off)
            "hue": 0.0,
            "crop_scale": [1.0, 1.0],  # random resized crop area range (1,1 = off)
            "crop_ratio": [0.75, 1.3333333],
            "rand_augment_ops": 0, # torchvision RandAugment num_ops (official GSV recipe: 3)
            "horizontal_flip": False,
            "grayscale": 0.0,      # probability of converting to grey
        },
    },
    "freeze": {
        "backbone_blocks": "all",  # "all" or N: patch/pos embedding + first N blocks frozen
    },
    "optim": {
        "optimizer": "adam",       # adam | adamw | sgd
        "lr": 1.0e-4,
        "weight_decay": 0.0,
        "momentum": 0.9,           # sgd only
        "schedule": "step",        # step | cosine | constant
        "step_epochs": 3,          # step: lr *= step_gamma every step_epochs epochs
        "step_gamma": 0.5,
        "warmup_steps": 0,
        "min_lr": 0.0,             # cosine floor
        "epochs": 10,
        "grad_accum": 1,           # micro-batches per optimiser step
        "clip_grad_norm": None,
        "patience": 10,            # stop after this many epochs without val R@5 gain
    },
    "loss": {
        "ms_alpha": 1.0,           # multi-similarity loss (official: alpha 1, beta 50, base 0)
        "ms_beta": 50.0,
        "ms_base": 0.0,
        "miner_epsilon": 0.1,      # multi-similarity miner margin (official 0.1)
        "gamma": 1.0,              # student: weight of the multi-similarity loss
        "eta": 1.0,                # student: weight of the distillation loss
        "triplet_margin": 0.1,     # selavpr: global triplet margin (official 0.1)
        "local_weight": 1.0,       # selavpr: weight of the mutual-NN local loss
        "negatives_per_anchor": 2, # selavpr: hardest in-batch negatives per anchor
        "gather_across_processes": True,  # DDP: MS/distillation loss over the whole batch
                                   # of all processes (as DataParallel does), not per process
    },
    "eval": {
        "recall_ns": [1, 5, 10, 20],
        "batch_size": 32,
        "radius_m": 25.0,
    },
    "log": {
        "every_steps": 10,         # CSV row + progress-bar refresh
        "checkpoint_every_steps": None,  # extra mid-epoch checkpoints (for --resume)
    },
}


def _type_ok(default: Any, value: Any) -> bool:
    if value is None or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, str):
        return True   # e.g. "all" or an int for freeze.backbone_blocks; checked later
    return True


def _merge(defaults: Dict[str, Any], user: Dict[str, Any], where: str) -> Dict[str, Any]:
    if not isinstance(user, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(user).__name__}")
    unknown = sorted(set(user) - set(defaults))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s): {', '.join(prefix + k for k in unknown)}; "
            f"allowed keys{' in ' + where if where else ''}: {', '.join(sorted(defaults))}")
    out = copy.deepcopy(defaults)
    for key, value in user.items():
        path = f"{where}.{key}" if where else key
        default = defaults[key]
        if tuple(path.split(".")) in FREE_FORM:
            out[key] = copy.deepcopy(value)
        elif isinstance(default, dict):
            out[key] = _merge(default, value if value is not None else {}, path)
        else:
            if not _type_ok(default, value):
                raise ConfigError(f"config key {path}: expected {type(default).__name__}, "
                                  f"got {value!r}")
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            out[key] = value
    return out


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
                 base_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Merge a user dict and overrides into the defaults; ConfigError on any bad key/value."""
    user = copy.deepcopy(user or {})
    for text in overrides:
        _deep_update(user, parse_override(text))
    user = _parse_scientific(user)
    cfg = _merge(DEFAULTS, user, "")
    validate(cfg)
    cfg["_base_dir"] = str(base_dir) if base_dir else None
    return cfg


def load_config(path: Union[str, Path], overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Read a YAML training config; relative paths in it resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    try:
        user = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    try:
        return build_config(user, overrides, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def validate(cfg: Dict[str, Any]) -> None:
    if cfg["stage"] not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {cfg['stage']!r}")
    if not cfg["model"]:
        raise ConfigError("config key 'model' (model card name or path) is required")
    if cfg["precision"] not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be fp32, bf16 or fp16, got {cfg['precision']!r}")
    d = cfg["data"]
    for key in ("places_per_batch", "images_per_place", "num_workers"):
        if not isinstance(d[key], int) or d[key] < (0 if key == "num_workers" else 1):
            raise ConfigError(f"data.{key} must be a positive integer, got {d[key]!r}")
    if d["images_per_place"] < 2:
        raise ConfigError("data.images_per_place must be >= 2 (a place needs a positive pair)")
    if d["train"] is None:
        raise ConfigError("data.train (one or more training sources) is required")
    fb = cfg["freeze"]["backbone_blocks"]
    if not (fb == "all" or (isinstance(fb, int) and not isinstance(fb, bool) and fb >= 0)):
        raise ConfigError(f"freeze.backbone_blocks must be 'all' or an integer >= 0, got {fb!r}")
    o = cfg["optim"]
    if o["optimizer"] not in ("adam", "adamw", "sgd"):
        raise ConfigError(f"optim.optimizer must be adam, adamw or sgd, got {o['optimizer']!r}")
    if o["schedule"] not in ("step", "cosine", "constant"):
        raise ConfigError(f"optim.schedule must be step, cosine or constant, got {o['schedule']!r}")
    if o["epochs"] is None or o["epochs"] < 1:
        raise ConfigError("optim.epochs must be >= 1")
    if o["grad_accum"] < 1:
        raise ConfigError("optim.grad_accum must be >= 1")
    if o["lr"] is None or o["lr"] <= 0:
        raise ConfigError("optim.lr must be > 0")
    if cfg["stage"] == "student" and not cfg["teacher"]["weights"]:
        raise ConfigError("stage student needs teacher.weights (the trained Super-CricaVPR "
                          "teacher) and teacher.model (its card)")
    if len(d["augment"]["crop_scale"]) != 2 or len(d["augment"]["crop_ratio"]) != 2:
        raise ConfigError("data.augment.crop_scale / crop_ratio must be [min, max]")


def resolve_path(cfg: Dict[str, Any], value: Optional[str]) -> Optional[Path]:
    """A path from the config, relative to the config file's folder (or the cwd)."""
    if value is None:
        return None
    p = Path(str(value)).expanduser()
    if p.is_absolute():
        return p
    base = cfg.get("_base_dir")
    if base and (Path(base) / p).exists():
        return Path(base) / p
    return p.resolve()


def dump_config(cfg: Dict[str, Any]) -> str:
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return yaml.safe_dump(clean, sort_keys=False)
