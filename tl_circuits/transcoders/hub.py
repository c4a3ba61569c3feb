"""Hugging Face repositories as transcoder sources: repo references and the one download
function.

A reference names a repository, optionally a folder inside it and a revision::

    owner/name
    owner/name@revision
    owner/name//sub/folder
    owner/name//sub/folder@revision
    owner/name/sub/folder[@revision]     (circuit-tracer's spelling, same meaning)

Every download goes through :func:`download` (``huggingface_hub.snapshot_download`` with
``allow_patterns``), so tests replace that one function to serve a local folder, and every
hub failure (offline and not cached, no such repository or revision, gated repository)
becomes a :class:`~tl_circuits.errors.PretrainedError` saying what was asked for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tl_circuits.errors import PretrainedError

#: one path component of a repository id (owner or name), as the hub accepts them
_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_REVISION = re.compile(r"^[A-Za-z0-9._/-]+$")


@dataclass(frozen=True)
class RepoRef:
    """A folder of a Hugging Face repository at a revision (None: the default branch)."""

    repo_id: str
    subfolder: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        text = self.repo_id + (f"//{self.subfolder}" if self.subfolder else "")
        return text + (f"@{self.revision}" if self.revision else "")

    def pattern(self, name: str) -> str:
        """An ``allow_patterns`` entry for ``name`` inside the referenced folder."""
        return f"{self.subfolder}/{name}" if self.subfolder else name


def parse_repo_ref(text: str) -> RepoRef:
    """Parse ``owner/name[//subfolder][@revision]`` (module docstring); a malformed
    reference raises PretrainedError saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise PretrainedError(f"{text!r} is not a Hugging Face repo reference")
    body, revision = text, None
    if "@" in text:
        body, revision = text.rsplit("@", 1)
        if not revision or not _REVISION.match(revision) or ".." in revision:
            raise PretrainedError(
                f"{text!r}: bad revision {revision!r} after '@' (a branch, tag or commit)"
            )
    if "//" in body:
        repo_part, subfolder = body.split("//", 1)
    else:
        parts = body.split("/")
        repo_part, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    owner_name = repo_part.split("/")
    if len(owner_name) != 2 or not all(_REPO_PART.match(p) for p in owner_name):
        raise PretrainedError(
            f"{text!r} is not a Hugging Face repo id: expected 'owner/name', optionally "
            "followed by '//subfolder' and '@revision' (and not an existing local folder)"
        )
    if any(p in ("--", "..") or "--" in p or ".." in p for p in owner_name):
        raise PretrainedError(f"{text!r}: '--' and '..' are not allowed in a repo id")
    subfolder = subfolder.strip("/") or None
    if subfolder is not None:
        pieces = subfolder.split("/")
        if any(p in ("", ".", "..") for p in pieces) or "\\" in subfolder:
            raise PretrainedError(f"{text!r}: bad subfolder {subfolder!r}")
    return RepoRef("/".join(owner_name), subfolder, revision)


def looks_like_repo_ref(text: str) -> bool:
    """True when ``text`` has the shape of a repo reference (``owner/name...``)."""
    return isinstance(text, str) and "/" in text and not text.startswith(("/", ".", "~"))


def download(repo_id: str, *, revision: str | None, allow_patterns: Sequence[str]) -> Path:
    """The local folder of ``repo_id`` at ``revision`` holding (at least) the files matching
    ``allow_patterns``: ``huggingface_hub.snapshot_download`` (downloads or the cache).

    The one place tl_circuits reaches the hub for transcoders; tests monkeypatch it.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns))
        )
    except Exception as exc:  # the hub raises many types; all mean "cannot get it"
        raise PretrainedError(describe_hub_error(repo_id, revision, exc)) from exc


def describe_hub_error(repo_id: str, revision: str | None, exc: Exception) -> str:
    """A message for a failed download of ``repo_id``."""
    name = type(exc).__name__
    at = f" at revision {revision!r}" if revision else ""
    if name == "RepositoryNotFoundError":
        why = "no such repository on the Hugging Face hub (or it is private: log in)"
    elif name == "RevisionNotFoundError":
        why = "no such revision"
    elif name == "GatedRepoError":
        why = "the repository is gated: accept its terms on the hub and log in"
    elif name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "offline" in str(exc):
        why = "offline and not in the local Hugging Face cache"
    else:
        why = f"{name}: {exc}"
    return f"could not download {repo_id!r}{at} from the Hugging Face hub: {why}"


@dataclass(frozen=True)
class HfUri:
    """A file of a repository, circuit-tracer's ``hf://owner/name/path?revision=rev``."""

    repo_id: str
    path: str
    revision: str | None


def parse_hf_uri(uri: str) -> HfUri:
    """Parse ``hf://owner/name/path/to/file[?revision=rev]``."""
    if not uri.startswith("hf://"):
        raise PretrainedError(f"{uri!r} is not an hf:// URI")
    rest, _, query = uri[len("hf://") :].partition("?")
    revision = None
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key == "revision" and value:
            revision = value
    parts = rest.split("/")
    if len(parts) < 3 or not all(_REPO_PART.match(p) for p in parts[:2]) or not parts[-1]:
        raise PretrainedError(f"{uri!r}: expected hf://owner/name/path/to/file")
    path = "/".join(parts[2:])
    if any(p in ("", ".", "..") for p in parts[2:]):
        raise PretrainedError(f"{uri!r}: bad file path {path!r}")
    return HfUri("/".join(parts[:2]), path, revision)


def download_uris(uris: Sequence[str]) -> dict[str, Path]:
    """Local paths of ``hf://`` files, one :func:`download` per (repository, revision)."""
    parsed = {uri: parse_hf_uri(uri) for uri in uris}
    groups: dict[tuple[str, str | None], list[str]] = {}
    for info in parsed.values():
        groups.setdefault((info.repo_id, info.revision), []).append(info.path)
    roots = {
        key: download(key[0], revision=key[1], allow_patterns=sorted(set(paths)))
        for key, paths in groups.items()
    }
    return {uri: roots[(i.repo_id, i.revision)] / i.path for uri, i in parsed.items()}
