"""Spoken tasks on the speech shards built by `python -m nanochat.speech_data build`.

Tasks of the Task API (tasks/common.py). Each item is a conversation with the audio in front:
    {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
     "audio": float32 samples at 16 kHz}
- SpokenTranscription: every clip -> its transcript (scored by word error rate, lower is better).
- SpokenQuestions: a spoken question -> its exact answer (scored by exact match); typed(i) is the
  same question as text with no audio, to measure the gap between hearing and reading. An
  arithmetic question is answered through the calculator, as tasks/arithmetic.py's typed ones
  are (the call, its output, "#### answer"), so a chat model answers what it hears as it answers
  what it reads.
- SpokenContinuation: the first half of a sentence spoken -> the rest as text (scored by WER
  against the real rest of the sentence).
TASKS names them as scripts/audio_train.py's --tasks does. Text normalisation and WER live in
nanochat.speech_eval.
"""

from nanochat.engine import use_calculator
from nanochat.speech_data import decode_audio, default_data_dir, load_split, spoken_expression
from nanochat.speech_eval import normalize_text, word_error_rate
from tasks.arithmetic import answer_matches, calculator_reply
from tasks.common import Task


class SpokenTask(Task):
    """Rows of one split whose `task` column matches `row_task` (None: every row); `rows` are the
    rows of this slice, so rows[i] belongs to task[i]."""

    prompt = ""
    row_task = None
    answer_column = "answer"

    def __init__(self, data_dir=None, split="train", **slice_args):
        super().__init__(**slice_args)
        rows = load_split(data_dir or default_data_dir(), split)
        self._all_rows = [r for r in rows if self.row_task is None or r["task"] == self.row_task]
        if not self._all_rows:
            raise ValueError(f"{type(self).__name__}: no {self.row_task} clips in the {split} split "
                             f"of {data_dir or default_data_dir()}")
        self.rows = [self._all_rows[j] for j in self.indices]

    def num_examples(self):
        return len(self._all_rows)

    def get_example(self, index):
        row = self._all_rows[index]
        return {"messages": [{"role": "user", "content": self.prompt},
                             {"role": "assistant", "content": self.reply(row)}],
                "audio": decode_audio(row["audio"], row["sample_rate"])}

    def reply(self, row):
        """The assistant's reply to a row: its answer column."""
        return row[self.answer_column]

    def question(self, index):
        """What is spoken (the user message is a fixed instruction)."""
        return self.rows[index]["transcript"]

    def text(self, index):
        """What is spoken and the reply, without decoding the audio."""
        return f"{self.rows[index]['transcript']}\n{self.rows[index][self.answer_column]}"

    @staticmethod
    def evaluate(item, completion):
        """Word error rate of the completion against the item's answer (lower is better)."""
        return word_error_rate(item["messages"][-1]["content"], completion)

    def reward(self, item, completion):
        """1 - WER, floored at 0: higher is better, as a reward must be."""
        return max(0.0, 1.0 - self.evaluate(item, completion))


class SpokenTranscription(SpokenTask):
    prompt = "Repeat what you heard."
    answer_column = "transcript"


class SpokenContinuation(SpokenTask):
    prompt = "Continue the sentence you heard."
    row_task = "continue"


class SpokenQuestions(SpokenTask):
    prompt = "Answer the question you heard."
    row_task = "question"

    @staticmethod
    def reply(row):
        """The answer; an arithmetic question's through the calculator (tasks.arithmetic)."""
        if row["source"] != "arithmetic":
            return row["answer"]
        expression = spoken_expression(row["question"])
        return calculator_reply(expression, use_calculator(expression), row["answer"])

    def typed(self, i):
        """The same item with the question typed as text and no audio (the modality-gap twin)."""
        row = self.rows[i]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": self.reply(row)}]}

    @staticmethod
    def evaluate(item, completion):
        """Exact match of the normalised completion and answer ("-4." matches "-4"); for a
        calculator reply, of the final "#### answer"."""
        reference = item["messages"][-1]["content"]
        if isinstance(reference, list):
            return answer_matches(reference, completion)
        return normalize_text(completion) == normalize_text(reference)

    def reward(self, item, completion):
        return float(self.evaluate(item, completion))


TASKS = {"transcribe": SpokenTranscription, "question": SpokenQuestions, "continue": SpokenContinuation}
