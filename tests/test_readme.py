"""The README's Python blocks run as written, in order, offline (on the default model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks() -> list[str]:
    return PYTHON_BLOCK.findall(README.read_text())


def readme_code() -> str:
    """The blocks concatenated in order, each at its own README line (blank lines between),
    so a traceback's line numbers are README.md's."""
    text = README.read_text()
    code = ""
    for block in PYTHON_BLOCK.finditer(text):
        first_line = text.count("\n", 0, block.start(1))
        code += "\n" * (first_line - code.count("\n")) + block.group(1)
    return code


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks()
    assert blocks, "README.md has no ```python block"
    monkeypatch.chdir(tmp_path)  # the blocks write their files here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    exec(compile(readme_code(), "README.md", "exec"), {"__name__": "__readme__"})


def test_readme_python_blocks_use_no_real_model() -> None:
    """Real models download: they belong in ```bash blocks and tutorial 4."""
    for i, block in enumerate(python_blocks()):
        for name in ("from_pretrained", "load_pretrained("):
            assert name not in block, f"README python block {i} uses {name}"
