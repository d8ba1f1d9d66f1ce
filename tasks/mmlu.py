"""MMLU (Hendrycks et al. 2021): 4-choice questions over 57 subjects, as a categorical task.

    MMLU()                 # test split, 14,042 questions
    MMLU(split="validation", subject="astronomy")
"""

from nanochat.eval_data import mmlu_rows
from tasks.common import MultipleChoiceTask


class MMLU(MultipleChoiceTask):
    def __init__(self, split="test", subject=None, **slice_args):
        rows = [(question, choices, answer) for s, question, choices, answer in mmlu_rows(split)
                if subject is None or s == subject]
        if not rows:
            raise ValueError(f"MMLU has no {split} questions for subject {subject!r}")
        super().__init__(rows, **slice_args)
