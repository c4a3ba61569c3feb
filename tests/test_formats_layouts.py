"""Writers of the foreign on-disk layouts ``load_transcoders`` reads, used by the format tests.

Each writer takes transcoders built by ``tl_circuits.testing`` and writes their weights in
exactly one tool's layout, in that tool's names and orientation (the rules are in
docs/dictionaries.md, taken from circuit-tracer 0.5.0's and SAE-Lens's loaders):

- circuit-tracer per-layer: ``layer_{i}.safetensors`` with ``W_enc [d_sae, d_model]``
  (feature-major: the transpose of ours), ``W_dec [d_sae, d_model]``, ``b_enc``, ``b_dec``,
  ``activation_function.threshold``, ``W_skip [d_out, d_in]``; ``config.yaml``.
- circuit-tracer CLT: ``W_enc_{i}.safetensors`` (``W_enc_{i} [d_sae, d_model]``, ``b_enc_{i}``,
  ``b_dec_{i}``, ``threshold_{i}``) and ``W_dec_{i}.safetensors`` (``W_dec_{i}
  [d_sae, n_layers - i, d_model]``); ``config.yaml``.
- Gemma Scope: ``layer_{i}/width_*/average_l0_*/params.npz`` (``W_enc [d_model, d_sae]``,
  ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``), listed by a circuit-tracer ``config.yaml``.
- Gemma Scope 2 per-layer: ``<folder>/params.safetensors`` (``w_enc [d_in, d_sae]``,
  ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``, ``affine_skip_connection [d_in, d_out]``)
  and ``<folder>/config.json`` (``hf_hook_point_in`` / ``hf_hook_point_out``).
- Gemma Scope 2 CLT: ``params_layer_{i}.safetensors`` with ``w_dec [d_sae, n_layers, d_out]``
  (zero before layer ``i``), and ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from tl_circuits import CrossLayerTranscoder, TranscoderSet
from tl_circuits.transcoders.base import Transcoders
from tl_circuits.transcoders.formats import detect

GS2_IN = "model.layers.{layer}.pre_feedforward_layernorm.output"
GS2_OUT = "model.layers.{layer}.post_feedforward_layernorm.output"


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().clone()


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def ct_config(kind: str, hook_in: str, hook_out: str, **extra) -> dict:
    return {
        "model_kind": kind,
        "feature_input_hook": hook_in,
        "feature_output_hook": hook_out,
        "scan": "test-scan",
        **extra,
    }


def write_ct_layer_file(tcs: Transcoders, layer: int, path: Path) -> Path:
    """One layer of a per-layer set in circuit-tracer's ``SingleLayerTranscoder`` layout."""
    enc = tcs.encoder(layer)
    tensors = {
        "W_enc": _c(enc.W_enc.T),
        "W_dec": _c(tcs.decoder(layer, layer)),
        "b_enc": _c(enc.b_enc),
        "b_dec": _c(tcs.b_dec(layer)),
    }
    if enc.threshold is not None:
        tensors["activation_function.threshold"] = _c(enc.threshold)
    if tcs.W_skip(layer) is not None:
        tensors["W_skip"] = _c(tcs.W_skip(layer))  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_ct_transcoder_set(
    tcs: TranscoderSet,
    root: Path,
    hook_in: str = "mlp.hook_in",
    hook_out: str = "hook_mlp_out",
    **extra,
) -> Path:
    for layer in range(tcs.n_layers):
        write_ct_layer_file(tcs, layer, root / f"layer_{layer}.safetensors")
    write_yaml(root / "config.yaml", ct_config("transcoder_set", hook_in, hook_out, **extra))
    return root


