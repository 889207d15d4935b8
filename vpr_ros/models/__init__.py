"""ROS-free model code: DINOv2 backbone, SciceVPR / Super-CricaVPR, SelaVPR, re-ranking.

Names are imported lazily so that reading model cards (``vpr models``, ``vpr --help``)
does not pay for importing torch and timm.
"""

from importlib import import_module

_EXPORTS = {
    "ModelCard": "cards", "load_card": "cards", "list_cards": "cards",
    "default_card_name": "cards", "default_rerank_card_name": "cards",
    "build_model": "factory", "load_model": "factory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
