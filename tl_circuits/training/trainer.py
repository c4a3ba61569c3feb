"""The training loop: :func:`train_transcoders`.

One loop trains per-layer and cross-layer transcoders (they differ only in the decoders of
:class:`~tl_circuits.training.trainable.TrainableTranscoder`). Every step reads a batch of
``batch_tokens`` activation rows of all trained layers from the
:class:`~tl_circuits.training.activations.ActivationStream`, takes one Adam step on
reconstruction + sparsity loss, and updates the dead-feature counters. The learning rate
and the sparsity coefficient depend only on the tokens seen, so a resumed run takes the
same steps as an uninterrupted one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.transcoder import Transcoder
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_circuits.model.hooks import (
    MLP_INPUT_HOOK,
    check_input_hook_reads_mlp_input,
    check_supported_architecture,
    install_mlp_input_hooks,
    model_has_folded_ln,
)
from tl_circuits.training.activations import ActivationStream, Chunk, TokenSource
from tl_circuits.training.checkpoint import (
    TrainingState,
    load_checkpoint,
    save_checkpoint,
)
from tl_circuits.training.config import (
    CheckpointError,
    TrainingConfig,
    TrainingConfigError,
    TrainingDataError,
    select_device,
)
from tl_circuits.training.evaluate import TrainingReport, evaluate_transcoders
from tl_circuits.training.export import to_clt, to_saelens, to_transcoder_set
from tl_circuits.training.trainable import TrainableTranscoder
from tl_circuits.transcoders.base import Transcoders
from tl_circuits.typing import Bool, Int

TRANSCODERS_DIR = "transcoders"
REPORT_FILE = "report.json"
#: Default evaluation set: the first tokens of the stream, at most this many.
EVAL_TOKENS = 8192
EMA_DECAY = 0.95


@dataclass
class TrainingResult:
    """What :func:`train_transcoders` returns.

    ``transcoders``: a TranscoderSet (per-layer; None when the trained layers are not
    ``0..k-1``, see ``saes``) or a CrossLayerTranscoder, in the model's dtype and on its
    device. ``saes``: per-layer kind only, model layer -> SAE-Lens object. ``report``: the
    evaluation and training numbers. ``out_dir``: where files were written (or None).
    """

    transcoders: Transcoders | None
    report: TrainingReport
    config: TrainingConfig
    saes: dict[int, Transcoder] | None = None
    out_dir: Path | None = None


def learning_rate(cfg: TrainingConfig, tokens_seen: int) -> float:
    """Constant ``lr``, then linear decay to 0 over the last ``lr_decay_fraction``."""
    if cfg.lr_decay_fraction == 0:
        return cfg.lr
    remaining = 1.0 - tokens_seen / cfg.n_tokens
    return cfg.lr * min(1.0, max(remaining, 0.0) / cfg.lr_decay_fraction)


def sparsity_coefficient(cfg: TrainingConfig, tokens_seen: int) -> float:
    """``sparsity_coefficient`` ramped linearly from 0 over ``sparsity_warmup_fraction``."""
    if cfg.sparsity_warmup_fraction == 0:
        return cfg.sparsity_coefficient
    ramp = tokens_seen / (cfg.sparsity_warmup_fraction * cfg.n_tokens)
    return cfg.sparsity_coefficient * min(1.0, ramp)


class RunningStats:
    """Exponential moving averages (decay ``EMA_DECAY``) of the per-layer batch FVU and L0,
    and the last batch's losses, kept as tensors on the training device (no per-step
    synchronisation); :meth:`to_dict` gives floats."""

    def __init__(self, saved: dict[str, Any] | None, device: torch.device) -> None:
        saved = saved or {}
        self.values: dict[str, Tensor] = {
            k: torch.tensor(v, device=device) for k, v in saved.items() if v is not None
        }

    def update(self, y: Tensor, sq_err: Tensor, acts: Tensor, loss: Tensor, recon: Tensor) -> None:
        """One batch: ``y [L, B, d]``, ``sq_err [L, B]``, ``acts [L, B, F]`` (normalised)."""
        with torch.no_grad():
            var = (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-30)
            new = {"fvu": sq_err.sum(1) / var, "l0": (acts > 0).float().sum(-1).mean(-1)}
            for key, value in new.items():
                old = self.values.get(key)
                self.values[key] = (
                    value if old is None else EMA_DECAY * old + (1 - EMA_DECAY) * value
                )
            self.values["loss"] = loss.detach()
            self.values["reconstruction_loss"] = recon.detach()

    def to_dict(self) -> dict[str, Any]:
        return {k: v.tolist() for k, v in self.values.items()}


def _eval_tokens(source: TokenSource) -> Chunk | None:
    """The first ``EVAL_TOKENS`` tokens (whole sequences, at least one) of the stream."""
    if source.first_chunk is None:
        return None
    tokens, mask = source.first_chunk
    n_seq = max(1, EVAL_TOKENS // tokens.shape[1])
    return tokens[:n_seq], None if mask is None else mask[:n_seq]


def train_transcoders(
    model: HookedTransformer,
    tokens: Int[Tensor, "n_seq seq"] | Iterable[Tensor | Chunk],
    cfg: TrainingConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    loss_mask: Bool[Tensor, "n_seq seq"] | None = None,
    *,
    eval_tokens: Int[Tensor, "n_eval seq_eval"] | None = None,
    eval_loss_mask: Bool[Tensor, "n_eval seq_eval"] | None = None,
) -> TrainingResult:
    """Train transcoders for ``model`` on ``tokens`` as ``cfg`` says; see docs/training.md.

    ``tokens``: ``[n_seq, seq]`` integer tensor, or an iterable of such chunks (or of
    ``(tokens, loss_mask)`` pairs); ``loss_mask [n_seq, seq]`` (bool, tensor input only):
    positions whose activations are trained on. ``out_dir``: writes
    ``transcoders/`` (SAE-Lens directories + manifest, or the CLT format),
    ``report.json`` and ``checkpoint/``. ``resume``: continue from ``out_dir``'s
    checkpoint (same config; for an iterator, pass a fresh one yielding the same chunks).
    ``eval_tokens``: tokens for the final report (default: the first
    ``EVAL_TOKENS`` tokens of the stream, i.e. training data).

    Arguments are checked by hand (not by beartype) so that every bad input raises a
    TrainingConfigError / TrainingDataError / CheckpointError that says what to change.
    """
    if not isinstance(cfg, TrainingConfig):
        raise TrainingConfigError(f"cfg must be a TrainingConfig, got {type(cfg).__name__}")
    check_supported_architecture(model)
    if cfg.input_hook == MLP_INPUT_HOOK:
        install_mlp_input_hooks(model)
    layers = cfg.training_layers(model.cfg.n_layers)
    check_input_hook_reads_mlp_input(model, layers[0], cfg.input_hook)
    device = select_device(cfg.device)
    root = Path(out_dir) if out_dir is not None else None
    if resume and root is None:
        raise CheckpointError("resume=True needs the out_dir that holds the checkpoint")

    source = TokenSource(model, tokens, loss_mask, cfg.chunk_tokens)
    stream = ActivationStream(model, source, layers, cfg.input_hook, device, cfg.seed)
    module = TrainableTranscoder(cfg, len(layers), model.cfg.d_model).to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    last_fired = torch.zeros(len(layers), cfg.d_sae, dtype=torch.long, device=device)
    state = TrainingState(stats={})
    if resume:
        assert root is not None
        last_fired, state = load_checkpoint(root, cfg, layers, module, optimizer, device)
        last_fired = last_fired.to(device)
    initialised = resume

    batches = stream.batches(state.position, cfg.batch_tokens)
    bar = tqdm(
        total=cfg.n_tokens, initial=min(state.tokens_seen, cfg.n_tokens), unit="tok",
        unit_scale=True, desc=f"training {cfg.kind} transcoders", disable=not progress,
    )  # fmt: skip
    stats = RunningStats(state.stats, device)
    started = time.perf_counter() - state.seconds
    next_checkpoint = _next_multiple(state.tokens_seen, cfg.checkpoint_every_tokens)
    while state.tokens_seen < cfg.n_tokens:
        try:
            x_raw, y_raw, position = next(batches)
        except StopIteration:
            warnings.warn(
                f"the token stream ended after {state.tokens_seen} of n_tokens={cfg.n_tokens} "
                "tokens; training stopped early (pass a tensor or a list to cycle the data)",
                stacklevel=2,
            )
            break
        if not initialised:
            module.initialise(x_raw, y_raw, torch.Generator().manual_seed(cfg.seed))
            initialised = True
        n_new = _train_step(cfg, module, optimizer, x_raw, y_raw, state, last_fired, stats)
        state.position = position
        bar.update(min(n_new, cfg.n_tokens - bar.n))
        if state.step % 10 == 0 or state.tokens_seen >= cfg.n_tokens:
            _show_progress(bar, stats, last_fired, state.tokens_seen, cfg, len(layers))
        if root is not None and next_checkpoint and state.tokens_seen >= next_checkpoint:
            state.seconds = time.perf_counter() - started
            state.stats = stats.to_dict()
            save_checkpoint(root, cfg, layers, module, optimizer, last_fired, state)
            next_checkpoint = _next_multiple(state.tokens_seen, cfg.checkpoint_every_tokens)
    bar.close()
    if not initialised:
        raise TrainingDataError(
            "the token stream yielded no activations (empty, or every position masked); "
            "nothing was trained"
        )
    state.seconds = time.perf_counter() - started
    state.stats = stats.to_dict()
    if root is not None and cfg.checkpoint_every_tokens:
        save_checkpoint(root, cfg, layers, module, optimizer, last_fired, state)
    return _finish(model, module, cfg, layers, source, state, last_fired, root, eval_tokens,
                   eval_loss_mask, progress)  # fmt: skip


def _train_step(
    cfg: TrainingConfig,
    module: TrainableTranscoder,
    optimizer: torch.optim.Optimizer,
    x_raw: Tensor,
    y_raw: Tensor,
    state: TrainingState,
    last_fired: Tensor,
    stats: RunningStats,
) -> int:
    """One optimiser step on a batch (learning rate and sparsity coefficient scheduled by
    the tokens seen); updates ``state``, ``last_fired`` and ``stats``; returns the batch's
    token count."""
    x, y = module.normalise(x_raw, y_raw)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, state.tokens_seen)
    loss, recon_loss, acts, sq_err = module.losses(
        x, y, sparsity_coefficient(cfg, state.tokens_seen)
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    state.tokens_seen += x.shape[1]
    state.step += 1
    fired = (acts > 0).any(1)
    last_fired[fired] = state.tokens_seen
    stats.update(y, sq_err, acts, loss, recon_loss)
    return int(x.shape[1])


def _show_progress(
    bar: tqdm,
    stats: RunningStats,
    last_fired: Tensor,
    tokens_seen: int,
    cfg: TrainingConfig,
    n_layers: int,
) -> None:
    """Loss, FVU, L0 and dead fraction (means over layers) on the progress bar."""
    dead = _dead_fraction(last_fired, tokens_seen, cfg.dead_after_tokens)
    shown = stats.to_dict()
    bar.set_postfix(
        loss=f"{shown['loss']:.4f}",
        fvu=f"{sum(shown['fvu']) / n_layers:.3f}",
        l0=f"{sum(shown['l0']) / n_layers:.1f}",
        dead=f"{sum(dead) / n_layers:.2f}",
    )


def _next_multiple(tokens_seen: int, every: int) -> int:
    """The next checkpoint threshold after ``tokens_seen`` (0: checkpoints off)."""
    return 0 if every == 0 else (tokens_seen // every + 1) * every


def _dead_fraction(last_fired: Tensor, tokens_seen: int, dead_after: int) -> list[float]:
    """Per layer, the fraction of features that did not fire in the last ``dead_after``
    tokens (only once that many tokens were seen; before, 0)."""
    if tokens_seen < dead_after:
        return [0.0] * last_fired.shape[0]
    return ((tokens_seen - last_fired) >= dead_after).float().mean(-1).tolist()


def _finish(
    model: HookedTransformer,
    module: TrainableTranscoder,
    cfg: TrainingConfig,
    layers: list[int],
    source: TokenSource,
    state: TrainingState,
    last_fired: Tensor,
    root: Path | None,
    eval_tokens: Tensor | None,
    eval_loss_mask: Tensor | None,
    progress: bool,
) -> TrainingResult:
    """Export, evaluate, save; build the result."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    common = dict(
        dtype=dtype,
        device=device,
        fold_ln=model_has_folded_ln(model),
        model_name=model.cfg.model_name,
    )
    saes: dict[int, Transcoder] | None = None
    transcoders: Transcoders | None
    if cfg.kind == "cross_layer":
        transcoders = to_clt(module, cfg.input_hook, **common)  # type: ignore[arg-type]
    else:
        saes = to_saelens(module, layers, cfg.input_hook, **common)  # type: ignore[arg-type]
        transcoders = to_transcoder_set(saes)
    complete = transcoders is not None and transcoders.n_layers == model.cfg.n_layers
    if eval_tokens is None:
        default = _eval_tokens(source)
        eval_tokens, eval_loss_mask = default if default is not None else (None, None)
    if complete and eval_tokens is not None:
        assert transcoders is not None
        report = evaluate_transcoders(
            model, transcoders, eval_tokens, eval_loss_mask, progress=progress
        )
    else:
        report = TrainingReport(layers=layers)
    stats = state.stats or {}
    report.training = {
        "tokens_seen": state.tokens_seen,
        "steps": state.step,
        "seconds": state.seconds,
        "seconds_per_layer": state.seconds / len(layers),
        "final_loss": stats.get("loss"),
        "final_reconstruction_loss": stats.get("reconstruction_loss"),
        "fvu_ema": stats.get("fvu"),
        "l0_ema": stats.get("l0"),
        "dead_fraction": _dead_fraction(last_fired, state.tokens_seen, cfg.dead_after_tokens),
        "layers": layers,
        "config": cfg.to_dict(),
    }
    if root is not None:
        out = root / TRANSCODERS_DIR
        if isinstance(transcoders, Transcoders):
            transcoders.save(out)  # type: ignore[attr-defined]
        else:
            assert saes is not None
            for layer, sae in saes.items():
                sae.save_model(out / f"layer_{layer}")
        report.save(root / REPORT_FILE)
    return TrainingResult(transcoders, report, cfg, saes, root)
