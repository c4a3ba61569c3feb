"""The trainable transcoder: one ``nn.Module`` for per-layer and cross-layer transcoders.

It works on *normalised* activations: each trained layer's input is multiplied by
``scale_in[l]`` and its MLP output by ``scale_out[l]`` (set from the first batch so both
have mean squared norm ``d_model``); :mod:`tl_circuits.training.export` folds the scales
back into the weights. With ``L`` trained source layers, ``F = d_sae`` features and
``d = d_model``:

- ``W_enc [L, d, F]``, ``b_enc [L, F]``, ``log_threshold [L, F]`` (JumpReLU:
  ``threshold = exp(log_threshold)`` stays positive);
- ``W_dec[i] [F, n_targets(i), d]``: slot ``j`` of source ``i`` writes to target ``i + j``
  (one slot per source for a per-layer transcoder, ``L - i`` for a cross-layer one);
- ``b_dec [L, d]`` (per target layer), ``W_skip [L, d, d]`` (``[d_out, d_in]``, skip only).

``pre = x @ W_enc + b_enc``; ReLU ``a = relu(pre)``; JumpReLU ``a = pre * (pre > threshold)``
with the straight-through pseudo-derivative of :class:`JumpReLUFunction`. The
reconstruction of target ``t`` is ``sum_{i <= t} a_i @ W_dec[i][:, t - i] + b_dec[t] +
x_t @ W_skip[t]^T``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tl_circuits.training.config import TrainingConfig


class JumpReLUFunction(torch.autograd.Function):
    """``a = pre * (pre > threshold)`` with a pseudo-derivative for the threshold.

    Backward: ``da/dpre = 1[pre > threshold]`` (exact away from the jump) and
    ``da/dthreshold = -threshold / eps * 1[|pre - threshold| < eps / 2]`` (the jump of
    height ``threshold`` smoothed by a rectangle kernel of bandwidth ``eps``).
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        mask = pre > threshold
        ctx.save_for_backward(pre, threshold, mask)
        ctx.bandwidth = bandwidth
        return pre * mask.to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        pre, threshold, mask = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * mask.to(grad.dtype)
        kernel = ((pre - threshold).abs() < eps / 2).to(grad.dtype) / eps
        grad_threshold = -threshold * kernel * grad
        # reduce over the broadcast (batch) dimensions back to threshold's shape
        while grad_threshold.dim() > threshold.dim():
            grad_threshold = grad_threshold.sum(0)
        for dim, size in enumerate(threshold.shape):
            if size == 1 and grad_threshold.shape[dim] != 1:
                grad_threshold = grad_threshold.sum(dim, keepdim=True)
        return grad_pre, grad_threshold, None


