"""Remote sources of ``load_transcoders``, offline: Hugging Face repo references (the one
download function replaced by a local "hub"), SAE-Lens releases (layer counts inferred,
Gemma Scope 2 hooks), and the refusal of lossy CLT-as-per-layer conversions."""

from __future__ import annotations

import re
import shutil
import socket
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from test_formats import assert_same_transcoders, check_context_r1, model_of
from test_formats_layouts import (
    write_ct_clt,
    write_ct_transcoder_set,
    write_gemma_scope_npz,
    write_yaml,
)

from tl_circuits import (
    PretrainedError,
    ReplacementContext,
    TranscoderConfigError,
    TranscoderSet,
    load_transcoders,
)
from tl_circuits.testing import (
    local_saelens_converter,
    random_clt,
    random_model,
    random_transcoders,
)
from tl_circuits.transcoders import hub
from tl_circuits.transcoders.hub import RepoRef, parse_repo_ref
from tl_circuits.transcoders.loading import release_sae_ids

LOSSY = "mntss-gemma-2-2b-2.5m-clt-as-per-layer"
LOSSY_REPO = "mntss/clt-gemma-2-2b-2.5M"


class LocalHub:
    """Stands in for ``hub.download``: serves ``repos[repo_id]`` folders, copying into a
    fresh snapshot only the files ``allow_patterns`` match (as ``snapshot_download``
    does), and records every call."""

    def __init__(self, root: Path, repos: dict[str, Path]) -> None:
        self.root, self.repos = root, repos
        self.calls: list[tuple[str, str | None, tuple[str, ...]]] = []

    def __call__(self, repo_id: str, *, revision: str | None, allow_patterns) -> Path:
        self.calls.append((repo_id, revision, tuple(allow_patterns)))
        if repo_id not in self.repos:
            raise PretrainedError(f"could not download {repo_id!r}: no such repository")
        src = self.repos[repo_id]
        snap = self.root / "snapshots" / repo_id.replace("/", "--") / (revision or "main")
        for path in src.rglob("*"):
            rel = path.relative_to(src).as_posix()
            if path.is_file() and any(fnmatch(rel, p) for p in allow_patterns):
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, snap / rel)
        snap.mkdir(parents=True, exist_ok=True)
        return snap

    def fetched(self) -> set[str]:
        return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline hub, and any socket connection fails loudly."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---- repo references -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("mntss/clt-gemma-2-2b-426k", RepoRef("mntss/clt-gemma-2-2b-426k")),
        ("owner/name@v1.0", RepoRef("owner/name", None, "v1.0")),
        ("owner/name//sub", RepoRef("owner/name", "sub")),
        ("owner/name//sub/deeper@refs/pr/3", RepoRef("owner/name", "sub/deeper", "refs/pr/3")),
        (
            "owner/name/transcoder_all/width_262k",
            RepoRef("owner/name", "transcoder_all/width_262k"),
        ),
        ("owner/name//sub/@abc123", RepoRef("owner/name", "sub", "abc123")),
    ],
)
def test_parse_repo_refs(text: str, ref: RepoRef) -> None:
    assert parse_repo_ref(text) == ref
    assert parse_repo_ref(str(ref)) == ref


@pytest.mark.parametrize(
    "text",
    [
        "owner",
        "owner/",
        "/name",
        "ow ner/name",
        "owner/na..me",
        "owner/name@",
        "owner/-name",
        "owner/name//../x",
        "owner/name//a//b",
        "owner/na--me",
        "owner/name@bad rev",
    ],
)
def test_bad_repo_ids_are_refused(text: str) -> None:
    with pytest.raises(PretrainedError):
        parse_repo_ref(text)


def test_bad_repo_id_through_load_transcoders(monkeypatch, tmp_path: Path) -> None:
    fake = LocalHub(tmp_path, {})
    monkeypatch.setattr(hub, "download", fake)
    with pytest.raises(PretrainedError, match="not a Hugging Face repo id"):
        load_transcoders("owner//name")
    with pytest.raises(PretrainedError, match="no such repository"):
        load_transcoders("nobody/missing-transcoders")
    assert fake.calls[0][0] == "nobody/missing-transcoders"


