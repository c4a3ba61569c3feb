"""Safe file access shared by every file format of the package.

Writes are atomic: a file appears with its whole content or not at all. Each writer writes
a temporary file in the destination's directory and renames it over the destination
(``os.replace``, atomic on POSIX), so a reader never sees a half-written file and an
interrupted write leaves the old file in place. Tensors are read through safetensors only
(never unpickled).

Writers replace only regular files or missing paths: a directory, a device, a FIFO, a
socket or a symbolic link at the destination is refused with
:class:`~tl_circuits.errors.TLCircuitsError` naming what it is (:func:`check_writable`), so
``to_json("/dev/null")`` run as root cannot replace the device node and a symlink is never
silently turned into a file. New files get the mode ``0o666 & ~umask``, as ``open`` would
give them.

Temporary files are hidden and recognisable: ``.{name}.{host}.{pid}.{random}.tmp`` beside
``{name}`` (``host``: a short hash of the host name; ``pid``: the writing process). A writer
removes its temporary file when anything fails; one killed outright (SIGKILL, power loss)
cannot, so each successful write of ``{name}`` also removes that target's temporaries left
by writers of this host that no longer run. Readers never look at dot files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from tl_circuits.errors import TLCircuitsError

#: at most this many characters of the target's name go into a temporary file's name
_TMP_NAME_CHARS = 120


def _replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``
    (the temporary file is removed if anything fails). ``path`` must be a regular file or
    missing (:func:`check_writable`); the file gets the mode ``0o666 & ~umask``."""
    path = Path(path)
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        check_writable(path)  # again: something may have appeared there meanwhile
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _remove_stale_temporaries(path)


def write_atomically(path: str | Path, write: Callable[[str], None]) -> None:
    """Let ``write(tmp)`` write a temporary file beside ``path`` (by its name, a ``str``),
    then rename it over ``path``: readers see the old file or the whole new one, never a
    part. ``path`` must be a regular file or missing (:func:`check_writable`)."""
    _replace_atomically(Path(path), write)


def check_writable(path: str | Path) -> None:
    """Raise :class:`~tl_circuits.errors.TLCircuitsError` unless ``path`` is a regular file
    or missing (its directory must exist): a writer may only replace those."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            what = "missing" if not os.path.lexists(path.parent) else _kind(path.parent)
            raise TLCircuitsError(
                f"cannot write {path}: its directory {path.parent} is {what}"
            ) from None
        return
    if stat.S_ISREG(st.st_mode):
        return
    what = _kind(path)
    raise TLCircuitsError(
        f"cannot write {path}: it is {what}; only a regular file or a missing path is "
        "replaced (remove it or choose another path)"
    )


def _kind(path: Path) -> str:
    """What ``path`` is, in words (not following a symbolic link)."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)})"
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS): set and restore at once
    os.umask(mask)
    return mask


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_prefix(name: str, pid: int | None = None) -> str:
    """``.{name}.{host}.{pid}.`` (``name`` cut to a length that leaves room)."""
    return f".{name[:_TMP_NAME_CHARS]}.{_host_tag()}.{os.getpid() if pid is None else pid}."


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by writers of this host that no longer run."""
    pattern = re.compile(
        re.escape(f".{path.name[:_TMP_NAME_CHARS]}.{_host_tag()}.") + r"(?P<pid>\d+)\.[^.]+\.tmp"
    )
    for dead in _left_by_dead_processes(path.parent, pattern):
        _remove_if(dead, stat.S_ISREG)


def _left_by_dead_processes(
    directory: Path, pattern: re.Pattern[str], wanted: Callable[[re.Match[str]], bool] | None = None
) -> Iterator[Path]:
    """Entries of ``directory`` whose name matches ``pattern`` (a ``pid`` group: the
    process that made it, on this host) and ``wanted``, and whose process no longer runs."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or (wanted is not None and not wanted(match)):
            continue
        if not _running(int(match.group("pid"))):
            yield directory / name


