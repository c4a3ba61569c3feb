"""The synthetic data the default model is trained on (reproducible from a seed).

A sequence has ``n_ctx`` tokens: ``<bos>`` and then, in random order with random filler
runs between them,

- ``n_blocks`` independent **blocks** of ``L`` distinct random filler words (``L`` drawn
  from ``block_len``), each followed later by a **copy** of it (induction:
  ``... A B ... A -> B``);
- ``n_facts`` **fact statements** ``Entity relation attribute`` from the fixed table
  :func:`fact_table` (distinct entities within a sequence, so each fact is stated once
  and can only be recalled, never copied);
- ``n_distractors`` entity names at random filler positions, so the fact's entity must be
  found by position (the token before the relation);
- a **skip-bigram rule** on the filler (``skip_bigram``): a filler word is often the fixed
  successor :func:`skip_successor` of the word *two* back. Predicting it needs "the
  previous token" at every position, like the local statistics of natural text; this is
  what grows a clean previous-token head early, which the induction circuit then reuses
  (without it the model copied through heads attending 3-5 tokens back,
  docs/default_model.md).

Filler words outside the blocks are drawn from the filler words in no block, so a copy is
the only repeat of a block word. Position ``p`` of a mask marks the logits at
``p`` that predict token ``p + 1``; ``loss_mask = copy_mask | fact_mask | rule_mask``
marks the predictable positions (a copy's tokens but its last, the attribute after a
relation word, and the positions whose next word the rule chose).
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
    block_len: inclusive range of each repeated block's length ``L`` (short blocks: a token
    ``k >= 2`` back is random filler, so only a previous-token mechanism predicts the copy).
    n_blocks: inclusive range of the number of independent repeated blocks per sequence
    (fewer when the sequence cannot hold them).
    n_facts: inclusive range of the number of fact statements per sequence.
    n_distractors: entity names dropped at random filler positions, so that the entity of a
    fact is identified by position (the token right before the relation), not by kind.
    min_filler: filler tokens kept free at least (blocks are dropped to make room).
    near_fraction: probability that a block's copy follows it after only ``near_gap``
    filler tokens (uniform, inclusive): then a key position ``k >= 2`` tokens after the
    block's first token does not exist yet when the copy starts, so a shifted "token k
    back" circuit fails there and only a previous-token (1-back) circuit works everywhere.
    skip_bigram: probability that a filler word ``x[p]`` (with a filler word two back) is
    replaced by ``skip_successor(x[p - 2])``, a fixed permutation of the filler words; the
    position before it then joins the loss (``rule_mask``). Predicting it needs the token
    one back, everywhere in a sequence — the dense local statistic that makes natural text
    grow previous-token heads (0 turns the rule off).
    """

    n_ctx: int = 64
    block_len: tuple[int, int] = (8, 24)
    n_blocks: tuple[int, int] = (1, 1)
    n_facts: tuple[int, int] = (1, 2)
    n_distractors: int = 4
    min_filler: int = 12
    near_fraction: float = 0.0
    near_gap: tuple[int, int] = (0, 2)
    skip_bigram: float = 0.5


SHORT_BLOCKS = SyntheticConfig(
    block_len=(2, 6), n_blocks=(3, 5), near_fraction=0.5, skip_bigram=0.0
)
"""A data shape tried for a clean (1-back) induction circuit before the skip-bigram rule:
3-5 repeated blocks of 2-6 words, half of the copies right after their block
(docs/default_model.md: it did not form one; the shipped model is trained on the defaults
above, whose skip-bigram rule did)."""


@dataclass(frozen=True)
class SyntheticBatch:
    """Generated sequences with their masks and the repeated blocks.

    tokens: ``[batch, pos]`` token ids (``<bos>`` at position 0).
    copy_mask: ``[batch, pos]`` positions whose next token is a copied block token.
    fact_mask: ``[batch, pos]`` relation positions (next token is the attribute).
    blocks: ``[n_blocks, 4]`` one row per repeated block of the whole batch: ``(sequence,
    block_start, copy_start, block_len)``; the first occurrence starts at ``block_start``,
    the copy at ``copy_start``, both ``block_len`` tokens long.
    rule_mask: ``[batch, pos]`` positions whose next word the skip-bigram rule chose (None
    when ``skip_bigram`` is 0).
    """

    tokens: Int[Tensor, "batch pos"]
    copy_mask: Bool[Tensor, "batch pos"]
    fact_mask: Bool[Tensor, "batch pos"]
    blocks: Int[Tensor, "n_blocks 4"]
    rule_mask: Bool[Tensor, "batch pos"] | None = None

    @property
    def loss_mask(self) -> Bool[Tensor, "batch pos"]:
        """Positions with a predictable next token (copy, fact answer, skip-bigram rule)."""
        mask = self.copy_mask | self.fact_mask
        return mask if self.rule_mask is None else mask | self.rule_mask


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


SKIP_BIGRAM_SEED = 20251121
"""Seed of the fixed filler permutation of the skip-bigram rule."""


def skip_successor() -> dict[int, int]:
    """The skip-bigram rule ``{filler id: filler id}`` (a fixed random permutation)."""
    ids = np.array([token_id(w) for w in filler_words()])
    perm = np.random.default_rng(SKIP_BIGRAM_SEED).permutation(ids)
    return {int(a): int(b) for a, b in zip(ids, perm)}


