"""Token sources and the activation stream the trainer and the evaluation read.

Tokens come as one ``[n_seq, seq]`` integer tensor (split into chunks of about
``chunk_tokens`` tokens, cycled in new shuffles when training needs more tokens than it
holds), or as an iterable of such chunks (each a tensor or a ``(tokens, loss_mask)``
pair). A re-iterable (a list) is cycled too; a one-shot iterator ends the stream when it
is exhausted. The stream runs the model on one chunk at a time, keeps the transcoder
inputs and MLP outputs of the trained layers at the positions of the loss mask, shuffles
the rows with a generator seeded by ``(seed, chunk index)`` and cuts them into batches.
A :class:`StreamPosition` (chunk index, row) therefore fully determines what follows,
which is what makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_circuits.errors import HookError
from tl_circuits.model.hooks import SUPPORTED_OUTPUT_HOOK
from tl_circuits.training.config import TrainingDataError

Chunk = tuple[Tensor, Tensor | None]  # tokens [n_seq, seq], loss mask [n_seq, seq] or None


def check_tokens(model: HookedTransformer, tokens: object, mask: object, where: str) -> Chunk:
    """Validate one chunk: integer ``[n_seq, seq]`` tokens in ``0..d_vocab-1`` with
    ``seq <= n_ctx``, and an optional bool mask of the same shape. Raises TrainingDataError
    naming ``where`` and what to pass instead."""
    if not isinstance(tokens, Tensor):
        raise TrainingDataError(
            f"{where}: tokens must be an integer torch.Tensor [n_seq, seq] (or an iterable of "
            f"them), got {type(tokens).__name__}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TrainingDataError(
            f"{where}: tokens must have an integer dtype (e.g. torch.long), got {tokens.dtype}"
        )
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise TrainingDataError(
            f"{where}: tokens must have shape [n_seq, seq] with both > 0, got {tuple(tokens.shape)}"
        )
    if tokens.shape[1] > model.cfg.n_ctx:
        raise TrainingDataError(
            f"{where}: sequences have {tokens.shape[1]} tokens but the model's n_ctx is "
            f"{model.cfg.n_ctx}; split them"
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= model.cfg.d_vocab:
        raise TrainingDataError(
            f"{where}: token ids must lie in 0..{model.cfg.d_vocab - 1}, got range {low}..{high}"
        )
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TrainingDataError(
                f"{where}: loss_mask must be a bool torch.Tensor, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if mask.shape != tokens.shape:
            raise TrainingDataError(
                f"{where}: loss_mask has shape {tuple(mask.shape)}, tokens "
                f"{tuple(tokens.shape)}; they must match"
            )
    return tokens, mask


class TokenSource:
    """Numbered chunks of tokens (and masks) from a tensor or an iterable.

    ``chunks(start, cycle)`` yields ``(k, tokens, mask)`` from chunk ``k = start`` on,
    skipping earlier chunks without running anything. ``first_chunk`` holds chunk 0 once
    seen (the trainer's default evaluation tokens).
    """

    def __init__(
        self,
        model: HookedTransformer,
        tokens: Tensor | Iterable[Tensor | Chunk],
        loss_mask: Tensor | None,
        chunk_tokens: int,
    ) -> None:
        self.model = model
        self.first_chunk: Chunk | None = None
        self._tensor: Chunk | None = None
        self._iterable: Iterable | None = None
        if isinstance(tokens, Tensor):
            self._tensor = check_tokens(model, tokens, loss_mask, "tokens")
            self.chunk_seqs = max(1, chunk_tokens // tokens.shape[1])
            self.n_chunks = -(-tokens.shape[0] // self.chunk_seqs)
        elif isinstance(tokens, Iterable) and not isinstance(tokens, (str, bytes, dict)):
            if loss_mask is not None:
                raise TrainingDataError(
                    "loss_mask applies to a tokens tensor; with an iterable of chunks, yield "
                    "(tokens, loss_mask) pairs instead"
                )
            self._iterable = tokens
        else:
            raise TrainingDataError(
                "tokens must be an integer torch.Tensor [n_seq, seq] or an iterable of them, "
                f"got {type(tokens).__name__}"
            )

    @property
    def is_one_shot(self) -> bool:
        """True for a one-shot iterator (cannot be cycled or re-read)."""
        return self._iterable is not None and iter(self._iterable) is self._iterable

    def chunks(self, start: int = 0, cycle: bool = True) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(k, tokens [n_seq, seq], mask [n_seq, seq] bool)`` for ``k = start, ...``."""
        k = 0
        while True:
            n_before = k
            for tokens, mask in self._one_pass():
                if k == 0:
                    self.first_chunk = (tokens, mask)
                if k >= start:
                    yield (
                        k,
                        tokens,
                        torch.ones_like(tokens, dtype=torch.bool) if (mask is None) else mask,
                    )
                k += 1
            if not cycle or self.is_one_shot or k == n_before:
                return

    def _one_pass(self) -> Iterator[Chunk]:
        if self._tensor is not None:
            tokens, mask = self._tensor
            for i in range(self.n_chunks):
                rows = slice(i * self.chunk_seqs, (i + 1) * self.chunk_seqs)
                yield tokens[rows], None if mask is None else mask[rows]
            return
        assert self._iterable is not None
        for i, item in enumerate(self._iterable):
            where = f"chunk {i} of the token stream"
            if isinstance(item, tuple):
                if len(item) != 2:
                    raise TrainingDataError(
                        f"{where}: a tuple chunk must be (tokens, loss_mask), got {len(item)} items"
                    )
                yield check_tokens(self.model, item[0], item[1], where)
            else:
                yield check_tokens(self.model, item, None, where)


def capture(
    model: HookedTransformer,
    tokens: Tensor,
    names: list[str],
    extra_hooks: list[tuple[str, Callable]] | None = None,
    stop_at_layer: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``model`` on ``tokens`` (no grad) recording the activations at ``names``.

    ``extra_hooks`` run too (after the recording hooks). Returns ``(output, {name:
    activation})``; the output is the logits, or the residual stream with ``stop_at_layer``.
    """
    captured: dict[str, Tensor] = {}

    def keep(tensor: Tensor, hook: HookPoint) -> None:
        captured[hook.name] = tensor.detach()

    hooks = [(name, keep) for name in names] + list(extra_hooks or [])
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        out = model(tokens.to(model.cfg.device), stop_at_layer=stop_at_layer)
    return out, captured


@dataclass(frozen=True)
class StreamPosition:
    """The next unread activation row: row ``row`` of the shuffled chunk ``chunk``."""

    chunk: int = 0
    row: int = 0


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """The generator that shuffles chunk ``chunk`` (depends only on ``seed`` and ``chunk``)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + chunk + 1) % (2**63))