def write_ct_clt(
    clt: CrossLayerTranscoder,
    root: Path,
    hook_in: str = "mlp.hook_in",
    hook_out: str = "hook_mlp_out",
    **extra,
) -> Path:
    """circuit-tracer's CLT layout (it stores no skip matrices: ``clt`` must have none)."""
    assert not clt.skip
    root.mkdir(parents=True, exist_ok=True)
    for i in range(clt.n_layers):
        t = clt.layer_tensors(i)
        enc = {
            f"W_enc_{i}": _c(t["W_enc"].T),
            f"b_enc_{i}": _c(t["b_enc"]),
            f"b_dec_{i}": _c(t["b_dec"]),
        }
        if "threshold" in t:
            enc[f"threshold_{i}"] = _c(t["threshold"])
        save_file(enc, str(root / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": _c(t["W_dec"])}, str(root / f"W_dec_{i}.safetensors"))
    write_yaml(
        root / "config.yaml", ct_config("cross_layer_transcoder", hook_in, hook_out, **extra)
    )
    return root


def write_gemma_scope_npz(tcs: TranscoderSet, root: Path) -> list[Path]:
    """Gemma Scope's ``params.npz`` per layer (JumpReLU, no skip), in its folder tree."""
    paths = []
    for layer in range(tcs.n_layers):
        enc = tcs.encoder(layer)
        assert enc.threshold is not None and tcs.W_skip(layer) is None
        folder = root / f"layer_{layer}" / f"width_{enc.d_sae}" / "average_l0_7"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / "params.npz",
            W_enc=enc.W_enc.numpy(),
            W_dec=tcs.decoder(layer, layer).numpy(),
            b_enc=enc.b_enc.numpy(),
            b_dec=tcs.b_dec(layer).numpy(),
            threshold=enc.threshold.numpy(),
        )
        paths.append(folder / "params.npz")
    return paths


def write_gemma_scope_set(tcs: TranscoderSet, root: Path) -> Path:
    """Gemma Scope npz files listed (relative paths) by a circuit-tracer config, as
    circuit-tracer's Gemma Scope repo does."""
    paths = write_gemma_scope_npz(tcs, root)
    write_yaml(
        root / "config.yaml",
        ct_config(
            "transcoder_set",
            "ln2.hook_normalized",
            "hook_mlp_out",
            transcoders=[str(p.relative_to(root)) for p in paths],
        ),
    )
    return root


def gs2_config(layer: int | str, affine: bool) -> dict:
    return {
        "architecture": "jump_relu",
        "model_name": "gemma-v3-test",
        "hf_hook_point_in": GS2_IN.replace("{layer}", str(layer)),
        "hf_hook_point_out": GS2_OUT.replace("{layer}", str(layer)),
        "affine_connection": affine,
    }


def write_gs2_transcoder(tcs: Transcoders, layer: int, folder: Path) -> Path:
    """One Gemma Scope 2 transcoder folder (``params.safetensors`` + ``config.json``)."""
    enc = tcs.encoder(layer)
    assert enc.threshold is not None
    tensors = {
        "w_enc": _c(enc.W_enc),
        "w_dec": _c(tcs.decoder(layer, layer)),
        "b_enc": _c(enc.b_enc),
        "b_dec": _c(tcs.b_dec(layer)),
        "threshold": _c(enc.threshold),
    }
    skip = tcs.W_skip(layer)
    if skip is not None:
        tensors["affine_skip_connection"] = _c(skip.T)  # stored [d_in, d_out]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(gs2_config(layer, skip is not None)))
    return folder


def write_gs2_set(tcs: TranscoderSet, root: Path) -> Path:
    """Gemma Scope 2's ``transcoder/layer_{l}_width_*`` folders, one per layer."""
    for layer in range(tcs.n_layers):
        suffix = "_affine" if tcs.W_skip(layer) is not None else ""
        write_gs2_transcoder(tcs, layer, root / f"layer_{layer}_width_16k_l0_small{suffix}")
    return root


def write_gs2_clt(
    clt: CrossLayerTranscoder, root: Path, *, config: bool = True, earlier: float = 0.0
) -> list[Path]:
    """A Gemma Scope 2 CLT: ``params_layer_{i}.safetensors`` with decoders to every layer
    (slots before ``i`` are ``earlier``: zero for a true CLT) and ``config.json``."""
    root.mkdir(parents=True, exist_ok=True)
    L, paths = clt.n_layers, []
    for i in range(L):
        t = clt.layer_tensors(i)
        w_dec = torch.full((clt.d_sae_per_layer, L, clt.d_model), earlier)
        w_dec[:, :i] = earlier
        w_dec[:, i:] = t["W_dec"]
        tensors = {
            "w_enc": _c(t["W_enc"]),
            "w_dec": w_dec,
            "b_enc": _c(t["b_enc"]),
            "b_dec": _c(t["b_dec"]),
            "threshold": _c(t["threshold"]),
        }
        if "W_skip" in t:
            tensors["affine_skip_connection"] = _c(t["W_skip"].T)
        save_file(tensors, str(root / f"params_layer_{i}.safetensors"))
        paths.append(root / f"params_layer_{i}.safetensors")
    if config:
        (root / "config.json").write_text(json.dumps(gs2_config("{layer}", clt.skip)))
    return paths


# ---- the writers write what the format detection expects -------------------------------


def test_each_layout_is_detected(tmp_path: Path) -> None:
    from tl_circuits.testing import random_clt, random_model, random_transcoders

    model = random_model("gpt2", n_layers=2, d_model=16, n_heads=2, d_vocab=20)
    plt = random_transcoders(model, "jumprelu_skip", d_sae=8)
    plain = random_transcoders(model, "jumprelu", d_sae=8)
    clt = random_clt(model, d_sae=8, skip=False)
    clt_skip = random_clt(model, d_sae=8, skip=True)
    cases = {
        "tl_circuits.transcoder_set": plt.save(tmp_path / "ours"),
        "tl_circuits.clt": clt.save(tmp_path / "ours_clt"),
        "saelens": plt.save(tmp_path / "one") / "layer_0",
        "circuit_tracer": write_ct_transcoder_set(plt, tmp_path / "ct"),
        "gemma_scope_2": write_gs2_transcoder(plt, 0, tmp_path / "gs2_one"),
        "gemma_scope_2_dirs": write_gs2_set(plt, tmp_path / "gs2"),
    }
    write_ct_clt(clt, tmp_path / "ct_clt")
    cases["circuit_tracer_clt"] = tmp_path / "ct_clt"
    write_gemma_scope_set(plain, tmp_path / "gs")
    cases["gemma_scope"] = tmp_path / "gs"
    write_gs2_clt(clt_skip, tmp_path / "gs2_clt")
    cases["gemma_scope_2_clt"] = tmp_path / "gs2_clt"
    no_manifest = plt.save(tmp_path / "dirs")
    (no_manifest / "transcoder_set.json").unlink()
    cases["saelens_dirs"] = no_manifest
    for expected, path in cases.items():
        if expected in ("circuit_tracer_clt", "gemma_scope"):
            expected = "circuit_tracer"
        assert detect(path) == expected, path


def test_writers_keep_the_foreign_orientation(tmp_path: Path) -> None:
    """The files really are transposed where the tool's layout is (so the format tests
    prove the loader's transposes, not a copy)."""
    from safetensors.torch import load_file

    from tl_circuits.testing import random_clt, random_model, random_transcoders

    model = random_model("gpt2", n_layers=2, d_model=16, n_heads=2, d_vocab=20)
    tcs = random_transcoders(model, "jumprelu_skip", d_sae=8)
    layer = load_file(write_ct_layer_file(tcs, 1, tmp_path / "l1.safetensors"))
    assert layer["W_enc"].shape == (8, 16)
    assert torch.equal(layer["W_enc"], tcs.encoder(1).W_enc.T)
    gs2 = load_file(write_gs2_transcoder(tcs, 1, tmp_path / "g") / "params.safetensors")
    assert torch.equal(gs2["affine_skip_connection"], tcs.W_skip(1).T)  # type: ignore[union-attr]
    clt = random_clt(model, d_sae=8, skip=False)
    write_ct_clt(clt, tmp_path / "c")
    enc = load_file(tmp_path / "c" / "W_enc_1.safetensors")
    assert enc["W_enc_1"].shape == (8, 16)
    with pytest.raises(AssertionError):
        write_ct_clt(random_clt(model, d_sae=8, skip=True), tmp_path / "d")
