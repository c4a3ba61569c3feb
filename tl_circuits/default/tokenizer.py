"""The default model's word-level vocabulary and its Hugging Face tokenizer.

Every token is a readable word, so graphs and tutorials read well:

- specials ``<pad>`` (id 0), ``<bos>`` (1), ``<unk>`` (2);
- 16 entity names (``Alice`` ... ``Sybil``), 4 relation words (``lives_in``, ``likes``,
  ``works_as``, ``plays``) and 8 attribute words per relation (cities, foods, jobs, games);
- filler pseudo-words (two consonant-vowel syllables, e.g. ``kavo``), chosen
  deterministically so that the vocabulary has exactly :data:`VOCAB_SIZE` words.

The tokenizer is a ``tokenizers`` WordLevel model with a whitespace pre-tokenizer and a
post-processor that prepends ``<bos>``, wrapped in ``transformers.PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import itertools
import random
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, BOS, UNK)

ENTITIES: tuple[str, ...] = (
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi",
    "Ivan", "Judy", "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil",
)  # fmt: skip
RELATIONS: tuple[str, ...] = ("lives_in", "likes", "works_as", "plays")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "lives_in": ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Sydney"),
    "likes": ("apples", "bread", "cheese", "rice", "soup", "tea", "pasta", "honey"),
    "works_as": ("baker", "doctor", "pilot", "farmer", "teacher", "painter", "lawyer", "nurse"),
    "plays": ("chess", "piano", "tennis", "guitar", "golf", "violin", "soccer", "drums"),
}

TOKENIZER_NAME = "tl_circuits-default"
VOCAB_SIZE = 512
"""Total number of words (``d_vocab`` of the model)."""

_CONSONANTS = "bdfgklmnprstvz"
_VOCALS = "aeiou"
_FILLER_SEED = 0


@cache
def filler_words() -> tuple[str, ...]:
    """The filler pseudo-words, in vocabulary order (deterministic; no clash with real words)."""
    syllables = [c + v for c in _CONSONANTS for v in _VOCALS]
    candidates = ["".join(p) for p in itertools.product(syllables, repeat=2)]
    taken = set(SPECIALS) | set(ENTITIES) | set(RELATIONS)
    taken |= {w for words in ATTRIBUTES.values() for w in words}
    candidates = [w for w in candidates if w not in taken]
    random.Random(_FILLER_SEED).shuffle(candidates)
    n = VOCAB_SIZE - len(taken)
    return tuple(sorted(candidates[:n]))


@cache
def vocabulary() -> tuple[str, ...]:
    """All words in id order: specials, entities, relations, attributes, fillers."""
    words = [*SPECIALS, *ENTITIES, *RELATIONS]
    for relation in RELATIONS:
        words.extend(ATTRIBUTES[relation])
    words.extend(filler_words())
    assert len(words) == VOCAB_SIZE and len(set(words)) == VOCAB_SIZE
    return tuple(words)


@cache
def token_id(word: str) -> int:
    """The id of one vocabulary word (KeyError for a word outside the vocabulary)."""
    return {w: i for i, w in enumerate(vocabulary())}[word]


def build_backend_tokenizer() -> Tokenizer:
    """A ``tokenizers.Tokenizer``: WordLevel over :func:`vocabulary`, whitespace split, BOS."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a backend tokenizer for TransformerLens (BOS prepended by the tokenizer itself)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        unk_token=UNK,
        pad_token=PAD,
        add_bos_token=True,
        padding_side="right",
        model_max_length=10**6,
        name_or_path=TOKENIZER_NAME,  # TransformerLens reads init_kwargs["name_or_path"]
    )


def save_tokenizer(path: Path) -> None:
    """Write the backend tokenizer as ``tokenizer.json``."""
    build_backend_tokenizer().save(str(path))


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Load ``tokenizer.json`` (written by :func:`save_tokenizer`) as a fast HF tokenizer."""
    return wrap_tokenizer(Tokenizer.from_file(str(path)))