# ---- downloads -----------------------------------------------------------------------------


def test_clt_repo_with_subfolder_and_revision(monkeypatch, tmp_path: Path) -> None:
    model = model_of("gpt2")
    clt = random_clt(model, skip=False)
    repo = tmp_path / "repo"
    write_ct_clt(clt, repo / "big")
    (repo / "other").mkdir()
    (repo / "other" / "huge.safetensors").write_bytes(b"not for us")
    (repo / "README.md").write_text("a CLT")
    fake = LocalHub(tmp_path / "cache", {"acme/clts": repo})
    monkeypatch.setattr(hub, "download", fake)
    loaded = load_transcoders("acme/clts//big@v2")
    assert [(c[0], c[1]) for c in fake.calls] == [("acme/clts", "v2")] * 2
    assert fake.calls[0][2] == (
        "big/transcoder_set.json",
        "big/cfg.json",
        "big/config.yaml",
        "big/config.json",
    )
    assert fake.calls[1][2] == ("big/W_enc_*.safetensors", "big/W_dec_*.safetensors")
    assert not any("huge" in f or "README" in f for f in fake.fetched())
    assert_same_transcoders(clt, loaded)
    check_context_r1(model, clt, loaded)
    # circuit-tracer's spelling of the same folder
    again = load_transcoders("acme/clts/big@v2")
    assert_same_transcoders(clt, again)


def test_per_layer_repo_and_listed_hf_uris(monkeypatch, tmp_path: Path) -> None:
    """A per-layer repo at its root, and a config listing ``hf://`` files of another repo
    (circuit-tracer's Gemma Scope repo lists Google's ``params.npz`` files so)."""
    model = model_of("gemma2")
    tcs = random_transcoders(model, "jumprelu", input_hook="ln2.hook_normalized")
    plt_repo = write_ct_transcoder_set(tcs, tmp_path / "plt", "ln2.hook_normalized")
    google = tmp_path / "google"
    files = write_gemma_scope_npz(tcs, google)
    pointer = tmp_path / "pointer"
    uris = [f"hf://google/gs-test/{p.relative_to(google).as_posix()}" for p in files]
    uris[2] += "?revision=r7"
    write_yaml(
        pointer / "config.yaml",
        {
            "model_kind": "transcoder_set",
            "feature_input_hook": "ln2.hook_normalized",
            "feature_output_hook": "hook_mlp_out",
            "transcoders": uris,
        },
    )
    fake = LocalHub(
        tmp_path / "cache",
        {"acme/plt": plt_repo, "acme/pointer": pointer, "google/gs-test": google},
    )
    monkeypatch.setattr(hub, "download", fake)
    assert_same_transcoders(tcs, load_transcoders("acme/plt"))
    assert fake.calls[1] == ("acme/plt", None, ("layer_*.safetensors",))
    fake.calls.clear()
    loaded = load_transcoders("acme/pointer")
    assert_same_transcoders(tcs, loaded)
    google_calls = sorted(
        (c for c in fake.calls if c[0] == "google/gs-test"), key=lambda c: str(c[1])
    )
    assert google_calls == [
        (
            "google/gs-test",
            None,
            tuple(sorted(u.removeprefix("hf://google/gs-test/") for u in uris[:2])),
        ),
        ("google/gs-test", "r7", ("layer_2/width_64/average_l0_7/params.npz",)),
    ]


def test_our_formats_from_a_repo(monkeypatch, tmp_path: Path) -> None:
    model = model_of("qwen3")
    tcs = random_transcoders(model, "jumprelu_skip")
    clt = random_clt(model)
    repo = tmp_path / "repo"
    tcs.save(repo / "plt")
    clt.save(repo / "clt")
    monkeypatch.setattr(hub, "download", LocalHub(tmp_path / "cache", {"me/tc": repo}))
    assert_same_transcoders(tcs, load_transcoders("me/tc//plt"))
    assert_same_transcoders(clt, load_transcoders("me/tc//clt"))


