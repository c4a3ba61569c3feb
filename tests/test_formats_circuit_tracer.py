"""Our readers against circuit-tracer 0.5.0's own loaders, on the same files.

circuit-tracer is not a dependency of tl_circuits. Its transcoder modules import only
torch, numpy, safetensors, huggingface_hub and pyyaml, so installing it without its other
dependencies is enough to run these checks:

    pip install --no-deps circuit-tracer==0.5.0

(its ``utils.hf_utils`` does not import with the huggingface_hub installed here, which no
longer has ``HF_HUB_ENABLE_HF_TRANSFER``, so its hub-facing config loader is not used; the
per-file loaders that loader calls are). For each layout,
circuit-tracer's loader and ``load_transcoders`` read the same files; the encoder
activations and the reconstructions (skip terms included) agree to 1e-5 relative.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_formats import model_of
from test_formats_layouts import (
    write_ct_clt,
    write_ct_transcoder_set,
    write_gemma_scope_set,
    write_gs2_clt,
    write_gs2_set,
)

from tl_circuits import load_transcoders
from tl_circuits.testing import random_clt, random_transcoders
from tl_circuits.transcoders.base import Transcoders

try:
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt, load_gemma_scope_2_clt
    from circuit_tracer.transcoder.single_layer_transcoder import (
        load_gemma_scope_2_transcoder,
        load_relu_transcoder,
        load_transcoder_set,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"circuit_tracer is not importable ({exc}); enable these checks with "
        "`pip install --no-deps circuit-tracer==0.5.0`",
        allow_module_level=True,
    )

CPU = torch.device("cpu")


def assert_rel_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    scale = float(theirs.abs().max())
    assert scale > 0, f"{what}: vacuous comparison"
    err = float((ours - theirs).abs().max())
    assert err <= 1e-5 * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def inputs(d_model: int, layer: int, n: int = 40) -> torch.Tensor:
    return torch.randn(n, d_model, generator=torch.Generator().manual_seed(100 + layer))


def ours_per_layer(tcs: Transcoders, layer: int, x: torch.Tensor):
    enc = tcs.encoder(layer)
    acts = enc.activations(enc.pre_activations(x))
    return acts, tcs.reconstruct(layer, {layer: acts}, x)


def compare_per_layer(ours: Transcoders, theirs, n_layers: int) -> None:
    """``theirs[l]``: circuit-tracer's SingleLayerTranscoder of layer l."""
    for layer in range(n_layers):
        x = inputs(ours.d_model, layer)
        acts, recon = ours_per_layer(ours, layer, x)
        with torch.no_grad():
            ct_acts = theirs[layer].encode(x)
            ct_recon = theirs[layer].decode(ct_acts, x)
        assert (ct_acts > 0).any() and not (ct_acts > 0).all()
        assert_rel_close(acts, ct_acts, f"layer {layer} activations")
        assert_rel_close(recon, ct_recon, f"layer {layer} reconstruction")


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "jumprelu_skip", "skip"])
def test_circuit_tracer_per_layer_files(kind: str, tmp_path: Path) -> None:
    tcs = random_transcoders(model_of("llama"), kind)  # type: ignore[arg-type]
    folder = write_ct_transcoder_set(tcs, tmp_path / "ct")
    ours = load_transcoders(folder)
    theirs = [
        load_relu_transcoder(
            str(folder / f"layer_{i}.safetensors"),
            i,
            device=CPU,
            lazy_encoder=False,
            lazy_decoder=False,
        )
        for i in range(3)
    ]
    assert (theirs[0].W_skip is not None) == ("skip" in kind)
    compare_per_layer(ours, theirs, 3)


def test_gemma_scope_npz_listed_by_a_config(tmp_path: Path) -> None:
    """A Gemma Scope repo's ``config.yaml`` (listing npz files), read the way circuit-tracer's
    config loader does (``load_transcoder_set`` with its Gemma Scope loader)."""
    tcs = random_transcoders(model_of("gemma2"), "jumprelu", input_hook="ln2.hook_normalized")
    folder = write_gemma_scope_set(tcs, tmp_path / "gs")
    import yaml

    config = yaml.safe_load((folder / "config.yaml").read_text())
    theirs = load_transcoder_set(
        {i: str(folder / p) for i, p in enumerate(config["transcoders"])},
        scan=config["scan"],
        feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"],
        device=CPU,
        dtype=torch.float32,
        special_load_fn="gemma-scope",
    )
    assert theirs.feature_input_hook == "ln2.hook_normalized"
    ours = load_transcoders(folder)
    assert ours.input_hook(0) == "blocks.0.ln2.hook_normalized"
    compare_per_layer(ours, list(theirs), 3)


def test_gemma_scope_2_per_layer_files(tmp_path: Path) -> None:
    tcs = random_transcoders(model_of("gemma2"), "jumprelu_skip")
    folder = write_gs2_set(tcs, tmp_path / "gs2")
    ours = load_transcoders(folder)
    theirs = [
        load_gemma_scope_2_transcoder(
            str(folder / f"layer_{i}_width_16k_l0_small_affine" / "params.safetensors"),
            i,
            device=CPU,
        )
        for i in range(3)
    ]
    assert theirs[0].W_skip is not None
    compare_per_layer(ours, theirs, 3)


def compare_clt(ours: Transcoders, theirs) -> None:
    L, d = ours.n_layers, ours.d_model
    x = torch.stack([inputs(d, layer, n=12) for layer in range(L)])  # [L, n_pos, d]
    acts = {}
    for layer in range(L):
        enc = ours.encoder(layer)
        acts[layer] = enc.activations(enc.pre_activations(x[layer]))
        with torch.no_grad():
            ct_acts = theirs.encode_layer(x[layer], layer)
        assert (ct_acts > 0).any()
        assert_rel_close(acts[layer], ct_acts, f"layer {layer} activations")
    with torch.no_grad():
        parts = theirs.compute_attribution_components(x, zero_positions=slice(0, 0))
    for layer in range(L):
        recon = ours.reconstruct(layer, acts, x[layer])
        assert_rel_close(recon, parts["reconstruction"][layer], f"layer {layer} reconstruction")


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_circuit_tracer_clt_files(activation: str, tmp_path: Path) -> None:
    clt = random_clt(model_of("gpt2"), activation=activation, skip=False)  # type: ignore[arg-type]
    folder = write_ct_clt(clt, tmp_path / "ct")
    theirs = load_clt(
        str(folder), device=CPU, dtype=torch.float32, lazy_decoder=False, lazy_encoder=False
    )
    compare_clt(load_transcoders(folder), theirs)
    # circuit-tracer's lazy decoder reads the same files
    lazy = load_clt(str(folder), device=CPU, dtype=torch.float32, lazy_decoder=True)
    compare_clt(load_transcoders(folder), lazy)


def test_gemma_scope_2_clt_files(tmp_path: Path) -> None:
    clt = random_clt(model_of("gemma2"), skip=True)
    paths = write_gs2_clt(clt, tmp_path / "gs2")
    # circuit-tracer 0.5.0 reads layers range(max(paths)), one fewer than the keys it is
    # given: hand it one spare key so that it reads every layer
    spare = {i: str(p) for i, p in enumerate(paths)} | {len(paths): str(paths[-1])}
    theirs = load_gemma_scope_2_clt(spare, device=CPU, dtype=torch.float32)
    assert theirs.n_layers == clt.n_layers and theirs.W_skip is not None
    compare_clt(load_transcoders(tmp_path / "gs2"), theirs)
