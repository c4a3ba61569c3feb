"""The prompts of a batch: ids, prompts and targets, from a JSON-lines file or a list.

A prompts file has one JSON value per line (blank lines are skipped):

- an object ``{"id": "...", "prompt": ..., "targets": [...]}``: ``prompt`` a string or a
  list of token ids; ``targets`` optional, items as ``AttributionGraph.build`` takes them
  in JSON: a token (string or id), ``[a, b]`` for the logit difference ``a - b``, or
  ``{"direction": [d_model floats]}`` (a direction in the final normalised residual stream);
- a bare JSON string: a prompt whose id is its line number (counting from 1).

An id names the prompt's folder ``DIR/graphs/{id}/``, so it must be a safe file name: 1 to
100 of ``A-Z a-z 0-9 _ . -``, not starting with a dot (the slug rule of
:func:`tl_circuits.graph.frontend.slug_problem`), and unique even ignoring case (a
case-insensitive file system would merge two folders). A file that breaks these rules is
refused before any work, naming the line. What a prompt *says* (empty, longer than the
model's context, an unknown target) is checked by the build, and such a prompt is recorded
as failed with the build's error; the others run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.frontend import slug_problem

PROMPT_FIELDS = ("id", "prompt", "targets")


class BatchInputError(TLCircuitsError):
    """A prompts file or list cannot be read as a batch (bad JSON, bad or repeated ids)."""


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of a batch: ``id`` (a safe folder name), ``prompt`` (a string or a list of
    token ids, as given), ``targets`` (JSON form, module docstring; None: the top logits)."""

    id: str
    prompt: Any
    targets: list[Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "targets": self.targets}

    def key(self, context: dict[str, Any]) -> str:
        """sha256 of the prompt, its targets and ``context`` (source and options): a record
        made under another key is not this prompt's result."""
        body = {"prompt": self.prompt, "targets": self.targets, "context": context}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()


def read_prompts(path: str | Path) -> list[PromptSpec]:
    """The prompts of the JSON-lines file ``path`` (module docstring)."""
    path = Path(path)
    specs = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BatchInputError(f"{where}: not JSON ({exc.msg})") from None
            specs.append(_spec(value, str(line_no), where))
    check_unique(specs, str(path))
    if not specs:
        raise BatchInputError(f"{path}: no prompts (one JSON object or string per line)")
    return specs


def prompt_specs(prompts: Iterable[Any]) -> list[PromptSpec]:
    """The batch of a Python iterable: each item a :class:`PromptSpec`, a dict as a prompts
    file line holds, or a prompt (a string or a list of token ids) whose id is its
    position counting from 1."""
    specs = []
    for position, item in enumerate(prompts, start=1):
        if isinstance(item, PromptSpec):
            specs.append(_spec(item.to_json(), str(position), f"prompt {position}"))
        elif isinstance(item, dict):
            specs.append(_spec(item, str(position), f"prompt {position}"))
        else:
            specs.append(PromptSpec(id=str(position), prompt=_plain(item)))
    check_unique(specs, "the prompts")
    if not specs:
        raise BatchInputError("no prompts given")
    return specs


def _spec(value: Any, default_id: str, where: str) -> PromptSpec:
    if isinstance(value, str):
        return PromptSpec(id=default_id, prompt=value)
    if not isinstance(value, dict):
        raise BatchInputError(
            f"{where}: a {type(value).__name__}; give an object "
            '{"id": ..., "prompt": ..., "targets": [...]} or a JSON string'
        )
    unknown = sorted(set(value) - set(PROMPT_FIELDS))
    if unknown:
        raise BatchInputError(f"{where}: unknown fields {unknown} (known: {list(PROMPT_FIELDS)})")
    if "prompt" not in value:
        raise BatchInputError(f"{where}: no 'prompt'")
    prompt_id = value.get("id", default_id)
    if isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
        prompt_id = str(prompt_id)
    problem = slug_problem(prompt_id)
    if problem is not None:
        raise BatchInputError(
            f"{where}: id {prompt_id!r} cannot name the prompt's folder: {problem}; use 1 to "
            "100 of the characters A-Z a-z 0-9 _ . -, not starting with a dot"
        )
    targets = value.get("targets")
    if targets is not None and not isinstance(targets, list):
        raise BatchInputError(f"{where}: 'targets' is a {type(targets).__name__}, not a list")
    return PromptSpec(id=prompt_id, prompt=_plain(value["prompt"]), targets=targets)


def _plain(prompt: Any) -> Any:
    """A tensor prompt as a list of ids (the record is JSON); anything else as given."""
    if isinstance(prompt, torch.Tensor):
        return prompt.tolist()
    if isinstance(prompt, tuple):
        return list(prompt)
    return prompt


def check_unique(specs: list[PromptSpec], where: str) -> None:
    """Refuse two prompts whose ids are equal ignoring case."""
    seen: dict[str, str] = {}
    for spec in specs:
        folded = spec.id.casefold()
        if folded in seen:
            raise BatchInputError(
                f"{where}: the id {spec.id!r} is given twice"
                + ("" if seen[folded] == spec.id else f" (as {seen[folded]!r}; case is ignored)")
            )
        seen[folded] = spec.id


def build_targets(targets: list[Any] | None) -> list[Any] | None:
    """The targets of a prompt in JSON form as ``AttributionGraph.build`` takes them: a
    two-item list becomes a logit-difference pair, ``{"direction": [...]}`` a float tensor;
    anything else is passed on (the build names what is wrong with it)."""
    if targets is None:
        return None
    out: list[Any] = []
    for item in targets:
        if isinstance(item, list) and len(item) == 2:
            out.append(tuple(item))
        elif isinstance(item, dict) and set(item) == {"direction"}:
            out.append(torch.tensor(item["direction"], dtype=torch.float32))
        else:
            out.append(item)
    return out