def test_repo_in_no_known_format(monkeypatch, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "layer_0").mkdir(parents=True)
    (repo / "layer_0" / "params.npz").write_bytes(b"")
    monkeypatch.setattr(
        hub,
        "download",
        LocalHub(
            tmp_path / "cache", {"some/repo": repo, "google/gemma-scope-2b-pt-transcoders": repo}
        ),
    )
    with pytest.raises(PretrainedError, match=r"'some/repo' has none of \['transcoder_set\.json'"):
        load_transcoders("some/repo")
    # an SAE-Lens release's repo: the error names the release to load instead
    with pytest.raises(
        PretrainedError, match="load_transcoders\\('gemma-scope-2b-pt-transcoders'\\)"
    ):
        load_transcoders("google/gemma-scope-2b-pt-transcoders")


def test_offline_and_hub_errors(monkeypatch, no_network) -> None:
    """The real download function, offline: a clear error, no connection attempted."""
    with pytest.raises(PretrainedError, match="offline and not in the local Hugging Face cache"):
        hub.download("nobody-tlc/not-cached-anywhere", revision=None, allow_patterns=["x"])
    import huggingface_hub

    for name, message in [
        ("RepositoryNotFoundError", "no such repository"),
        ("RevisionNotFoundError", "no such revision"),
        ("GatedRepoError", "gated"),
    ]:
        error = type(name, (Exception,), {})

        def fail(*args, error=error, **kwargs):
            raise error("nope")

        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(PretrainedError, match=f"'a/b' at revision 'v1' .*{message}"):
            hub.download("a/b", revision="v1", allow_patterns=["*"])


# ---- SAE-Lens releases -----------------------------------------------------------------------


def test_release_layer_count_inferred() -> None:
    assert len(release_sae_ids("gemma-scope-2b-pt-transcoders", None)) == 26
    assert release_sae_ids("mwhanna-qwen3-0.6b-transcoders-lowl0", None) == [
        f"layer_{layer}" for layer in range(28)
    ]
    ids = release_sae_ids(
        "gemma-scope-2-270m-pt-transcoders-all", None, "layer_{layer}_width_16k_l0_small_affine"
    )
    assert len(ids) == 18 and ids[17] == "layer_17_width_16k_l0_small_affine"
    with pytest.raises(PretrainedError, match="SAE id template"):
        release_sae_ids("gemma-scope-2-270m-pt-transcoders-all", None)
    with pytest.raises(PretrainedError, match="do not cover layers"):
        release_sae_ids("gemma-scope-2-270m-pt-transcoders-all", None, "layer_{layer}_nope")


def test_release_without_n_layers(tmp_path: Path, no_network) -> None:
    model = random_model("qwen3", n_layers=28, d_model=16, n_heads=2, d_vocab=40)
    tcs = random_transcoders(model, "relu", d_sae=24)
    root = tcs.save(tmp_path / "hub")
    converter = local_saelens_converter(root)
    release = "mwhanna-qwen3-0.6b-transcoders-lowl0"
    loaded = load_transcoders(release, converter=converter)
    assert loaded.n_layers == 28
    assert_same_transcoders(tcs, loaded)
    with pytest.raises(PretrainedError, match=r"exactly one SAE per layer 0\.\.2"):
        load_transcoders(release, n_layers=3, converter=converter)


def test_gemma_scope_2_release_reads_the_recorded_input_point(no_network) -> None:
    """SAE-Lens names ``hook_mlp_in`` (the ln2 input) for Gemma Scope 2 transcoders whose
    recorded Hugging Face input is ``pre_feedforward_layernorm.output`` (the ln2 output, our
    ``mlp.hook_in``); the set reads the recorded point."""
    from test_formats import GEMMA3

    model = random_model(GEMMA3, n_layers=18, d_model=16, n_heads=2, d_vocab=40)  # type: ignore[arg-type]
    tcs = random_transcoders(model, "jumprelu_skip", d_sae=16)

    def converter(repo_id, folder_name, device, force_download, cfg_overrides):
        layer = int(re.search(r"layer_(\d+)", folder_name).group(1))  # type: ignore[union-attr]
        sae = tcs.saes[layer]
        cfg = {  # the flat config shape SAE-Lens's gemma_3 loader returns
            "architecture": "jumprelu_skip_transcoder",
            "d_in": 16,
            "d_sae": 16,
            "d_out": 16,
            "dtype": "float32",
            "model_name": "google/gemma-3-270m",
            "hook_name": f"blocks.{layer}.hook_mlp_in",
            "hook_name_out": f"blocks.{layer}.hook_mlp_out",
            "hf_hook_name": f"model.layers.{layer}.pre_feedforward_layernorm.output",
            "hf_hook_name_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "reshape_activations": "none",
            **(cfg_overrides or {}),
        }
        return cfg, {k: v.detach().clone() for k, v in sae.state_dict().items()}, None

    loaded = load_transcoders(
        "gemma-scope-2-270m-pt-transcoders-all",
        sae_id_template="layer_{layer}_width_16k_l0_small_affine",
        converter=converter,
    )
    assert [loaded.input_hook(layer) for layer in (0, 17)] == [
        "blocks.0.mlp.hook_in",
        "blocks.17.mlp.hook_in",
    ]
    assert_same_transcoders(tcs, loaded)


