"""Procedural text for a language-model demo with no download: sentences of a small grammar, a share corrupted.

The grammar pairs each subject with its own verbs and objects (cats chase mice, farmers plant seeds), so a
small model learns which words go together; a test sentence's proponents are then training sentences about the
same subject. A corrupted sentence — its words shuffled, or replaced by random words of the vocabulary — is the
text analog of a flipped label: fluent-looking data the model should not learn from.

    corpus = procedural_corpus(n_train=800, n_test=100, corrupt_fraction=0.1, seed=0)
    corpus.train[:2]           # ['the small cat chases a grey mouse .', ...]
    corpus.corrupted_rows      # sorted training rows that were corrupted

``word_tokenizer`` trains a word-level tokenizer on such sentences (the ``tokenizers`` library, no download) and
returns it as a ``transformers.PreTrainedTokenizerFast``, ready for ``save_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradindex.errors import TaskSpecError
from gradindex.tasks._common import task_option
from gradindex.utils import check_fraction, check_non_negative_int, check_positive_int

__all__ = ["CORRUPTIONS", "SPECIAL_TOKENS", "TextCorpus", "procedural_corpus", "word_tokenizer"]

# the kinds of corruption, in the order the corrupted rows cycle through them
CORRUPTIONS: dict[str, str] = {
    "shuffled": "the sentence's words in a random order",
    "noise": "every word replaced by a random word of the vocabulary",
}
# padding, unknown word, start and end of a sentence (ids 0..3 of every tokenizer word_tokenizer trains)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")

# subject -> (verbs, objects): a sentence uses one of each, so the words of a subject go together
_SUBJECTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cat": (("chases", "watches", "catches"), ("mouse", "bird", "fish")),
    "dog": (("fetches", "chews", "buries"), ("bone", "stick", "ball")),
    "farmer": (("plants", "waters", "harvests"), ("seed", "field", "apple")),
    "baker": (("bakes", "slices", "sells"), ("bread", "cake", "pie")),
    "pilot": (("flies", "lands", "checks"), ("plane", "jet", "glider")),
    "child": (("reads", "draws", "finds"), ("book", "map", "picture")),
}
_ADJECTIVES = ("small", "big", "old", "young", "quick", "quiet", "happy", "tired")
_COLOURS = ("red", "grey", "green", "brown", "white", "yellow")
_PLACES = ("garden", "kitchen", "market", "park", "field", "house")
_TIMES = ("today", "again", "early", "slowly")


@dataclass(frozen=True, eq=False)
class TextCorpus:
    """Sentences of the grammar, one string each (words separated by single spaces).

    train: the training sentences, some corrupted.
    test: clean sentences of the same grammar.
    corrupted_rows: sorted training rows that were corrupted, ``int64[n_corrupted]``.
    corruption: per training row, ``""`` when clean, else its kind (a key of ``CORRUPTIONS``).
    clean_train: the training sentences as they were before corruption.
    subjects: per training row, the subject of its clean sentence.
    """

    train: list[str]
    test: list[str]
    corrupted_rows: np.ndarray
    corruption: list[str]
    clean_train: list[str]
    subjects: list[str]

    @property
    def corrupted_mask(self) -> np.ndarray:
        """``bool[n_train]``, True at corrupted rows."""
        mask = np.zeros(len(self.train), dtype=bool)
        mask[self.corrupted_rows] = True
        return mask

    def vocabulary(self) -> list[str]:
        """Every word of the grammar, sorted (noise draws from these, so a tokenizer trained on them knows all)."""
        return vocabulary()


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted."""
    words = {"the", "a", "an", "in", "near", ".", *_ADJECTIVES, *_COLOURS, *_PLACES, *_TIMES}
    for subject, (verbs, objects) in _SUBJECTS.items():
        words.update((subject, *verbs, *objects))
    return sorted(words)


def _sentence(rng: np.random.Generator) -> tuple[str, str]:
    """One clean sentence and its subject, e.g. ``the quick dog buries a brown bone in the park .``."""
    subject = str(rng.choice(list(_SUBJECTS)))
    verbs, objects = _SUBJECTS[subject]
    words = [str(rng.choice(["the", "a"]))]
    if rng.random() < 0.6:
        words.append(str(rng.choice(_ADJECTIVES)))
    words += [subject, str(rng.choice(verbs)), str(rng.choice(["the", "a"]))]
    if rng.random() < 0.5:
        words.append(str(rng.choice(_COLOURS)))
    words.append(str(rng.choice(objects)))
    ending = rng.random()
    if ending < 0.45:
        words += [str(rng.choice(["in", "near"])), "the", str(rng.choice(_PLACES))]
    elif ending < 0.7:
        words.append(str(rng.choice(_TIMES)))
    words.append(".")
    for position in range(len(words) - 1):  # "a old baker" -> "an old baker"
        if words[position] == "a" and words[position + 1][0] in "aeiou":
            words[position] = "an"
    return " ".join(words), subject


