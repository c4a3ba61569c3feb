"""The synthetic data the default model is trained on (reproducible from a seed).

A sequence has ``n_ctx`` tokens: ``<bos>`` and then, in random order with random filler
runs between them,

- a **block** of ``L`` distinct random filler words and, later, a **copy** of it
  (induction: ``... A B ... A -> B``); ``L`` is drawn from ``block_len``;
- ``n_facts`` **fact statements** ``Entity relation attribute`` from the fixed table
  :func:`fact_table` (distinct entities within a sequence, so each fact is stated once
  and can only be recalled, never copied);
- ``n_distractors`` entity names at random filler positions, so the fact's entity must be
  found by position (the token before the relation): this is what makes a sharp
  previous-token head worth learning early.

Filler words outside the block are drawn from the filler words not in the block, so the
copy is the only repeat of a block word. Position ``p`` of a mask marks the logits at
``p`` that predict token ``p + 1``; ``loss_mask = copy_mask | fact_mask`` marks the
predictable positions (second copy after its first token, and the attribute after a
relation word).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tl_circuits.default.tokenizer import (
    ATTRIBUTES,
    BOS,
    ENTITIES,
    RELATIONS,
    filler_words,
    token_id,
)
from tl_circuits.typing import Bool, Int, Tensor, typechecked

FACT_SEED = 20250601
"""Seed of the fixed entity x relation -> attribute table."""


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the generated sequences.

    n_ctx: tokens per sequence (including ``<bos>``).
    block_len: inclusive range of the copied block's length ``L``.
    n_facts: inclusive range of the number of fact statements per sequence.
    n_distractors: entity names dropped at random filler positions, so that the entity of a
    fact is identified by position (the token right before the relation), not by kind.
    """

    n_ctx: int = 64
    block_len: tuple[int, int] = (8, 24)
    n_facts: tuple[int, int] = (1, 2)
    n_distractors: int = 4


@dataclass(frozen=True)
class SyntheticBatch:
    """Generated sequences with their masks and the block positions.

    tokens: ``[batch, pos]`` token ids (``<bos>`` at position 0).
    copy_mask: ``[batch, pos]`` positions whose next token is a copied block token.
    fact_mask: ``[batch, pos]`` relation positions (next token is the attribute).
    block_start, copy_start, block_len: ``[batch]`` first copy starts at ``block_start``,
    the second at ``copy_start``, both ``block_len`` tokens long.
    """

    tokens: Int[Tensor, "batch pos"]
    copy_mask: Bool[Tensor, "batch pos"]
    fact_mask: Bool[Tensor, "batch pos"]
    block_start: Int[Tensor, " batch"]
    copy_start: Int[Tensor, " batch"]
    block_len: Int[Tensor, " batch"]

    @property
    def loss_mask(self) -> Bool[Tensor, "batch pos"]:
        """Positions with a predictable next token (copy or fact answer)."""
        return self.copy_mask | self.fact_mask


def fact_table() -> dict[str, dict[str, str]]:
    """The fixed facts ``{entity: {relation: attribute}}`` (16 x 4; each attribute is the
    answer for exactly two entities per relation)."""
    rng = np.random.default_rng(FACT_SEED)
    table: dict[str, dict[str, str]] = {e: {} for e in ENTITIES}
    for relation in RELATIONS:
        values = ATTRIBUTES[relation]
        order = rng.permutation(np.tile(np.arange(len(values)), 2))
        for entity, k in zip(ENTITIES, order):
            table[entity][relation] = values[int(k)]
    return table


def _fact_ids() -> np.ndarray:
    """``[n_entities, n_relations]`` attribute token ids of :func:`fact_table`."""
    table = fact_table()
    return np.array([[token_id(table[e][r]) for r in RELATIONS] for e in ENTITIES])


def _split(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    """A uniformly random composition of ``total`` into ``parts`` non-negative integers."""
    cuts = np.sort(rng.integers(0, total + 1, size=parts - 1))
    return np.diff(np.concatenate([[0], cuts, [total]]))


@typechecked
def generate(n: int, seed: int, config: SyntheticConfig | None = None) -> SyntheticBatch:
    """``n`` sequences from the generator seeded with ``seed`` (same seed, same batch)."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(seed)
    fillers = np.array([token_id(w) for w in filler_words()])
    entity_ids = np.array([token_id(e) for e in ENTITIES])
    relation_ids = np.array([token_id(r) for r in RELATIONS])
    facts = _fact_ids()
    bos = token_id(BOS)
    T = cfg.n_ctx
    tokens = np.zeros((n, T), dtype=np.int64)
    copy_mask = np.zeros((n, T), dtype=bool)
    fact_mask = np.zeros((n, T), dtype=bool)
    starts = np.zeros((3, n), dtype=np.int64)
    for b in range(n):
        L = int(rng.integers(cfg.block_len[0], cfg.block_len[1] + 1))
        k = int(rng.integers(cfg.n_facts[0], cfg.n_facts[1] + 1))
        n_free = T - 1 - 2 * L - 3 * k
        if n_free < 0:
            raise ValueError(f"n_ctx={T} is too short for a block of {L} and {k} facts")
        block = rng.choice(fillers, size=L, replace=False)
        ents = rng.choice(len(ENTITIES), size=k, replace=False)
        rels = rng.integers(0, len(RELATIONS), size=k)
        # items: 0 = block, 1 = copy, 2.. = facts; block always before its copy
        order = rng.permutation(k + 2)
        i0, i1 = np.flatnonzero(order == 0)[0], np.flatnonzero(order == 1)[0]
        if i1 < i0:
            order[i0], order[i1] = 1, 0
        gaps = _split(rng, n_free, k + 3)
        others = np.setdiff1d(fillers, block, assume_unique=True)
        seq = [bos]
        filler_pos: list[int] = []
        for item, gap in zip(order, gaps[:-1]):
            filler_pos.extend(range(len(seq), len(seq) + int(gap)))
            seq.extend(rng.choice(others, size=int(gap)))
            p = len(seq)
            if item == 0:
                starts[0, b] = p
                seq.extend(block)
            elif item == 1:
                starts[1, b] = p
                seq.extend(block)
                copy_mask[b, p : p + L - 1] = True
            else:
                e, r = ents[item - 2], rels[item - 2]
                seq.extend([entity_ids[e], relation_ids[r], facts[e, r]])
                fact_mask[b, p + 1] = True
        filler_pos.extend(range(len(seq), len(seq) + int(gaps[-1])))
        seq.extend(rng.choice(others, size=int(gaps[-1])))
        k_d = min(cfg.n_distractors, len(filler_pos))
        for p in rng.choice(filler_pos, size=k_d, replace=False):
            seq[int(p)] = entity_ids[rng.integers(0, len(ENTITIES))]
        tokens[b] = seq
        starts[2, b] = L
    return SyntheticBatch(
        tokens=torch.from_numpy(tokens),
        copy_mask=torch.from_numpy(copy_mask),
        fact_mask=torch.from_numpy(fact_mask),
        block_start=torch.from_numpy(starts[0]),
        copy_start=torch.from_numpy(starts[1]),
        block_len=torch.from_numpy(starts[2]),
    )


@typechecked
def generate_filler(n: int, seed: int, n_ctx: int = 64) -> Int[Tensor, "batch pos"]:
    """``[n, n_ctx]`` sequences of ``<bos>`` then uniformly random filler words."""
    rng = np.random.default_rng(seed)
    fillers = np.array([token_id(w) for w in filler_words()])
    tokens = rng.choice(fillers, size=(n, n_ctx))
    tokens[:, 0] = token_id(BOS)
    return torch.from_numpy(tokens)
