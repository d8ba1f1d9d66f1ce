"""Spoken tasks on the speech shards built by `python -m nanochat.speech_data build`.

Each item is a conversation with the audio in front:
    {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
     "audio": float32 samples at 16 kHz}
- SpokenTranscription: every clip -> its transcript (scored by word error rate, lower is better).
- SpokenQuestions: a spoken question -> its exact answer (scored by exact match); typed(i) is the
  same question as text with no audio, to measure the gap between hearing and reading.
- SpokenContinuation: the first half of a sentence spoken -> the rest as text (scored by WER
  against the real rest of the sentence).
TASKS names them as scripts/audio_train.py's --tasks does. Text normalisation and WER live in
nanochat.speech_eval.
"""

from nanochat.speech_data import decode_audio, default_data_dir, load_split
from nanochat.speech_eval import normalize_text, word_error_rate


class SpokenTask:
    """Rows of one split whose `task` column matches `row_task` (None: every row)."""

    prompt = ""
    row_task = None
    answer_column = "answer"

    def __init__(self, data_dir=None, split="train"):
        rows = load_split(data_dir or default_data_dir(), split)
        self.rows = [r for r in rows if self.row_task is None or r["task"] == self.row_task]
        if not self.rows:
            raise ValueError(f"{type(self).__name__}: no {self.row_task} clips in the {split} split "
                             f"of {data_dir or default_data_dir()}")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return {"messages": [{"role": "user", "content": self.prompt},
                             {"role": "assistant", "content": row[self.answer_column]}],
                "audio": decode_audio(row["audio"], row["sample_rate"])}

    @staticmethod
    def evaluate(item, completion):
        """Word error rate of the completion against the item's answer (lower is better)."""
        return word_error_rate(item["messages"][-1]["content"], completion)


class SpokenTranscription(SpokenTask):
    prompt = "Repeat what you heard."
    answer_column = "transcript"


class SpokenContinuation(SpokenTask):
    prompt = "Continue the sentence you heard."
    row_task = "continue"


class SpokenQuestions(SpokenTask):
    prompt = "Answer the question you heard."
    row_task = "question"

    def typed(self, i):
        """The same item with the question typed as text and no audio (the modality-gap twin)."""
        row = self.rows[i]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": row["answer"]}]}

    @staticmethod
    def evaluate(item, completion):
        """Exact match of the normalised completion and answer ("-4." matches "-4")."""
        return normalize_text(completion) == normalize_text(item["messages"][-1]["content"])


TASKS = {"transcribe": SpokenTranscription, "question": SpokenQuestions, "continue": SpokenContinuation}
