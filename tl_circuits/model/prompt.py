"""Turning a user's prompt into a validated 1-D token tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_circuits.errors import PromptError

Prompt = str | Sequence[int] | Tensor


def to_tokens(model: HookedTransformer, prompt: Prompt) -> Tensor:
    """Tokens ``[pos]`` (long, on the model's device) for a string, id list or tensor.

    Strings are tokenised with ``model.to_tokens`` (its BOS convention). Raises PromptError
    for an empty prompt, one longer than ``n_ctx``, or ids outside the vocabulary.
    """
    if isinstance(prompt, str):
        if prompt == "":
            raise PromptError("the prompt is empty")
        if model.tokenizer is None:
            raise PromptError("this model has no tokenizer; pass token ids instead of a string")
        # truncate=False: a prompt longer than n_ctx must fail below, not lose its tail
        tokens = model.to_tokens(prompt, truncate=False)[0]
    else:
        tokens = torch.as_tensor(prompt)
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.numel() == 0:
            # before the dtype check: torch.as_tensor([]) is a float tensor
            raise PromptError("the prompt is empty")
        if tokens.dim() != 1:
            raise PromptError(
                f"expected a 1-D sequence of token ids, got shape {tuple(tokens.shape)}"
            )
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise PromptError(f"token ids must be integers, got {tokens.dtype}")
        tokens = tokens.to(torch.long)
    n = tokens.shape[0]
    if n == 0:
        raise PromptError("the prompt is empty")
    if n > model.cfg.n_ctx:
        raise PromptError(
            f"the prompt has {n} tokens but the model's context is n_ctx={model.cfg.n_ctx}"
        )
    bad = (tokens < 0) | (tokens >= model.cfg.d_vocab)
    if bad.any():
        pos = int(bad.nonzero()[0, 0])
        raise PromptError(
            f"token id {int(tokens[pos])} at position {pos} is outside the vocabulary "
            f"[0, {model.cfg.d_vocab})"
        )
    return tokens.to(model.cfg.device)
