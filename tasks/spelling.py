"""Spelling tasks on the Debian `wamerican` word list: the letter-level skills a BPE model cannot
see directly in its tokens.

- SpellingBee: how many times a letter occurs in a word. The reply spells the word out, counts
  with the calculator tool (`'word'.count('x')`, forced in by the Engine) and ends "#### N".
- SimpleSpelling: spell a word letter by letter ("a,p,p,l,e").
Words are split by nanochat.sentences.text_split (the rule the spoken data uses): a test word
never appears in the train split. Item i is drawn from (seed, split, i), so any size is
deterministic.

    SpellingBee("test", size=1000)      SimpleSpelling("train", size=20000)
"""

import random
import re
import string

from nanochat.sentences import SPLITS, text_split
from nanochat.speech_data import dictionary_words
from tasks.common import Task, final_number

# Letters the question asks about: mostly ones in the word (the count is then at least one).
IN_WORD_FRACTION = 0.7
_TEMPLATES = ("How many {letter} are in the word {word}?",
              "How many times does the letter {letter} appear in {word}?",
              "Count the letter {letter} in the word {word}.",
              "In the word {word}, how many {letter}s are there?")


class _WordTask(Task):
    def __init__(self, split="test", size=1000, seed=0, **slice_args):
        super().__init__(**slice_args)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.words = [w for w in dictionary_words() if text_split(w) == split]
        self.split, self.size, self.seed = split, size, seed

    def num_examples(self):
        return self.size

    def _rng(self, index):
        return random.Random(f"{type(self).__name__}-{self.seed}-{self.split}-{index}")


class SpellingBee(_WordTask):
    def get_example(self, index):
        rng = self._rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < IN_WORD_FRACTION else rng.choice(string.ascii_lowercase)
        count = word.count(letter)
        reply = [{"type": "text", "text": f"Spelled out, {word} is {','.join(word)}. Counting {letter} with Python: "},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": rng.choice(_TEMPLATES).format(letter=letter, word=word)},
                             {"role": "assistant", "content": reply}]}

    def evaluate(self, item, completion):
        """The reply's "####" number is the count."""
        got, expected = final_number(completion), final_number(item["messages"][-1]["content"][-1]["text"])
        return got is not None and float(got) == float(expected)


class SimpleSpelling(_WordTask):
    def get_example(self, index):
        word = self._rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": ",".join(word)}]}

    def evaluate(self, item, completion):
        """The reply's letters, in order, are the word's (separators do not matter)."""
        return "".join(re.findall(r"[a-z]", completion.lower())) == item["messages"][-1]["content"].replace(",", "")
