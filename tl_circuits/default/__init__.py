"""The embedded default model: a small trained transformer with circuits we know.

A 2-layer GPT-2-style ``HookedTransformer`` over a readable word-level vocabulary, trained
by ``scripts/train_default_model.py`` on :mod:`tl_circuits.default.synthetic` (fixed seeds),
shipped with per-layer and cross-layer transcoders in ``tl_circuits/default/data/``. It
contains an induction circuit (a previous-token head feeding an induction head:
``... A B ... A -> B``) and an MLP fact lookup (``Entity relation -> attribute``); the
measured heads, accuracies and transcoder quality are in :func:`default_card`. Everything
loads from package data: no internet, no model hub. See ``docs/default_model.md``.

    model = load_default_model()                  # HookedTransformer with its tokenizer
    tcs = load_default_transcoders("per_layer")   # TranscoderSet ("cross_layer": a CLT)
    DEFAULT_PROMPTS["induction"].text, DEFAULT_PROMPTS["fact"].answer
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_circuits.default.synthetic import fact_table
from tl_circuits.default.tokenizer import load_tokenizer
from tl_circuits.errors import PretrainedError, TLCircuitsError
from tl_circuits.model.loading import check_device
from tl_circuits.transcoders import CrossLayerTranscoder, TranscoderSet

__all__ = [
    "DEFAULT_PROMPTS",
    "DefaultModelError",
    "DefaultPrompt",
    "data_dir",
    "default_card",
    "load_default_model",
    "load_default_transcoders",
]

TranscoderKind = Literal["per_layer", "cross_layer"]
TRANSCODER_DIRS: dict[str, str] = {"per_layer": "per_layer", "cross_layer": "cross_layer"}


class DefaultModelError(TLCircuitsError):
    """The default model's package data is missing or a request for it is malformed."""


@dataclass(frozen=True)
class DefaultPrompt:
    """A prompt that shows one of the default model's circuits.

    name: key in :data:`DEFAULT_PROMPTS`; text: the prompt (``<bos>`` is prepended by the
    tokenizer); answer: the token the model predicts next; description: what it shows.
    """

    name: str
    text: str
    answer: str
    description: str


def _prompts() -> dict[str, DefaultPrompt]:
    facts = fact_table()
    block = "gita dama fera buka pipu bomo"
    prompts = [
        DefaultPrompt(
            name="induction",
            text=f"kana {block} deko gala kelo fimi dono {block.rsplit(' ', 1)[0]}",
            answer=block.rsplit(" ", 1)[1],
            description=(
                "a block of filler words repeated: at the second 'pipu' the induction head "
                "attends to the token after the first 'pipu' ('bomo') and copies it; the "
                "previous-token head in layer 0 made that key findable"
            ),
        ),
        DefaultPrompt(
            name="fact",
            text="kana deko Alice lives_in",
            answer=facts["Alice"]["lives_in"],
            description=(
                "a fact lookup: a layer-0 head moves 'Alice' to the 'lives_in' position "
                "and MLP0's features map (entity, relation) to the attribute"
            ),
        ),
        DefaultPrompt(
            name="fact_plays",
            text="gala dono fimi Judy plays",
            answer=facts["Judy"]["plays"],
            description="a second fact lookup, with another entity and relation",
        ),
    ]
    return {p.name: p for p in prompts}


DEFAULT_PROMPTS: dict[str, DefaultPrompt] = _prompts()
"""The prompts that show the default model's circuits, by name."""


def data_dir() -> Path:
    """The folder holding the default model's files (``tl_circuits/default/data``)."""
    return Path(__file__).resolve().parent / "data"


def _data_file(name: str, directory: Path | None = None) -> Path:
    path = (directory or data_dir()) / name
    if not path.exists():
        raise DefaultModelError(
            f"the default model's file {path} is missing; reinstall tl_circuits, or "
            "regenerate it with `python scripts/train_default_model.py --stage all`"
        )
    return path


def model_config(
    device: str | torch.device = "cpu", directory: Path | None = None
) -> HookedTransformerConfig:
    """The default model's ``HookedTransformerConfig`` (from ``data/model_config.json``)."""
    arch = json.loads(_data_file("model_config.json", directory).read_text())
    return HookedTransformerConfig(**arch, device=str(device))


def load_default_model(
    device: str | torch.device = "cpu", directory: str | Path | None = None
) -> HookedTransformer:
    """The default model (eval mode, float32) with its word-level tokenizer attached, so
    ``model.to_tokens(text)`` (prepends ``<bos>``) and ``model.to_str_tokens`` work.

    ``directory``: read the files from there instead of the package data (the training
    script uses this for its output folder).
    """
    directory = Path(directory) if directory is not None else None
    device = _device(device)
    cfg = model_config(device, directory)
    tokenizer = load_tokenizer(_data_file("tokenizer.json", directory))
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    state = load_file(str(_data_file("model.safetensors", directory)), device=str(device))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def load_default_transcoders(
    kind: TranscoderKind = "per_layer",
    device: str | torch.device = "cpu",
    directory: str | Path | None = None,
) -> TranscoderSet | CrossLayerTranscoder:
    """The default model's transcoders: ``"per_layer"`` -> :class:`TranscoderSet` (one
    SAE-Lens transcoder per layer), ``"cross_layer"`` -> :class:`CrossLayerTranscoder`.
    ``directory`` as in :func:`load_default_model`."""
    if kind not in TRANSCODER_DIRS:
        raise DefaultModelError(
            f"unknown transcoder kind {kind!r}; use one of {sorted(TRANSCODER_DIRS)}"
        )
    device = _device(device)
    path = _data_file(TRANSCODER_DIRS[kind], Path(directory) if directory is not None else None)
    if kind == "per_layer":
        with warnings.catch_warnings():
            # SAE-Lens advises loading the model with the cfg's model_from_pretrained_kwargs;
            # the default model is built from its own config, so the advice does not apply
            warnings.filterwarnings(
                "ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs"
            )
            return TranscoderSet.load(path, device=str(device))
    return CrossLayerTranscoder.load(path, device=str(device))


def _device(device: str | torch.device) -> str:
    try:
        return check_device(device)
    except PretrainedError as exc:
        raise DefaultModelError(str(exc)) from None


@cache
def _card() -> str:
    return _data_file("card.json").read_text()


def default_card() -> dict[str, Any]:
    """What the default model contains and how well (``data/card.json``): architecture,
    training recipe, circuit heads ``[layer, head, score]``, fact-lookup MLP layers,
    accuracies, transcoder FVU/L0, spliced-model accuracies and agreement, wall times."""
    return json.loads(_card())
