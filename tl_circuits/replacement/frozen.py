"""Explicit adjoint (reverse mode) of the frozen local replacement model.

With attention patterns, norm scales and feature activations frozen, the map from node
values to feature pre-activations and targets is linear (DESIGN.md R2). Its adjoint needs
only the cached patterns ``P`` and scales ``s`` and the weights ``W_V``, ``W_O``,
``W_skip`` and the norm weights ``w``: a batch of ``B`` seed rows is propagated as one
``[B, pos, d_model]`` tensor, no forward pass is repeated, and nothing of batch size is
stored per layer.

Per block ``l`` (pre-norm; ``g`` is the gradient on the residual stream after block ``l``):

- MLP output: ``G_l = g`` is the gradient on ``mlp_out(l)``; edges from the sources that
  write there are read off it (:class:`GradientSink`);
- MLP input: ``g_x = g @ W_skip^(l)`` (the skip path) plus the seeds of rows whose target
  reads ``x_in(l)``; then ``g_mid = g + In_l^T(g_x)``;
- attention: ``g_pre = g_mid + LN1^T(Attn^T(Post1^T(g_mid)))`` with
  ``Attn^T(g)[k] = sum_h sum_q P_h[q, k] g[q] W_O^h^T W_V^h^T``;
- parallel blocks (attention and MLP both read ``resid_pre``) add both branches to ``g``.

Norm adjoints with frozen scale ``s`` and weight ``w`` (:mod:`.norms`): RMS ``g * w / s``;
LayerNorm ``centre(g * w / s)`` (centring is linear and self-adjoint).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from tl_circuits.replacement.context import ReplacementContext
from tl_circuits.replacement.norms import (
    FrozenNorm,
    Identity,
    LinearMap,
    frozen_norm,
    norm_adjoint_,
)

__all__ = ["BackwardWorkspace", "FrozenBlock", "FrozenLinearModel", "Seeds", "SparseSeeds"]


@dataclass(frozen=True)
class SparseSeeds:
    """Seeds with one vector per row: row ``row[i]`` gets ``vector[i]`` (``[n, d_model]``)
    at position ``pos[i]``; for rows that read one feature's encoder at one position."""

    row: Tensor  # [n] batch indices
    pos: Tensor  # [n]
    vector: Tensor  # [n, d_model]

    def __post_init__(self) -> None:  # indices where the vectors are (no host round trips)
        object.__setattr__(self, "row", self.row.to(self.vector.device))
        object.__setattr__(self, "pos", self.pos.to(self.vector.device))

    def add_to_(self, g: Tensor) -> None:
        """Add the seeds to a position-major ``g`` ``[pos, B, d_model]``."""
        g.index_put_((self.pos, self.row), self.vector, accumulate=True)


@dataclass(frozen=True)
class Seeds:
    """Where a reverse pass starts, one row per batch element (any of the three kinds).

    - ``x_in[l]``: a gradient on ``x_in(l)`` (rows whose target reads layer ``l``'s
      transcoder input): dense ``[B, pos, d_model]``, or :class:`SparseSeeds`;
    - ``final``: ``[B, pos, d_model]`` on the final norm's output (graph targets);
    - ``resid = (m, seeds)``: on ``resid_pre(m)`` (what a head of layer ``m`` reads;
      ``m = 0``: the embeddings), one vector per row. Not together with ``final``.
    """

    x_in: Mapping[int, Tensor | SparseSeeds] = field(default_factory=dict)
    final: Tensor | None = None
    resid: tuple[int, SparseSeeds] | None = None

    def check(self) -> None:
        if not self.x_in and self.final is None and self.resid is None:
            raise ValueError("backward needs at least one seed")
        if self.final is not None and self.resid is not None:
            raise ValueError("backward takes a final seed or a residual seed, not both")

    def _dense(self) -> list[Tensor]:
        return [s for s in (*self.x_in.values(), self.final) if isinstance(s, Tensor)]

    def n_pos(self, default: int) -> int:
        """Positions the pass covers: the dense seeds' length, else ``default``."""
        dense = self._dense()
        return dense[0].shape[1] if dense else default

    def like(self) -> Tensor:
        """A seed tensor (its dtype and device are the pass's)."""
        dense = self._dense()
        if dense:
            return dense[0]
        sparse = [*self.x_in.values(), *([] if self.resid is None else [self.resid[1]])]
        return sparse[0].vector  # type: ignore[union-attr]


