"""The Task API every dataset speaks, for training, evaluation and RL alike.

A Task is a sequence of conversations:
    task[i] -> {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}
plus "audio" (float32 samples at 16 kHz) for a spoken item and "letters" (the answer letters)
for a multiple-choice one. `eval_type` says how a model is scored on it: "categorical" (the
answer is one of `letters`: compare the model's logits on those letters) or "generative" (sample
a reply and check it). `evaluate(item, completion)` scores one reply; `reward(item, completion)`
is the RL reward (by default the evaluation as a float); `question(i)` and `text(i)` give the
item's text for the contamination check (tasks/contamination.py). A subclass implements
`num_examples()`, `get_example(index)` and `evaluate`.

Tasks slice like sequences at construction (`Task(start=0, stop=None, step=1)`), so a held-out
part or a quick subset needs no copy of the data. `TaskMixture` interleaves tasks in a
deterministic shuffled order (list a task twice to give it twice the weight); `TaskSequence`
plays them one after the other (a curriculum).
"""

import random
import re
import string


class Task:
    """Base class: a sliced view over a subclass's examples."""

    eval_type = "generative"

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"{type(self).__name__}: bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        """Examples in the whole underlying dataset, before slicing."""
        raise NotImplementedError

    def get_example(self, index):
        """Conversation number `index` of the underlying dataset."""
        raise NotImplementedError

    def evaluate(self, item, completion):
        """Score one reply to `item` (True/False, or a number where the task says so)."""
        raise NotImplementedError

    def reward(self, item, completion):
        """The RL reward of one reply: the evaluation as a float."""
        return float(self.evaluate(item, completion))

    def question(self, index):
        """The text that identifies item `index` (its first user message), for contamination checks."""
        return self[index]["messages"][0]["content"]

    def text(self, index):
        """All the text of item `index`: its question and every message (tasks/contamination.py)."""
        return self.question(index) + "\n" + conversation_text(self[index])

    @property
    def indices(self):
        """range of underlying indices this slice covers."""
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return range(self.start, stop, self.step)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.get_example(self.indices[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def conversation_text(conversation):
    """Every message's text (string content and the text of content parts), one per line."""
    lines = []
    for message in conversation["messages"]:
        content = message["content"]
        lines += [content] if isinstance(content, str) else [part["text"] for part in content]
    return "\n".join(lines)


class TaskSequence:
    """Tasks played one after the other: all items of the first, then of the second, ...
    locate(i) gives the task an item belongs to, for its evaluate or reward."""

    def __init__(self, tasks):
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]

    def __len__(self):
        return len(self.index)

    def locate(self, i):
        """(task, index within that task) of item i: the task that evaluates or rewards it."""
        t, j = self.index[i]
        return self.tasks[t], j

    def __getitem__(self, i):
        task, j = self.locate(i)
        return task[j]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class TaskMixture(TaskSequence):
    """Every item of every task in one order shuffled by `seed` (the same seed, the same order).
    A task listed twice contributes each of its items twice: that is its weight."""

    def __init__(self, tasks, seed=42):
        super().__init__(tasks)
        random.Random(seed).shuffle(self.index)


# ---------------------------------------------------------------------------
# Multiple choice: the one rendering every multiple-choice task uses

LETTERS = string.ascii_uppercase


def render_mc(question, choices):
    """(user message, letters) of a multiple-choice question: the question, one lettered line per
    choice, and the instruction to answer with a letter. The reply is the bare letter, one token in
    any byte-level BPE, so a categorical eval reads it off the first reply position."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(LETTERS)} choices, got {len(choices)}")
    letters = list(LETTERS[:len(choices)])
    lines = [question.strip(), ""] + [f"{letter}. {choice.strip()}" for letter, choice in zip(letters, choices)]
    lines += ["", f"Answer with the letter of the correct choice ({', '.join(letters)})."]
    return "\n".join(lines), letters


class MultipleChoiceTask(Task):
    """A categorical task over rows (question, choices, index of the right choice)."""

    eval_type = "categorical"

    def __init__(self, rows, **slice_args):
        super().__init__(**slice_args)
        self.rows = rows

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        question, choices, answer = self.rows[index]
        user, letters = render_mc(question, choices)
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": letters[answer]}],
                "letters": letters}

    def question(self, index):
        question, choices, _ = self.rows[self.indices[index]]
        return "\n".join([question, *choices])

    def evaluate(self, item, completion):
        """The reply starts with the right letter ("B", "B.", "B) ..." all count)."""
        words = completion.strip().split()
        return bool(words) and words[0].rstrip(".):") == item["messages"][-1]["content"]


# ---------------------------------------------------------------------------
# Final answers written as "#### <number>" (GSM8K's convention, also the spelling tasks')

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_number(text):
    """The number after the last "####", thousands commas removed ("1,000.50" -> "1000.50"), or None."""
    found = _FINAL.findall(text)
    return found[-1].replace(",", "") if found else None
