"""Transcoder training: per-layer (ReLU/JumpReLU, optional skip) and cross-layer.

SAE-Lens 6.x cannot train transcoders; this package does, on a ``HookedTransformer``'s MLP
inputs and outputs streamed from a token source, and saves in SAE-Lens format (per-layer)
or the CLT format. See ``docs/training.md``.

Modules: ``config`` (TrainingConfig, device selection, errors), ``activations`` (token
sources, activation stream), ``trainable`` (the weights and losses), ``trainer`` (the
loop), ``checkpoint``, ``export`` (to SAE-Lens / CLT objects), ``evaluate``.
"""

from tl_circuits.training.config import (
    CheckpointError,
    TrainingConfig,
    TrainingConfigError,
    TrainingDataError,
    select_device,
)
from tl_circuits.training.evaluate import TrainingReport, evaluate_transcoders
from tl_circuits.training.trainer import TrainingResult, train_transcoders

__all__ = [
    "CheckpointError",
    "TrainingConfig",
    "TrainingConfigError",
    "TrainingDataError",
    "TrainingReport",
    "TrainingResult",
    "evaluate_transcoders",
    "select_device",
    "train_transcoders",
]
