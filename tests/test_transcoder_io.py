"""Round trips of transcoders through files, and agreement with SAE-Lens's own code.

Every check compares numbers: the tensors after a save/load are identical to the originals,
and the replacement context built from the loaded transcoders gives the same activations
and reconstructions, bit for bit.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from tl_circuits import CrossLayerTranscoder, ReplacementContext, TranscoderSet
from tl_circuits.testing import TRANSCODER_KINDS, local_saelens_converter, random_clt
from tl_circuits.transcoders.base import Transcoders

FAMILY = "gpt2"


# ---- helpers ------------------------------------------------------------------------


def layer_tensors(tcs: Transcoders, layer: int) -> dict[str, torch.Tensor | None]:
    """Every tensor of one source layer through the generic interface."""
    enc = tcs.encoder(layer)
    out: dict[str, torch.Tensor | None] = {
        "W_enc": enc.W_enc,
        "b_enc": enc.b_enc,
        "threshold": enc.threshold,
        "b_dec": tcs.b_dec(layer),
        "W_skip": tcs.W_skip(layer),
    }
    for target in tcs.target_layers(layer):
        out[f"W_dec->{target}"] = tcs.decoder(layer, target)
    return out


def assert_same_tensors(a: Transcoders, b: Transcoders) -> None:
    assert a.n_layers == b.n_layers
    assert a.d_model == b.d_model
    assert a.dtype == b.dtype
    for layer in range(a.n_layers):
        assert a.input_hook(layer) == b.input_hook(layer)
        assert a.output_hook(layer) == b.output_hook(layer)
        assert list(a.target_layers(layer)) == list(b.target_layers(layer))
        ta, tb = layer_tensors(a, layer), layer_tensors(b, layer)
        assert ta.keys() == tb.keys()
        for name, x in ta.items():
            y = tb[name]
            if x is None or y is None:
                assert x is None and y is None, f"layer {layer}: {name} present in only one"
                continue
            assert x.dtype == y.dtype, f"layer {layer}: {name} dtype"
            assert torch.equal(x, y), f"layer {layer}: {name} differs"


#: kinds SAE-Lens computes itself (it has no TopK transcoder: a TopK set's activations are ours)
SAELENS_KINDS = [k for k in TRANSCODER_KINDS if k != "topk"]


def assert_same_context(a: Transcoders, b: Transcoders) -> None:
    """The replacement context of both sets on one prompt agrees bit for bit."""
    model = cached_model(FAMILY)
    tokens = prompt_tokens()
    ca = ReplacementContext(model, a, tokens)
    cb = ReplacementContext(model, b, tokens)
    for layer in range(model.cfg.n_layers):
        assert torch.equal(ca.pre_activations[layer], cb.pre_activations[layer])
        assert torch.equal(ca.activations[layer], cb.activations[layer])
        assert torch.equal(ca.reconstruction[layer], cb.reconstruction[layer])
        assert torch.equal(ca.errors[layer], cb.errors[layer])
        # not a vacuous comparison: some features fire, the reconstruction is non-trivial
        assert (ca.activations[layer] > 0).any()
        assert ca.reconstruction[layer].abs().sum() > 0


def random_inputs(d_model: int, n: int = 64, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, d_model, generator=torch.Generator().manual_seed(seed))


# ---- per-layer transcoders (SAE-Lens classes) ----------------------------------------


@pytest.mark.parametrize("kind", TRANSCODER_KINDS)
def test_transcoder_set_save_load_round_trip(kind: str, tmp_path: Path) -> None:
    tcs = cached_transcoders(FAMILY, kind)
    root = tcs.save(tmp_path / "set")
    assert (root / "transcoder_set.json").is_file()
    loaded = TranscoderSet.load(root)
    assert [type(s) for s in loaded.saes] == [type(s) for s in tcs.saes]
    assert loaded.expects_folded_ln == tcs.expects_folded_ln
    assert_same_tensors(tcs, loaded)
    assert_same_context(tcs, loaded)


@pytest.mark.parametrize("kind", SAELENS_KINDS)
def test_saelens_reads_our_files(kind: str, tmp_path: Path) -> None:
    """Each saved layer is a plain SAE-Lens directory: SAE.load_from_disk restores the class."""
    tcs = cached_transcoders(FAMILY, kind)
    root = tcs.save(tmp_path / "set")
    dirs = [root / f"layer_{layer}" for layer in range(tcs.n_layers)]
    for layer, path in enumerate(dirs):
        sae = SAE.load_from_disk(path)
        original = tcs.saes[layer]
        assert type(sae) is type(original)
        assert sae.cfg.metadata.hook_name == original.cfg.metadata.hook_name
        assert sae.cfg.metadata.hook_name_out == original.cfg.metadata.hook_name_out
        for name, param in original.state_dict().items():
            assert torch.equal(sae.state_dict()[name], param), f"layer {layer}: {name}"

    # from_disk on a list of SAE-Lens directories, in any order
    from_dirs = TranscoderSet.from_disk(list(reversed(dirs)))
    assert_same_tensors(tcs, from_dirs)

    # a directory of SAE-Lens directories without our manifest
    (root / "transcoder_set.json").unlink()
    no_manifest = TranscoderSet.load(root)
    assert_same_tensors(tcs, no_manifest)
    assert_same_context(tcs, no_manifest)


@pytest.mark.parametrize("kind", SAELENS_KINDS)
def test_encoder_and_reconstruction_match_saelens(kind: str) -> None:
    """Our Encoder / reconstruct equal SAE-Lens's encode / forward (skip term included)."""
    tcs = cached_transcoders(FAMILY, kind)
    x = random_inputs(tcs.d_model)
    for layer, sae in enumerate(tcs.saes):
        enc = tcs.encoder(layer)
        with torch.no_grad():
            ours_acts = enc.activations(enc.pre_activations(x))
            theirs_acts = sae.encode(x)
            ours_out = tcs.reconstruct(layer, {layer: ours_acts}, x)
            theirs_out = sae.forward(x)
        assert (theirs_acts > 0).any() and not (theirs_acts > 0).all()
        torch.testing.assert_close(ours_acts, theirs_acts, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours_out, theirs_out, rtol=0, atol=1e-6)
        if tcs.W_skip(layer) is not None:
            # forward really includes W_skip: dropping it changes the output
            without_skip = theirs_acts @ sae.W_dec + sae.b_dec
            assert not torch.allclose(theirs_out, without_skip, atol=1e-3)


