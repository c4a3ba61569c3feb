"""Training configuration, its validation, device selection and the training errors.

Every hyperparameter of a run lives in :class:`TrainingConfig`. Values are in *normalised*
activation units where that matters: the trainer rescales each layer's transcoder input
and MLP output so that their mean squared norm is ``d_model`` (see ``docs/training.md``),
so ``lr``, ``sparsity_coefficient``, ``jumprelu_bandwidth`` and ``jumprelu_init_threshold``
mean the same on every model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tl_circuits.errors import TLCircuitsError
from tl_circuits.model.hooks import SUPPORTED_INPUT_HOOKS

Kind = Literal["per_layer", "cross_layer"]
ActivationName = Literal["relu", "jumprelu"]
LossName = Literal["relative_mse", "mse"]

KINDS: tuple[str, ...] = ("per_layer", "cross_layer")
ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu")
LOSSES: tuple[str, ...] = ("relative_mse", "mse")

#: Fields that may differ between a checkpoint and the run resuming it (they do not change
#: the computation).
RESUMABLE_FIELDS = frozenset({"device", "checkpoint_every_tokens"})


class TrainingConfigError(TLCircuitsError):
    """A training hyperparameter is invalid or does not fit the model."""


class TrainingDataError(TLCircuitsError):
    """The training tokens (or loss mask) have the wrong type, dtype, shape or values."""


class CheckpointError(TLCircuitsError):
    """A checkpoint is missing, unreadable, or belongs to a different configuration."""


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters of one transcoder training run.

    - ``kind``: ``"per_layer"`` (one SAE-Lens transcoder per layer) or ``"cross_layer"``
      (features of layer ``l`` write to the MLP outputs of layers ``l..n_layers-1``).
    - ``d_sae``: features per layer. ``activation``: ``"relu"`` or ``"jumprelu"``.
    - ``skip``: also learn an affine skip ``W_skip`` ``[d_model, d_model]``.
    - ``loss``: ``"relative_mse"`` (per token ``|y_hat - y|^2 / (|y|^2 + eps)``, averaged;
      ``eps = relative_mse_floor * d_model`` in normalised units) or ``"mse"``
      (``mean |y_hat - y|^2 / d_model`` in normalised units, i.e. MSE over the mean
      squared norm). Summed over target layers.
    - ``sparsity_coefficient``: weight of the sparsity penalty, per token and summed over
      source layers: ReLU ``sum_f a_f |d_f|``; JumpReLU
      ``sum_f tanh(sparsity_tanh_scale * a_f |d_f|)``, where ``|d_f|`` is the norm of
      feature ``f``'s decoder (all its target layers concatenated for a CLT). Ramped
      linearly from 0 over the first ``sparsity_warmup_fraction`` of ``n_tokens``.
    - ``lr``: Adam learning rate; decays linearly to 0 over the last ``lr_decay_fraction``
      of ``n_tokens``. ``batch_tokens``: tokens (activation rows) per optimiser step;
      ``n_tokens``: tokens to train on in total.
    - ``layers``: per-layer kind only, the layers to train (default all);
      ``input_hook``: suffix after ``blocks.{l}.`` of the transcoder input.
    - ``seed``: initialisation and shuffling; ``device``: None picks ``cuda`` when available.
    - ``dead_after_tokens``: a feature that has not fired in this many training tokens
      counts as dead (reported, not re-initialised).
    - ``checkpoint_every_tokens``: write a checkpoint to ``out_dir`` this often (0: never).
    - ``chunk_tokens``: tokens per activation chunk when ``tokens`` is one tensor (a chunk's
      activations of every layer are held in memory at once and shuffled).
    - ``jumprelu_bandwidth``: width ``eps`` of the rectangle kernel of the threshold's
      pseudo-derivative; ``jumprelu_init_threshold``: initial threshold.
    - ``init_decoder_norm``: initial norm of each feature's decoder (per target layer).
    """

    kind: Kind = "per_layer"
    d_sae: int = 1024
    activation: ActivationName = "relu"
    skip: bool = False
    loss: LossName = "relative_mse"
    sparsity_coefficient: float = 1e-3
    lr: float = 1e-3
    batch_tokens: int = 1024
    n_tokens: int = 2_000_000
    layers: tuple[int, ...] | None = None
    input_hook: str = "mlp.hook_in"
    seed: int = 0
    device: str | None = None
    dead_after_tokens: int = 1_000_000
    checkpoint_every_tokens: int = 500_000
    chunk_tokens: int = 32_768
    sparsity_warmup_fraction: float = 0.05
    lr_decay_fraction: float = 0.2
    sparsity_tanh_scale: float = 4.0
    relative_mse_floor: float = 1e-3
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.1
    init_decoder_norm: float = 0.1

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        self.validate()

    def validate(self) -> None:
        """Raise TrainingConfigError naming the first bad field and its allowed values."""
        if self.kind not in KINDS:
            raise TrainingConfigError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise TrainingConfigError(
                f"activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if self.loss not in LOSSES:
            raise TrainingConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        positive_ints = ("d_sae", "batch_tokens", "n_tokens", "dead_after_tokens", "chunk_tokens")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TrainingConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.checkpoint_every_tokens, int) or self.checkpoint_every_tokens < 0:
            raise TrainingConfigError(
                "checkpoint_every_tokens must be an integer >= 0 (0: no checkpoints), got "
                f"{self.checkpoint_every_tokens!r}"
            )
        positive_floats = (
            "lr",
            "sparsity_tanh_scale",
            "relative_mse_floor",
            "jumprelu_bandwidth",
            "jumprelu_init_threshold",
            "init_decoder_norm",
        )
        for name in positive_floats:
            if not float(getattr(self, name)) > 0:
                raise TrainingConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not float(self.sparsity_coefficient) >= 0:
            raise TrainingConfigError(
                f"sparsity_coefficient must be >= 0, got {self.sparsity_coefficient!r}"
            )
        for name in ("sparsity_warmup_fraction", "lr_decay_fraction"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise TrainingConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.input_hook not in SUPPORTED_INPUT_HOOKS:
            raise TrainingConfigError(
                f"input_hook must be one of {SUPPORTED_INPUT_HOOKS} (the part after "
                f"'blocks.{{l}}.'), got {self.input_hook!r}"
            )
        if self.layers is not None:
            if self.kind == "cross_layer":
                raise TrainingConfigError(
                    "layers must be None for kind='cross_layer': a CLT spans every layer"
                )
            if len(self.layers) == 0 or len(set(self.layers)) != len(self.layers):
                raise TrainingConfigError(
                    f"layers must be a non-empty list of distinct layers, got {self.layers}"
                )

    def training_layers(self, n_layers: int) -> list[int]:
        """The layers this run trains on a model with ``n_layers`` blocks (sorted).

        Raises TrainingConfigError for a layer outside ``0..n_layers-1``.
        """
        if self.layers is None:
            return list(range(n_layers))
        bad = [layer for layer in self.layers if not 0 <= layer < n_layers]
        if bad:
            raise TrainingConfigError(
                f"layers {bad} are out of range: the model has layers 0..{n_layers - 1}"
            )
        return sorted(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (``layers`` as a list)."""
        out = dataclasses.asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise TrainingConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainingConfigError(f"unknown TrainingConfig fields {unknown}")
        values = dict(data)
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        return cls(**values)

    def differences(self, other: TrainingConfig) -> list[str]:
        """Names of fields that differ from ``other``, ignoring :data:`RESUMABLE_FIELDS`."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in RESUMABLE_FIELDS and mine[k] != theirs[k])


def select_device(requested: str | None, cuda_available: bool | None = None) -> torch.device:
    """The device to train on: ``requested`` if given, else ``cuda`` when available.

    ``cuda_available`` defaults to ``torch.cuda.is_available()`` (pass it to test the rule).
    Raises TrainingConfigError for a CUDA device when CUDA is not available.
    """
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested is None:
        return torch.device("cuda" if available else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise TrainingConfigError(f"device {requested!r} is not a valid torch device") from exc
    if device.type == "cuda" and not available:
        raise TrainingConfigError(
            f"device {requested!r} requested but CUDA is not available; use device=None or 'cpu'"
        )
    return device
