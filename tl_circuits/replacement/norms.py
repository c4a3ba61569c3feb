"""Norms with their scale frozen at the clean run's value: linear maps (DESIGN.md §1).

A TransformerLens ``LayerNorm`` / ``RMSNorm`` (or their ``Pre`` forms, weights folded)
computes ``y = centre?(x) / s * w + b`` with ``s`` the input's scale. With ``s`` frozen the
map is affine; its linear part and adjoint are what the frozen model needs: RMS
``g * w / s``; LayerNorm ``centre(g * w / s)`` (centring is linear and self-adjoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

from tl_circuits.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class FrozenNorm:
    """A norm with frozen scale: ``y = centre?(x) / s * w`` (+ bias, irrelevant here).

    ``scale``: ``[pos, 1]``; ``weight``: ``[d]`` or None (folded); ``centre``: LayerNorm.
    """

    scale: Tensor
    weight: Tensor | None
    centre: bool

    def to(self, dtype: torch.dtype) -> FrozenNorm:
        """The same norm with its scale and weight in ``dtype``."""
        weight = None if self.weight is None else self.weight.to(dtype)
        return FrozenNorm(self.scale.to(dtype), weight, self.centre)

    def adjoint(self, g: Tensor) -> Tensor:
        """Gradient on the input given ``g`` ``[B, pos, d]`` on the output."""
        if self.weight is not None:
            g = g * self.weight
        g = g / self.scale
        if self.centre:
            g = g - g.mean(-1, keepdim=True)
        return g

    def forward_linear(self, x: Tensor, first_pos: int = 0) -> Tensor:
        """The linear part ``centre?(x) / s * w`` applied to ``x`` ``[..., pos, d]``, whose
        positions are the prompt's ``first_pos, first_pos + 1, ...``."""
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        x = x / self.scale[first_pos : first_pos + x.shape[-2]]
        if self.weight is not None:
            x = x * self.weight
        return x


def frozen_norm(module: torch.nn.Module, scale: Tensor, with_weight: bool = True) -> FrozenNorm:
    """The linear part of a TransformerLens norm module with its scale frozen at ``scale``
    (``with_weight=False``: without the weight, as ``ln2.hook_normalized`` reads it)."""
    if isinstance(module, LayerNorm):
        return FrozenNorm(scale, module.w.detach() if with_weight else None, True)
    if isinstance(module, LayerNormPre):
        return FrozenNorm(scale, None, True)
    if isinstance(module, RMSNorm):
        return FrozenNorm(scale, module.w.detach() if with_weight else None, False)
    if isinstance(module, RMSNormPre):
        return FrozenNorm(scale, None, False)
    raise UnsupportedArchitectureError(f"unsupported normalisation module {type(module).__name__}")


class Identity:
    """The identity as a :class:`LinearMap` (no post-attention norm; the residual stream
    read as it is)."""

    def adjoint(self, g: Tensor) -> Tensor:
        return g

    def forward_linear(self, x: Tensor, first_pos: int = 0) -> Tensor:
        return x


class LinearMap(Protocol):
    def adjoint(self, g: Tensor) -> Tensor: ...

    def forward_linear(self, x: Tensor, first_pos: int = 0) -> Tensor: ...


def norm_adjoint_(norm: LinearMap, g: Tensor) -> None:
    """:meth:`FrozenNorm.adjoint` in place on a position-major ``g`` ``[pos, B, d]``
    (``pos`` a prefix of the prompt); nothing for the identity."""
    if isinstance(norm, Identity):
        return
    assert isinstance(norm, FrozenNorm)
    if norm.weight is not None:
        g.mul_(norm.weight)
    g.div_(norm.scale[: g.shape[0], None, :])
    if norm.centre:
        g.sub_(g.mean(-1, keepdim=True))