def test_encoder_matches_saelens_jumprelu_at_threshold() -> None:
    """Pre-activations exactly at the threshold are inactive in both implementations."""
    tcs = cached_transcoders(FAMILY, "jumprelu")
    sae, enc = tcs.saes[0], tcs.encoder(0)
    pre = enc.threshold.clone().repeat(3, 1)
    pre[1] += 1e-3
    pre[2] -= 1e-3
    ours = enc.activations(pre)
    theirs = torch.relu(pre) * (pre > sae.threshold).to(pre.dtype)
    assert torch.equal(ours, theirs)
    assert (ours[0] == 0).all() and (ours[2] == 0).all()
    assert (ours[1] > 0).sum() == (enc.threshold + 1e-3 > 0).sum()


def test_transcoder_set_to_dtype_leaves_original_unchanged(tmp_path: Path) -> None:
    tcs = cached_transcoders(FAMILY, "jumprelu_skip")
    before = {k: v.clone() for k, v in layer_tensors(tcs, 0).items() if v is not None}
    t64 = tcs.to(dtype=torch.float64)
    assert t64.dtype == torch.float64
    assert all(s.cfg.dtype == "float64" for s in t64.saes)
    # the original set (and its SAE-Lens objects) keep their dtype and values
    assert tcs.dtype == torch.float32
    assert all(s.W_enc.dtype == torch.float32 for s in tcs.saes)
    tcs.check_consistent()
    for name, value in layer_tensors(tcs, 0).items():
        if value is not None:
            assert torch.equal(value, before[name])
            assert torch.equal(layer_tensors(t64, 0)[name], value.double())
    # dtype survives a save/load round trip
    loaded = TranscoderSet.load(t64.save(tmp_path / "set64"))
    assert_same_tensors(t64, loaded)


