"""The embedded default model still shows its circuits, and its transcoders work.

Everything is measured here on freshly generated data (seeds not used in training or for
the card); the bounds are the targets of docs/default_model.md, not the measured values.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tl_circuits import ReplacementContext
from tl_circuits.default import (
    DEFAULT_PROMPTS,
    DefaultModelError,
    DefaultPrompt,
    default_card,
    load_default_model,
    load_default_transcoders,
    mechanisms,
)
from tl_circuits.default.synthetic import (
    SHORT_BLOCKS,
    SyntheticConfig,
    fact_table,
    generate,
    generate_filler,
    skip_successor,
)
from tl_circuits.default.tokenizer import (
    ENTITIES,
    RELATIONS,
    VOCAB_SIZE,
    filler_words,
    token_id,
    vocabulary,
)
from tl_circuits.graph import AttributionGraph
from tl_circuits.model.hooks import install_mlp_input_hooks
from tl_circuits.training.evaluate import replacement_hooks
from tl_circuits.transcoders import CrossLayerTranscoder, TranscoderSet

TEST_SEED = 987_654  # not a training, transcoder or card seed
N_SEQ = 64

# stated bounds (docs/default_model.md)
MIN_PREVIOUS_TOKEN_SCORE = 0.7
MIN_INDUCTION_SCORE = 0.5
MIN_COPY_ACCURACY = 0.9
MIN_FACT_ACCURACY = 0.95
MAX_COPY_ACCURACY_INDUCTION_ABLATED = 0.3
MIN_SPLICED_COPY_ACCURACY = 0.7
MIN_SPLICED_FACT_ACCURACY = 0.8
MIN_REPLACEMENT_SCORE = 0.6


@functools.cache
def model():
    return load_default_model()


@functools.cache
def transcoders(kind: str):
    return load_default_transcoders(kind)  # type: ignore[arg-type]


@functools.cache
def batch():
    return generate(N_SEQ, TEST_SEED, SyntheticConfig(n_ctx=model().cfg.n_ctx))


@functools.cache
def clean_accuracy() -> dict[str, float]:
    return mechanisms.accuracies(model(), batch())


@functools.cache
def head_scores() -> tuple[torch.Tensor, torch.Tensor]:
    filler = generate_filler(N_SEQ, TEST_SEED, model().cfg.n_ctx)
    return (
        mechanisms.previous_token_scores(model(), filler),
        mechanisms.induction_scores(model(), batch()),
    )


# --- tokenizer and generator -------------------------------------------------------------


def test_tokenizer_round_trips() -> None:
    m = model()
    assert m.cfg.d_vocab == VOCAB_SIZE == len(vocabulary())
    text = "kana deko Alice lives_in Paris gita"
    tokens = m.to_tokens(text)[0]
    assert tokens[0].item() == token_id("<bos>")
    assert m.to_str_tokens(text) == ["<bos>", *text.split()]
    assert m.to_string(tokens[1:]) == text
    for i in torch.randint(0, VOCAB_SIZE, (50,), generator=torch.Generator().manual_seed(0)):
        word = vocabulary()[int(i)]
        assert m.to_tokens(word, prepend_bos=False)[0].tolist() == [int(i)]
    # an unknown word is <unk>, not silently split
    assert m.to_tokens("notaword", prepend_bos=False)[0].tolist() == [token_id("<unk>")]


def test_vocabulary_is_readable_and_disjoint() -> None:
    words = vocabulary()
    assert len(set(words)) == len(words)
    assert all(" " not in w for w in words)
    assert set(filler_words()).isdisjoint(ENTITIES)


@pytest.mark.parametrize(
    "config",
    [SyntheticConfig(), SHORT_BLOCKS, SyntheticConfig(skip_bigram=0.0)],
    ids=["default", "short", "no-rule"],
)
def test_generator_is_reproducible_and_well_formed(config: SyntheticConfig) -> None:
    a, b = generate(16, 5, config), generate(16, 5, config)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
    assert not torch.equal(a.tokens, generate(16, 6, config).tokens)
    bos = token_id("<bos>")
    assert (a.tokens[:, 0] == bos).all() and (a.tokens[:, 1:] != bos).all()
    facts = fact_table()
    rel_ids = {token_id(r): r for r in RELATIONS}
    copy_mask = torch.zeros_like(a.copy_mask)
    for i, s, c, L in a.blocks.tolist():
        assert c >= s + L and config.block_len[0] <= L <= config.block_len[1]
        assert torch.equal(a.tokens[i, s : s + L], a.tokens[i, c : c + L])
        # a block word occurs only in the block and its copy
        for word in a.tokens[i, s : s + L].tolist():
            assert (a.tokens[i] == word).sum() == 2
        copy_mask[i, c : c + L - 1] = True
    assert torch.equal(copy_mask, a.copy_mask)
    n_blocks = torch.bincount(a.blocks[:, 0], minlength=16)
    assert (n_blocks >= 1).all() and (n_blocks <= config.n_blocks[1]).all()
    assert n_blocks.float().mean() >= min(2, config.n_blocks[0])
    successor = skip_successor()
    assert sorted(successor) == sorted(successor.values())  # a permutation of the fillers
    if config.skip_bigram > 0:
        assert a.rule_mask is not None and a.rule_mask.any()
        for i, p in a.rule_mask.nonzero().tolist():  # logits at p predict successor(x[p-1])
            assert int(a.tokens[i, p + 1]) == successor[int(a.tokens[i, p - 1])]
        assert torch.equal(a.loss_mask, a.copy_mask | a.fact_mask | a.rule_mask)
    else:
        assert a.rule_mask is None
    for i in range(16):
        for p in a.fact_mask[i].nonzero()[:, 0].tolist():
            entity = vocabulary()[int(a.tokens[i, p - 1])]
            relation = rel_ids[int(a.tokens[i, p])]
            assert vocabulary()[int(a.tokens[i, p + 1])] == facts[entity][relation]


def test_fact_table_shape() -> None:
    facts = fact_table()
    assert list(facts) == list(ENTITIES)
    assert all(list(row) == list(RELATIONS) for row in facts.values())


# --- the model's circuits ----------------------------------------------------------------


def test_accuracies() -> None:
    acc = clean_accuracy()
    assert acc["copy"] >= MIN_COPY_ACCURACY, acc
    assert acc["fact"] >= MIN_FACT_ACCURACY, acc


def test_previous_token_and_induction_heads() -> None:
    prev, ind = head_scores()
    (pl, ph, ps), (il, ih, iscore) = mechanisms.circuit_heads(prev, ind)
    assert ps >= MIN_PREVIOUS_TOKEN_SCORE, prev
    assert iscore >= MIN_INDUCTION_SCORE, ind
    assert pl < il
    # the card names the same heads
    card = default_card()
    assert card["previous_token_head"][:2] == [pl, ph]
    assert card["induction_head"][:2] == [il, ih]


def test_ablating_the_induction_head_breaks_copying() -> None:
    prev, ind = head_scores()
    _, (il, ih, _) = mechanisms.circuit_heads(prev, ind)
    clean = clean_accuracy()
    ablated = mechanisms.accuracies(model(), batch(), ablate_heads=[(il, ih)])
    assert ablated["copy"] <= MAX_COPY_ACCURACY_INDUCTION_ABLATED, (clean, ablated)
    assert ablated["fact"] >= clean["fact"] - 0.2, (clean, ablated)  # copying only
    # control: ablating a different head of the same layer does not break copying
    other = (ih + 1) % model().cfg.n_heads
    control = mechanisms.accuracies(model(), batch(), ablate_heads=[(il, other)])
    assert control["copy"] >= clean["copy"] - 0.2, control


def test_ablating_the_previous_token_head_breaks_copying() -> None:
    prev, ind = head_scores()
    (pl, ph, _), _ = mechanisms.circuit_heads(prev, ind)
    ablated = mechanisms.accuracies(model(), batch(), ablate_heads=[(pl, ph)])
    assert ablated["copy"] <= MAX_COPY_ACCURACY_INDUCTION_ABLATED, ablated


def test_fact_lookup_runs_through_the_card_mlp_layers() -> None:
    layers = default_card()["fact_lookup_mlp_layers"]
    assert layers, "the card names no fact-lookup MLP layer"
    result = mechanisms.mlp_ablation_accuracies(model(), batch())
    for layer in layers:
        assert result[layer]["fact"] < 0.5, result


# --- transcoders -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cls"), [("per_layer", TranscoderSet), ("cross_layer", CrossLayerTranscoder)]
)
def test_transcoders_load_and_reproduce_r1(kind: str, cls: type) -> None:
    tcs = transcoders(kind)
    assert isinstance(tcs, cls)
    for prompt in DEFAULT_PROMPTS.values():
        ctx = ReplacementContext(model(), tcs, prompt.text)
        logits, _ = ctx.run()
        with torch.no_grad():
            clean = model()(prompt.text)[0]
        assert (logits - clean).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["per_layer", "cross_layer"])
def test_spliced_accuracies(kind: str) -> None:
    m = model()
    install_mlp_input_hooks(m)
    hooks = replacement_hooks(transcoders(kind))

    def spliced(tokens: torch.Tensor) -> torch.Tensor:
        with m.hooks(fwd_hooks=hooks):
            return m(tokens)

    acc = mechanisms.accuracies(m, batch(), logits_fn=spliced)
    assert acc["copy"] >= MIN_SPLICED_COPY_ACCURACY, acc
    assert acc["fact"] >= MIN_SPLICED_FACT_ACCURACY, acc


@pytest.mark.parametrize("kind", ["per_layer", "cross_layer"])
@pytest.mark.parametrize("name", ["induction", "fact"])
def test_default_prompt_graphs(kind: str, name: str) -> None:
    prompt = DEFAULT_PROMPTS[name]
    m = model()
    with torch.no_grad():
        top = m(prompt.text)[0, -1].argmax().item()
    assert m.to_string(torch.tensor([top])) == prompt.answer
    graph = AttributionGraph.build(m, transcoders(kind), prompt.text)
    assert graph.scores().replacement >= MIN_REPLACEMENT_SCORE
    assert graph.prune().scores().replacement >= MIN_REPLACEMENT_SCORE


# --- loader API --------------------------------------------------------------------------


def test_default_prompts_and_card() -> None:
    for name, prompt in DEFAULT_PROMPTS.items():
        assert isinstance(prompt, DefaultPrompt) and prompt.name == name
        assert "<unk>" not in model().to_str_tokens(prompt.text)
        assert prompt.answer in vocabulary()
    card = default_card()
    for key in ("architecture", "previous_token_head", "induction_head", "accuracy"):
        assert key in card
    assert card["architecture"]["n_layers"] == model().cfg.n_layers
    for kind in ("per_layer", "cross_layer"):
        assert len(card["transcoders"][kind]["fvu"]) == model().cfg.n_layers


def test_bad_requests_fail_clearly(tmp_path) -> None:
    with pytest.raises(DefaultModelError, match="unknown transcoder kind"):
        load_default_transcoders("nonsense")  # type: ignore[arg-type]
    with pytest.raises(DefaultModelError, match="missing"):
        load_default_model(directory=tmp_path)
