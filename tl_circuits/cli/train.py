"""``tl-circuits train-transcoders``: train per-layer or cross-layer transcoders."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tl_circuits.cli.options import check_output_dir
from tl_circuits.cli.sources import DEFAULT, SourceError, check_source_device

DESCRIPTION = """\
Train transcoders on a model's MLP inputs/outputs (tl_circuits.training; docs/training.md)
and save them in SAE-Lens format (per-layer) or the CLT format (cross-layer), with a
report (FVU, L0, dead fraction, next-token agreement and loss with every MLP replaced) and
checkpoints (--resume continues).

Tokens: --tokens FILE (a .safetensors file with an integer "tokens" tensor [n_seq, seq],
or a UTF-8 .txt file, tokenized and cut into --seq-len sequences); with no --model and no
--tokens, fresh sequences from the default model's synthetic generator.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train-transcoders",
        help="train per-layer or cross-layer transcoders for a model",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--model", default=None, help="TransformerLens model name (default: embedded)")
    p.add_argument(
        "--fold-ln",
        action="store_true",
        help="load the model with LN folded (needs --model; the default model is unfolded)",
    )
    p.add_argument("--tokens", type=Path, help=".safetensors ('tokens') or .txt file")
    p.add_argument("--seq-len", type=int, default=128, help="for .txt tokens (%(default)s)")
    p.add_argument("--kind", choices=("per_layer", "cross_layer"), default="per_layer")
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--activation", choices=("relu", "jumprelu"), default="relu")
    p.add_argument("--skip", action="store_true", help="also learn a linear skip W_skip")
    p.add_argument("--loss", choices=("relative_mse", "mse"), default="relative_mse")
    p.add_argument("--sparsity", type=float, default=1e-3, help="sparsity coefficient")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-tokens", type=int, default=500_000)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tl_circuits.training import TrainingConfig, train_transcoders

    if args.fold_ln and args.model in (None, DEFAULT):
        raise SourceError(
            "--fold-ln does not apply to the embedded default model (it is used unfolded, as "
            "its shipped transcoders were trained); drop --fold-ln or pass --model"
        )
    if args.device is not None:
        check_source_device(args.device)
    check_output_dir(args.out, "--out")
    if args.tokens is not None and not args.tokens.is_file():
        raise FileNotFoundError(f"--tokens {args.tokens}: no such file")
    model = _model(args)
    cfg = TrainingConfig(
        kind=args.kind,
        d_sae=args.d_sae,
        activation=args.activation,
        skip=args.skip,
        loss=args.loss,
        sparsity_coefficient=args.sparsity,
        lr=args.lr,
        batch_tokens=args.batch_tokens,
        n_tokens=args.n_tokens,
        seed=args.seed,
        device=args.device,
    )
    tokens = _token_source(args, model)
    result = train_transcoders(model, tokens, cfg, out_dir=args.out, resume=args.resume)
    report = result.report.to_dict()
    for key, value in report.items():
        print(f"{key}: {value}")
    print(f"wrote {args.out}")
    return 0


def _model(args: argparse.Namespace) -> Any:
    if args.model is None or args.model == DEFAULT:
        from tl_circuits.default import load_default_model

        return load_default_model(device=args.device or "cpu")
    from tl_circuits.transcoders.loading import load_model

    return load_model(args.model, fold_ln=args.fold_ln, device=args.device or "cpu")


def _token_source(args: argparse.Namespace, model: Any) -> Any:
    """What the trainer streams: a tensor from --tokens, or synthetic chunks."""
    from tl_circuits.training.config import TrainingDataError

    if args.tokens is None:
        if args.model not in (None, DEFAULT):
            raise SourceError(f"--model {args.model}: give --tokens (a .safetensors or .txt file)")
        return _synthetic_chunks(args.n_tokens, args.seed)
    path: Path = args.tokens
    if not path.is_file():
        raise FileNotFoundError(f"--tokens {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise TrainingDataError(
                f"--tokens {path}: not a readable .safetensors file ({exc})"
            ) from None
        if "tokens" not in tensors:
            raise TrainingDataError(f"{path} has no 'tokens' tensor (it has {sorted(tensors)})")
        tokens = tensors["tokens"]
        if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TrainingDataError(
                f"{path}: 'tokens' must be an integer [n_seq, seq] tensor, got "
                f"{tokens.dtype} of shape {tuple(tokens.shape)}"
            )
        return tokens.long()
    if path.suffix == ".txt":
        if args.seq_len < 2:
            raise SourceError("--seq-len must be at least 2")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise TrainingDataError(
                f"--tokens {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                f"{exc.start}, line {line}); convert it to UTF-8 first"
            ) from None
        if model.tokenizer is None:
            raise TrainingDataError(f"--tokens {path}: the model has no tokenizer for text")
        ids = model.to_tokens(text, prepend_bos=False)[0]
        body = args.seq_len - 1
        n_seq = ids.shape[0] // body
        if n_seq == 0:
            raise SourceError(f"{path} has fewer than {body} tokens")
        bos = model.tokenizer.bos_token_id
        seqs = ids[: n_seq * body].view(n_seq, body)
        return torch.cat([torch.full((n_seq, 1), bos, dtype=seqs.dtype), seqs], dim=1)
    raise SourceError(f"--tokens {path}: expected a .safetensors or .txt file")


def _synthetic_chunks(n_tokens: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, loss_mask) chunks of the default model's synthetic data, at least
    ``n_tokens`` in all; transcoders train on every position (an MLP must be replaced
    everywhere, not only where the next token is predictable)."""
    from tl_circuits.default.synthetic import SyntheticConfig, generate

    per_chunk = 256
    chunk_tokens = per_chunk * SyntheticConfig().n_ctx
    for i in range(-(-n_tokens // chunk_tokens) + 1):
        batch = generate(per_chunk, seed=seed * 100_003 + i)
        yield batch.tokens, torch.ones_like(batch.loss_mask)