# ---- SAE.from_pretrained on local files ---------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline hub, and any socket connection fails loudly."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(AssertionError, match="network access attempted"):
        socket.create_connection(("huggingface.co", 443))


@pytest.mark.parametrize("kind", ["skip", "jumprelu_skip"])
def test_from_pretrained_with_local_converter(kind: str, tmp_path: Path, no_network) -> None:
    """TranscoderSet.from_pretrained through SAE-Lens's real from_pretrained code path.

    The release is a "repo id" absent from SAE-Lens's directory; the converter (SAE-Lens's
    PretrainedSaeHuggingfaceLoader signature) reads ``<root>/<folder_name>`` from disk.
    """
    tcs = cached_transcoders(FAMILY, kind)
    root = tcs.save(tmp_path / "hub")
    release = "local-test/transcoders-not-on-the-hub"
    assert release not in get_pretrained_saes_directory()
    calls: list[tuple[str, str]] = []
    converter = local_saelens_converter(root, calls)

    sae_ids = [f"layer_{layer}" for layer in reversed(range(tcs.n_layers))]
    loaded = TranscoderSet.from_pretrained(release, sae_ids, converter=converter)
    assert calls == [(release, sae_id) for sae_id in sae_ids]
    assert [type(s) for s in loaded.saes] == [type(s) for s in tcs.saes]
    assert_same_tensors(tcs, loaded)
    assert_same_context(tcs, loaded)

    # dtype= is honoured on that path too
    loaded64 = TranscoderSet.from_pretrained(release, sae_ids, dtype="float64", converter=converter)
    assert loaded64.dtype == torch.float64
    assert torch.equal(loaded64.encoder(1).W_enc, tcs.encoder(1).W_enc.double())


# ---- cross-layer transcoders --------------------------------------------------------

CLT_VARIANTS = [("relu", False), ("relu", True), ("jumprelu", False), ("jumprelu", True)]


def make_clt(activation: str, skip: bool) -> CrossLayerTranscoder:
    return random_clt(cached_model(FAMILY), activation=activation, skip=skip)  # type: ignore[arg-type]


@pytest.mark.parametrize(("activation", "skip"), CLT_VARIANTS)
@pytest.mark.parametrize("lazy", [True, False])
def test_clt_save_load_round_trip(activation: str, skip: bool, lazy: bool, tmp_path: Path) -> None:
    clt = make_clt(activation, skip)
    root = clt.save(tmp_path / "clt")
    assert sorted(p.name for p in root.iterdir()) == [
        "cfg.json",
        *(f"layer_{layer}.safetensors" for layer in range(clt.n_layers)),
    ]
    loaded = CrossLayerTranscoder.load(root, lazy=lazy)
    assert loaded.config() == clt.config()
    if lazy:
        assert all(t is None for t in loaded._layers)
    else:
        assert all(t is not None for t in loaded._layers)
    assert_same_tensors(clt, loaded)
    for layer in range(clt.n_layers):
        assert loaded.layer_tensors(layer).keys() == clt.layer_tensors(layer).keys()
        for name, value in clt.layer_tensors(layer).items():
            assert torch.equal(loaded.layer_tensors(layer)[name], value)
    assert_same_context(clt, loaded)


