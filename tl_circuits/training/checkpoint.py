"""Training checkpoints: safetensors for tensors, JSON for the rest.

``out_dir/checkpoint/`` holds

- ``weights.safetensors``: the module's parameters and buffers (``module.<name>``), the
  Adam moments (``adam.<i>.exp_avg``, ``adam.<i>.exp_avg_sq``, ``adam.<i>.step`` for
  parameter ``i`` in ``module.parameters()`` order) and ``last_fired [L, F]`` (tokens seen
  when each feature last fired);
- ``state.json``: format and version, the :class:`TrainingConfig`, the trained layers,
  ``tokens_seen``, ``step``, the stream position (chunk, row), the running statistics and
  the seconds trained so far.

There is no other random state: initialisation uses a generator seeded by ``seed`` and
each chunk's shuffle one seeded by ``(seed, chunk)``, so the stream position determines
every later batch. A checkpoint is written to a temporary directory and renamed into
place, so an interrupted write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tl_circuits.errors import TLCircuitsError
from tl_circuits.training.activations import StreamPosition
from tl_circuits.training.config import CheckpointError, TrainingConfig
from tl_circuits.training.trainable import TrainableTranscoder

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_FORMAT = "tl_circuits.training_checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainingState:
    """Everything a run needs to continue besides the weights and Adam moments."""

    tokens_seen: int = 0
    step: int = 0
    position: StreamPosition = field(default_factory=StreamPosition)
    seconds: float = 0.0
    stats: dict[str, Any] | None = None


def save_checkpoint(
    out_dir: Path,
    cfg: TrainingConfig,
    layers: list[int],
    module: TrainableTranscoder,
    optimizer: torch.optim.Adam,
    last_fired: Tensor,
    state: TrainingState,
) -> Path:
    """Write ``out_dir/checkpoint`` atomically; returns its path."""
    tensors: dict[str, Tensor] = {
        f"module.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()
    }
    params = list(module.parameters())
    for i, param in enumerate(params):
        moments = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in moments:
                value = torch.as_tensor(moments[key]).detach().cpu().reshape(moments[key].shape)
                tensors[f"adam.{i}.{key}"] = value.contiguous()
    tensors["last_fired"] = last_fired.detach().cpu().contiguous()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "layers": layers,
        "tokens_seen": state.tokens_seen,
        "step": state.step,
        "position": {"chunk": state.position.chunk, "row": state.position.row},
        "seconds": state.seconds,
        "stats": state.stats,
    }
    final = out_dir / CHECKPOINT_DIR
    tmp = out_dir / (CHECKPOINT_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
    old = out_dir / (CHECKPOINT_DIR + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load_checkpoint(
    out_dir: Path,
    cfg: TrainingConfig,
    layers: list[int],
    module: TrainableTranscoder,
    optimizer: torch.optim.Adam,
    device: torch.device,
) -> tuple[Tensor, TrainingState]:
    """Restore weights and Adam moments into ``module``/``optimizer``; return
    ``(last_fired, state)``.

    Raises CheckpointError when there is no checkpoint, it is of another format, or its
    configuration or layers differ from this run's (naming the fields).
    """
    root = out_dir / CHECKPOINT_DIR
    if not (root / STATE_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"resume=True but {root} holds no checkpoint ({STATE_FILE} + {WEIGHTS_FILE}); "
            "run with resume=False to start from scratch"
        )
    meta = _read_state(root / STATE_FILE)
    try:
        saved = TrainingConfig.from_dict(meta["config"])
    except (TLCircuitsError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{root / STATE_FILE}: its 'config' is not valid: {exc}") from None
    diff = cfg.differences(saved)
    if diff:
        detail = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in diff)
        raise CheckpointError(
            f"the checkpoint in {root} was made with a different configuration ({detail}); "
            "resume with the same TrainingConfig or use another out_dir"
        )
    if meta["layers"] != layers:
        raise CheckpointError(
            f"the checkpoint trained layers {meta['layers']}, this run layers {layers} "
            "(does the model have the same number of layers?)"
        )
    tensors = _read_weights(root / WEIGHTS_FILE, device)
    module_state = {
        k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")
    }
    try:
        module.load_state_dict(module_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{root / WEIGHTS_FILE}: weights do not fit this model: {exc}"
        ) from exc
    for i, param in enumerate(module.parameters()):
        moments = {
            key: tensors[f"adam.{i}.{key}"]
            for key in ("exp_avg", "exp_avg_sq", "step")
            if f"adam.{i}.{key}" in tensors
        }
        if moments:
            _check_moments(root / WEIGHTS_FILE, i, param, moments)
            moments["step"] = moments["step"].cpu()  # Adam keeps its step count on the CPU
            optimizer.state[param] = moments
    position = StreamPosition(meta["position"]["chunk"], meta["position"]["row"])
    state = TrainingState(
        tokens_seen=meta["tokens_seen"],
        step=meta["step"],
        position=position,
        seconds=meta["seconds"],
        stats=meta["stats"],
    )
    last_fired = tensors.get("last_fired")
    if last_fired is None or last_fired.dim() != 2 or last_fired.shape[0] != len(layers):
        shape = None if last_fired is None else tuple(last_fired.shape)
        raise CheckpointError(
            f"{root / WEIGHTS_FILE}: 'last_fired' must be a [{len(layers)}, d_sae] tensor, got "
            f"{'nothing' if shape is None else shape}"
        )
    return last_fired, state


# the type of every field of state.json (stats: an object or null)
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "version": (int,),
    "config": (dict,),
    "layers": (list,),
    "tokens_seen": (int,),
    "step": (int,),
    "position": (dict,),
    "seconds": (int, float),
    "stats": (dict, type(None)),
}


def _read_state(path: Path) -> dict[str, Any]:
    """``state.json`` parsed and type-checked (CheckpointError naming the file otherwise)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not valid JSON ({exc}); the checkpoint is corrupt: delete "
            f"{path.parent} or run with resume=False"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint")
    problems = []
    for key, types in _STATE_TYPES.items():
        value = meta.get(key, ...)
        if value is ...:
            problems.append(f"{key!r} is missing")
        elif isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{key!r} must be {names}, got {value!r:.40}")
    if not problems:
        layers, position = meta["layers"], meta["position"]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            problems.append(f"'layers' must be a list of ints, got {layers!r:.40}")
        for key in ("chunk", "row"):
            value = position.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"'position.{key}' must be an int >= 0, got {value!r:.40}")
        for key in ("tokens_seen", "step"):
            if meta[key] < 0:
                problems.append(f"{key!r} must be >= 0, got {meta[key]}")
    if problems:
        raise CheckpointError(f"{path}: corrupt checkpoint state: " + "; ".join(problems))
    return meta


def _read_weights(path: Path, device: torch.device) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"{path}: cannot read the checkpoint's weights ({type(exc).__name__}: {exc}); the "
            f"file is truncated or corrupt: delete {path.parent} or run with resume=False"
        ) from None


def _check_moments(path: Path, i: int, param: Tensor, moments: dict[str, Tensor]) -> None:
    for key in ("exp_avg", "exp_avg_sq"):
        value = moments.get(key)
        if value is None or value.shape != param.shape:
            got = None if value is None else tuple(value.shape)
            raise CheckpointError(
                f"{path}: Adam moment 'adam.{i}.{key}' must have the parameter's shape "
                f"{tuple(param.shape)}, got {got}"
            )
    if "step" not in moments or moments["step"].numel() != 1:
        raise CheckpointError(f"{path}: Adam moment 'adam.{i}.step' is missing or not a scalar")
