"""ARC (Clark et al. 2018): grade-school science questions, 3-5 choices, as a categorical task.

    ARC("ARC-Easy")         # test split, 2,376 questions
    ARC("ARC-Challenge")    # test split, 1,172 questions (the ones retrieval and co-occurrence failed on)
"""

from nanochat.eval_data import arc_rows
from tasks.common import MultipleChoiceTask


class ARC(MultipleChoiceTask):
    def __init__(self, subset, split="test", **slice_args):
        super().__init__(arc_rows(subset, split), **slice_args)
        self.subset = subset