def test_clt_lazy_load_reads_each_layer_on_first_access(tmp_path: Path) -> None:
    clt = make_clt("jumprelu", True)
    root = clt.save(tmp_path / "clt")
    loaded = CrossLayerTranscoder.load(root, lazy=True)
    # metadata is available without reading any tensor
    assert loaded.dtype == torch.float32 and loaded.d_sae(2) == clt.d_sae_per_layer
    assert loaded.input_hook(1) == "blocks.1.mlp.hook_in"
    assert all(t is None for t in loaded._layers)

    enc = loaded.encoder(1)
    assert loaded._layers[0] is None and loaded._layers[2] is None
    assert loaded._layers[1] is not None
    assert torch.equal(enc.W_enc, clt.encoder(1).W_enc)

    # a layer read once is not read again: removing its file afterwards is harmless
    (root / "layer_1.safetensors").unlink()
    assert torch.equal(loaded.decoder(1, 2), clt.decoder(1, 2))

    # reading a target layer's b_dec loads only that layer
    assert torch.equal(loaded.b_dec(2), clt.b_dec(2))
    assert loaded._layers[0] is None and loaded._layers[2] is not None


def test_clt_lazy_load_with_dtype(tmp_path: Path) -> None:
    clt = make_clt("jumprelu", True)
    loaded = CrossLayerTranscoder.load(clt.save(tmp_path / "clt"), dtype=torch.float64)
    assert loaded.dtype == torch.float64
    assert loaded._layers[0] is None
    for name, value in layer_tensors(loaded, 0).items():
        assert value is not None and value.dtype == torch.float64
        assert torch.equal(value, layer_tensors(clt, 0)[name].double())  # type: ignore[union-attr]
    loaded.check_consistent()


@pytest.mark.parametrize(("activation", "skip"), CLT_VARIANTS)
def test_clt_to_float64(activation: str, skip: bool, tmp_path: Path) -> None:
    clt = make_clt(activation, skip)
    for source in (clt, CrossLayerTranscoder.load(clt.save(tmp_path / "clt"), lazy=True)):
        c64 = source.to(dtype=torch.float64)
        assert c64.dtype == torch.float64
        assert c64.config()["dtype"] == "float64"
        for layer in range(clt.n_layers):
            for name, value in clt.layer_tensors(layer).items():
                got = c64.layer_tensors(layer)[name]
                assert got.dtype == torch.float64
                assert torch.equal(got, value.double())
        assert clt.dtype == torch.float32  # the original is untouched

    # the float64 copy runs on the float64 model and agrees with float32 up to rounding
    c64 = clt.to(dtype=torch.float64)
    tokens = prompt_tokens()
    ctx32 = ReplacementContext(cached_model(FAMILY), clt, tokens)
    ctx64 = ReplacementContext(cached_model(FAMILY, dtype=torch.float64), c64, tokens)
    for layer in range(clt.n_layers):
        torch.testing.assert_close(
            ctx64.pre_activations[layer].float(), ctx32.pre_activations[layer], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            ctx64.reconstruction[layer].float(), ctx32.reconstruction[layer], atol=1e-4, rtol=0
        )

    # and survives a save/load round trip in float64
    loaded = CrossLayerTranscoder.load(c64.save(tmp_path / "clt64"), lazy=False)
    assert loaded.config()["dtype"] == "float64"
    assert_same_tensors(c64, loaded)


def test_clt_reconstruction_sums_all_source_layers() -> None:
    """reconstruct(l) = sum over sources s <= l of a_s @ W_dec[s][:, l - s] + b_dec + skip."""
    clt = make_clt("jumprelu", True)
    x = [random_inputs(clt.d_model, n=8, seed=s) for s in range(clt.n_layers)]
    acts = {
        s: clt.encoder(s).activations(clt.encoder(s).pre_activations(x[s]))
        for s in range(clt.n_layers)
    }
    for target in range(clt.n_layers):
        expected = clt.layer_tensors(target)["b_dec"] + x[target] @ clt.W_skip(target).T
        for s in range(target + 1):
            expected = expected + acts[s] @ clt.layer_tensors(s)["W_dec"][:, target - s]
        torch.testing.assert_close(
            clt.reconstruct(target, acts, x[target]), expected, atol=1e-6, rtol=0
        )


