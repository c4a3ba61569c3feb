"""How the head-loading passes are cut and ordered (:mod:`.compute`).

Each side (target rows, units) is cut into *chunks*, one pass each (:func:`cut`), whose
blocks span the positions and layers their items reach; the *plan* (:func:`plan`) holds
one side in memory batch by batch and streams the other, recomputing it for each held
batch: whichever order costs less work, so a side that fits in memory at once is computed
once and the other once too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Chunks:
    """One side cut into chunks (one pass each): chunk ``c`` holds the items
    ``order[bounds[c] : bounds[c + 1]]`` (target nodes, or units); ``nbytes[c]``: what its
    block holds; ``work[c]``: its pass's cost in (row x layer x position) steps;
    ``first_pos[c]``, ``start[c]``, ``stop[c]``: the positions and layers it spans."""

    order: Tensor
    bounds: list[int]
    nbytes: list[int]
    work: list[int]
    first_pos: list[int]
    start: list[int]
    stop: list[int]

    def __len__(self) -> int:
        return len(self.nbytes)

    def items(self, c: int) -> Tensor:
        return self.order[self.bounds[c] : self.bounds[c + 1]]

    def chunk_of(self, n_items: int) -> tuple[Tensor, Tensor]:
        """``[n_items]``: each item's chunk (-1: in none) and its row in that chunk."""
        chunk = torch.full((n_items,), -1, dtype=torch.long)
        row = torch.full((n_items,), -1, dtype=torch.long)
        for c in range(len(self)):
            items = self.items(c)
            chunk[items] = c
            row[items] = torch.arange(len(items))
        return chunk, row


def cut(
    order: Tensor,
    span: tuple[Tensor, Tensor, Tensor, Tensor],
    row_bytes: int,
    cap: int,
    budget: int,
) -> Chunks:
    """Cut ``order`` into consecutive chunks of at most ``cap`` items whose block stays
    within ``budget`` bytes. ``span``: each item's first and end position and first and
    last layer (``[n]`` each, by item); a chunk spans their extremes and holds
    ``rows x layers x positions x row_bytes``."""
    pos_lo, pos_hi, lay_lo, lay_hi = (t[order].tolist() for t in span)
    bounds, nbytes, work, first, start, stop = [0], [], [], [], [], []
    i, n = 0, len(order)
    while i < n:
        p0, p1, l0, l1, j = pos_lo[i], pos_hi[i], lay_lo[i], lay_hi[i], i + 1
        while j < n and j - i < cap:
            q0, q1 = min(p0, pos_lo[j]), max(p1, pos_hi[j])
            k0, k1 = min(l0, lay_lo[j]), max(l1, lay_hi[j])
            if (j + 1 - i) * (q1 - q0) * max(0, k1 - k0 + 1) * row_bytes > budget:
                break
            p0, p1, l0, l1, j = q0, q1, k0, k1, j + 1
        steps = (j - i) * (p1 - p0) * max(0, l1 - l0 + 1)
        bounds.append(j)
        nbytes.append(steps * row_bytes)
        work.append(steps)
        first.append(p0)
        start.append(l0)
        stop.append(l1)
        i = j
    return Chunks(order, bounds, nbytes, work, first, start, stop)


@dataclass(frozen=True)
class Plan:
    """Which side is held (``held``: "target" or "unit"), in which batches of its chunks;
    the other side is streamed chunk by chunk for each held batch."""

    held: str
    held_batches: list[list[int]]

    @property
    def streamed(self) -> str:
        return "unit" if self.held == "target" else "target"

    def streamed_chunks(self, blocks: Iterable[tuple[int, int]], batch: list[int]) -> list[int]:
        """The streamed side's chunks sharing a block ``(target chunk, unit chunk)`` of
        ``blocks`` with a chunk of ``batch``."""
        mine = set(batch)
        at = 0 if self.held == "target" else 1
        return sorted({key[1 - at] for key in blocks if key[at] in mine})


def plan(targets: Chunks, units: Chunks, memory_bytes: int) -> Plan:
    """Hold the side whose batches (within 3/4 of ``memory_bytes``) make the total work
    least: held work once plus the streamed side's work once per held batch."""
    batches = {
        name: _batches(chunks.nbytes, memory_bytes * 3 // 4)
        for name, chunks in (("target", targets), ("unit", units))
    }
    work = {"target": sum(targets.work), "unit": sum(units.work)}
    cost = {
        "target": work["target"] + len(batches["target"]) * work["unit"],
        "unit": work["unit"] + len(batches["unit"]) * work["target"],
    }
    held = min(cost, key=lambda name: (cost[name], name != "target"))
    return Plan(held, batches[held])


def _batches(nbytes: list[int], budget: int) -> list[list[int]]:
    """Consecutive chunks grouped while their blocks fit in ``budget`` together."""
    out: list[list[int]] = []
    total = budget + 1
    for c, size in enumerate(nbytes):
        if out and total + size <= budget:
            out[-1].append(c)
            total += size
        else:
            out.append([c])
            total = size
    return out
