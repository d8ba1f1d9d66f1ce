"""HellaSwag (Zellers et al. 2019): pick the sensible ending of a short scene, as a categorical
task (the chat form; base models are scored on it by likelihood in CORE).

    HellaSwag()            # validation split, 10,042 items
"""

from nanochat.eval_data import hellaswag_rows
from tasks.common import MultipleChoiceTask


class HellaSwag(MultipleChoiceTask):
    def __init__(self, split="validation", **slice_args):
        rows = [(f"Which ending continues this best?\n\n{context} ...", endings, answer)
                for context, endings, answer in hellaswag_rows(split)]
        super().__init__(rows, **slice_args)
