"""Shared fixtures: random-weight models of six families and transcoders of every class.

Models are cached per (family, fold_ln) for the session; tests must not modify them.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tl_circuits.testing import (
    FAMILIES,
    TRANSCODER_KINDS,
    random_clt,
    random_model,
    random_transcoders,
)

ALL_KINDS = (*TRANSCODER_KINDS, "clt", "clt_topk")


@functools.cache
def cached_model(family: str, fold_ln: bool = False, dtype: torch.dtype = torch.float32):
    return random_model(family, fold_ln=fold_ln, dtype=dtype)  # type: ignore[arg-type]


@functools.cache
def cached_transcoders(
    family: str,
    kind: str,
    fold_ln: bool = False,
    dtype: torch.dtype = torch.float32,
    input_hook: str = "mlp.hook_in",
):
    """Random transcoders of ``kind`` reading ``blocks.{l}.{input_hook}``."""
    model = cached_model(family, fold_ln, dtype)
    if kind == "clt":
        return random_clt(model, input_hook=input_hook)
    if kind == "clt_topk":
        return random_clt(model, activation="topk", input_hook=input_hook)
    return random_transcoders(model, kind, input_hook=input_hook)  # type: ignore[arg-type]


def prompt_tokens(n: int = 12, seed: int = 3, d_vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, d_vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=ALL_KINDS)
def kind(request) -> str:
    return request.param
