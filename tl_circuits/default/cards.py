"""Feature cards of the default model's transcoders (top-activating contexts).

Shipped in ``tl_circuits/default/data/feature_cards/{per_layer,cross_layer}/``, computed by
:func:`tl_circuits.transcoders.feature_cards.top_activating_contexts` on
:func:`tl_circuits.default.synthetic.generate` data (:data:`CARD_SEQUENCES` sequences,
seed :data:`CARD_SEED`, not a training seed). Regenerate them with::

    python -m tl_circuits.default.cards
"""

from __future__ import annotations

from pathlib import Path

from tl_circuits.transcoders.feature_cards import FeatureCards, top_activating_contexts

#: the synthetic data the cards are computed on
CARD_SEED = 20260101
CARD_SEQUENCES = 512
#: contexts per feature and tokens per context
CARD_K = 5
CARD_WINDOW = 8
KINDS = ("per_layer", "cross_layer")


def cards_dir(kind: str) -> Path:
    """Where the cards of the default ``kind`` transcoders are shipped."""
    from tl_circuits.default import data_dir

    return data_dir() / "feature_cards" / kind


def load_default_feature_cards(kind: str = "per_layer") -> FeatureCards | None:
    """The shipped cards of the default ``kind`` transcoders, or ``None`` if missing."""
    path = cards_dir(kind)
    if not (path / "feature_cards.json").is_file():
        return None
    return FeatureCards.load(path)


def build_default_feature_cards(kind: str = "per_layer") -> FeatureCards:
    """Compute the default model's cards (what :func:`main` ships)."""
    from tl_circuits.default import load_default_model, load_default_transcoders
    from tl_circuits.default.synthetic import generate

    model = load_default_model()
    transcoders = load_default_transcoders(kind)
    tokens = generate(CARD_SEQUENCES, CARD_SEED).tokens
    cards = top_activating_contexts(
        model, transcoders, tokens, k=CARD_K, window=CARD_WINDOW, batch_size=64
    )
    cards.info.update({"dataset": "tl_circuits.default.synthetic.generate", "seed": CARD_SEED})
    return cards


def main() -> None:
    for kind in KINDS:
        path = build_default_feature_cards(kind).save(cards_dir(kind))
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"wrote {path} ({size} bytes)")


if __name__ == "__main__":
    main()
