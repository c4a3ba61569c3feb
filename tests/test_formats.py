"""``load_transcoders`` on every supported local format (docs/dictionaries.md).

For each format the test writes random weights in exactly that format's layout
(``test_formats_layouts``), loads them with ``load_transcoders`` and checks that

- the loaded transcoders hold the original tensors, bit for bit, in our orientation (the
  layouts transpose what the foreign tool stores transposed), with the same hooks;
- the replacement context gives the same activations and reconstructions as the original;
- R1: the spliced model reproduces the clean logits (float32, 1e-5);
- G1: feature and target rows of the graph sum to their values (loaded as float64).

Then: a CLT in circuit-tracer's layout gives the same graph as in our format; lazy loading
reads no layer file before it is used; bad input is refused naming the file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import prompt_tokens
from safetensors.torch import load_file, save_file
from test_formats_layouts import (
    write_ct_clt,
    write_ct_layer_file,
    write_ct_transcoder_set,
    write_gemma_scope_npz,
    write_gemma_scope_set,
    write_gs2_clt,
    write_gs2_set,
    write_gs2_transcoder,
    write_yaml,
)

from tl_circuits import (
    AttributionGraph,
    CrossLayerTranscoder,
    HookError,
    PretrainedError,
    ReplacementContext,
    TranscoderConfigError,
    TranscoderSet,
    load_transcoders,
)
from tl_circuits.testing import FAMILIES, random_clt, random_model, random_transcoders
from tl_circuits.transcoders.base import Transcoders

F32, F64 = torch.float32, torch.float64
#: Gemma Scope 2 belongs to Gemma 3; the gemma2 family has the same sandwich norms
GEMMA3 = "gemma3" if "gemma3" in FAMILIES else "gemma2"


@functools.cache
def model_of(family: str, n_layers: int = 3, dtype: torch.dtype = F32):
    return random_model(family, n_layers=n_layers, dtype=dtype)  # type: ignore[arg-type]


# ---- checks ----------------------------------------------------------------------------


def assert_same_transcoders(a: Transcoders, b: Transcoders) -> None:
    """Same layers, hooks and tensors (bit for bit) through the generic interface."""
    assert (a.n_layers, a.d_model, a.dtype) == (b.n_layers, b.d_model, b.dtype)
    for layer in range(a.n_layers):
        assert a.input_hook(layer) == b.input_hook(layer)
        assert a.output_hook(layer) == b.output_hook(layer)
        assert list(a.target_layers(layer)) == list(b.target_layers(layer))
        ea, eb = a.encoder(layer), b.encoder(layer)
        assert torch.equal(ea.W_enc, eb.W_enc), f"layer {layer}: W_enc"
        assert torch.equal(ea.b_enc, eb.b_enc), f"layer {layer}: b_enc"
        assert ea.top_k == eb.top_k
        assert (ea.threshold is None) == (eb.threshold is None)
        if ea.threshold is not None:
            assert torch.equal(ea.threshold, eb.threshold), f"layer {layer}: threshold"
        for t in a.target_layers(layer):
            assert torch.equal(a.decoder(layer, t), b.decoder(layer, t)), f"W_dec {layer}->{t}"
        assert torch.equal(a.b_dec(layer), b.b_dec(layer)), f"layer {layer}: b_dec"
        sa, sb = a.W_skip(layer), b.W_skip(layer)
        assert (sa is None) == (sb is None), f"layer {layer}: W_skip present in one only"
        if sa is not None:
            assert torch.equal(sa, sb), f"layer {layer}: W_skip"  # type: ignore[arg-type]


def check_context_r1(model, original: Transcoders, loaded: Transcoders) -> None:
    """Same activations and reconstructions as the originals; R1 within 1e-5."""
    tokens = prompt_tokens()
    ctx = ReplacementContext(model, loaded, tokens)
    ref = ReplacementContext(model, original, tokens)
    for layer in range(model.cfg.n_layers):
        assert torch.equal(ctx.activations[layer], ref.activations[layer])
        assert torch.equal(ctx.reconstruction[layer], ref.reconstruction[layer])
        assert ctx.reconstruction[layer].abs().sum() > 0
    assert len(ctx.active_features()) > 0
    logits, _ = ctx.run()
    assert (logits - ctx.logits).abs().max().item() <= 1e-5


def check_g1(model, tcs: Transcoders) -> AttributionGraph:
    graph = AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False, batch_size=32)
    rows = torch.cat([graph.indices("feature"), graph.indices("target")])
    assert len(graph.indices("feature")) > 0
    total = graph.adjacency[rows].sum(1) + graph.constants[rows]
    torch.testing.assert_close(total, graph.row_values[rows], rtol=1e-10, atol=1e-10)
    assert graph.adjacency[graph.indices("target")].abs().sum() > 0
    return graph


# ---- every format ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str
    make: Callable[[object], Transcoders]  # the originals, on the float32 model
    write: Callable[[Transcoders, Path], Path]  # writes the layout, returns the folder
    n_layers: int = 3


def _no_manifest(tcs: Transcoders, path: Path) -> Path:
    root = tcs.save(path)  # type: ignore[attr-defined]
    (root / "transcoder_set.json").unlink()
    return root


def _ct_topk(tcs: Transcoders, path: Path) -> Path:
    return write_ct_transcoder_set(
        tcs,  # type: ignore[arg-type]
        path,
        "hook_resid_mid",
        "hook_mlp_out",
        activation_function="topk",
        k=tcs.top_k,  # type: ignore[attr-defined]
    )


def _gs2_clt_via_ct_config(clt: Transcoders, path: Path) -> Path:
    files = write_gs2_clt(clt, path / "clt" / "width_16k", config=False)  # type: ignore[arg-type]
    write_yaml(
        path / "config.yaml",
        {
            "model_kind": "cross_layer_transcoder",
            "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "hook_mlp_out",
            "transcoders": [str(p.relative_to(path)) for p in files],
        },
    )
    return path


CASES = {
    "ours_transcoder_set": Case(
        "gpt2", lambda m: random_transcoders(m, "jumprelu_skip"), lambda t, p: t.save(p)
    ),
    "saelens_directories": Case("pythia", lambda m: random_transcoders(m, "skip"), _no_manifest),
    "saelens_directory": Case(
        "llama",
        lambda m: random_transcoders(m, "jumprelu"),
        lambda t, p: t.save(p) / "layer_0",
        n_layers=1,
    ),
    "ours_clt": Case("qwen3", lambda m: random_clt(m), lambda t, p: t.save(p)),
    "circuit_tracer_set": Case(
        "llama",
        lambda m: random_transcoders(m, "jumprelu_skip"),
        lambda t, p: write_ct_transcoder_set(t, p, "mlp.hook_in", "mlp.hook_out"),
    ),
    "circuit_tracer_set_relu": Case(
        "gpt2",
        lambda m: random_transcoders(m, "relu", input_hook="hook_resid_mid"),
        lambda t, p: write_ct_transcoder_set(t, p, "hook_resid_mid", "hook_mlp_out"),
    ),
    "circuit_tracer_set_topk": Case(
        "qwen3", lambda m: random_transcoders(m, "topk", input_hook="hook_resid_mid"), _ct_topk
    ),
    "circuit_tracer_clt": Case(
        "gpt2", lambda m: random_clt(m, skip=False), lambda t, p: write_ct_clt(t, p)
    ),
    "circuit_tracer_clt_relu": Case(
        "qwen3",
        lambda m: random_clt(m, activation="relu", skip=False),
        lambda t, p: write_ct_clt(t, p, "mlp.hook_in", "mlp.hook_out"),
    ),
    "circuit_tracer_clt_topk": Case(
        "pythia",
        lambda m: random_clt(m, activation="topk", skip=False),
        lambda t, p: write_ct_clt(
            t,  # type: ignore[arg-type]
            p,
            "mlp.hook_in",
            "hook_mlp_out",
            activation_function="topk",
            k=t.top_k,  # type: ignore[attr-defined]
        ),
    ),
    "gemma_scope_npz": Case(
        "gemma2",
        lambda m: random_transcoders(m, "jumprelu", input_hook="ln2.hook_normalized"),
        write_gemma_scope_set,
    ),
    "gemma_scope_2_set": Case(
        GEMMA3, lambda m: random_transcoders(m, "jumprelu_skip"), write_gs2_set
    ),
    "gemma_scope_2_clt": Case(
        GEMMA3,
        lambda m: random_clt(m, skip=True),
        lambda t, p: (write_gs2_clt(t, p), p)[1],
    ),
    "gemma_scope_2_clt_listed": Case(
        "gemma2", lambda m: random_clt(m, skip=True), _gs2_clt_via_ct_config
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_format_loads_exactly(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    model = model_of(case.family, case.n_layers)
    original = case.make(model)
    folder = case.write(original, tmp_path / name)
    loaded = load_transcoders(folder)
    assert type(loaded) is type(original)
    assert loaded.expects_folded_ln in (None, False)
    assert_same_transcoders(original, loaded)
    check_context_r1(model, original, loaded)
    # G1 in float64: the same files read in another dtype
    loaded64 = load_transcoders(str(folder), dtype="float64")
    assert loaded64.dtype == F64
    check_g1(model_of(case.family, case.n_layers, F64), loaded64)


def test_per_layer_formats_are_saelens_objects(tmp_path: Path) -> None:
    """Foreign per-layer formats become SAE-Lens transcoder objects of the right class."""
    from sae_lens.saes.transcoder import JumpReLUSkipTranscoder, JumpReLUTranscoder, Transcoder

    model = model_of("llama")
    tcs = random_transcoders(model, "jumprelu_skip")
    loaded = load_transcoders(write_ct_transcoder_set(tcs, tmp_path / "ct"))
    assert isinstance(loaded, TranscoderSet)
    assert all(type(s) is JumpReLUSkipTranscoder for s in loaded.saes)
    plain = random_transcoders(model, "relu")
    loaded = load_transcoders(write_ct_transcoder_set(plain, tmp_path / "relu"))
    assert all(type(s) is Transcoder for s in loaded.saes)  # type: ignore[union-attr]
    jr = random_transcoders(model_of("gemma2"), "jumprelu", input_hook="ln2.hook_normalized")
    loaded = load_transcoders(write_gemma_scope_set(jr, tmp_path / "gs"))
    assert all(type(s) is JumpReLUTranscoder for s in loaded.saes)  # type: ignore[union-attr]
    # and they save as ordinary SAE-Lens directories, loading back to the same set
    again = load_transcoders(loaded.save(tmp_path / "saved"))  # type: ignore[union-attr]
    assert_same_transcoders(loaded, again)


def test_dtype_and_device_arguments(tmp_path: Path) -> None:
    model = model_of("gpt2")
    folder = write_ct_clt(random_clt(model, skip=False), tmp_path / "ct")
    for dtype, expected in [
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        (torch.float64, F64),
        ("torch.float32", F32),
        (None, F32),  # the files' dtype
    ]:
        loaded = load_transcoders(folder, dtype=dtype, device=torch.device("cpu"))
        assert loaded.dtype == expected and loaded.device == torch.device("cpu")
        assert loaded.encoder(1).W_enc.dtype == expected
    with pytest.raises(PretrainedError, match="unknown dtype 'int8'"):
        load_transcoders(folder, dtype="int8")
    bf16 = load_transcoders(folder, dtype="bfloat16")
    assert bf16.encoder(0).W_enc.dtype == torch.bfloat16
    plt = random_transcoders(model, "jumprelu")
    loaded = load_transcoders(write_ct_transcoder_set(plt, tmp_path / "p"), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.saes[0].cfg.dtype == "bfloat16"  # type: ignore[union-attr]


# ---- circuit-tracer CLT == our CLT ----------------------------------------------------------


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_circuit_tracer_clt_gives_the_same_graph_as_ours(activation: str, tmp_path: Path) -> None:
    model = model_of("llama", 3, F64)
    clt = random_clt(model, activation=activation, skip=False)  # type: ignore[arg-type]
    ours = load_transcoders(clt.save(tmp_path / "ours"))
    theirs = load_transcoders(write_ct_clt(clt, tmp_path / "ct"))
    assert isinstance(ours, CrossLayerTranscoder) and isinstance(theirs, CrossLayerTranscoder)
    assert {**ours.config(), "fold_ln": False} == theirs.config()  # circuit-tracer: unfolded
    a = check_g1(model, ours)
    b = check_g1(model, theirs)
    for name in ("kind", "layer", "pos", "feature"):
        assert torch.equal(getattr(a.nodes, name), getattr(b.nodes, name)), name
    assert torch.equal(a.nodes.activation, b.nodes.activation)
    assert torch.equal(a.adjacency, b.adjacency)
    assert a.adjacency.abs().sum() > 0


# ---- lazy loading --------------------------------------------------------------------------


def test_circuit_tracer_clt_is_lazy(tmp_path: Path) -> None:
    model = model_of("gpt2")
    clt = random_clt(model, skip=False)
    folder = write_ct_clt(clt, tmp_path / "ct")
    loaded = load_transcoders(folder)
    assert isinstance(loaded, CrossLayerTranscoder)
    reader = loaded._reader
    # metadata without reading any layer
    assert (loaded.n_layers, loaded.d_model, loaded.d_sae(1)) == (3, 32, clt.d_sae_per_layer)
    assert loaded.activation == "jumprelu" and loaded.input_hook(2) == "blocks.2.mlp.hook_in"
    assert reader.reads == [] and all(t is None for t in loaded._layers)  # type: ignore[union-attr]
    # a later layer's file removed after loading: only using that layer fails
    (folder / "W_dec_2.safetensors").unlink()
    assert torch.equal(loaded.encoder(0).W_enc, clt.encoder(0).W_enc)
    assert reader.reads == [0]  # type: ignore[union-attr]
    assert torch.equal(loaded.decoder(1, 2), clt.decoder(1, 2))
    assert reader.reads == [0, 1]  # type: ignore[union-attr]
    loaded.encoder(0)  # read once, kept
    assert reader.reads == [0, 1]  # type: ignore[union-attr]
    with pytest.raises(FileNotFoundError, match=r"W_dec_2\.safetensors"):
        loaded.encoder(2)
    # eager loading reads everything at once, so the missing file is found at load
    with pytest.raises(FileNotFoundError, match=r"W_dec_2\.safetensors"):
        load_transcoders(folder, lazy=False)


def test_gemma_scope_2_clt_is_lazy(tmp_path: Path) -> None:
    clt = random_clt(model_of("gemma2"), skip=True)
    write_gs2_clt(clt, tmp_path / "gs2")
    loaded = load_transcoders(tmp_path / "gs2")
    reader = loaded._reader  # type: ignore[union-attr]
    assert reader.reads == [] and loaded.skip  # type: ignore[union-attr]
    (tmp_path / "gs2" / "params_layer_2.safetensors").unlink()
    assert torch.equal(loaded.W_skip(1), clt.W_skip(1))  # type: ignore[arg-type]
    assert reader.reads == [1]
    with pytest.raises(FileNotFoundError, match=r"params_layer_2\.safetensors"):
        loaded.b_dec(2)


# ---- bad input --------------------------------------------------------------------------


def test_folder_in_no_known_format(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(TranscoderConfigError, match=r"junk: not a transcoder folder.*weights\.bin"):
        load_transcoders(tmp_path / "junk")
    # Gemma Scope npz files alone do not say which hooks they read
    tcs = random_transcoders(model_of("gemma2"), "jumprelu", input_hook="ln2.hook_normalized")
    write_gemma_scope_npz(tcs, tmp_path / "npz")
    with pytest.raises(TranscoderConfigError, match=r"params\.npz.*config\.yaml"):
        load_transcoders(tmp_path / "npz")
    # a circuit-tracer config of an unknown kind, and one without hooks
    write_yaml(tmp_path / "kind" / "config.yaml", {"model_kind": "sae"})
    with pytest.raises(TranscoderConfigError, match=r"config\.yaml: model_kind is 'sae'"):
        load_transcoders(tmp_path / "kind")
    write_yaml(tmp_path / "nohook" / "config.yaml", {"model_kind": "transcoder_set"})
    with pytest.raises(TranscoderConfigError, match="feature_input_hook is missing"):
        load_transcoders(tmp_path / "nohook")
    with pytest.raises(PretrainedError, match="is a file"):
        load_transcoders(tmp_path / "junk" / "weights.bin")


def test_hooks_the_model_lacks_or_the_splice_cannot_use(tmp_path: Path) -> None:
    model = model_of("gpt2")
    tcs = random_transcoders(model, "relu")
    # a hook no splice supports: refused at load, naming the config
    with pytest.raises(HookError, match=r"config\.yaml: feature_input_hook 'hook_attn_out'"):
        load_transcoders(write_ct_transcoder_set(tcs, tmp_path / "a", "hook_attn_out"))
    with pytest.raises(HookError, match=r"feature_output_hook 'hook_resid_post'"):
        load_transcoders(
            write_ct_transcoder_set(tcs, tmp_path / "b", "mlp.hook_in", "hook_resid_post")
        )
    # a hook this model does not have: Pythia's parallel blocks never compute resid_mid
    pythia = model_of("pythia")
    mid = random_transcoders(model_of("gpt2"), "relu", input_hook="hook_resid_mid")
    loaded = load_transcoders(write_ct_transcoder_set(mid, tmp_path / "c", "hook_resid_mid"))
    with pytest.raises(HookError, match=r"blocks\.0\.hook_resid_mid"):
        ReplacementContext(pythia, loaded, prompt_tokens())
    # circuit-tracer's mlp.hook_out is the MLP module's output: not hook_mlp_out after ln2_post
    out = load_transcoders(
        write_ct_transcoder_set(tcs, tmp_path / "d", "mlp.hook_in", "mlp.hook_out")
    )
    assert out.output_is_mlp_module_out and out.output_hook(1) == "blocks.1.hook_mlp_out"
    out.check_model(model_of("llama"))  # no post-MLP norm: the same point
    with pytest.raises(HookError, match=r"mlp\.hook_out.*ln2_post"):
        out.check_model(model_of("gemma2"))
    from transformer_lens import HookedTransformer

    from tl_circuits import load_pretrained

    with pytest.MonkeyPatch.context() as mp:  # load_pretrained runs the check
        mp.setattr(
            HookedTransformer, "from_pretrained_no_processing", lambda *a, **k: model_of("gemma2")
        )
        with pytest.raises(HookError, match="ln2_post"):
            load_pretrained("gemma-2-2b", str(tmp_path / "d"))
    # the same for a CLT, and refused at load when the config names a Gemma 2/3 model
    clt = random_clt(model, skip=False)
    loaded_clt = load_transcoders(write_ct_clt(clt, tmp_path / "e", "mlp.hook_in", "mlp.hook_out"))
    with pytest.raises(HookError, match="ln2_post"):
        loaded_clt.check_model(model_of("gemma2"))
    gemma = write_ct_clt(
        clt, tmp_path / "f", "mlp.hook_in", "mlp.hook_out", model_name="google/gemma-2-2b"
    )
    with pytest.raises(HookError, match=r"config\.yaml: .*google/gemma-2-2b normalises"):
        load_transcoders(gemma)


def test_shapes_that_disagree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_of("llama")
    tcs = random_transcoders(model, "jumprelu_skip")
    folder = write_ct_transcoder_set(tcs, tmp_path / "ct")
    # a file whose tensors disagree with each other: the file is named
    bad = load_file(folder / "layer_1.safetensors")
    bad["W_enc"] = bad["W_enc"].T.contiguous()
    save_file(bad, str(folder / "layer_1.safetensors"))
    with pytest.raises(TranscoderConfigError, match=r"layer_1\.safetensors: W_enc has shape"):
        load_transcoders(folder)
    # transcoders for another width than the model's
    narrow = random_transcoders(random_model("llama", d_model=16, n_heads=2), "relu")
    loaded = load_transcoders(write_ct_transcoder_set(narrow, tmp_path / "narrow"))
    with pytest.raises(
        TranscoderConfigError, match="d_in=16 does not match the model's d_model=32"
    ):
        ReplacementContext(model, loaded, prompt_tokens())
    # load_pretrained names the transcoders and the model
    from transformer_lens import HookedTransformer

    from tl_circuits import load_pretrained

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", lambda *a, **k: model)
    with pytest.raises(TranscoderConfigError, match=r"have d_model=16 but .* has d_model=32"):
        load_pretrained("gpt2", str(tmp_path / "narrow"))
    # a CLT whose decoder of one layer has the wrong number of slots (read lazily)
    clt = random_clt(model, skip=False)
    ct = write_ct_clt(clt, tmp_path / "clt")
    save_file({"W_dec_1": torch.zeros(48, 1, 32)}, str(ct / "W_dec_1.safetensors"))
    lazy = load_transcoders(ct)
    with pytest.raises(TranscoderConfigError, match=r"W_enc_1\.safetensors.*W_dec has shape"):
        lazy.decoder(1, 1)


def test_missing_layer_files(tmp_path: Path) -> None:
    model = model_of("gpt2")
    tcs = random_transcoders(model, "relu")
    folder = write_ct_transcoder_set(tcs, tmp_path / "ct")
    with pytest.raises(FileNotFoundError, match=r"layer_3\.safetensors: layer file missing"):
        load_transcoders(folder, n_layers=4)
    (folder / "layer_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"layer_1\.safetensors: layer file missing"):
        load_transcoders(folder)
    clt_folder = write_ct_clt(random_clt(model, skip=False), tmp_path / "clt")
    (clt_folder / "W_dec_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"W_dec_1\.safetensors"):
        load_transcoders(clt_folder)
    # a listed file that does not exist
    gs = write_gemma_scope_set(
        random_transcoders(model_of("gemma2"), "jumprelu", input_hook="ln2.hook_normalized"),
        tmp_path / "gs",
    )
    (gs / "layer_2" / "width_64" / "average_l0_7" / "params.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"layer_2/width_64/average_l0_7/params\.npz"):
        load_transcoders(gs)
    # our own formats: a set of 3 layers asked to cover 4
    with pytest.raises(TranscoderConfigError, match="3 layers, but 4 were asked for"):
        load_transcoders(tcs.save(tmp_path / "ours"), n_layers=4)


def test_refusals_of_inexact_files(tmp_path: Path) -> None:
    model = model_of("gemma2")
    # a Gemma Scope 2 "CLT" whose features also write to earlier layers
    clt = random_clt(model, skip=True)
    write_gs2_clt(clt, tmp_path / "acausal", earlier=0.5)
    loaded = load_transcoders(tmp_path / "acausal")
    loaded.encoder(0)  # layer 0 has no earlier layers
    with pytest.raises(
        TranscoderConfigError, match=r"params_layer_1\.safetensors: .*earlier layers"
    ):
        loaded.encoder(1)
    # circuit-tracer thresholds below zero would pass negative activations there, not here
    tcs = random_transcoders(model_of("llama"), "jumprelu")
    folder = write_ct_transcoder_set(tcs, tmp_path / "neg")
    bad = load_file(folder / "layer_0.safetensors")
    bad["activation_function.threshold"][0] = -0.5
    save_file(bad, str(folder / "layer_0.safetensors"))
    with pytest.raises(TranscoderConfigError, match=r"layer_0\.safetensors: .*negative"):
        load_transcoders(folder)
    # a config whose activation disagrees with the files
    write_ct_transcoder_set(tcs, tmp_path / "says_relu", activation_function="relu")
    with pytest.raises(TranscoderConfigError, match="has thresholds but the config says relu"):
        load_transcoders(tmp_path / "says_relu")
    # Gemma Scope 2 hook points without an exact TransformerLens equivalent
    g = write_gs2_transcoder(tcs, 0, tmp_path / "gs2")
    cfg = (
        (g / "config.json")
        .read_text()
        .replace("pre_feedforward_layernorm.output", "mlp.down_proj.input")
    )
    (g / "config.json").write_text(cfg)
    with pytest.raises(HookError, match=r"config\.json: hf_hook_point_in .*mlp\.down_proj\.input"):
        load_transcoders(g)
    # two Gemma Scope 2 transcoders of one layer
    write_gs2_transcoder(tcs, 1, tmp_path / "dup" / "a")
    write_gs2_transcoder(tcs, 1, tmp_path / "dup" / "b")
    with pytest.raises(TranscoderConfigError, match="both transcoders of layer 1"):
        load_transcoders(tmp_path / "dup")


def test_listed_paths_are_relative_to_the_config(tmp_path: Path, monkeypatch) -> None:
    """A ``transcoders:`` list mixes relative and absolute paths; the working directory
    does not matter."""
    model = model_of("llama")
    tcs = random_transcoders(model, "relu")
    root = tmp_path / "set"
    files = [write_ct_layer_file(tcs, i, root / "w" / f"l{i}.safetensors") for i in range(3)]
    listed = ["w/l0.safetensors", str(files[1]), "./w/l2.safetensors"]
    write_yaml(
        root / "config.yaml",
        {
            "model_kind": "transcoder_set",
            "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "hook_mlp_out",
            "transcoders": listed,
        },
    )
    monkeypatch.chdir(tmp_path)
    assert_same_transcoders(tcs, load_transcoders(root))
