"""Safe checkpoint loading (official .pth files, DINOv2 pretrains, our safetensors) and saving.

Nothing here unpickles arbitrary objects: ``.pth`` files are read with
``torch.load(weights_only=True, map_location="cpu")``, allow-listing only the numpy
names that the official training scripts pickle into their metadata (numpy 1.x module
paths, see ``OFFICIAL_NUMPY_GLOBALS``).  Our own files are safetensors.

Accepted inputs, whatever the card:

* official training dicts (``model_state_dict`` + optimiser/metadata) and bare state
  dicts, with or without the ``module.`` prefix of ``torch.nn.DataParallel``;
* DINOv2 pretrain files (plain backbone keys), loaded into the backbone of any card;
  the rest of the model keeps its seeded initialisation;
* safetensors written by :func:`save_weights`.

Key mapping official -> ours (explicit, see ``OFFICIAL_KEY_RULES``):

================================  =============================
official (after ``module.``)      ours
================================  =============================
SciceVPR ``backbone.dino_model.``  ``backbone.``
SciceVPR ``conv.``                 ``fusion.``
SciceVPR ``tokenmix.N.mix.``       ``token_mixers.N.mlp.``
SciceVPR ``tokenmix.N.norm.``      ``token_mixers.N.norm.``
SciceVPR ``gem.p``, ``encoder.*``  unchanged
SelaVPR ``backbone.*``             unchanged, except
SelaVPR ``...adapterK.D_fcJ.``     ``...adapterK.fcJ.``
SelaVPR ``aggregation.1.p``        ``gem.p``
SelaVPR ``LocalAdapt.``            ``local_adapt.``
DINOv2 pretrain ``<key>``          ``backbone.<key>``
================================  =============================

Loading is strict by default: a :class:`CheckpointError` names missing, unexpected
and mis-shaped keys (a few of each, with counts) and says when the file belongs to
another architecture.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..errors import CheckpointError
from .cards import ModelCard

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Kinds of state dicts we recognise (after stripping "module.").
KIND_SCICE_OFFICIAL = "scicevpr_official"      # SciceVPR / Super-CricaVPR training files
KIND_SELA_OFFICIAL = "selavpr_official"
KIND_DINOV2_PRETRAIN = "dinov2_pretrain"
KIND_OURS = "vpr_ros"

OFFICIAL_KEY_RULES: Dict[str, List[Tuple[str, str]]] = {
    KIND_SCICE_OFFICIAL: [
        (r"^backbone\.dino_model\.", "backbone."),
        (r"^conv\.", "fusion."),
        (r"^tokenmix\.(\d+)\.mix\.", r"token_mixers.\1.mlp."),
        (r"^tokenmix\.(\d+)\.norm\.", r"token_mixers.\1.norm."),
    ],
    KIND_SELA_OFFICIAL: [
        (r"\.adapter([12])\.D_fc([12])\.", r".adapter\1.fc\2."),
        (r"^aggregation\.1\.p$", "gem.p"),
        (r"^LocalAdapt\.", "local_adapt."),
    ],
    KIND_DINOV2_PRETRAIN: [
        (r"^", "backbone."),
    ],
    KIND_OURS: [],
}

_KIND_ARCHITECTURES = {
    KIND_SCICE_OFFICIAL: ("scicevpr", "super_cricavpr"),
    KIND_SELA_OFFICIAL: ("selavpr",),
}

_KIND_DESCRIPTIONS = {
    KIND_SCICE_OFFICIAL: "an official SciceVPR / Super-CricaVPR checkpoint",
    KIND_SELA_OFFICIAL: "an official SelaVPR checkpoint",
    KIND_DINOV2_PRETRAIN: "a DINOv2 pretrain (backbone-only) file",
    KIND_OURS: "a vpr_ros weights file",
}


def official_numpy_globals() -> list:
    """Exactly the numpy objects the official (numpy 1.x) checkpoints pickle."""
    import numpy

    try:
        core = numpy._core
    except AttributeError:  # numpy 1.x
        core = numpy.core
    allowed = [
        (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        numpy.ndarray,
        numpy.dtype,
        (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    ]
    dtypes = getattr(numpy, "dtypes", None)
    if dtypes is not None and hasattr(dtypes, "Float64DType"):
        allowed.append(dtypes.Float64DType)
    return allowed


# ---------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------

def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)


def read_checkpoint(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read any supported weights file -> (flat state dict on the CPU, metadata)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"weights file is empty (0 bytes): {path}")
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _read_torch(path), {}


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {path}: {exc} (truncated or "
                              "corrupt? download or export it again)") from None
    return tensors, meta


def _read_torch(path: Path) -> Dict[str, torch.Tensor]:
    import pickle

    try:
        # mmap (zip files only): optimiser state in training files is never read into memory.
        mmap = zipfile.is_zipfile(path)
        with torch.serialization.safe_globals(official_numpy_globals()), \
                warnings.catch_warnings():
            # A raw pickle of protocol > 2 makes torch warn before refusing it; the refusal
            # (below) is the one line the user needs.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else "unpickling failed"
        if "Unsupported global" in str(exc) or "weights_only" in str(exc):
            raise CheckpointError(
                f"{path} contains Python objects that are not allowed in a weights file "
                f"({msg[:200]}); only tensors, numbers and numpy metadata are loaded, never "
                "arbitrary pickled code.  Re-export the state dict with torch.save("
                "model.state_dict())") from None
        raise CheckpointError(f"cannot read {path}: it is not a PyTorch checkpoint or it is "
                              f"corrupt ({msg[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError,
            AttributeError, IndexError, TypeError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read {path}: truncated, corrupt or not a PyTorch/"
                              f"safetensors weights file ({detail}); download it again") from None
    return extract_state_dict(obj, path)


def extract_state_dict(obj, path: Union[Path, str] = "checkpoint") -> Dict[str, torch.Tensor]:
    """Official training dict / wrapped dict / bare state dict -> flat tensor dict."""
    if isinstance(obj, Mapping):
        for key in ("model_state_dict", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(
                    isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors or a "
                              "training checkpoint with 'model_state_dict')")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (keys: {list(obj)[:6]})")
    return tensors


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove DataParallel/DDP ``module.`` prefixes (leading ones only)."""
    out = {}
    for k, v in state.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


