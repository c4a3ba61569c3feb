"""Feature cards: each transcoder feature's top-activating contexts in a token dataset.

:func:`top_activating_contexts` runs any TransformerLens model on any ``[n_seq, seq]`` token
dataset, reads every layer's transcoder input at ``transcoders.input_hook(layer)`` and keeps,
per ``(layer, feature)``, the ``k`` (sequence, position) pairs of largest positive
activation, each with the ``window`` tokens ending at that position and the feature's
activations over them. :class:`FeatureCards` holds the result and saves it as one
safetensors file plus a JSON sidecar (never pickle).

A context's tokens are ``tokens[seq, pos - window + 1 : pos + 1]`` (shorter at the start of
a sequence); its ``max_pos`` is the index of the maximum inside that list (the last one).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_circuits.errors import TLCircuitsError
from tl_circuits.model.hooks import MLP_INPUT_HOOK, install_mlp_input_hooks
from tl_circuits.storage import read_safetensors, write_safetensors, write_text
from tl_circuits.transcoders.base import Transcoders

__all__ = ["FeatureCards", "top_activating_contexts"]

#: version of the JSON sidecar
CARDS_VERSION = 1
_TENSOR_FILE = "feature_cards.safetensors"
_JSON_FILE = "feature_cards.json"


@dataclass(frozen=True, eq=False)
class FeatureCards:
    """Top-``k`` contexts per feature of every layer.

    Per layer ``l`` (lists indexed by layer), with ``d = d_sae(l)``:

    - ``seq[l]``, ``pos[l]``: ``[d, k]`` the dataset row and position of each context's
      maximum, ``-1`` where the feature has fewer than ``k`` positive activations;
    - ``max_act[l]``: ``[d, k]`` the activation there (descending along ``k``; 0 if unused);
    - ``tokens[l]``: ``[d, k, window]`` token ids of the window ending at ``pos`` (left
      padded with ``-1`` at the start of a sequence);
    - ``acts[l]``: ``[d, k, window]`` the feature's activations over the window (0 on
      padding).
    """

    window: int
    seq: list[Tensor]
    pos: list[Tensor]
    max_act: list[Tensor]
    tokens: list[Tensor]
    acts: list[Tensor]
    info: dict[str, Any]

    @property
    def n_layers(self) -> int:
        return len(self.seq)

    def contexts(
        self, layer: int, feature: int, decode: Callable[[int], str] | None = None
    ) -> list[dict[str, Any]]:
        """The feature's contexts as JSON-ready dicts ``{"tokens", "acts", "max_act",
        "max_pos", "seq", "pos"}`` (``tokens``: ``decode(id)``, else the ids), strongest
        first; ``[]`` for a feature that never fired or out of range."""
        if not 0 <= layer < self.n_layers or not 0 <= feature < self.seq[layer].shape[0]:
            return []
        out = []
        for j in range(self.seq[layer].shape[1]):
            if int(self.seq[layer][feature, j]) < 0:
                continue
            ids = self.tokens[layer][feature, j].tolist()
            acts = self.acts[layer][feature, j].tolist()
            keep = [i for i, t in enumerate(ids) if t >= 0]
            toks = [ids[i] for i in keep]
            out.append(
                {
                    "tokens": [decode(t) for t in toks] if decode is not None else toks,
                    "acts": [float(acts[i]) for i in keep],
                    "max_act": float(self.max_act[layer][feature, j]),
                    "max_pos": len(keep) - 1,
                    "seq": int(self.seq[layer][feature, j]),
                    "pos": int(self.pos[layer][feature, j]),
                }
            )
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``path/feature_cards.safetensors`` and ``path/feature_cards.json``
        (``path`` a directory, created if missing); returns ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for layer in range(self.n_layers):
            tensors[f"seq.{layer}"] = self.seq[layer].to(torch.int32)
            tensors[f"pos.{layer}"] = self.pos[layer].to(torch.int16)
            tensors[f"max_act.{layer}"] = self.max_act[layer].to(torch.float32)
            small = self.tokens[layer].numel() == 0 or int(self.tokens[layer].max()) < 2**15
            tensors[f"tokens.{layer}"] = self.tokens[layer].to(
                torch.int16 if small else torch.int32
            )
            tensors[f"acts.{layer}"] = self.acts[layer].to(torch.float16)
        write_safetensors(tensors, path / _TENSOR_FILE, {"format": "tl_circuits.feature_cards"})
        meta = {
            "version": CARDS_VERSION,
            "n_layers": self.n_layers,
            "window": self.window,
            "info": self.info,
        }
        write_text(path / _JSON_FILE, json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureCards:
        """Read what :meth:`save` wrote (safetensors + JSON only)."""
        path = Path(path)
        try:
            meta = json.loads((path / _JSON_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TLCircuitsError(f"cannot read feature cards in {path}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("version") != CARDS_VERSION:
            raise TLCircuitsError(f"{path / _JSON_FILE}: not feature cards of version 1")
        n_layers, window = meta.get("n_layers"), meta.get("window")
        if not isinstance(n_layers, int) or not isinstance(window, int) or window < 1:
            raise TLCircuitsError(f"{path / _JSON_FILE}: bad n_layers or window")
        t, _ = read_safetensors(path / _TENSOR_FILE)
        fields: dict[str, list[Tensor]] = {}
        for name in ("seq", "pos", "max_act", "tokens", "acts"):
            try:
                fields[name] = [t[f"{name}.{layer}"] for layer in range(n_layers)]
            except KeyError as exc:
                raise TLCircuitsError(f"{path / _TENSOR_FILE}: missing tensor {exc}") from None
        for layer in range(n_layers):
            d, k = fields["seq"][layer].shape
            ok = fields["pos"][layer].shape == fields["max_act"][layer].shape == (d, k)
            ok &= fields["tokens"][layer].shape == fields["acts"][layer].shape == (d, k, window)
            if not ok:
                raise TLCircuitsError(f"{path / _TENSOR_FILE}: layer {layer} has bad shapes")
        return cls(
            window=window,
            seq=[x.long() for x in fields["seq"]],
            pos=[x.long() for x in fields["pos"]],
            max_act=[x.float() for x in fields["max_act"]],
            tokens=[x.long() for x in fields["tokens"]],
            acts=[x.float() for x in fields["acts"]],
            info=dict(meta.get("info") or {}),
        )


def top_activating_contexts(
    model: HookedTransformer,
    transcoders: Transcoders,
    tokens: Tensor,
    *,
    k: int = 8,
    window: int = 8,
    batch_size: int = 32,
    layers: list[int] | None = None,
) -> FeatureCards:
    """The top-``k`` contexts of every feature (module docstring) over ``tokens``
    ``[n_seq, seq]`` (int). Two passes over the data: the first ranks positions, the
    second gathers the windows."""
    if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TLCircuitsError(f"tokens must be an int tensor [n_seq, seq], got {tokens.shape}")
    for name, value in (("k", k), ("window", window), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TLCircuitsError(f"{name} must be a positive integer, got {value!r}")
    layers = list(range(transcoders.n_layers)) if layers is None else list(layers)
    if any(h.endswith(MLP_INPUT_HOOK) for h in map(transcoders.input_hook, layers)):
        install_mlp_input_hooks(model)
    n_seq, seq_len = tokens.shape
    tokens = tokens.long().cpu()

    batches = functools.partial(_batches, model, transcoders, tokens, layers, batch_size)
    best_act, best_flat = _rank_positions(batches, transcoders, layers, k, seq_len)
    seq_of, pos_of, max_act, win_tok = {}, {}, {}, {}
    offsets = torch.arange(window) - (window - 1)  # [-window+1 .. 0]
    for m in layers:
        used = best_act[m] > 0
        flat = torch.where(used, best_flat[m], -1).T  # [d, k]
        seq_of[m] = torch.where(flat >= 0, flat // seq_len, -1)
        pos_of[m] = torch.where(flat >= 0, flat % seq_len, -1)
        max_act[m] = torch.where(used, best_act[m], 0.0).T.contiguous()
        win_pos = pos_of[m][..., None] + offsets  # [d, k, window]
        valid = (win_pos >= 0) & (seq_of[m][..., None] >= 0)
        s_idx = seq_of[m][..., None].clamp(min=0).expand_as(win_pos)
        win_tok[m] = torch.where(valid, tokens[s_idx, win_pos.clamp(min=0)], -1)
    win_act = _window_activations(batches, layers, seq_of, pos_of, offsets)
    info = {
        "n_seq": int(n_seq),
        "seq_len": int(seq_len),
        "k": k,
        "input_hooks": [transcoders.input_hook(m) for m in layers],
    }
    return FeatureCards(
        window=window,
        seq=[seq_of[m] for m in layers],
        pos=[pos_of[m] for m in layers],
        max_act=[max_act[m] for m in layers],
        tokens=[win_tok[m] for m in layers],
        acts=[win_act[m] for m in layers],
        info=info,
    )


def _rank_positions(
    batches: Any, transcoders: Transcoders, layers: list[int], k: int, seq_len: int
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """First pass: per layer, the ``k`` largest activations of every feature ``[k, d]``
    and their flat positions ``seq * seq_len + pos``."""
    best_act = {
        m: torch.full((k, transcoders.d_sae(m)), -torch.inf, dtype=torch.float32) for m in layers
    }
    best_flat = {m: torch.full((k, transcoders.d_sae(m)), -1, dtype=torch.long) for m in layers}
    for start, acts in batches():
        for m in layers:
            a = acts[m].reshape(-1, acts[m].shape[-1])  # [b * seq, d]
            flat = torch.arange(a.shape[0]) + start * seq_len
            cand_act = torch.cat([best_act[m], a])
            cand_flat = torch.cat([best_flat[m], flat[:, None].expand_as(a)])
            top = cand_act.topk(min(k, cand_act.shape[0]), dim=0, sorted=True).indices
            best_act[m] = cand_act.gather(0, top)
            best_flat[m] = cand_flat.gather(0, top)
    return best_act, best_flat


def _window_activations(
    batches: Any,
    layers: list[int],
    seq_of: dict[int, Tensor],
    pos_of: dict[int, Tensor],
    offsets: Tensor,
) -> dict[int, Tensor]:
    """Second pass: each feature's activations over the window ending at each of its top
    positions, ``[d, k, window]`` per layer (0 outside the sequence)."""
    win_act = {
        m: torch.zeros((*seq_of[m].shape, len(offsets)), dtype=torch.float32) for m in layers
    }
    for start, acts in batches():
        stop = start + acts[layers[0]].shape[0]
        for m in layers:
            d = acts[m].shape[-1]
            s = seq_of[m]
            here = (s >= start) & (s < stop)
            if not here.any():
                continue
            f_idx, j_idx = here.nonzero(as_tuple=True)
            wp = pos_of[m][f_idx, j_idx][:, None] + offsets  # [n, window]
            ok = wp >= 0
            local = (s[f_idx, j_idx] - start)[:, None].expand_as(wp)
            vals = acts[m][local, wp.clamp(min=0), f_idx[:, None].expand_as(wp).clamp(max=d - 1)]
            win_act[m][f_idx, j_idx] = torch.where(ok, vals, 0.0)
    return win_act


def feature_activations(
    model: HookedTransformer, transcoders: Transcoders, tokens: Tensor, layers: list[int]
) -> dict[int, Tensor]:
    """Feature activations ``{layer: [batch, seq, d_sae]}`` (float32, CPU) of ``tokens``
    ``[batch, seq]`` on the clean model (the transcoders only read, nothing is spliced)."""
    if any(h.endswith(MLP_INPUT_HOOK) for h in map(transcoders.input_hook, layers)):
        install_mlp_input_hooks(model)
    kept: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: HookPoint) -> None:
        kept[hook.name] = x.detach()

    names = {transcoders.input_hook(m) for m in layers}
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, keep) for n in sorted(names)]):
        model(tokens.to(model.cfg.device))
    out = {}
    with torch.no_grad():
        for m in layers:
            enc = transcoders.encoder(m)
            x = kept[transcoders.input_hook(m)].to(enc.W_enc.device, enc.W_enc.dtype)
            out[m] = enc.activations(enc.pre_activations(x)).float().cpu()
    return out


def _batches(
    model: HookedTransformer,
    transcoders: Transcoders,
    tokens: Tensor,
    layers: list[int],
    batch_size: int,
):
    for start in range(0, tokens.shape[0], batch_size):
        yield (
            start,
            feature_activations(model, transcoders, tokens[start : start + batch_size], layers),
        )
