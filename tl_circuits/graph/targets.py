"""Resolving what the user asks to explain into :class:`Target` read-outs."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.nodes import Target
from tl_circuits.model.prompt import text_problem, unknown_words
from tl_circuits.replacement.context import ReplacementContext


class TargetError(TLCircuitsError):
    """A target specification is invalid (unknown token, wrong shape, ...)."""


def _token_id(ctx: ReplacementContext, spec: Any) -> int:
    """The vocabulary id of one token given as an id (an int, not a bool) or as a string
    that is exactly one token the tokenizer knows. A digit string such as ``"5"`` is a
    string (the word "5"), never the id 5."""
    d_vocab = ctx.model.cfg.d_vocab
    if isinstance(spec, bool) or (isinstance(spec, Tensor) and spec.dtype == torch.bool):
        raise TargetError(f"target {spec!r} is a bool; give a token id (int) or a token string")
    if isinstance(spec, str):
        return _string_token_id(ctx, spec)
    if isinstance(spec, Tensor) and spec.dim() == 0 and not spec.is_floating_point():
        spec = int(spec)
    try:
        token = operator.index(spec)  # ints, numpy integers; not floats
    except TypeError:
        raise TargetError(
            f"cannot interpret target {spec!r} ({type(spec).__name__}) as a token: give a "
            "token id (int) or a token string"
        ) from None
    if not 0 <= token < d_vocab:
        raise TargetError(f"target token id {token} is outside the vocabulary [0, {d_vocab})")
    return token


def _string_token_id(ctx: ReplacementContext, spec: str) -> int:
    tokenizer = ctx.model.tokenizer
    if tokenizer is None:
        raise TargetError(f"target {spec!r} is a string but the model has no tokenizer")
    if spec == "":
        raise TargetError(f"target {spec!r} is empty; give a token string or a token id")
    problem = text_problem(spec)
    if problem is not None:
        raise TargetError(f"target {spec!r} cannot be tokenised: {problem}")
    unknown = unknown_words(tokenizer, spec)
    if unknown:
        raise TargetError(
            f"target {spec!r} is not in the tokenizer's vocabulary (it would become the "
            f"unknown token {tokenizer.unk_token!r}); give a word of the vocabulary, or a token "
            "id as an int (tl-circuits: --target-id)"
        )
    ids = ctx.model.to_tokens(spec, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        raise TargetError(f"target {spec!r} is {len(ids)} tokens; a logit target must be one")
    return int(ids[0])


def _token_str(ctx: ReplacementContext, token: int) -> str:
    if ctx.model.tokenizer is None:
        return str(token)
    return ctx.model.to_string(torch.tensor([token]))


def resolve_targets(
    ctx: ReplacementContext,
    specs: Sequence[Any] | None,
    *,
    pos: int = -1,
    desired_probability: float = 0.95,
    max_logits: int = 10,
) -> list[Target]:
    """Targets at position ``pos`` (default: the last).

    ``specs`` None: the top logits until cumulative probability >= ``desired_probability``
    (at most ``max_logits``), each weighted by its probability. Otherwise each item is a
    token (an int id, not a bool, or a string that is one token the tokenizer knows; a
    digit string is a word, not an id), a pair ``(a, b)`` for the logit difference
    ``a - b``, a ``[d_model]`` tensor (a direction read from the final normalised residual
    stream), or a ready :class:`Target`; these have weight 1.
    """
    model = ctx.model
    n_pos = ctx.n_pos
    if not -n_pos <= pos < n_pos:
        raise TargetError(f"target position {pos} is outside the prompt (length {n_pos})")
    pos = pos % n_pos
    W_U = model.W_U.detach()  # [d_model, d_vocab]
    b_U = model.b_U.detach()
    probs = torch.softmax(ctx.logits[pos].double(), -1)

    def logit_target(token: int, weight: float) -> Target:
        p = float(probs[token])
        return Target(
            kind="logit",
            label=_token_str(ctx, token),
            pos=pos,
            vector=W_U[:, token] - W_U.mean(1),
            bias=float(b_U[token] - b_U.mean()),
            token=token,
            probability=p,
            weight=weight,
        )

    if specs is None:
        if not 0 < desired_probability <= 1:
            raise TargetError(f"desired_probability must be in (0, 1], got {desired_probability}")
        if max_logits < 1:
            raise TargetError(f"max_logits must be >= 1, got {max_logits}")
        top = torch.argsort(probs, descending=True)[:max_logits]
        cumulative = torch.cumsum(probs[top], 0)
        n = int((cumulative < desired_probability).sum()) + 1
        return [logit_target(int(t), float(probs[t])) for t in top[: min(n, max_logits)]]

    if isinstance(specs, (str, bytes, int, Tensor, Target)) or not isinstance(specs, Sequence):
        raise TargetError(
            f"targets must be a list of targets, got {type(specs).__name__} {specs!r:.60}; "
            f"wrap a single target in a list (targets=[{specs!r:.40}])"
        )
    if len(specs) == 0:
        raise TargetError("targets is empty; pass None for the default top logits")
    return [_target_of(ctx, spec, pos, i, logit_target) for i, spec in enumerate(specs)]


def _target_of(
    ctx: ReplacementContext,
    spec: Any,
    pos: int,
    index: int,
    logit_target: Callable[[int, float], Target],
) -> Target:
    """The :class:`Target` of one user specification (see :func:`resolve_targets`)."""
    model = ctx.model
    W_U, b_U = model.W_U.detach(), model.b_U.detach()
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, Tensor):
        if spec.shape != (model.cfg.d_model,):
            raise TargetError(
                f"a direction target must have shape ({model.cfg.d_model},), got "
                f"{tuple(spec.shape)}"
            )
        if not torch.isfinite(spec).all():
            raise TargetError("a direction target contains NaN/inf")
        vec = spec.to(W_U.dtype).to(W_U.device)
        return Target(kind="direction", label=f"direction #{index}", pos=pos, vector=vec)
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise TargetError(f"a logit-difference target is a pair (a, b), got {spec!r}")
        a, b = (_token_id(ctx, s) for s in spec)
        if a == b:
            raise TargetError(
                f"logit-difference target {spec!r}: both sides are token {a} "
                f"({_token_str(ctx, a)!r}); the difference of a logit with itself is always 0"
            )
        return Target(
            kind="logit_diff",
            label=f'"{_token_str(ctx, a)}" - "{_token_str(ctx, b)}"',
            pos=pos,
            vector=W_U[:, a] - W_U[:, b],
            bias=float(b_U[a] - b_U[b]),
            tokens=(a, b),
        )
    if isinstance(spec, (int, str)) or hasattr(spec, "__index__"):
        return logit_target(_token_id(ctx, spec), 1.0)
    raise TargetError(f"cannot interpret target {spec!r}")


def target_values(targets: list[Target], final_normalized: Tensor) -> Tensor:
    """Each target's value from the final norm's output ``[pos, d_model]`` (in its dtype)."""
    dtype = final_normalized.dtype
    return torch.stack([final_normalized[t.pos] @ t.vector.to(dtype) + t.bias for t in targets])
