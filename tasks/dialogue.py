"""Human conversation for SFT, from packages on PyPI: chit-chat between people (chitchat-dataset)
and short scripted dialogs (chatterbot-corpus). Neither has a reference answer to score, so
`evaluate` is not defined: they are training and validation-loss data.

- Chitchat: 7,168 conversations between two people (consecutive messages of one sender form a
  turn; the first sender plays the user). Many are long (rendered median 415 tokens, max 31,537,
  dev/LOG.md), so each is split into windows of whole turns: consecutive (user, assistant)
  exchanges that fit in `max_chars` characters together, so no turn is cut and no exchange is lost
  (an exchange longer than max_chars alone is a window by itself, for the packer to cut or skip).
  Conversations are assigned to a split by a hash of their id (1 in VAL_BUCKETS to "val").
- Chatterbot: chatterbot-corpus's English YAML dialogs (2,026 conversations, mostly one or two
  exchanges), minus its `botprofile.yml`, a persona (its creator, age, home) that would contradict
  this assistant's identity (tasks/identity.py), and minus dialogs that ask an eval question.

    Chitchat("train", max_chars=1500)    Chatterbot()
"""

import glob
import json
import os
import zlib

from tasks.common import Task

VAL_BUCKETS = 50  # chitchat conversations held out for the validation loss: 1 in 50 (~140)
SPLITS = ("train", "val")
PERSONA_FILES = ("botprofile.yml",)
# chatterbot-corpus dialogs that ask an eval question word for word (found by
# tests/test_contamination.py): trivia.yml's mercury question is MMLU test item 7493.
EVAL_QUESTIONS = ("What is the only metal that is a liquid at normal atmospheric pressure and temperature?",)


def exchange_windows(turns, max_chars):
    """Lists of consecutive (user, assistant) turn pairs whose text adds up to at most max_chars
    (a single pair longer than that on its own); a trailing unanswered user turn is dropped."""
    pairs = [turns[i:i + 2] for i in range(0, len(turns) - 1, 2)]
    windows, current, size = [], [], 0
    for pair in pairs:
        n = sum(len(t) for t in pair)
        if current and size + n > max_chars:
            windows.append(current)
            current, size = [], 0
        current, size = current + [pair], size + n
    return windows + [current] if current else windows


def as_conversation(pairs):
    """{"messages": ...} of (user, assistant) turn pairs."""
    return {"messages": [{"role": role, "content": text} for pair in pairs
                         for role, text in zip(("user", "assistant"), pair)]}


class Chitchat(Task):
    def __init__(self, split="train", max_chars=1500, **slice_args):
        super().__init__(**slice_args)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if max_chars < 1:
            raise ValueError(f"max_chars must be positive, got {max_chars}")
        import chitchat_dataset  # in pyproject's dependencies
        path = os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")
        with open(path, encoding="utf-8") as f:
            conversations = json.load(f)
        self.windows = []
        for key in sorted(conversations):
            if ("val" if zlib.crc32(key.encode()) % VAL_BUCKETS == 0 else "train") != split:
                continue
            turns = ["\n".join(m["text"] for m in turn) for turn in conversations[key]["messages"]]
            self.windows += exchange_windows(turns, max_chars)

    def num_examples(self):
        return len(self.windows)

    def get_example(self, index):
        return as_conversation(self.windows[index])


class Chatterbot(Task):
    def __init__(self, **slice_args):
        super().__init__(**slice_args)
        import chatterbot_corpus  # in pyproject's dependencies
        import yaml
        root = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
        self.dialogs = []
        for path in sorted(glob.glob(os.path.join(root, "*.yml"))):
            if os.path.basename(path) in PERSONA_FILES:
                continue
            with open(path, encoding="utf-8") as f:
                for turns in yaml.safe_load(f)["conversations"]:
                    pairs = [[str(a), str(b)] for a, b in zip(turns[0::2], turns[1::2])]
                    if pairs and pairs[0][0] not in EVAL_QUESTIONS:
                        self.dialogs.append(pairs)

    def num_examples(self):
        return len(self.dialogs)

    def get_example(self, index):
        return as_conversation(self.dialogs[index])
