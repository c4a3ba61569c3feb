"""Evaluation of transcoders on a token set: reconstruction and the fully replaced model.

Per layer, on the clean forward pass (each transcoder reads the model's own MLP input):

- ``fvu[l]`` = ``sum |mlp_out - recon|^2 / sum |mlp_out - mean(mlp_out)|^2`` over the
  evaluated positions (the mean taken over the same positions);
- ``l0[l]``: mean number of active features (``a > 0``) of source layer ``l`` per position;
- ``dead_fraction[l]``: fraction of layer ``l``'s features active at no evaluated position.

For the *replaced* model every MLP output is replaced by its transcoder's reconstruction
(no error term), computed from the replaced model's own MLP inputs:

- ``agreement``: fraction of evaluated positions where its argmax next token equals the
  original model's;
- ``ce_loss_original`` / ``ce_loss_replaced``: mean next-token cross-entropy (nats) over
  evaluated positions that have a next token.

"Evaluated positions" are those of the loss mask (all by default).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_circuits.replacement.context import validate_transcoders
from tl_circuits.training.activations import Chunk, TokenSource, capture
from tl_circuits.training.config import TrainingDataError
from tl_circuits.transcoders.base import Transcoders
from tl_circuits.typing import Bool, Float, Int, typechecked


class ReconstructionAccumulator:
    """Streaming FVU of one layer: sums in float64 over batches of rows ``[n, d]``."""

    def __init__(self) -> None:
        self.n = 0
        self.sum_y: Tensor | None = None
        self.sum_y2 = 0.0
        self.sum_err2 = 0.0

    @typechecked
    def update(self, y: Float[Tensor, "n d"], y_hat: Float[Tensor, "n d"]) -> None:
        """Add rows of true outputs ``y`` and reconstructions ``y_hat``."""
        y64 = y.double()
        part = y64.sum(0)
        self.sum_y = part if self.sum_y is None else self.sum_y + part
        self.sum_y2 += float(y64.pow(2).sum())
        self.sum_err2 += float((y64 - y_hat.double()).pow(2).sum())
        self.n += y.shape[0]

    def fvu(self) -> float:
        """``sum |err|^2 / sum |y - mean y|^2`` (NaN before any update)."""
        if self.sum_y is None or self.n == 0:
            return float("nan")
        variance = self.sum_y2 - float(self.sum_y.pow(2).sum()) / self.n
        return self.sum_err2 / max(variance, 1e-300)


@dataclass
class TrainingReport:
    """Evaluation numbers (see the module docstring) and, after training, training stats.

    Lists are indexed by layer (``layers`` says which). Fields are None when not measured
    (e.g. the replaced-model numbers when the transcoders do not cover every layer).
    ``training``: tokens seen, steps, seconds, seconds per layer, final loss and the
    running (EMA) FVU / L0 / dead fraction of the last training batches.
    """

    layers: list[int]
    fvu: list[float] | None = None
    l0: list[float] | None = None
    dead_fraction: list[float] | None = None
    agreement: float | None = None
    ce_loss_original: float | None = None
    ce_loss_replaced: float | None = None
    n_eval_tokens: int = 0
    training: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def replacement_hooks(transcoders: Transcoders) -> list[tuple[str, Callable]]:
    """Hooks replacing every MLP output by its reconstruction from the live MLP inputs."""
    x_in: dict[int, Tensor] = {}
    acts: dict[int, Tensor] = {}
    hooks: list[tuple[str, Callable]] = []
    for layer in range(transcoders.n_layers):
        encoder = transcoders.encoder(layer)

        def on_input(x: Tensor, hook: HookPoint, layer: int = layer, encoder=encoder) -> None:
            x_in[layer] = x
            acts[layer] = encoder.activations(encoder.pre_activations(x))

        def on_output(out: Tensor, hook: HookPoint, layer: int = layer) -> Tensor:
            return transcoders.reconstruct(layer, acts, x_in[layer])

        hooks.append((transcoders.input_hook(layer), on_input))
        hooks.append((transcoders.output_hook(layer), on_output))
    return hooks


def _sequence_batches(source: TokenSource, n: int) -> Iterable[tuple[Tensor, Tensor]]:
    """The source's chunks (read once) cut into batches of at most ``n`` sequences."""
    for _, tokens, mask in source.chunks(cycle=False):
        for start in range(0, tokens.shape[0], n):
            yield tokens[start : start + n], mask[start : start + n]


