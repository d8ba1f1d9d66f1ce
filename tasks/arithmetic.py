"""Generated arithmetic answered through the calculator tool: unlimited, verifiable math for SFT,
RL rewards and evaluation.

Questions come from reasoning-gym's `basic_arithmetic` generator ("Calculate 867 + 821."). The
reply calls the calculator with the expression, the tool's output follows (the Engine computes
it and forces it in at inference time), and the reply ends "#### <answer>" (GSM8K's convention):

    user:       Calculate 867 + 821.
    assistant:  <|python_start|>867 + 821<|python_end|><|output_start|>1688<|output_end|>\n\n#### 1688

A reply is right when its last "####" number equals the answer, so `evaluate` and `reward` (1.0 or
0.0) score the answer however it was reached. The RL stage imports this module for its rewards:

    from tasks.arithmetic import Arithmetic
    train, test = Arithmetic("train", size=20000), Arithmetic("test", size=500)
    item = test[0]; reward = test.reward(item, completion)   # completion: the decoded reply text

Splits: a question belongs to the test split when a hash of its first three normalised words (the
word "calculate" and the first two numbers) falls in a tenth of the hash space, so no test question
is ever generated for training, whatever the sizes and seeds, and no training question extends a
test one (the contamination check, tasks/contamination.py, finds a short question inside a longer
text). Both splits draw from the same reasoning-gym stream (seed `seed`): the training items are
its items outside the test hash (repeats kept: they are samples of the distribution), the test
items the distinct ones inside it.

Levels (reasoning-gym's options): "easy" two 1-2 digit terms of + - *; "mid" 2-3 terms of 1-3
digits; "hard" its defaults, 2-6 terms of 1-4 digits, all four operators, parentheses and
negation. The probe in dev/LOG.md (2026-12-02): the d4 base reaches 99% on "mid" after 300 SFT
steps, "hard" needs ~1200, and no level generalises to a harder one it never saw.

reasoning-gym's `gsm_symbolic` is not used: its templates were made from GSM8K *test* questions
(Mirzadeh et al. 2024, "GSM-Symbolic"), which chat_eval scores.
"""

import zlib
from decimal import Decimal

from nanochat.engine import CalculatorError, use_calculator
from nanochat.speech_eval import normalize_text
from tasks.common import Task, final_number

LEVELS = {
    "easy": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=("+", "-", "*"),
                 allow_parentheses=False, allow_negation=False),
    "mid": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=3, operators=("+", "-", "*"),
                allow_parentheses=False, allow_negation=False),
    "hard": {},
}
SPLITS = ("train", "test")
TEST_BUCKETS = 10  # one hash bucket in ten is the test split
KEY_WORDS = 3  # "calculate" and the first two numbers decide a question's split


def question_split(question):
    """"test" or "train": the split a question belongs to (a hash of its first KEY_WORDS words)."""
    key = " ".join(normalize_text(question).split()[:KEY_WORDS])
    return "test" if zlib.crc32(key.encode()) % TEST_BUCKETS == 0 else "train"


class Arithmetic(Task):
    """`size` items of one split and level, generated deterministically from `seed`."""

    def __init__(self, split="train", size=1000, seed=0, level="mid", **slice_args):
        super().__init__(**slice_args)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {list(LEVELS)}, got {level!r}")
        import reasoning_gym  # in pyproject's dependencies
        self.split, self.size, self.seed, self.level = split, size, seed, level
        stream = reasoning_gym.create_dataset("basic_arithmetic", size=2 ** 62, seed=seed, **LEVELS[level])
        self.rows, seen = [], set()
        # The easy level has ~12,000 distinct questions: a test split of it holds at most a tenth.
        for index in range(200 * size + 100_000):
            if len(self.rows) == size:
                break
            row = stream[index]
            question, expression = row["question"], row["metadata"]["expression"]
            if question_split(question) != split or (split == "test" and question in seen):
                continue
            try:
                result = use_calculator(expression)
            except CalculatorError:  # e.g. a division by zero
                continue
            if Decimal(result) != Decimal(row["answer"]):  # a division the tool rounds differently: skip it
                continue
            seen.add(question)
            self.rows.append((question, expression, result, row["answer"]))
        if len(self.rows) < size:
            raise ValueError(f"Arithmetic level {level!r} has only {len(self.rows)} distinct {split} questions; "
                             f"ask for at most that many or use a harder level")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        question, expression, result, answer = self.rows[index]
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": calculator_reply(expression, result, answer)}]}

    def evaluate(self, item, completion):
        return answer_matches(item["messages"][-1]["content"], completion)


def calculator_reply(expression, result, answer):
    """The assistant's content parts for a question answered through the calculator: the call, the
    tool's output (`result`, as engine.use_calculator prints it) and "#### answer"."""
    return [{"type": "python", "text": expression}, {"type": "python_output", "text": result},
            {"type": "text", "text": f"\n\n#### {answer}"}]


def answer_matches(reply, completion):
    """Whether the completion's last "####" number equals that of a calculator_reply exactly ("18.0"
    is "18"; compared as decimals: products of 4-digit terms exceed what a float holds exactly)."""
    got, expected = final_number(completion), final_number(reply[-1]["text"])
    return got is not None and Decimal(got) == Decimal(expected)