def _split(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    """A uniformly random composition of ``total`` into ``parts`` non-negative integers."""
    cuts = np.sort(rng.integers(0, total + 1, size=parts - 1))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def _block_lengths(rng: np.random.Generator, cfg: SyntheticConfig, room: int) -> list[int]:
    """Lengths of the repeated blocks of one sequence; the last blocks are dropped until
    both copies of every block fit in ``room`` tokens (at least one block is kept)."""
    n_blocks = int(rng.integers(cfg.n_blocks[0], cfg.n_blocks[1] + 1))
    lengths = [int(x) for x in rng.integers(cfg.block_len[0], cfg.block_len[1] + 1, n_blocks)]
    while len(lengths) > 1 and 2 * sum(lengths) > room:
        lengths.pop()
    return lengths


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
    rule_mask = np.zeros((n, T), dtype=bool)
    successor = skip_successor() if cfg.skip_bigram > 0 else {}
    blocks: list[tuple[int, int, int, int]] = []
    for b in range(n):
        k = int(rng.integers(cfg.n_facts[0], cfg.n_facts[1] + 1))
        lengths = _block_lengths(rng, cfg, T - 1 - 3 * k - cfg.min_filler)
        n_free = T - 1 - 2 * sum(lengths) - 3 * k
        words = rng.choice(fillers, size=sum(lengths), replace=False)
        cuts = np.cumsum([0, *lengths])
        block_words = [words[cuts[i] : cuts[i + 1]] for i in range(len(lengths))]
        ents = rng.choice(len(ENTITIES), size=k, replace=False)
        rels = rng.integers(0, len(RELATIONS), size=k)
        near = rng.random(len(lengths)) < cfg.near_fraction
        inner = [
            int(rng.integers(cfg.near_gap[0], cfg.near_gap[1] + 1)) if near[i] else 0
            for i in range(len(lengths))
        ]
        n_free -= sum(inner)
        if n_free < 0:
            raise ValueError(f"n_ctx={T} is too short for blocks {lengths} and {k} facts")
        # items: ("block", i) twice per far block (the first one met is the original), once
        # per near block (block, a short filler gap, copy), and ("fact", j)
        items = [("block", i) for i in range(len(lengths)) for _ in range(1 if near[i] else 2)]
        items += [("fact", j) for j in range(k)]
        order = rng.permutation(len(items))
        gaps = _split(rng, n_free, len(items) + 1)
        others = np.setdiff1d(fillers, words, assume_unique=True)
        seq = [bos]
        filler_pos: list[int] = []
        first_start: dict[int, int] = {}

        for index, gap in zip(order, gaps[:-1]):
            filler_pos.extend(range(len(seq), len(seq) + int(gap)))
            seq.extend(rng.choice(others, size=int(gap)))
            p = len(seq)
            kind, i = items[int(index)]
            if kind == "fact":
                e, r = ents[i], rels[i]
                seq.extend([entity_ids[e], relation_ids[r], facts[e, r]])
                fact_mask[b, p + 1] = True
                continue
            if i not in first_start:  # the block's first occurrence
                first_start[i] = p
                seq.extend(block_words[i])
                if not near[i]:
                    continue
                filler_pos.extend(range(len(seq), len(seq) + inner[i]))
                seq.extend(rng.choice(others, size=inner[i]))
            c = len(seq)  # the copy
            seq.extend(block_words[i])
            blocks.append((b, first_start[i], c, lengths[i]))
            copy_mask[b, c : c + lengths[i] - 1] = True
        filler_pos.extend(range(len(seq), len(seq) + int(gaps[-1])))
        seq.extend(rng.choice(others, size=int(gaps[-1])))
        k_d = min(cfg.n_distractors, len(filler_pos))
        distractors = rng.choice(filler_pos, size=k_d, replace=False)
        for p in distractors:
            seq[int(p)] = entity_ids[rng.integers(0, len(ENTITIES))]
        if cfg.skip_bigram > 0:
            taken = set(int(w) for w in words)
            free = sorted(set(filler_pos) - set(int(p) for p in distractors))
            fire = rng.random(len(free)) < cfg.skip_bigram
            for p, hit in zip(free, fire):
                new = successor.get(int(seq[p - 2]), -1) if p >= 2 else -1
                if hit and new >= 0 and new not in taken:
                    seq[p] = new
                    rule_mask[b, p - 1] = True
        tokens[b] = seq
    return SyntheticBatch(
        tokens=torch.from_numpy(tokens),
        copy_mask=torch.from_numpy(copy_mask),
        fact_mask=torch.from_numpy(fact_mask),
        blocks=torch.tensor(blocks, dtype=torch.int64).reshape(-1, 4),
        rule_mask=torch.from_numpy(rule_mask) if cfg.skip_bigram > 0 else None,
    )


@typechecked
def generate_filler(n: int, seed: int, n_ctx: int = 64) -> Int[Tensor, "batch pos"]:
    """``[n, n_ctx]`` sequences of ``<bos>`` then uniformly random filler words."""
    rng = np.random.default_rng(seed)
    fillers = np.array([token_id(w) for w in filler_words()])
    tokens = rng.choice(fillers, size=(n, n_ctx))
    tokens[:, 0] = token_id(BOS)
    return torch.from_numpy(tokens)
