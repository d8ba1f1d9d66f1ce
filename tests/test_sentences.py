"""The sentences the spoken data reads, their split, and the pretraining corpus leaving the
val/test ones out."""

import random
import re

import pytest

from nanochat import sentences as S
from nanochat.corpus import bible_docs, sotu_docs


def test_sentences_are_plain_and_short():
    sentences = S.sentences()
    assert len(sentences) > 10_000
    for s in sentences[:: len(sentences) // 500]:
        assert S.MIN_WORDS <= len(s.split()) <= S.MAX_WORDS
        assert not re.search(r"\d|\b(Mr|Mrs|Dr)\.$", s), s


def test_text_split_follows_the_percentages():
    splits = [S.text_split(s) for s in S.sentences()]
    for split, percent in S.TEXT_SPLIT_PERCENT.items():
        assert abs(100 * splits.count(split) / len(splits) - percent) < 1.5, split
    assert S.held_out_sentences() == {s for s, split in zip(S.sentences(), splits) if split != "train"}


def test_drop_held_out_cuts_exactly_the_held_out_sentences():
    held = sorted(S.held_out_sentences())[:2]
    train = [s for s in S.sentences() if S.text_split(s) == "train"][:3]
    text = f"{train[0]}\n{held[0]}  {train[1]}\n\n{held[1]} {train[2]}\n"
    assert S.drop_held_out(text) == f"{train[0]}\n{train[1]}\n\n{train[2]}\n"
    untouched = " ".join(train) + "\n\nMr. Smith went to Washington. He stayed."
    assert S.drop_held_out(untouched) == untouched


@pytest.fixture(scope="module")
def pretraining_text():
    docs = list(sotu_docs()) + list(bible_docs())
    return " ".join(" ".join(d.replace("\u2019", "'").split()) for d in docs)


def test_pretraining_corpus_holds_train_sentences_but_no_held_out_ones(pretraining_text):
    rng = random.Random(0)
    held = rng.sample(sorted(S.held_out_sentences()), 200)
    train = rng.sample([s for s in S.sentences() if S.text_split(s) == "train"], 200)
    assert all(s in pretraining_text for s in train)  # the search finds sentences that are there
    assert not [s for s in held if s in pretraining_text]