# ---- lossy conversions ----------------------------------------------------------------------


def _mntss_style_converter(tcs: TranscoderSet):
    """Returns what SAE-Lens's CLT-as-per-layer loader returns (a flat config with the
    directory's overrides, e.g. the neuronpedia id), with our random weights."""

    def converter(repo_id, folder_name, device, force_download, cfg_overrides):
        layer = int(folder_name)
        cfg = {
            "architecture": "transcoder",
            "d_in": tcs.d_model,
            "d_out": tcs.d_model,
            "d_sae": tcs.d_sae(layer),
            "dtype": "float32",
            "device": device,
            "activation_fn": "relu",
            "normalize_activations": "none",
            "model_name": "gemma-2-2b",
            "hook_name": f"blocks.{layer}.hook_resid_mid",
            "hook_name_out": f"blocks.{layer}.hook_mlp_out",
            "apply_b_dec_to_input": False,
            "model_from_pretrained_kwargs": {"fold_ln": False},
            **(cfg_overrides or {}),
        }
        state = {k: v.detach().clone() for k, v in tcs.saes[layer].state_dict().items()}
        return cfg, state, None

    return converter


def test_lossy_release_is_refused(monkeypatch, no_network, tmp_path: Path) -> None:
    advice = rf"load_transcoders\('{LOSSY_REPO}'\)"
    with pytest.raises(TranscoderConfigError, match=rf"summed.*not for reconstruction.*{advice}"):
        load_transcoders(LOSSY)
    with pytest.raises(TranscoderConfigError, match=advice):
        TranscoderSet.from_pretrained(LOSSY, ["layer_0", "layer_1"])
    from transformer_lens import HookedTransformer

    from tl_circuits import load_pretrained

    monkeypatch.setattr(
        HookedTransformer, "from_pretrained_no_processing", lambda *a, **k: model_of("gemma2")
    )
    with pytest.raises(TranscoderConfigError, match=advice):
        load_pretrained("gemma-2-2b", LOSSY)


def test_lossy_sae_objects_are_refused(no_network, tmp_path: Path) -> None:
    """SAE objects of the lossy release handed in directly: their metadata (the neuronpedia
    id SAE-Lens copies from its directory) shows where they came from."""
    import warnings

    model = model_of("gemma2")
    tcs = random_transcoders(model, "relu", input_hook="hook_resid_mid")
    converter = _mntss_style_converter(tcs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saes = [SAE.from_pretrained(LOSSY, f"layer_{i}", converter=converter) for i in range(3)]
    assert saes[1].cfg.metadata.neuronpedia_id == "gemma-2-2b/1-clt-hp"
    advice = rf"load_transcoders\('{LOSSY_REPO}'\)"
    with pytest.raises(TranscoderConfigError, match=rf"item 0 .*gemma-2-2b/0-clt-hp.*{advice}"):
        TranscoderSet(saes)
    # saved to disk and read back, the metadata still says so
    saes[0].save_model(tmp_path / "layer_0")
    with pytest.raises(TranscoderConfigError, match=advice):
        load_transcoders(tmp_path / "layer_0")
    # the same objects without that provenance are accepted
    for sae in saes:
        sae.cfg.metadata.neuronpedia_id = None
    ReplacementContext(model, TranscoderSet(saes), torch.arange(5))