# ---------------------------------------------------------------------------------
# recognising and mapping keys
# ---------------------------------------------------------------------------------

def detect_kind(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith("backbone.dino_model.") or k.startswith("tokenmix.") or
           k.startswith("conv.") for k in keys):
        return KIND_SCICE_OFFICIAL
    if any(k.startswith("LocalAdapt.") or k == "aggregation.1.p" or ".D_fc" in k for k in keys):
        return KIND_SELA_OFFICIAL
    if any(k in ("cls_token", "pos_embed") or k.startswith("blocks.") for k in keys):
        return KIND_DINOV2_PRETRAIN
    return KIND_OURS


def official_to_ours(state: Mapping[str, torch.Tensor], kind: Optional[str] = None
                     ) -> Tuple[Dict[str, torch.Tensor], str]:
    """Rename an official (or pretrain) state dict to our parameter names."""
    state = strip_module_prefix(state)
    kind = kind or detect_kind(state)
    rules = [(re.compile(p), r) for p, r in OFFICIAL_KEY_RULES[kind]]
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        out[new] = value
    return out, kind


def _is_adapter_key(key: str) -> bool:
    return ".adapter1." in key or ".adapter2." in key


def _summarise(keys: List[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > n else ''})"


def check_against_model(mapped: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
                        card: ModelCard, kind: str, source: str,
                        strict: bool = True) -> List[str]:
    """Compare mapped keys/shapes with the model's; raise CheckpointError on mismatch.

    Returns the model keys the file does not provide (allowed only for pretrain files).
    """
    allowed = _KIND_ARCHITECTURES.get(kind)
    if allowed and card.architecture not in allowed:
        raise CheckpointError(
            f"{source} is {_KIND_DESCRIPTIONS[kind]}, but model card {card.name!r} is a "
            f"{card.architecture} model; choose a {' or '.join(allowed)} card (e.g. --model "
            f"{'selavpr_vitl14' if 'selavpr' in allowed else 'scicevpr_b'}) or the right file")
    if kind == KIND_DINOV2_PRETRAIN:
        expected_here = {k: s for k, s in expected.items() if k.startswith("backbone.")}
    else:
        expected_here = dict(expected)
    missing = [k for k in expected_here if k not in mapped]
    unexpected = [k for k in mapped if k not in expected_here]
    mis_shaped = [f"{k} file {tuple(mapped[k].shape)} vs model {tuple(expected_here[k])}"
                  for k in expected_here
                  if k in mapped and tuple(mapped[k].shape) != tuple(expected_here[k])]
    if kind == KIND_DINOV2_PRETRAIN:
        # Pretrain files have no adapters (SelaVPR starts them at identity / zero).
        missing = [k for k in missing if not _is_adapter_key(k)]
    problems = []
    if mis_shaped:
        problems.append("mis-shaped keys " + _summarise(mis_shaped, 3))
    if strict and missing:
        problems.append("missing keys " + _summarise(missing))
    if strict and unexpected:
        problems.append("unexpected keys " + _summarise(unexpected))
    if problems:
        hint = ""
        if kind == KIND_SCICE_OFFICIAL:
            layers = {int(m.group(1)) for k in mapped
                      for m in [re.match(r"encoder\.layers\.(\d+)\.", k)] if m}
            file_layers = max(layers) + 1 if layers else 0
            card_layers = card.head.get("encoder_layers")
            if file_layers and card_layers and file_layers != card_layers:
                which = "a Super-CricaVPR teacher" if file_layers == 2 else "a SciceVPR student"
                hint = (f" The file has {file_layers} encoder layer(s), which looks like {which} "
                        f"checkpoint; card {card.name!r} expects {card_layers}.")
        if mis_shaped and not hint:
            hint = (" The file was trained with other sizes than the card describes "
                    "(e.g. ViT-L vs ViT-B, other mix_in_dim); pick the matching card.")
        raise CheckpointError(f"{source} ({_KIND_DESCRIPTIONS[kind]}) does not match model card "
                              f"{card.name!r}: " + "; ".join(problems) + "." + hint)
    return [k for k in expected if k not in mapped]


