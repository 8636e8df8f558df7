"""Filtering generated images by DreamSim similarity of object crops to the real photos."""

from personalization.filtering.embedders import DreamSimEmbedder, EmbedderError, check_dreamsim_cache
from personalization.filtering.maskers import NoMasker, PatchMasker, SamMasker, build_masker, crop_box, mask_box
from personalization.filtering.scorer import Scorer, compute_scores, take_until_accepted

__all__ = [
    "DreamSimEmbedder",
    "EmbedderError",
    "NoMasker",
    "PatchMasker",
    "SamMasker",
    "Scorer",
    "build_masker",
    "check_dreamsim_cache",
    "compute_scores",
    "crop_box",
    "mask_box",
    "take_until_accepted",
]
