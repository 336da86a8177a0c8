"""Poisoning and fast training, shared by benchmarks, the demo, tests and training-time defenses."""
from .augment import augment_batch
from .loop import evaluate_accuracy, predict, train_classifier
from .poison import poison_arrays
from .synthetic import make_synthetic

__all__ = ["augment_batch", "evaluate_accuracy", "make_synthetic", "poison_arrays", "predict", "train_classifier"]
