"""Turning a user's prompt into a validated 1-D token tensor.

Every way a prompt can be unusable raises :class:`PromptError` naming the problem: an
empty prompt, one longer than ``n_ctx``, ids outside the vocabulary, ids that are not
integers, a nested or ragged list, bytes, text that is not valid Unicode (an undecodable
byte from a file or the command line), and words the tokenizer does not know (a word-level
tokenizer maps them to its unknown token; pass token ids to use the unknown token on
purpose). :func:`text_problem` and :func:`unknown_words` are shared with the target
resolution, so a target string is checked the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_circuits.errors import PromptError

if TYPE_CHECKING:
    Prompt = str | Sequence[int] | Tensor
else:
    # At run time every value passes the public functions' type check and reaches
    # to_tokens, which explains what is wrong with it (a runtime type check of
    # ``Sequence[int]`` would reject ``[1.5]`` with a message that prints the whole model).
    Prompt = object


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenised, or None: a character that is not valid Unicode
    (a lone surrogate: what Python makes of an undecodable byte in ``argv`` or in a file
    read with ``errors='surrogateescape'``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        code = ord(char)
        byte = f" (the undecodable byte 0x{code - 0xDC00:02x})" if 0xDC80 <= code <= 0xDCFF else ""
        return (
            f"character {exc.start} is {char!r}{byte}, which is not valid UTF-8 text; "
            "decode the input as UTF-8 (or fix its encoding) first"
        )
    return None


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """The pieces of ``text`` that ``tokenizer`` maps to its unknown token, unless the piece
    is that token written out (``"<unk>"``). Empty when the tokenizer has no unknown token
    (byte-level BPE tokenizers know every string)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    unk_text = str(tokenizer.unk_token)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_unknown = sum(1 for t in ids if t == unk) - text.count(unk_text)
        return [f"<{n_unknown} unknown piece(s)>"] if n_unknown > 0 else []
    words = []
    for token, (start, end) in zip(enc["input_ids"], offsets, strict=True):
        piece = text[start:end]
        if token == unk and piece.strip() != unk_text:
            words.append(piece)
    return words


def to_tokens(model: HookedTransformer, prompt: Prompt) -> Tensor:
    """Tokens ``[pos]`` (long, on the model's device) for a string, id list or tensor.

    Strings are tokenised with ``model.to_tokens`` (its BOS convention). Raises PromptError
    for an empty prompt, one longer than ``n_ctx``, ids outside the vocabulary or not
    integers, a prompt of another type (bytes, a nested list, ...), text that is not valid
    UTF-8, and words the tokenizer does not know (they would silently become its unknown
    token; pass token ids to use it on purpose).
    """
    if isinstance(prompt, str):
        tokens = _string_tokens(model, prompt)
    elif isinstance(prompt, (bytes, bytearray, memoryview)):
        raise PromptError(
            "the prompt is bytes; pass a str (decode it, e.g. data.decode('utf-8')) or a list "
            "of token ids"
        )
    elif isinstance(prompt, (Tensor, Sequence)) or hasattr(prompt, "__array__"):
        tokens = _id_tokens(prompt)
    else:
        raise PromptError(
            f"the prompt must be a str, a sequence of token ids or a 1-D integer tensor, got "
            f"{type(prompt).__name__} {_short(prompt)}"
        )
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


def _string_tokens(model: HookedTransformer, prompt: str) -> Tensor:
    if prompt == "":
        raise PromptError("the prompt is empty")
    problem = text_problem(prompt)
    if problem is not None:
        raise PromptError(f"the prompt cannot be tokenised: {problem}")
    if model.tokenizer is None:
        raise PromptError("this model has no tokenizer; pass token ids instead of a string")
    unknown = unknown_words(model.tokenizer, prompt)
    if unknown:
        shown = ", ".join(repr(w) for w in dict.fromkeys(unknown[:10]))
        raise PromptError(
            f"the prompt has {len(unknown)} word(s) the tokenizer does not know ({shown}); "
            f"they would all become the unknown token {model.tokenizer.unk_token!r}. Use words "
            "of its vocabulary, or pass token ids to use the unknown token on purpose"
        )
    # truncate=False: a prompt longer than n_ctx must fail in to_tokens, not lose its tail
    return model.to_tokens(prompt, truncate=False)[0]


def _id_tokens(prompt: Any) -> Tensor:
    if isinstance(prompt, Sequence) and any(isinstance(x, str) for x in prompt):
        raise PromptError(
            f"the prompt is a sequence of strings {_short(prompt)}; pass one str (the tokenizer "
            "splits it) or a sequence of integer token ids"
        )
    try:
        tokens = torch.as_tensor(prompt)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise PromptError(
            f"the prompt {_short(prompt)} is not a 1-D sequence of integer token ids ({exc})"
        ) from exc
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.numel() == 0:
        # before the dtype check: torch.as_tensor([]) is a float tensor
        raise PromptError("the prompt is empty")
    if tokens.dim() != 1:
        raise PromptError(f"expected a 1-D sequence of token ids, got shape {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise PromptError(f"token ids must be integers, got {tokens.dtype}")
    return tokens.to(torch.long)
