"""The tl-circuits commands on the embedded default model, and their bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.cli import main
from tl_circuits.default import DEFAULT_PROMPTS
from tl_circuits.graph import AttributionGraph


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("trace")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["trace", "--example", "fact", "--out", str(out), "--head-edges", "30"]) == 0
    return out, buffer.getvalue()


def test_trace_writes_everything(traced) -> None:
    out, printed = traced
    for name in ("graph", "pruned"):
        assert (out / name / "graph.json").is_file()
    svg = (out / "graph.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and (out / "graph.png").stat().st_size > 1000
    exported = json.loads((out / "graph.json").read_text())
    assert {"metadata", "nodes", "links"} <= set(exported)
    full = AttributionGraph.load(out / "graph")
    pruned = AttributionGraph.load(out / "pruned")
    assert full.info["source"]["model"] == "default"
    loadings = HeadLoadings.load(out / "pruned", graph=pruned)
    assert loadings.n_edges == 30
    # the printed answer is the model's: the fact prompt's top target is its known answer
    answer = DEFAULT_PROMPTS["fact"].answer
    top = max(full.targets, key=lambda t: t.probability)
    assert top.label.strip() == answer
    assert f'Output "{top.label}"' in printed and "replacement score" in printed
    # the printed replacement score is the graph's
    assert f"replacement score {full.scores().replacement:.3f}" in printed


def test_heads_on_a_traced_graph(traced, capsys) -> None:
    out, _ = traced
    assert main(["heads", str(out), "--edges", "5", "--cross-position-only"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" -> ") == 5 and "heads:" in printed


def test_qk_graph_and_components_basis(traced, capsys) -> None:
    out, _ = traced
    assert main(["qk", str(out), "--layer", "1", "--head", "0", "--top", "3"]) == 0
    graph_basis = capsys.readouterr().out
    assert "basis graph" in graph_basis and "top terms at key" in graph_basis
    assert (
        main(
            [
                "qk",
                "--example",
                "fact",
                "--layer",
                "1",
                "--head",
                "0",
                "--basis",
                "components",
                "--competition",
            ]
        )
        == 0
    )
    components = capsys.readouterr().out
    assert "basis components" in components and "competition terms" in components

    # both bases explain the same scores: the printed score lines agree
    def scores(text: str) -> list[str]:
        return sorted(line.split("score")[1] for line in text.splitlines() if "attention " in line)

    assert scores(graph_basis) == scores(components)


def test_info(capsys) -> None:
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    for prompt in DEFAULT_PROMPTS.values():
        assert prompt.text in printed
    assert main(["info", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)


def test_train_transcoders_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "tc"
    argv = [
        "train-transcoders",
        "--out",
        str(out),
        "--d-sae",
        "32",
        "--n-tokens",
        "4096",
        "--batch-tokens",
        "512",
    ]
    assert main(argv) == 0
    assert (out / "report.json").is_file()
    from tl_circuits.transcoders import TranscoderSet

    loaded = TranscoderSet.load(out / "transcoders")
    assert loaded.encoder(0).W_enc.shape[-1] == 32 or loaded.encoder(0).W_enc.shape[0] == 32


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trace", "--example", "nope"], "unknown --example"),
        (["trace", "   "], "empty"),
        (["trace", "x", "--example", "fact"], "not both"),
        (["trace", "--max-features", "0"], "must be positive"),
        (["trace", "--batch-size", "0"], "must be positive"),
        (["trace", "--max-features", "9", "--spill-dir", "/no/such/dir"], "not a directory"),
        (["trace", "--transcoders", "/no/such/dir", "--model", "default"], "not a directory"),
        (
            ["qk", "--example", "fact", "--layer", "0", "--head", "0", "--query-pos", "99"],
            "outside the prompt",
        ),
        (
            [
                "qk",
                "--example",
                "fact",
                "--layer",
                "0",
                "--head",
                "0",
                "--query-pos",
                "1",
                "--key-pos",
                "3",
            ],
            "key",
        ),
        (["qk", "--example", "fact", "--layer", "9", "--head", "0"], "layer"),
        (["qk", "--example", "fact", "--layer", "0", "--head", "99"], "head"),
        (
            ["train-transcoders", "--out", "/tmp/x", "--tokens", "/no/such.safetensors"],
            "no such file",
        ),
        (["train-transcoders", "--out", "/tmp/x", "--d-sae", "0"], "d_sae"),
    ],
)
def test_bad_input_fails_clearly(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after any progress bar
    assert last.startswith(f"tl-circuits {argv[0]}: error:"), err
    assert message in last, err


def test_bad_token_file(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"ids": torch.zeros(2, 3, dtype=torch.long)}, path)
    assert main(["train-transcoders", "--out", str(tmp_path / "o"), "--tokens", str(path)]) == 2
    assert "no 'tokens' tensor" in capsys.readouterr().err


def test_trace_with_a_spill_dir_gives_the_same_graph(tmp_path) -> None:
    from tl_circuits.graph import AttributionGraph

    outs = []
    for spill in (None, tmp_path / "spill"):
        out = tmp_path / ("spilled" if spill else "in_memory")
        argv = ["trace", "--out", str(out), "--max-features", "12", "--no-picture"]
        argv += ["--batch-size", "5", "--head-edges", "0"]
        if spill is not None:
            spill.mkdir()
            argv += ["--spill-dir", str(spill)]
        assert main(argv) == 0
        outs.append(AttributionGraph.load(out / "graph"))
    assert list((tmp_path / "spill").iterdir()) == []  # the scratch folder is gone
    assert torch.equal(outs[0].adjacency, outs[1].adjacency)
    assert torch.equal(outs[0].nodes.feature, outs[1].nodes.feature)
