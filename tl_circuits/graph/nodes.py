"""Node tables and target specifications of an attribution graph.

Node order in every graph: features, then errors, then tokens, then targets. Each kind is
contiguous, so ``graph.nodes.kind`` is sorted and slices by kind are cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from tl_circuits.replacement.sources import ERROR, FEATURE, KINDS, TARGET, TOKEN
from tl_circuits.typing import Float, Int, typechecked

__all__ = ["ERROR", "FEATURE", "KINDS", "TARGET", "TOKEN", "NodeTable", "Target"]

TargetKind = Literal["logit", "logit_diff", "direction"]


@typechecked
@dataclass(frozen=True)
class NodeTable:
    """One row per node.

    - ``kind``: index into :data:`KINDS` (0 feature, 1 error, 2 token, 3 target)
    - ``layer``: the source/reading layer; errors: the MLP layer; tokens: -1; targets:
      ``n_layers`` (they read the final residual stream)
    - ``pos``: token position
    - ``feature``: feature index (features), -1 otherwise
    - ``activation``: feature activation; error: norm of the error vector; token: norm of
      the embedding; target: the target's value (logit minus mean logit, etc.)
    """

    kind: Int[Tensor, " n"]
    layer: Int[Tensor, " n"]
    pos: Int[Tensor, " n"]
    feature: Int[Tensor, " n"]
    activation: Float[Tensor, " n"]

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def indices(self, kind: str) -> Tensor:
        """Node indices of ``kind`` ("feature", "error", "token" or "target")."""
        return (self.kind == KINDS.index(kind)).nonzero(as_tuple=True)[0]

    def count(self, kind: str) -> int:
        return int((self.kind == KINDS.index(kind)).sum())

    def select(self, index: Tensor) -> NodeTable:
        """The rows at ``index`` (order kept)."""
        return NodeTable(
            *(getattr(self, f)[index] for f in ("kind", "layer", "pos", "feature", "activation"))
        )

    def to_records(self) -> list[dict]:
        """A list of plain dicts (``kind`` as its name), e.g. for ``pandas.DataFrame``."""
        return [
            {
                "kind": KINDS[int(k)],
                "layer": int(la),
                "pos": int(p),
                "feature": int(f),
                "activation": float(a),
            }
            for k, la, p, f, a in zip(
                self.kind, self.layer, self.pos, self.feature, self.activation
            )
        ]


@dataclass(frozen=True)
class Target:
    """A graph target: a linear read-out of the final (normalised) residual stream.

    ``value = ln_final(resid_final)[pos] · vector + bias``. For a token target
    ``vector = W_U[:, t] - mean_v W_U[:, v]`` and ``bias = b_U[t] - mean(b_U)`` (the
    pre-soft-cap logit minus the mean logit); for a logit difference ``W_U[:, a] - W_U[:, b]``
    and ``b_U[a] - b_U[b]``; for a direction, the user's vector and 0.
    """

    kind: TargetKind
    label: str  # logit targets: the token's string; otherwise a description
    pos: int
    vector: Float[Tensor, " d_model"]
    bias: float = 0.0
    token: int = -1  # token id for "logit" targets
    tokens: tuple[int, ...] = field(default_factory=tuple)  # (a, b) for "logit_diff"
    probability: float = float("nan")  # softmax probability for "logit" targets
    weight: float = 1.0  # weight in influence computations (probability for default logits)


def target_display(target: Target) -> str:
    """``Output "tok" (p=0.123)`` for a logit target, the label otherwise."""
    if target.kind == "logit":
        return f'Output "{target.label}" (p={target.probability:.3f})'
    return target.label


def normalized_target_weights(targets: list[Target], dtype: torch.dtype) -> Tensor:
    """The targets' weights divided by their sum, ``[n_targets]``."""
    w = torch.tensor([t.weight for t in targets], dtype=dtype)
    return w / w.sum()


def empty_nodes() -> NodeTable:
    z = torch.zeros(0, dtype=torch.long)
    return NodeTable(z, z, z, z, torch.zeros(0))
