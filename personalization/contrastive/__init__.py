"""Contrastive fine-tuning: triplet sampling (ids), the training data, losses, and the plain-PyTorch step."""

from personalization.contrastive.data import TrainingRows, TripletDataset, load_negatives_folder, select_training_rows
from personalization.contrastive.losses import (
    LOSSES,
    build_loss,
    cross_entropy,
    hinge,
    info_nce,
    multi_positive_info_nce,
)
from personalization.contrastive.step import DeepSpeedStepper, Stepper, TorchStepper, train_step
from personalization.contrastive.triplets import TripletError, sample_triplets

__all__ = [
    "LOSSES",
    "DeepSpeedStepper",
    "Stepper",
    "TorchStepper",
    "TrainingRows",
    "TripletDataset",
    "TripletError",
    "build_loss",
    "cross_entropy",
    "hinge",
    "info_nce",
    "load_negatives_folder",
    "multi_positive_info_nce",
    "sample_triplets",
    "select_training_rows",
    "train_step",
]