def _corrupt(sentence: str, kind: str, rng: np.random.Generator, words: Sequence[str]) -> str:
    tokens = sentence.split(" ")
    if kind == "shuffled":
        for _ in range(10):  # a permutation that leaves the sentence as it was is no corruption: draw again
            shuffled = [tokens[index] for index in rng.permutation(len(tokens))]
            if shuffled != tokens:
                return " ".join(shuffled)
        return " ".join(reversed(tokens))
    if kind == "noise":
        return " ".join(str(rng.choice(words)) for _ in tokens)
    raise TaskSpecError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")


def procedural_corpus(
    n_train: int = 800, n_test: int = 100, corrupt_fraction: float = 0.1, seed: int = 0
) -> TextCorpus:
    """Sentences of the grammar, deterministic given ``seed``, with ``round(corrupt_fraction * n_train)`` training
    sentences corrupted (alternately shuffled and replaced by noise words, see ``CORRUPTIONS``).

    Args:
        n_train: training sentences.
        n_test: test sentences (never corrupted).
        corrupt_fraction: the share of training sentences corrupted, in [0, 1].
        seed: sets the sentences, which rows are corrupted and how.

    Returns:
        The corpus (``TextCorpus``).

    Raises:
        TaskSpecError: a bad option (named).
    """
    n_train = task_option(check_positive_int, "n_train", n_train)
    n_test = task_option(check_non_negative_int, "n_test", n_test)
    corrupt_fraction = task_option(
        check_fraction, "corrupt_fraction", corrupt_fraction, low_open=False, high_open=False
    )
    seed = task_option(check_non_negative_int, "seed", seed)
    rng = np.random.default_rng([seed, 0x7E47])
    drawn = [_sentence(rng) for _ in range(n_train + n_test)]
    clean = [sentence for sentence, _ in drawn[:n_train]]
    subjects = [subject for _, subject in drawn[:n_train]]
    test = [sentence for sentence, _ in drawn[n_train:]]
    noise_rng = np.random.default_rng([seed, 0xC0AA])  # its own stream: the corruption never moves the sentences
    n_corrupt = int(round(corrupt_fraction * n_train))
    rows = np.sort(noise_rng.choice(n_train, size=n_corrupt, replace=False)).astype(np.int64)
    kinds = list(CORRUPTIONS)
    corruption = [""] * n_train
    train = list(clean)
    words = vocabulary()
    for position, row in enumerate(rows.tolist()):
        kind = kinds[position % len(kinds)]
        corruption[row] = kind
        train[row] = _corrupt(clean[row], kind, noise_rng, words)
    rows.flags.writeable = False
    return TextCorpus(
        train=train, test=test, corrupted_rows=rows, corruption=corruption, clean_train=clean, subjects=subjects
    )


def word_tokenizer(sentences: Sequence[str], *, extra_words: Sequence[str] = ()) -> Any:
    """A word-level tokenizer of ``sentences`` (words split on whitespace) as a ``PreTrainedTokenizerFast``: ids 0..3
    are ``<pad> <unk> <s> </s>``, every sentence is encoded as ``<s> words </s>``, and decoding drops them.

    Args:
        sentences: the text it is trained on; every word in it gets an id.
        extra_words: more words to give ids (e.g. the whole grammar's vocabulary).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (``save_pretrained(folder)`` writes it beside a model).

    Raises:
        TaskSpecError: ``tokenizers`` or ``transformers`` is not installed.
    """
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast
    except ImportError as error:
        raise TaskSpecError(
            f'a word tokenizer needs the Hugging Face libraries ({error.name} is missing); pip install "gradindex[hf]"'
        ) from None
    pad, unk, bos, eos = SPECIAL_TOKENS
    tokenizer = Tokenizer(models.WordLevel(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1, show_progress=False)
    tokenizer.train_from_iterator([*sentences, *extra_words], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos
    )
