"""ROS-free model code: DINOv2 backbone, SciceVPR / Super-CricaVPR, SelaVPR, re-ranking."""

from .cards import ModelCard, default_card_name, list_cards, load_card  # noqa: F401
from .factory import build_model, load_model  # noqa: F401