class BackwardWorkspace:
    """Reusable buffers of :meth:`FrozenLinearModel.backward` for up to ``batch`` rows over
    up to ``n_pos`` positions: three position-major residual gradients ``[pos, B, d_model]``
    and two head buffers of ``pos * B * n_heads * d_head`` elements. Allocated once, so a
    build's row batches reuse the same memory instead of allocating per operation."""

    def __init__(
        self,
        model: FrozenLinearModel,
        batch: int,
        n_pos: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.batch, self.n_pos, self.d_model = batch, n_pos, model.d_model
        first = model.blocks[0].W_O
        self.width = first.shape[0] * first.shape[1]
        residual = n_pos * batch * model.d_model
        heads = n_pos * batch * self.width
        self._residual = [torch.empty(residual, dtype=dtype, device=device) for _ in range(3)]
        self._heads = [torch.empty(heads, dtype=dtype, device=device) for _ in range(2)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._residual, *self._heads))

    def views(self, batch: int, n_pos: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``g``, ``gx``, ``tmp`` (``[n_pos, batch, d_model]``) and the two head buffers."""
        if batch > self.batch or n_pos > self.n_pos:
            raise ValueError(
                f"workspace holds {self.batch} rows x {self.n_pos} positions, "
                f"asked for {batch} x {n_pos}"
            )
        size = n_pos * batch * self.d_model
        residual = [t[:size].view(n_pos, batch, self.d_model) for t in self._residual]
        return residual[0], residual[1], residual[2], self._heads[0], self._heads[1]


#: keys per block of the pattern product on long prompts (:func:`causal_mix_`)
KEY_BLOCK = 256


def causal_mix_(pattern_t: Tensor, gz: Tensor, out: Tensor) -> None:
    """``out = pattern_t @ gz`` per head (``[heads, k, q] x [heads, q, n] -> [heads, k,
    n]``) for a causal pattern (``pattern_t[h, k, q] = 0`` for ``q < k``): keys in blocks
    of :data:`KEY_BLOCK` read only the queries at or after the block's first key, so a long
    prompt's product skips most of the zero upper triangle (about half the work)."""
    n_pos = pattern_t.shape[1]
    if n_pos <= 2 * KEY_BLOCK:
        torch.bmm(pattern_t, gz, out=out)
        return
    for k0 in range(0, n_pos, KEY_BLOCK):
        k1 = min(k0 + KEY_BLOCK, n_pos)
        out[:, k0:k1] = torch.bmm(pattern_t[:, k0:k1, k0:], gz[:, k0:])


@dataclass(frozen=True)
class FrozenBlock:
    """Everything the adjoint needs of one block."""

    ln1: LinearMap
    post_attn: LinearMap  # ln1_post (Gemma-2) or identity
    pattern: Tensor  # [n_heads, pos, pos]
    W_V: Tensor  # [n_heads, d_model, d_head] (query heads; GQA expanded)
    W_O: Tensor  # [n_heads, d_head, d_model]
    mlp_in: LinearMap  # residual -> transcoder input
    W_skip: Tensor | None  # [d_model, d_model], [out, in]
    parallel: bool

    def attn_adjoint_into(
        self,
        g: Tensor,
        out: Tensor,
        heads_a: Tensor,
        heads_b: Tensor,
        values: Callable[[Tensor], None] | None = None,
    ) -> None:
        """``out`` = gradient on attention's input (before ln1) from ``g`` on its output.

        ``g``, ``out``: ``[pos, B, d_model]`` (position-major; ``pos`` may be a prefix of the
        prompt); ``heads_a``, ``heads_b``: flat work buffers of at least
        ``pos * B * n_heads * d_head`` elements. ``W_O`` runs as one GEMM over all heads; the
        pattern mixing is one batched GEMM over heads on a head-major copy
        (``[heads, q, B * d_head]``); ``W_V`` is applied per head, accumulating into ``out``.
        ``values``: called with the gradient on the values (``hook_v``, before ``W_V``),
        ``[heads, pos, B, d_head]``, a view of ``heads_a`` valid during the call.
        """
        n_pos, batch, d_model = g.shape
        n_heads, d_head = self.W_O.shape[0], self.W_O.shape[1]
        rows, width = n_pos * batch, n_heads * d_head
        src = g
        if not isinstance(self.post_attn, Identity):
            out.copy_(g)
            norm_adjoint_(self.post_attn, out)
            src = out
        gz = heads_a[: rows * width].view(rows, width)
        torch.mm(src.view(rows, d_model), self.W_O.reshape(width, d_model).T, out=gz)
        gz_heads = heads_b[: rows * width].view(n_heads, n_pos, batch, d_head)
        gz_heads.copy_(gz.view(n_pos, batch, n_heads, d_head).permute(2, 0, 1, 3))
        gv = heads_a[: rows * width].view(n_heads, n_pos, batch * d_head)
        pattern_t = self.pattern[:, :n_pos, :n_pos].transpose(1, 2)  # [heads, k, q]
        causal_mix_(pattern_t, gz_heads.view(n_heads, n_pos, batch * d_head), gv)
        if values is not None:
            values(gv.view(n_heads, n_pos, batch, d_head))
        # W_V over all heads as one GEMM on a row-major copy ([rows, heads * d_head], in
        # heads_b: the head-major gz is no longer needed)
        gv_rows = heads_b[: rows * width].view(rows, n_heads, d_head)
        gv_rows.copy_(gv.view(n_heads, rows, d_head).transpose(0, 1))
        w_v = self.W_V.permute(0, 2, 1).reshape(width, d_model)  # [heads * d_head, d_model]
        torch.mm(gv_rows.view(rows, width), w_v, out=out.view(rows, d_model))
        norm_adjoint_(self.ln1, out)

    def attn_forward(self, x: Tensor, first_pos: int = 0) -> Tensor:
        """Linear part of attention on ``x`` ``[B, pos, d_model]`` (no biases).

        ``first_pos``: ``x`` holds the prompt's positions ``first_pos ..`` (a suffix; exact
        when the residual is zero before it, since attention only looks back).
        """
        f, n = first_pos, x.shape[1]
        y = self.ln1.forward_linear(x, f)
        v = torch.einsum("bkm,hme->bhke", y, self.W_V)
        z = torch.einsum("hqk,bhke->bhqe", self.pattern[:, f : f + n, f : f + n], v)
        out = torch.einsum("bhqe,hed->bqd", z, self.W_O)
        return self.post_attn.forward_linear(out, f)


class FrozenLinearModel:
    """The frozen replacement model of one prompt as explicit linear operators.

    ``blocks[l]``: :class:`FrozenBlock`; ``ln_final``: the final norm's linear part.
    Values are taken from a :class:`ReplacementContext` (cached scales and patterns).
    """

    def __init__(self, ctx: ReplacementContext) -> None:
        model, tcs = ctx.model, ctx.transcoders
        self.n_layers = model.cfg.n_layers
        self.n_pos = ctx.n_pos
        self.d_model = model.cfg.d_model
        self.parallel = bool(model.cfg.parallel_attn_mlp)

        dtype = ctx.compute_dtype  # weights in the analyses' dtype (float32 for 16-bit)

        def scale(name: str) -> Tensor:
            return ctx.frozen[name][0].to(dtype)  # [pos, 1]

        def frozen(module: torch.nn.Module, s: Tensor, with_weight: bool = True) -> FrozenNorm:
            return frozen_norm(module, s, with_weight).to(dtype)

        blocks = []
        for layer, block in enumerate(model.blocks):
            prefix = f"blocks.{layer}."
            ln1 = frozen(block.ln1, scale(prefix + "ln1.hook_scale"))
            post = (
                frozen(block.ln1_post, scale(prefix + "ln1_post.hook_scale"))
                if hasattr(block, "ln1_post")
                else Identity()
            )
            suffix = tcs.input_hook(layer).removeprefix(prefix)
            skip = tcs.W_skip(layer)
            ln2_scale = scale(prefix + "ln2.hook_scale")
            if suffix == "mlp.hook_in":
                mlp_in: LinearMap = frozen(block.ln2, ln2_scale)
            elif suffix == "ln2.hook_normalized":
                mlp_in = frozen(block.ln2, ln2_scale, with_weight=False)
            else:  # hook_resid_mid / hook_mlp_in / hook_resid_pre (parallel): the residual itself
                mlp_in = Identity()
            blocks.append(
                FrozenBlock(
                    ln1=ln1,
                    post_attn=post,
                    pattern=ctx.frozen[prefix + "attn.hook_pattern"][0].to(dtype),
                    W_V=block.attn.W_V.detach().to(dtype),
                    W_O=block.attn.W_O.detach().to(dtype),
                    mlp_in=mlp_in,
                    W_skip=None if skip is None else skip.to(dtype),
                    parallel=self.parallel,
                )
            )
        self.blocks = blocks
        self.ln_final = frozen(model.ln_final, scale("ln_final.hook_scale"))
        self.dtype = dtype

    def backward(
        self,
        seeds: Seeds,
        sink: GradientSink,
        batch: int,
        *,
        n_pos: int | None = None,
        workspace: BackwardWorkspace | None = None,
        values: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Propagate ``seeds`` (``batch`` rows) to the embeddings, handing the sink each
        gradient it reads on the way.

        From the top layer down, ``sink.mlp_out(l, G)`` gets the gradient on ``mlp_out(l)``
        and ``sink.attn_out(l, G)`` the gradient on layer ``l``'s attention output
        (``resid_mid(l)`` in a sequential block, ``resid_post(l)`` in a parallel one).
        Returns the gradient on the embeddings (residual stream entering block 0),
        ``[B, pos, d_model]``.

        ``pos`` may be less than the prompt's length (default: the dense seeds' length, else
        the whole prompt; ``n_pos`` sets it): attention is causal, so positions after the
        seeds' last one have zero gradient everywhere and are skipped.

        The gradients handed to the sink are views of working buffers, valid only during the
        call (clone to keep). ``workspace``: buffers to reuse across calls (one batch after
        another without new allocations); the returned tensor is then a view into it, valid
        until its next use. ``values``: called as ``values(layer, G_v)`` with the gradient on
        layer ``layer``'s attention values (see :meth:`FrozenBlock.attn_adjoint_into`), for
        analyses that read it (head loadings); nothing is computed for it.
        """
        seeds.check()
        if n_pos is None:
            n_pos = seeds.n_pos(self.n_pos)
        if workspace is None:
            like = seeds.like()
            workspace = BackwardWorkspace(self, batch, n_pos, like.dtype, like.device)
        g, gx, tmp, heads_a, heads_b = workspace.views(batch, n_pos)
        g_view = g.transpose(0, 1)  # [B, pos, d_model] for sinks and the caller
        resid_layer = -1 if seeds.resid is None else seeds.resid[0]
        if seeds.final is not None:
            g_view.copy_(seeds.final)
            norm_adjoint_(self.ln_final, g)
            top = self.n_layers - 1
        else:
            g.zero_()
            top = max([*seeds.x_in, resid_layer - 1])
        live = seeds.final is not None  # False while g is still exactly zero
        for layer in range(top, -1, -1):
            if layer == resid_layer - 1:  # resid_pre(layer + 1) is resid_post(layer)
                assert seeds.resid is not None
                seeds.resid[1].add_to_(g)
                live = True
            if live:
                sink.mlp_out(layer, g_view)
            live = True
            at_layer = None if values is None else functools.partial(values, layer)
            self._block_adjoint(
                layer, seeds.x_in.get(layer), sink, g, gx, tmp, heads_a, heads_b, at_layer
            )
        if resid_layer == 0:  # a seed on the embeddings themselves
            assert seeds.resid is not None
            seeds.resid[1].add_to_(g)
        return g_view

    def _block_adjoint(
        self,
        layer: int,
        seed: Tensor | SparseSeeds | None,
        sink: GradientSink,
        g: Tensor,
        gx: Tensor,
        tmp: Tensor,
        heads_a: Tensor,
        heads_b: Tensor,
        values: Callable[[Tensor], None] | None = None,
    ) -> None:
        """Turn ``g`` (position-major ``[pos, B, d_model]``), the gradient on
        ``resid_post(layer)``, into the gradient on ``resid_pre(layer)`` in place: the skip
        path and any ``seed`` on ``x_in(layer)`` through ``mlp_in``'s adjoint (``gx``), and
        the attention adjoint (``tmp``; module docstring)."""
        block = self.blocks[layer]
        has_gx = block.W_skip is not None or seed is not None
        if block.W_skip is not None:
            torch.mm(g.view(-1, self.d_model), block.W_skip, out=gx.view(-1, self.d_model))
        elif seed is not None:
            gx.zero_()
        if isinstance(seed, SparseSeeds):
            seed.add_to_(gx)
        elif seed is not None:
            gx.add_(seed.transpose(0, 1))
        if has_gx:
            norm_adjoint_(block.mlp_in, gx)
        if block.parallel:  # attention and the MLP both read resid_pre: add both branches
            sink.attn_out(layer, g.transpose(0, 1))
            block.attn_adjoint_into(g, tmp, heads_a, heads_b, values)
            g.add_(tmp)
            if has_gx:
                g.add_(gx)
        else:
            if has_gx:
                g.add_(gx)
            sink.attn_out(layer, g.transpose(0, 1))
            block.attn_adjoint_into(g, tmp, heads_a, heads_b, values)
            g.add_(tmp)

    def forward_residuals(
        self,
        writes: dict[int, Tensor] | None = None,
        embed: Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
        first_pos: int = 0,
    ) -> list[Tensor]:
        """Forward-propagate node contributions through the frozen *direct-effect* model.

        Features are cut (their activations are inputs, not functions of the residual
        stream); what moves a contribution is attention with frozen patterns and norm scales
        and the transcoders' skip path ``W_skip`` (through ``mlp_in``), nothing else.

        ``writes[w]``: ``[B, pos, d_model]`` added to ``mlp_out(w)`` (it enters
        ``resid_post(w)``); ``embed``: ``[B, pos, d_model]`` the residual entering block 0.

        Per block: parallel ``post = pre + attn(pre) + skip(pre)``, otherwise
        ``mid = pre + attn(pre)``, ``post = mid + skip(mid)``; then the writes of that layer.

        ``start``: the first layer whose input can be nonzero (no ``embed`` and no writes
        before layer ``start - 1`` are allowed): earlier blocks are skipped, their
        ``resid_pre`` returned as zeros.

        ``first_pos``: every input is zero before this position; the tensors (inputs and
        outputs) then hold only positions ``first_pos ..`` (``[B, pos - first_pos, d]``), and
        the work shrinks with them (causal attention never moves a contribution back).

        Returns ``n_layers + 1`` tensors ``[B, pos, d_model]``: ``resid_pre(m)`` for each
        layer ``m`` and, last, ``resid_post(n_layers - 1)`` (what the final norm reads);
        with ``stop`` given, only ``resid_pre(0..stop)`` (``stop + 1`` tensors).
        """
        writes = writes or {}
        like = embed if embed is not None else next(iter(writes.values()), None)
        if like is None:
            raise ValueError("forward_residuals needs writes or embed")
        if start > 0 and (embed is not None or any(w < start - 1 for w in writes)):
            raise ValueError(f"forward_residuals(start={start}) got an earlier write")
        x = embed if embed is not None else torch.zeros_like(like)
        out = []
        for layer, block in enumerate(self.blocks):
            out.append(x)
            if stop is not None and layer >= stop:
                return out
            if layer < start:
                if layer in writes:
                    x = x + writes[layer]
                continue
            attn = block.attn_forward(x, first_pos)
            if block.parallel:
                skip = _skip_forward(block, x, first_pos)
                x = x + attn if skip is None else x + attn + skip
            else:
                x = x + attn
                skip = _skip_forward(block, x, first_pos)
                if skip is not None:
                    x = x + skip
            if layer in writes:
                x = x + writes[layer]
        out.append(x)
        return out

    def backward_residuals(self, seeds: Seeds, batch: int) -> ResidualGradients:
        """:meth:`backward` over the whole prompt, recording the gradient on every residual
        point a head loading needs (see :class:`ResidualGradients`)."""
        like = seeds.like()
        zero = torch.zeros(batch, self.n_pos, self.d_model, dtype=like.dtype, device=like.device)
        recorder = _ResidualRecorder(zero, self.n_layers)
        embed = self.backward(seeds, recorder, batch, n_pos=self.n_pos)
        return ResidualGradients(
            post=recorder.post,
            attn_out=recorder.attn,
            embed=embed.contiguous(),
        )


class _ResidualRecorder:
    """A sink keeping the gradient on each MLP output and attention output (default 0)."""

    def __init__(self, zero: Tensor, n_layers: int) -> None:
        self.post = [zero] * n_layers
        self.attn = [zero] * n_layers

    def mlp_out(self, layer: int, grad: Tensor) -> None:
        self.post[layer] = grad.clone(memory_format=torch.contiguous_format)

    def attn_out(self, layer: int, grad: Tensor) -> None:
        self.attn[layer] = grad.clone(memory_format=torch.contiguous_format)


class GradientSink(Protocol):
    """What :meth:`FrozenLinearModel.backward` hands gradients to (``[B, pos, d_model]``
    views, valid during the call)."""

    def mlp_out(self, layer: int, grad: Tensor) -> None:
        """The gradient on ``mlp_out(layer)`` (where sources of that layer write)."""

    def attn_out(self, layer: int, grad: Tensor) -> None:
        """The gradient on layer ``layer``'s attention output."""


# ---- forward propagation and recorded gradients (head loadings, DESIGN.md §3) ---------------


def _skip_forward(block: FrozenBlock, x: Tensor, first_pos: int = 0) -> Tensor | None:
    """The MLP skip path ``W_skip mlp_in(x)`` of ``block`` (None without a skip); ``x``
    holds positions ``first_pos ..``."""
    if block.W_skip is None:
        return None
    return block.mlp_in.forward_linear(x, first_pos) @ block.W_skip.T


@dataclass
class ResidualGradients:
    """Gradients recorded by :meth:`FrozenLinearModel.backward_residuals`.

    ``post[m]``: on ``resid_post(m)`` (equal to the gradient on ``mlp_out(m)``);
    ``attn_out[m]``: on the output of layer ``m``'s attention, i.e. on ``resid_mid(m)``
    (sequential blocks) or ``resid_post(m)`` (parallel blocks, the same tensor as
    ``post[m]``); ``embed``: on the residual stream entering block 0. All ``[B, pos, d]``.
    """

    post: list[Tensor]
    attn_out: list[Tensor]
    embed: Tensor