def evaluate_transcoders(
    model: HookedTransformer,
    transcoders: Transcoders,
    tokens: Int[Tensor, "n_seq seq"] | Iterable[Tensor | Chunk],
    loss_mask: Bool[Tensor, "n_seq seq"] | None = None,
    *,
    batch_sequences: int = 16,
    progress: bool = False,
) -> TrainingReport:
    """FVU, L0 and dead fraction per layer, and the fully replaced model's next-token
    agreement and cross-entropy, on ``tokens`` (``[n_seq, seq]`` or an iterable of chunks,
    read once). ``loss_mask [n_seq, seq]`` (bool) selects the evaluated positions.
    """
    validate_transcoders(model, transcoders)
    n_layers = model.cfg.n_layers
    if batch_sequences < 1:
        raise TrainingDataError(f"batch_sequences must be >= 1, got {batch_sequences}")
    source = TokenSource(model, tokens, loss_mask, batch_sequences * model.cfg.n_ctx)
    in_hooks = [transcoders.input_hook(layer) for layer in range(n_layers)]
    out_hooks = [transcoders.output_hook(layer) for layer in range(n_layers)]
    recon_acc = [ReconstructionAccumulator() for _ in range(n_layers)]
    active_sum = [0.0] * n_layers
    fired = [torch.zeros(transcoders.d_sae(layer), dtype=torch.bool) for layer in range(n_layers)]
    n_pos = n_agree = n_ce = 0
    ce_orig = ce_repl = 0.0
    bar = tqdm(desc="evaluating", unit="seq", disable=not progress)
    for chunk_tokens, chunk_mask in _sequence_batches(source, batch_sequences):
        chunk_tokens = chunk_tokens.to(model.cfg.device)
        mask = chunk_mask.to(model.cfg.device)
        logits, cache = capture(model, chunk_tokens, in_hooks + out_hooks)
        with torch.no_grad():
            acts = {
                layer: transcoders.encoder(layer).activations(
                    transcoders.encoder(layer).pre_activations(cache[in_hooks[layer]])
                )
                for layer in range(n_layers)
            }
            for layer in range(n_layers):
                recon = transcoders.reconstruct(layer, acts, cache[in_hooks[layer]])
                recon_acc[layer].update(cache[out_hooks[layer]][mask].float(), recon[mask].float())
                active = acts[layer][mask] > 0
                active_sum[layer] += float(active.sum())
                fired[layer] |= active.any(0).cpu()
            replaced, _ = capture(model, chunk_tokens, [], replacement_hooks(transcoders))
        n_pos += int(mask.sum())
        n_agree += int((logits.argmax(-1) == replaced.argmax(-1))[mask].sum())
        has_next = mask[:, :-1]
        targets = chunk_tokens[:, 1:][has_next]
        n_ce += int(has_next.sum())
        for name, out in (("orig", logits), ("repl", replaced)):
            log_probs = out[:, :-1][has_next].double().log_softmax(-1)
            total = -float(log_probs.gather(-1, targets[:, None]).sum())
            if name == "orig":
                ce_orig += total
            else:
                ce_repl += total
        bar.update(chunk_tokens.shape[0])
    bar.close()
    if n_pos == 0:
        raise TrainingDataError("no evaluated positions: the tokens are empty or fully masked")
    return TrainingReport(
        layers=list(range(n_layers)),
        fvu=[acc.fvu() for acc in recon_acc],
        l0=[s / n_pos for s in active_sum],
        dead_fraction=[1.0 - float(f.float().mean()) for f in fired],
        agreement=n_agree / n_pos,
        ce_loss_original=ce_orig / n_ce if n_ce else float("nan"),
        ce_loss_replaced=ce_repl / n_ce if n_ce else float("nan"),
        n_eval_tokens=n_pos,
    )