class ActivationStream:
    """Shuffled batches of ``(x_in, mlp_out)`` rows of the trained layers.

    ``layers``: model layers, in order; ``input_hook``: suffix after ``blocks.{l}.``.
    Activations are float32 on ``device``.
    """

    def __init__(
        self,
        model: HookedTransformer,
        source: TokenSource,
        layers: list[int],
        input_hook: str,
        device: torch.device,
        seed: int,
    ) -> None:
        self.model = model
        self.source = source
        self.layers = layers
        self.in_hooks = [f"blocks.{layer}.{input_hook}" for layer in layers]
        self.out_hooks = [f"blocks.{layer}.{SUPPORTED_OUTPUT_HOOK}" for layer in layers]
        self.device = device
        self.seed = seed

    def chunk_activations(self, k: int, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Shuffled ``x, y [L, n_rows, d_model]`` of chunk ``k`` at the masked positions."""
        _, cache = capture(
            self.model,
            tokens,
            self.in_hooks + self.out_hooks,
            stop_at_layer=max(self.layers) + 1,
        )
        missing = [name for name in self.in_hooks + self.out_hooks if name not in cache]
        if missing:
            raise HookError(
                f"hooks {missing} did not fire on a forward pass (does the model have them? "
                "'hook_mlp_in' needs model.set_use_hook_mlp_in(True))"
            )
        flat_mask = mask.reshape(-1).to(self.model.cfg.device)

        def rows(names: list[str]) -> Tensor:
            stacked = torch.stack([cache[n].reshape(-1, cache[n].shape[-1]) for n in names])
            return stacked[:, flat_mask].to(device=self.device, dtype=torch.float32)

        x, y = rows(self.in_hooks), rows(self.out_hooks)
        perm = torch.randperm(x.shape[1], generator=chunk_generator(self.seed, k))
        perm = perm.to(self.device)
        return x[:, perm], y[:, perm]

    def batches(
        self, start: StreamPosition, batch_tokens: int
    ) -> Iterator[tuple[Tensor, Tensor, StreamPosition]]:
        """``(x, y [L, batch_tokens, d_model], position after the batch)`` from ``start``.

        A batch may span two chunks; only one chunk's activations (plus a partial batch)
        are held at a time. Ends when the token source ends (one-shot iterators only).
        """
        parts_x: list[Tensor] = []
        parts_y: list[Tensor] = []
        have = 0
        for k, tokens, mask in self.source.chunks(start.chunk):
            x, y = self.chunk_activations(k, tokens, mask)
            n = x.shape[1]
            r = start.row if k == start.chunk else 0
            while r < n:
                take = min(batch_tokens - have, n - r)
                parts_x.append(x[:, r : r + take])
                parts_y.append(y[:, r : r + take])
                r += take
                have += take
                if have == batch_tokens:
                    after = StreamPosition(k, r) if r < n else StreamPosition(k + 1, 0)
                    yield torch.cat(parts_x, 1), torch.cat(parts_y, 1), after
                    parts_x, parts_y, have = [], [], 0
            # copy the partial batch so this chunk's activations can be freed
            parts_x = [p.clone() for p in parts_x]
            parts_y = [p.clone() for p in parts_y]
            del x, y
