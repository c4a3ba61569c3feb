"""Safe file access shared by every file format of the package.

Writes are atomic: a file appears with its whole content or not at all. Each writer writes
a temporary file in the destination's directory and renames it over the destination
(``os.replace``, atomic on POSIX), so a reader never sees a half-written file and an
interrupted write leaves the old file in place. Tensors are read through safetensors only
(never unpickled).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from tl_circuits.errors import TLCircuitsError


def _replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``
    (the temporary file is removed if anything fails)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _replace_atomically(path, write)


def write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (moved to the CPU, made contiguous and unshared) with string
    ``metadata`` to the safetensors file ``path`` atomically."""
    from safetensors.torch import save_file

    _replace_atomically(path, lambda tmp: save_file(_owned(tensors), tmp, metadata=metadata))


def _owned(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that share no storage (safetensors refuses shared ones)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out[name] = t
    return out


def read_safetensors(
    path: Path, error: type[TLCircuitsError] = TLCircuitsError
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the safetensors file ``path``, on the CPU; a file that is
    not readable safetensors raises ``error`` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own (Rust) error types
        raise error(f"{path} is not a readable safetensors file: {e}") from e
    return tensors, metadata
