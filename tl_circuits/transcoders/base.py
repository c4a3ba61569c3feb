"""The interface every transcoder family implements, and the checks against a model.

A transcoder replaces the MLP of each layer. Feature ``f`` of source layer ``l`` reads the
MLP input ``x_in(l)`` (at ``input_hook(l)``) and, when active, writes ``a_f * W_dec_f^(l->l')``
to the MLP output of every layer ``l'`` in ``target_layers(l)`` (just ``l`` for a per-layer
transcoder; ``l..n_layers-1`` for a cross-layer one). The reconstruction of MLP output
``l'`` is

    sum_{l <= l'} a^(l) @ W_dec^(l->l') + b_dec^(l') + x_in(l') @ W_skip^(l')^T

with ``a^(l) = act(x_in(l) @ W_enc^(l) + b_enc^(l))``. ``W_skip`` follows SAE-Lens's
orientation ``[d_out, d_in]``.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tl_circuits.errors import HookError, NonFiniteError, TranscoderConfigError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

_LAYER_IN_HOOK = re.compile(r"^blocks\.(\d+)\.")


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; TranscoderConfigError naming the file when it is not
    readable, not JSON, or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise TranscoderConfigError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise TranscoderConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_hook_template(template: object) -> str:
    """A hook-name template with exactly one ``{layer}`` field and no other (a clear
    TranscoderConfigError otherwise, e.g. for ``blocks.{0}.hook_mlp_out``)."""
    if not isinstance(template, str):
        raise TranscoderConfigError(f"hook template must be a string, got {template!r}")
    try:
        filled = template.format(layer=0)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise TranscoderConfigError(
            f"hook template {template!r} must contain '{{layer}}' and no other field ({exc!r})"
        ) from exc
    if "{layer}" not in template or filled == template:
        raise TranscoderConfigError(f"hook template {template!r} lacks '{{layer}}'")
    return template


def layer_of_hook(hook_name: str) -> int:
    """The block index in a hook name like ``blocks.3.ln2.hook_normalized``."""
    match = _LAYER_IN_HOOK.match(hook_name)
    if match is None:
        raise TranscoderConfigError(
            f"hook {hook_name!r} is not inside a transformer block (expected 'blocks.<layer>.…')"
        )
    return int(match.group(1))


@dataclass(frozen=True)
class Encoder:
    """One layer's feature encoder.

    ``pre = x_in @ W_enc + b_enc`` (shape ``[..., d_sae]``). The activation is one of:

    - ReLU: ``relu(pre)``;
    - JumpReLU (``threshold`` set): ``relu(pre)`` masked by ``pre > threshold``, exactly as
      SAE-Lens computes it;
    - TopK (``top_k`` set): at each position the ``top_k`` largest pre-activations are
      kept as they are (not rectified, as circuit-tracer's ``TopK`` keeps them) and the rest
      are 0; with a ``threshold`` as well, kept values must also exceed it. The kept set is
      part of the frozen state of a prompt (DESIGN.md §1): a kept feature is a node whose
      activation is its pre-activation.
    """

    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    threshold: Tensor | None  # [d_sae], JumpReLU (or a TopK format's threshold rule)
    top_k: int | None = None  # TopK: features kept per position

    def __post_init__(self) -> None:
        if self.top_k is not None and not 0 < self.top_k <= self.W_enc.shape[1]:
            raise TranscoderConfigError(
                f"top_k must be in [1, d_sae={self.W_enc.shape[1]}], got {self.top_k}"
            )

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def pre_activations(self, x_in: Tensor) -> Tensor:
        """``x_in`` ``[..., d_in]`` -> pre-activations ``[..., d_sae]``."""
        return x_in @ self.W_enc + self.b_enc

    def activations(self, pre: Tensor) -> Tensor:
        """Pre-activations ``[..., d_sae]`` -> activations ``[..., d_sae]`` (>= 0 except the
        kept values of a TopK encoder, which keep their sign)."""
        if self.top_k is not None:
            kept = torch.zeros_like(pre, dtype=torch.bool)
            kept.scatter_(-1, pre.topk(self.top_k, dim=-1).indices, True)
            if self.threshold is not None:
                kept &= pre > self.threshold
            return torch.where(kept, pre, torch.zeros_like(pre))
        acts = torch.relu(pre)
        if self.threshold is None:
            return acts
        return acts * (pre > self.threshold).to(acts.dtype)


class Transcoders(ABC):
    """A full set of MLP replacements for a model: one encoder per layer plus decoders.

    Subclasses: :class:`~tl_circuits.TranscoderSet` (per-layer, SAE-Lens) and
    :class:`~tl_circuits.CrossLayerTranscoder`. Layers are numbered like the model's blocks
    and every block must be covered.
    """

    n_layers: int
    d_model: int
    #: Whether the transcoders were trained on a model with ``fold_ln=True`` (True),
    #: unprocessed weights (False), or unknown (None).
    expects_folded_ln: bool | None
    #: The reconstruction was trained on the MLP module's own output (circuit-tracer's
    #: ``mlp.hook_out``): the same point as ``hook_mlp_out`` only in models without a norm
    #: after the MLP; :meth:`check_model` refuses the others.
    output_is_mlp_module_out: bool = False

    @abstractmethod
    def input_hook(self, layer: int) -> str:
        """Hook name whose activation is the transcoder input of ``layer``."""

    @abstractmethod
    def output_hook(self, layer: int) -> str:
        """Hook name whose activation the layer's reconstruction replaces."""

    @abstractmethod
    def encoder(self, layer: int) -> Encoder:
        """The encoder of source layer ``layer``."""

    @abstractmethod
    def decoder(self, source_layer: int, target_layer: int) -> Tensor:
        """Decoder ``W_dec^(source->target)``, shape ``[d_sae(source), d_model]``."""

    @abstractmethod
    def b_dec(self, target_layer: int) -> Tensor:
        """Output bias of ``target_layer``'s reconstruction, shape ``[d_model]``."""

    @abstractmethod
    def W_skip(self, layer: int) -> Tensor | None:
        """Skip matrix ``[d_model(out), d_model(in)]`` of ``layer``, or None."""

    @abstractmethod
    def target_layers(self, source_layer: int) -> range:
        """Layers whose MLP output features of ``source_layer`` write to."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    # ---- derived -------------------------------------------------------------------

    def check_model(self, model: HookedTransformer) -> None:
        """Model-dependent checks the hook names cannot express.

        Raises HookError when the reconstruction is of the MLP module's own output
        (``output_is_mlp_module_out``) but ``model`` applies a norm after its MLP
        (``ln2_post``, e.g. Gemma 2 and 3): there ``hook_mlp_out`` is that norm's output, a
        different point, and the splice would replace the wrong tensor.
        """
        if self.output_is_mlp_module_out and model.cfg.use_normalization_before_and_after:
            raise HookError(
                f"{self.output_hook(0)!r} stands for circuit-tracer's 'mlp.hook_out' (the MLP "
                "module's output), but this model normalises the MLP output (ln2_post), so "
                "'hook_mlp_out' is a different point; these transcoders cannot be spliced "
                "into it exactly (use transcoders trained on 'hook_mlp_out')"
            )

    def d_sae(self, layer: int) -> int:
        return self.encoder(layer).d_sae

    def source_layers(self, target_layer: int) -> list[int]:
        """Source layers whose features write to ``target_layer``'s MLP output."""
        return [s for s in range(target_layer + 1) if target_layer in self.target_layers(s)]

    def reconstruct(self, target_layer: int, acts: Mapping[int, Tensor], x_in: Tensor) -> Tensor:
        """Reconstruction of ``target_layer``'s MLP output.

        ``acts[s]``: activations ``[..., d_sae(s)]`` of every source layer ``s`` writing to
        ``target_layer``; ``x_in``: that layer's transcoder input ``[..., d_model]`` (used by
        the skip term). Returns ``[..., d_model]``.
        """
        out = None
        for s in self.source_layers(target_layer):
            part = acts[s] @ self.decoder(s, target_layer)
            out = part if out is None else out + part
        assert out is not None
        out = out + self.b_dec(target_layer)
        skip = self.W_skip(target_layer)
        if skip is not None:
            out = out + x_in @ skip.T
        return out

    def check_consistent(self) -> None:
        """Shapes, dtypes, devices and finiteness of every layer's tensors.

        Raises TranscoderConfigError for a shape, dtype or device that disagrees with the
        set, and NonFiniteError for a NaN or infinity in any weight.
        """
        for layer in range(self.n_layers):
            enc = self.encoder(layer)
            where = f"layer {layer} ({self.input_hook(layer)})"
            if enc.W_enc.shape[0] != self.d_model:
                raise TranscoderConfigError(
                    f"{where}: d_in is {enc.W_enc.shape[0]} but the set's d_model is {self.d_model}"
                )
            tensors: list[tuple[str, Tensor]] = [("W_enc", enc.W_enc), ("b_enc", enc.b_enc)]
            if enc.threshold is not None:
                tensors.append(("threshold", enc.threshold))
            for t in self.target_layers(layer):
                dec = self.decoder(layer, t)
                if tuple(dec.shape) != (enc.d_sae, self.d_model):
                    raise TranscoderConfigError(
                        f"{where}: decoder to layer {t} has shape {tuple(dec.shape)}, "
                        f"expected ({enc.d_sae}, {self.d_model}) (d_out must equal d_model)"
                    )
                tensors.append((f"W_dec (to layer {t})", dec))
            tensors.append(("b_dec", self.b_dec(layer)))
            skip = self.W_skip(layer)
            if skip is not None:
                tensors.append(("W_skip", skip))
            for name, tensor in tensors:
                if tensor.dtype != self.dtype or tensor.device != self.device:
                    raise TranscoderConfigError(
                        f"{where}: {name} is {tensor.dtype} on {tensor.device}, but the set is "
                        f"{self.dtype} on {self.device}; move all transcoders with .to()"
                    )
                if not all_finite(tensor):
                    raise NonFiniteError(f"{where}: {name} contains NaN or infinite values")


def all_finite(tensor: Tensor) -> bool:
    """True when ``tensor`` has no NaN/inf; a cheap sum first, the exact check only if needed."""
    acc = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(tensor).all())
