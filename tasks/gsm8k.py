"""GSM8K (Cobbe et al. 2021): grade-school math word problems with a worked answer.

The reference answers mark each calculation as <<expression=result>>. In a conversation those
become calls of the calculator tool: the expression as a python part, the result as its output
(which the Engine computes and forces in at inference time), so a model learns to call the tool
and is scored with it. The final line is "#### <number>"; a reply is right when its "####"
number equals the reference.

    GSM8K()                # test split, 1,319 problems (no package ships the train split)
"""

import re

from nanochat.eval_data import gsm8k_rows
from nanochat.tokenizer import reply_parts
from tasks.common import Task, final_number

_CALCULATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def answer_parts(answer):
    """A GSM8K answer as assistant content parts: text, then python / python_output per calculation."""
    return reply_parts(answer, _CALCULATION)


class GSM8K(Task):
    def __init__(self, **slice_args):
        super().__init__(**slice_args)
        self.rows = gsm8k_rows()

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        question, answer = self.rows[index]
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer_parts(answer)}]}

    def evaluate(self, item, completion):
        """The reply's final "####" number equals the reference's (numerically: "18.0" is "18")."""
        reference = final_number("".join(p["text"] for p in item["messages"][-1]["content"]))
        got = final_number(completion)
        return got is not None and float(got) == float(reference)