def load_weights(model: nn.Module, card: ModelCard, path: PathLike, strict: bool = True) -> str:
    """Load any supported file into ``model`` (built from ``card``); returns the file kind."""
    path = Path(os.path.expanduser(str(path)))
    raw, meta = read_checkpoint(path)
    if meta.get("architecture") and meta["architecture"] != card.architecture:
        raise CheckpointError(f"{path} holds a {meta['architecture']} model "
                              f"(card {meta.get('card_name', '?')}), but model card "
                              f"{card.name!r} is {card.architecture}")
    mapped, kind = official_to_ours(raw)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    not_in_file = check_against_model(mapped, expected, card, kind, str(path), strict=strict)
    if kind == KIND_DINOV2_PRETRAIN and not_in_file:
        log.warning("%s is a DINOv2 pretrain file: the backbone is loaded, %d other tensors "
                    "(head%s) keep their seeded initialisation", path, len(not_in_file),
                    ", adapters" if any(_is_adapter_key(k) for k in not_in_file) else "")
    usable = {k: v for k, v in mapped.items() if k in expected}
    result = model.load_state_dict(usable, strict=False)
    if strict and kind != KIND_DINOV2_PRETRAIN and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(f"{path}: internal key mismatch {result}")  # checked above; defensive
    return kind


# ---------------------------------------------------------------------------------
# saving our own files, fingerprints
# ---------------------------------------------------------------------------------

def card_sidecar_path(weights_path: PathLike) -> Path:
    p = Path(weights_path)
    return p.with_name(p.name + ".card.yaml")


def save_weights(model: nn.Module, card: ModelCard, path: PathLike) -> Path:
    """Write ``model``'s weights as safetensors plus ``<path>.card.yaml`` (atomically).

    The sidecar card is ``card`` with ``weights`` pointing at the new file and no
    random seed, so ``load_card(<path>.card.yaml)`` gives a loadable model.
    """
    from safetensors.torch import save_file

    from ..atomic import atomic_path
    from .cards import write_card

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "vpr_ros", "architecture": card.architecture, "card_name": card.name}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=meta)
    sidecar = card.replace(weights=path.name, random_init_seed=None, path=card_sidecar_path(path))
    write_card(sidecar, card_sidecar_path(path))
    _FINGERPRINTS.pop(str(path.resolve()), None)
    return path


_FINGERPRINTS: Dict[str, Tuple[int, int, str]] = {}


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file, cached per (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    cached = _FINGERPRINTS.get(str(p))
    if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
        return cached[2]
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _FINGERPRINTS[str(p)] = (st.st_size, st.st_mtime_ns, digest)
    return digest
