"""The CLI's model/transcoder resolution (no network): releases, local folders, errors."""

from __future__ import annotations

import argparse

import pytest
from conftest import cached_model, cached_transcoders

from tl_circuits.cli import main
from tl_circuits.cli.sources import ModelSource, SourceError, load_source, source_from_args
from tl_circuits.errors import PretrainedError
from tl_circuits.transcoders.loading import load_transcoders, release_sae_ids


def _args(**kw) -> argparse.Namespace:
    base = dict(
        model=None,
        transcoders=None,
        sae_id_template=None,
        fold_ln=False,
        device="cpu",
        dtype="float32",
    )
    return argparse.Namespace(**{**base, **kw})


def test_release_names_its_model_and_one_id_per_layer() -> None:
    source = source_from_args(_args(transcoders="gemma-scope-2b-pt-transcoders"))
    assert source.model == "gemma-2-2b"
    ids = release_sae_ids("gemma-scope-2b-pt-transcoders", 26)
    assert len(ids) == 26
    assert all(sae_id.startswith(f"layer_{layer}/") for layer, sae_id in enumerate(ids))


def test_release_template_and_ambiguous_release() -> None:
    ids = release_sae_ids("mwhanna-qwen3-0.6b-transcoders-lowl0", 28, "layer_{layer}")
    assert ids == [f"layer_{layer}" for layer in range(28)]
    with pytest.raises(PretrainedError, match="no SAE ids"):
        release_sae_ids("mwhanna-qwen3-0.6b-transcoders-lowl0", 29, "layer_{layer}")
    # several SAEs per layer: the user must choose
    with pytest.raises(PretrainedError, match="SAE id template"):
        release_sae_ids("gemma-scope-2-270m-pt-transcoders-all", 18)
    with pytest.raises(PretrainedError, match="not an SAE-Lens release"):
        release_sae_ids("no-such-release", 2)


def test_source_round_trip_and_bad_records() -> None:
    source = ModelSource(model="gpt2", transcoders="/x", sae_id_template="l{layer}")
    assert ModelSource.from_json(source.to_json()) == source
    with pytest.raises(SourceError, match="unknown model-source fields"):
        ModelSource.from_json({"model": "gpt2", "colour": "red"})
    with pytest.raises(SourceError, match="placeholder"):
        source_from_args(_args(model="gpt2", transcoders="r", sae_id_template="layer_0"))
    with pytest.raises(SourceError, match="needs --model"):
        source_from_args(_args(transcoders="/some/folder"))


def test_local_transcoder_folders_load(tmp_path) -> None:
    """A saved TranscoderSet and a CLT folder are told apart and loaded."""
    from tl_circuits.transcoders import CrossLayerTranscoder, TranscoderSet

    cached_model("gpt2")
    plt_dir, clt_dir = tmp_path / "plt", tmp_path / "clt"
    cached_transcoders("gpt2", "relu").save(plt_dir)
    cached_transcoders("gpt2", "clt").save(clt_dir)
    assert isinstance(load_transcoders(str(plt_dir), n_layers=3), TranscoderSet)
    assert isinstance(load_transcoders(str(clt_dir), n_layers=3), CrossLayerTranscoder)
    with pytest.raises(PretrainedError, match="not a directory and not an SAE-Lens release"):
        load_transcoders(str(tmp_path / "nope"), n_layers=3)


def test_unknown_model_and_missing_transcoders() -> None:
    with pytest.raises(PretrainedError, match="unknown model"):
        load_source(ModelSource(model="no-such-model-xyz", transcoders="/x"))
    with pytest.raises(SourceError, match="needs --transcoders"):
        load_source(ModelSource(model="gpt2"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["trace", "hello", "--model", "no-such-model-xyz", "--transcoders", "/x"],
            "unknown model",
        ),
        (["heads", "/no/such/graph"], "no such graph"),
        (["qk", "/no/such/graph", "--layer", "0", "--head", "0"], "no such graph"),
    ],
)
def test_cli_errors_exit_2(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tl-circuits {argv[0]}: error:") and message in err


def test_help_for_every_command(capsys) -> None:
    for command in ("trace", "heads", "qk", "train-transcoders", "info"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert command in capsys.readouterr().out
