"""Dictionary folders that are broken or hostile (issue 14): every one is refused with the
library's error naming the file, through ``load_transcoders`` and through ``tl-circuits
trace --transcoders DIR`` (exit status 2, one line, no traceback). A manifest may name only
folders inside its own set."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tl_circuits import TLCircuitsError, load_transcoders
from tl_circuits.cli import main
from tl_circuits.default import data_dir, load_default_model

Edit = Callable[[Path], None]


def _json(path: Path, change: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set(key: str, value: object) -> Callable[[dict], dict]:
    return lambda cfg: {**cfg, key: value}


PER_LAYER: dict[str, tuple[Edit, str]] = {
    "manifest not JSON": (
        lambda d: (d / "transcoder_set.json").write_text("{not json"),
        "transcoder_set.json: not a readable JSON file",
    ),
    "manifest not UTF-8": (
        lambda d: (d / "transcoder_set.json").write_bytes(b'{"layers": ["\xff"]}'),
        "transcoder_set.json: not a readable JSON file",
    ),
    "manifest a list": (
        lambda d: (d / "transcoder_set.json").write_text('["layer_0", "layer_1"]'),
        "expected a JSON object, got list",
    ),
    "manifest without layers": (
        lambda d: _json(
            d / "transcoder_set.json", lambda m: {k: v for k, v in m.items() if k != "layers"}
        ),
        "'layers' must be a non-empty list",
    ),
    "manifest layers not strings": (
        lambda d: _json(d / "transcoder_set.json", _set("layers", [0, 1])),
        "'layers' must be a non-empty list",
    ),
    "manifest of another format": (
        lambda d: _json(d / "transcoder_set.json", _set("format", "something.else")),
        "is not 'tl_circuits.transcoder_set' version 1",
    ),
    "manifest of another version": (
        lambda d: _json(d / "transcoder_set.json", _set("version", 7)),
        "is not 'tl_circuits.transcoder_set' version 1",
    ),
    "manifest entry escaping the set": (
        lambda d: _json(d / "transcoder_set.json", _set("layers", ["layer_0", "../../x"])),
        "'../../x' is not inside",
    ),
    "manifest entry absolute": (
        lambda d: _json(d / "transcoder_set.json", _set("layers", ["layer_0", "/etc"])),
        "'/etc' is not inside",
    ),
    "manifest entry the set itself": (
        lambda d: _json(d / "transcoder_set.json", _set("layers", ["layer_0", "."])),
        "'.' is not inside",
    ),
    "manifest top_k not an integer": (
        lambda d: _json(d / "transcoder_set.json", _set("top_k", "8")),
        "'top_k' must be an integer or null",
    ),
    "layer cfg.json not JSON": (
        lambda d: (d / "layer_1" / "cfg.json").write_text("{"),
        "layer_1/cfg.json: not a readable JSON file",
    ),
    "layer of an unknown architecture": (
        lambda d: _json(d / "layer_1" / "cfg.json", _set("architecture", "no-such-kind")),
        "layer_1: SAE-Lens cannot load this transcoder directory",
    ),
    "layer weights truncated": (
        lambda d: _truncate(d / "layer_1" / "sae_weights.safetensors"),
        "layer_1: SAE-Lens cannot load this transcoder directory",
    ),
    "layer shapes disagree with its config": (
        lambda d: _json(d / "layer_1" / "cfg.json", _set("d_sae", 7)),
        "layer_1: SAE-Lens cannot load this transcoder directory",
    ),
    "layer folder missing": (
        lambda d: shutil.rmtree(d / "layer_1"),
        "layer_1: not an SAE-Lens directory",
    ),
}

CROSS_LAYER: dict[str, tuple[Edit, str]] = {
    "cfg.json not JSON": (
        lambda d: (d / "cfg.json").write_text("[1,"),
        "cfg.json: not a readable JSON",
    ),
    "cfg.json a number": (
        lambda d: (d / "cfg.json").write_text("3"),
        "expected a JSON object, got int",
    ),
    "hook template with {0}": (
        lambda d: _json(d / "cfg.json", _set("input_hook", "blocks.{0}.mlp.hook_in")),
        "input_hook: hook template 'blocks.{0}.mlp.hook_in' must contain '{layer}'",
    ),
    "hook template with another field": (
        lambda d: _json(d / "cfg.json", _set("output_hook", "blocks.{layer}.{x}")),
        "must contain '{layer}' and no other field",
    ),
    "hook template not a string": (
        lambda d: _json(d / "cfg.json", _set("output_hook", 5)),
        "hook template must be a string",
    ),
    "n_layers a string": (
        lambda d: _json(d / "cfg.json", _set("n_layers", "2")),
        "n_layers must be a positive integer",
    ),
    "n_layers huge": (
        lambda d: _json(d / "cfg.json", _set("n_layers", 10**12)),
        "n_layers must be a positive integer",
    ),
    "d_sae negative": (
        lambda d: _json(d / "cfg.json", _set("d_sae", -3)),
        "d_sae must be a positive integer",
    ),
    "skip not a bool": (
        lambda d: _json(d / "cfg.json", _set("skip", "yes")),
        "skip must be a bool",
    ),
    "unknown dtype": (
        lambda d: _json(d / "cfg.json", _set("dtype", "float7")),
        "unknown dtype 'float7'",
    ),
    "layer file missing": (
        lambda d: (d / "layer_1.safetensors").unlink(),
        "layer_1.safetensors: CLT layer file missing",
    ),
    "layer file truncated": (
        lambda d: _truncate(d / "layer_1.safetensors"),
        "layer_1.safetensors is not a readable safetensors file",
    ),
    "d_sae disagreeing with the files": (
        lambda d: _json(d / "cfg.json", lambda c: {**c, "d_sae": c["d_sae"] + 1}),
        "has shape",
    ),
}


def _broken(tmp_path: Path, kind: str, edit: Edit) -> Path:
    folder = tmp_path / kind
    shutil.copytree(data_dir() / kind, folder)
    edit(folder)
    return folder


CASES = [("per_layer", n, *c) for n, c in PER_LAYER.items()] + [
    ("cross_layer", n, *c) for n, c in CROSS_LAYER.items()
]


@pytest.mark.parametrize(("kind", "name", "edit", "message"), CASES, ids=[c[1] for c in CASES])
def test_broken_folders_are_refused_clearly(tmp_path, kind, name, edit, message) -> None:
    folder = _broken(tmp_path, kind, edit)
    with pytest.raises((TLCircuitsError, FileNotFoundError)) as info:
        tcs = load_transcoders(str(folder), lazy=False)
        for layer in range(tcs.n_layers):  # a lazy reader's errors come on first use
            tcs.encoder(layer)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("kind", "name", "edit", "message"),
    [
        c
        for c in CASES
        if c[1]
        in {
            "manifest a list",
            "manifest entry escaping the set",
            "layer weights truncated",
            "hook template with {0}",
            "layer file truncated",
            "cfg.json not JSON",
        }
    ],
    ids=lambda c: c if isinstance(c, str) else "",
)
def test_the_cli_says_so_in_one_line(tmp_path, capsys, monkeypatch, kind, name, edit, message):
    """A folder needs --model; the named model is the default one here (no download)."""
    monkeypatch.setattr(
        "tl_circuits.transcoders.loading.load_model", lambda *a, **k: load_default_model()
    )
    folder = _broken(tmp_path, kind, edit)
    out = tmp_path / "out"
    argv = ["trace", "--model", "gpt2", "--transcoders", str(folder), "--out", str(out)]
    status = main([*argv, "--no-picture", "a prompt"])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "graph").exists()  # nothing written for a refused input


@pytest.mark.parametrize("recorded", ["/etc", "../../somewhere", "{tmp}"])
def test_a_graph_file_does_not_choose_which_folders_are_read(tmp_path, capsys, recorded):
    """``heads`` / ``qk`` on a graph whose recorded source is a local folder refuse to read
    it unless the user names it (--transcoders); the default model's record is used and
    said aloud."""
    from tl_circuits import AttributionGraph

    out = tmp_path / "out"
    assert main(["trace", "--out", str(out), "--no-picture", "--head-edges", "0"]) == 0
    capsys.readouterr()
    graph = AttributionGraph.load(out / "pruned")
    assert main(["heads", str(out), "--edges", "2"]) == 0
    assert "using the model and transcoders the graph records: embedded default" in (
        capsys.readouterr().out
    )
    folder = str(tmp_path) if recorded == "{tmp}" else recorded
    graph.info["source"] = {**graph.info["source"], "model": "gpt2", "transcoders": folder}
    graph.save(out / "pruned")
    for command in (["heads", str(out)], ["qk", str(out), "--layer", "1", "--head", "1"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "a graph file does not choose which files are read" in err and folder in err
