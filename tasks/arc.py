"""ARC (Clark et al. 2018): grade-school science questions, 3-5 choices, as a categorical task.

    ARC("ARC-Easy")         # test split, 2,376 questions
    ARC("ARC-Challenge")    # test split, 1,172 questions (the ones retrieval and co-occurrence failed on)
    arc_practice()          # validation splits of both, 867 questions: SFT's multiple-choice practice

chat_eval scores the test splits; the validation splits are only ever trained on.
"""

from nanochat.eval_data import arc_rows
from tasks.common import MultipleChoiceTask

ARC_SUBSETS = ("ARC-Easy", "ARC-Challenge")


class ARC(MultipleChoiceTask):
    def __init__(self, subset, split="test", **slice_args):
        super().__init__(arc_rows(subset, split), **slice_args)
        self.subset = subset


def arc_practice(**slice_args):
    """ARC-Easy and ARC-Challenge's validation splits as one task (570 + 299 questions), minus the
    few that share a passage with a test question (a 13-word window, tasks/contamination.py: 2
    questions, e.g. one on Maryland's natural resources)."""
    from tasks.contamination import ContaminationIndex
    tests = [ARC(subset) for subset in ARC_SUBSETS]
    index = ContaminationIndex([(t.subset, i, t.question(i)) for t in tests for i in range(len(t))])
    rows = [row for subset in ARC_SUBSETS for row in arc_rows(subset, "validation")]
    return MultipleChoiceTask([row for row in rows if not index.find("\n".join([row[0], *row[1]]))], **slice_args)