def test_clt_copy_of_directory_loads(tmp_path: Path) -> None:
    """The format is self-contained: a copied directory loads the same."""
    clt = make_clt("relu", False)
    src = clt.save(tmp_path / "a")
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    assert_same_tensors(clt, CrossLayerTranscoder.load(dst, lazy=False))


def test_convert_circuit_tracer_style_clt(tmp_path: Path) -> None:
    """The conversion recipe of docs/clt_format.md, checked against the source semantics.

    A circuit-tracer-style directory (feature-major encoders in ``W_enc_{i}.safetensors``
    with ``b_enc_{i}``, ``b_dec_{i}``, ``threshold_{i}``; decoders in
    ``W_dec_{i}.safetensors``; skip applied as ``x @ W_skip``) is converted and the
    converted CLT reproduces that tool's activations and reconstructions.
    """
    from safetensors.torch import load_file, save_file

    L, d, d_sae = 3, 32, 24
    gen = torch.Generator().manual_seed(11)
    src = tmp_path / "ct"
    src.mkdir()
    skips = [torch.randn(d, d, generator=gen) / d for _ in range(L)]  # [d_in, d_out]
    for i in range(L):
        save_file(
            {
                f"W_enc_{i}": torch.randn(d_sae, d, generator=gen) / d**0.5,
                f"b_enc_{i}": 0.1 * torch.randn(d_sae, generator=gen),
                f"b_dec_{i}": 0.1 * torch.randn(d, generator=gen),
                f"threshold_{i}": 0.2 * torch.rand(d_sae, generator=gen),
            },
            src / f"W_enc_{i}.safetensors",
        )
        save_file(
            {f"W_dec_{i}": torch.randn(d_sae, L - i, d, generator=gen) / d_sae**0.5},
            src / f"W_dec_{i}.safetensors",
        )

    # conversion, as the documentation describes it
    enc = [load_file(src / f"W_enc_{i}.safetensors") for i in range(L)]
    dec = [load_file(src / f"W_dec_{i}.safetensors") for i in range(L)]
    assert all((e[f"threshold_{i}"] >= 0).all() for i, e in enumerate(enc))
    layers = [
        {
            "W_enc": enc[i][f"W_enc_{i}"].T.contiguous(),
            "b_enc": enc[i][f"b_enc_{i}"],
            "threshold": enc[i][f"threshold_{i}"],
            "W_dec": dec[i][f"W_dec_{i}"],
            "b_dec": enc[i][f"b_dec_{i}"],
            "W_skip": skips[i].T.contiguous(),
        }
        for i in range(L)
    ]
    CrossLayerTranscoder(
        layers,
        n_layers=L,
        d_model=d,
        d_sae=d_sae,
        activation="jumprelu",
        skip=True,
        fold_ln=False,
    ).save(tmp_path / "converted")
    clt = CrossLayerTranscoder.load(tmp_path / "converted", lazy=False)

    # the source tool's semantics: z = x @ W_enc^T + b; a = z * (z > threshold);
    # recon(t) = sum_i a_i @ W_dec_i[:, t - i] + b_dec_t + x_t @ W_skip_t
    x = [random_inputs(d, n=16, seed=20 + i) for i in range(L)]
    acts_src = []
    for i in range(L):
        z = x[i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        acts_src.append(z * (z > enc[i][f"threshold_{i}"]))
    acts = {i: clt.encoder(i).activations(clt.encoder(i).pre_activations(x[i])) for i in range(L)}
    for i in range(L):
        assert (acts_src[i] > 0).any()
        torch.testing.assert_close(acts[i], acts_src[i], atol=1e-6, rtol=0)
    for t in range(L):
        expected = enc[t][f"b_dec_{t}"] + x[t] @ skips[t]
        for i in range(t + 1):
            expected = expected + acts_src[i] @ dec[i][f"W_dec_{i}"][:, t - i]
        torch.testing.assert_close(clt.reconstruct(t, acts, x[t]), expected, atol=1e-5, rtol=0)