def _remove_if(path: Path, kind: Callable[[int], bool]) -> None:
    """Remove ``path`` if ``kind(its lstat mode)`` (a file, or a directory tree)."""
    with contextlib.suppress(OSError):
        mode = os.lstat(path).st_mode
        if not kind(mode):
            return
        if stat.S_ISDIR(mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or cannot tell: keep the file
    return True


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the lock file ``path`` (created if missing, never removed)
    for a read-modify-write of the file it guards; other processes calling this with the
    same path wait. Uses ``fcntl.flock`` (POSIX); where it does not exist, no lock is
    taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        what = _kind(path) if os.path.lexists(path) else "not creatable"
        raise TLCircuitsError(f"cannot use the lock file {path}: it is {what} ({e})") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TLCircuitsError(f"cannot use the lock file {path}: it is {_kind(path)}")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _replace_atomically(path, write)


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


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """The hex sha256 of the file ``path``, read in chunks (constant memory)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def remove_dead_temporaries(directory: Path, target: Callable[[str], bool]) -> None:
    """Remove the temporary files in ``directory`` of every target name for which
    ``target(name)`` is true, left by writers of this host that no longer run (a writer
    killed outright). For formats whose file names vary from write to write (content
    addressed), which a write of one name alone would never clean."""
    pattern = re.compile(r"\.(.+)\." + re.escape(_host_tag()) + r"\.(?P<pid>\d+)\.[^.]+\.tmp")
    for dead in _left_by_dead_processes(directory, pattern, lambda m: target(m.group(1))):
        _remove_if(dead, stat.S_ISREG)


#: safetensors' dtype code of each torch dtype name
SAFETENSORS_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (moved to the CPU, made contiguous and unshared) with string
    ``metadata`` to the safetensors file ``path`` atomically. The file is written here,
    tensor by tensor, into this module's own temporary file (no copy of the tensors as one
    byte string, and no temporary file of safetensors' own, which a killed writer would
    leave behind under a name nobody recognises). Tensors go in name order; readers are
    safetensors'."""
    import json
    import struct

    import torch

    owned = _owned(tensors)
    names = sorted(owned)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = owned[name]
        code = SAFETENSORS_CODES.get(str(t.dtype).removeprefix("torch."))
        if code is None:
            raise TLCircuitsError(f"cannot write tensor {name!r} of dtype {t.dtype} to {path}")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": code,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name in names:
                t = owned[name]
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)

    _replace_atomically(path, write)


#: name prefix of a spill directory (``{prefix}.{host}.{pid}.{random}``)
_SPILL_PREFIX = ".tl_circuits-spill"


class SpillFile:
    """An append-only scratch file of float tensors in a private directory, removed with
    everything in it by :meth:`close` (also on an error or ``KeyboardInterrupt`` when used
    as a context manager).

    The directory ``{parent}/.tl_circuits-spill.{host}.{pid}.{random}`` is created with mode
    ``0o700``; directories of this host's spills whose process no longer runs (a build
    killed outright) are removed first. :meth:`append` writes a tensor's bytes at the end
    and returns where; :meth:`read` reads ``shape`` elements back from there into a new CPU
    tensor (plain ``pread``: nothing is memory-mapped, so what is read lives only as long
    as the caller keeps it).
    """

    def __init__(self, parent: str | Path, dtype: torch.dtype) -> None:
        parent = Path(parent)
        if not parent.is_dir():
            what = _kind(parent) if os.path.lexists(parent) else "missing"
            raise TLCircuitsError(f"spill directory {parent} is not a directory (it is {what})")
        _remove_dead_spills(parent)
        prefix = f"{_SPILL_PREFIX}.{_host_tag()}.{os.getpid()}."
        try:
            self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except OSError as e:
            raise TLCircuitsError(f"cannot create a spill directory in {parent}: {e}") from e
        self.dtype = dtype
        self.bytes_written = 0
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self._fd: int | None = os.open(self.directory / "rows.bin", flags, 0o600)

    def __enter__(self) -> SpillFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, values: Tensor) -> int:
        """Write ``values`` (this file's dtype) at the end; returns its byte offset."""
        if self._fd is None:
            raise ValueError("spill file is closed")
        data = values.detach().to("cpu", self.dtype).contiguous()
        view = memoryview(data.reshape(-1).view(torch.uint8).numpy())
        offset = self.bytes_written
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        self.bytes_written += len(view)
        return offset

    def read(self, offset: int, shape: tuple[int, ...]) -> Tensor:
        """``shape`` elements written at byte ``offset``, as a new CPU tensor."""
        if self._fd is None:
            raise ValueError("spill file is closed")
        out = torch.empty(shape, dtype=self.dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise TLCircuitsError(f"spill file {self.directory} ended early (truncated?)")
            done += n
        return out

    def close(self) -> None:
        """Close the file and remove the directory (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        shutil.rmtree(self.directory, ignore_errors=True)


def _remove_dead_spills(parent: Path) -> None:
    """Remove spill directories in ``parent`` left by this host's processes that no longer
    run."""
    pattern = re.compile(re.escape(f"{_SPILL_PREFIX}.{_host_tag()}.") + r"(?P<pid>\d+)\..+")
    for dead in _left_by_dead_processes(parent, pattern):
        _remove_if(dead, stat.S_ISDIR)
