"""Every tutorial runs top to bottom (its own asserts check the claims it makes)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ALL_TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("[0-9]*.py"))
NOT_EXECUTED = "# tl_circuits-tutorial: not-executed"  # header line of tutorials that download
TUTORIALS = [p for p in ALL_TUTORIALS if NOT_EXECUTED not in p.read_text()]
DOWNLOADING = [p for p in ALL_TUTORIALS if p not in TUTORIALS]


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # tutorials write their files here
    runpy.run_path(str(path), run_name="__main__")


def test_there_are_tutorials() -> None:
    assert TUTORIALS


@pytest.mark.parametrize("path", DOWNLOADING, ids=[p.stem for p in DOWNLOADING])
def test_downloading_tutorial_uses_the_real_api(path: Path) -> None:
    """Tutorials that download are not run, but they must compile and every name they
    import from tl_circuits must exist (their code paths are tested on local files)."""
    import ast
    import importlib

    tree = ast.parse(path.read_text(), filename=str(path))
    compile(tree, str(path), "exec")
    imported = [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tl_circuits")
        for alias in node.names
    ]
    assert imported
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
