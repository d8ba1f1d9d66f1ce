"""Contamination check: does the text of any eval item occur in a training task?

Text is normalised first (nanochat.speech_eval.normalize_text: lowercase words, punctuation dropped,
numbers kept). An eval item's question of at least NGRAM words is found in a training item when
one of its NGRAM-word windows occurs in the training item's text (13 words: the overlap unit of
Brown et al. 2020, the GPT-3 paper, Appendix C); a shorter question when all of its words occur
there, in order and contiguous. The eval side is every item of every chat eval task
(tasks/suites.py) and every offline CORE item (nanochat/core_eval.py): tasks.suites.eval_questions.

    index = ContaminationIndex(eval_questions())      # from tasks.suites
    hits = find_contamination(SomeTrainingTask(), index)     # [] when clean
"""

import numpy as np

from nanochat.speech_eval import normalize_text
from tasks.common import conversation_text

NGRAM = 13


def core_item_text(item):
    """The text of a CORE item: its context(s) and every answer."""
    parts = item.get("context_options", []) + [item.get("query", ""), item.get("context", "")]
    parts += item.get("choices", []) + [item.get("continuation", "")]
    return "\n".join(p for p in parts if p)


class ContaminationIndex:
    """The eval questions' NGRAM-word windows, hashed, and their short questions whole.

    A window's hash is sum_k value[word_k] * weight[k] (mod 2^64) with random 64-bit word values
    and position weights: vectorised over millions of windows, and two different windows
    collide with probability ~2^-64."""

    def __init__(self, questions, ngram=NGRAM, seed=0):
        self.questions, self.ngram = questions, ngram
        self.vocab, self.short = {}, {}  # short: word count -> {words: question number}
        self.copies = {}  # question number -> later questions with the same text (indexed once)
        first, long = {}, []
        for q, (_, _, text) in enumerate(questions):
            if text in first:
                self.copies.setdefault(first[text], []).append(q)
                continue
            first[text] = q
            words = normalize_text(text).split()
            if len(words) >= ngram:
                long.append((q, np.array([self.vocab.setdefault(w, len(self.vocab)) for w in words])))
            elif words:
                self.short.setdefault(len(words), {})[tuple(words)] = q
        rng = np.random.default_rng(seed)
        self.values = rng.integers(-2 ** 63, 2 ** 63 - 1, size=len(self.vocab) + 1, dtype=np.int64)
        self.weights = rng.integers(-2 ** 63, 2 ** 63 - 1, size=ngram, dtype=np.int64)
        hashes = [self._hashes(ids) for _, ids in long]
        owners = [np.full(len(h), q) for (q, _), h in zip(long, hashes)]
        hashes = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.owners = np.concatenate(owners)[order] if owners else np.zeros(0, dtype=np.int64)

    def _hashes(self, ids):
        """Hash of every ngram-word window of a word-id array."""
        windows = np.lib.stride_tricks.sliding_window_view(self.values[ids], self.ngram)
        with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
            return (windows * self.weights).sum(axis=1)

    def find(self, text):
        """Numbers of the questions (into self.questions) that occur in `text`."""
        words = normalize_text(text).split()
        found = set()
        if len(words) >= self.ngram and len(self.hashes):
            unknown = len(self.vocab)  # a word no question has: its windows cannot match
            ids = np.array([self.vocab.get(w, unknown) for w in words])
            probe = self._hashes(ids)
            lo, hi = np.searchsorted(self.hashes, probe, "left"), np.searchsorted(self.hashes, probe, "right")
            for a, b in zip(lo[hi > lo], hi[hi > lo]):
                found.update(self.owners[a:b].tolist())
        for n, table in self.short.items():
            found.update(table[w] for w in (tuple(words[i:i + n]) for i in range(len(words) - n + 1)) if w in table)
        return found.union(*(self.copies.get(q, ()) for q in found))


def find_contamination(task, index):
    """[(eval source, eval index, training index)] for every eval question found in the text of a
    training task's item (task.text(i): its question and every message)."""
    hits = []
    for i in range(len(task)):
        for q in sorted(index.find(task.text(i))):
            source, j, _ = index.questions[q]
            hits.append((source, j, i))
    return hits