class TrainableTranscoder(nn.Module):
    """Weights of a per-layer (``cross_layer=False``) or cross-layer transcoder in training.

    ``n_sources``: number of trained layers ``L`` (their model indices are kept by the
    trainer). Parameters are float32; initialise with :meth:`initialise`.
    """

    def __init__(self, cfg: TrainingConfig, n_sources: int, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.cross_layer = cfg.kind == "cross_layer"
        self.n_sources = n_sources
        self.d_model = d_model
        L, d, F = n_sources, d_model, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(L, d, F))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.zeros(F, self.n_targets(i), d)) for i in range(L)]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.log_threshold = (
            nn.Parameter(torch.zeros(L, F)) if cfg.activation == "jumprelu" else None
        )
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if cfg.skip else None
        self.register_buffer("scale_in", torch.ones(L))
        self.register_buffer("scale_out", torch.ones(L))

    def n_targets(self, source: int) -> int:
        """Number of target layers source ``source`` writes to."""
        return self.n_sources - source if self.cross_layer else 1

    # ---- initialisation ------------------------------------------------------------

    @torch.no_grad()
    def initialise(self, x_raw: Tensor, y_raw: Tensor, generator: torch.Generator) -> None:
        """Set scales and weights from a first batch ``x_raw, y_raw [L, B, d]``.

        Scales make the mean squared norm ``d_model``; decoder directions are random unit
        vectors times ``init_decoder_norm``; the encoder is the transposed (unit)
        decoder of the feature's own layer; ``b_dec`` is the mean normalised output;
        ``b_enc = 0``; JumpReLU thresholds start at ``jumprelu_init_threshold``;
        ``W_skip = 0``.
        """
        d = self.d_model
        self.scale_in.copy_((d / x_raw.pow(2).sum(-1).mean(-1).clamp_min(1e-30)).sqrt())
        self.scale_out.copy_((d / y_raw.pow(2).sum(-1).mean(-1).clamp_min(1e-30)).sqrt())
        y = y_raw * self.scale_out[:, None, None]
        self.b_dec.copy_(y.mean(1))
        for i, W_dec in enumerate(self.W_dec):
            # drawn on the CPU (the generator's device), so the draw is the same on any device
            directions = torch.randn(W_dec.shape, generator=generator).to(W_dec.device)
            directions = directions / directions.norm(dim=-1, keepdim=True)
            W_dec.copy_(directions * self.cfg.init_decoder_norm)
            self.W_enc[i].copy_(directions[:, 0, :].T)
        self.b_enc.zero_()
        if self.log_threshold is not None:
            self.log_threshold.fill_(float(torch.tensor(self.cfg.jumprelu_init_threshold).log()))
        if self.W_skip is not None:
            self.W_skip.zero_()

    # ---- forward -------------------------------------------------------------------

    def normalise(self, x_raw: Tensor, y_raw: Tensor) -> tuple[Tensor, Tensor]:
        """Raw ``[L, B, d]`` activations -> normalised ones."""
        return x_raw * self.scale_in[:, None, None], y_raw * self.scale_out[:, None, None]

    def encode(self, x: Tensor) -> Tensor:
        """Normalised inputs ``[L, B, d]`` -> activations ``[L, B, F]``."""
        pre = torch.baddbmm(self.b_enc[:, None, :], x, self.W_enc)
        if self.log_threshold is None:
            return torch.relu(pre)
        threshold = self.log_threshold.exp()[:, None, :]
        return JumpReLUFunction.apply(pre, threshold, self.cfg.jumprelu_bandwidth)

    def decode(self, acts: Tensor, x: Tensor) -> Tensor:
        """Activations ``[L, B, F]`` and normalised inputs ``[L, B, d]`` -> reconstructions
        ``[L, B, d]`` of every target layer (normalised units)."""
        L, B, _ = acts.shape
        d = self.d_model
        recon = self.b_dec[:, None, :].expand(L, B, d)
        if self.cross_layer:
            parts = [recon]
            for i, W_dec in enumerate(self.W_dec):
                out = (acts[i] @ W_dec.reshape(W_dec.shape[0], -1)).reshape(B, -1, d)
                pad = torch.zeros(i, B, d, dtype=out.dtype, device=out.device)
                parts.append(torch.cat([pad, out.transpose(0, 1)], 0))
            recon = torch.stack(parts).sum(0)
        else:
            W = torch.stack([W_dec[:, 0, :] for W_dec in self.W_dec])
            recon = torch.baddbmm(recon, acts, W)
        if self.W_skip is not None:
            recon = recon + torch.bmm(x, self.W_skip.transpose(1, 2))
        return recon

    def decoder_norms(self) -> Tensor:
        """Norm of each feature's decoder over all its target slots, ``[L, F]``."""
        return torch.stack([W_dec.flatten(1).norm(dim=-1) for W_dec in self.W_dec])

    def losses(
        self, x: Tensor, y: Tensor, sparsity_coefficient: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(total loss, reconstruction loss, acts [L, B, F], squared error [L, B])`` on
        normalised ``x, y [L, B, d]``; the squared error ``|y_hat - y|^2`` per token.

        Reconstruction: per target layer, ``relative_mse`` = mean over tokens of
        ``|err|^2 / (|y|^2 + relative_mse_floor * d)``, or ``mse`` = mean of
        ``|err|^2 / d``; summed over layers. Sparsity: mean over tokens, summed over
        source layers and features, of ``a_f |d_f|`` (ReLU) or
        ``tanh(sparsity_tanh_scale * a_f |d_f|)`` (JumpReLU), times the coefficient.
        """
        acts = self.encode(x)
        err = (self.decode(acts, x) - y).pow(2).sum(-1)  # [L, B]
        d = self.d_model
        if self.cfg.loss == "relative_mse":
            per_token = err / (y.pow(2).sum(-1) + self.cfg.relative_mse_floor * d)
        else:
            per_token = err / d
        reconstruction = per_token.mean(-1).sum()
        weighted = acts * self.decoder_norms()[:, None, :]
        if self.log_threshold is not None:
            weighted = torch.tanh(self.cfg.sparsity_tanh_scale * weighted)
        sparsity = sparsity_coefficient * weighted.sum(-1).mean(-1).sum()
        return reconstruction + sparsity, reconstruction, acts, err
