"""The Task API (tasks/common.py) and the chat tasks on the real installed data."""

import collections
from fractions import Fraction

import pytest

from nanochat.engine import use_calculator
from nanochat.sentences import text_split
from tasks.common import LETTERS, MultipleChoiceTask, Task, TaskMixture, TaskSequence, final_number, render_mc
from tasks.gsm8k import GSM8K, answer_parts
from tasks.humaneval import HumanEval, extract_code
from tasks.spelling import SimpleSpelling, SpellingBee


class Numbers(Task):
    """Item i says i."""

    def __init__(self, n, **slice_args):
        super().__init__(**slice_args)
        self.n = n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": str(index)}, {"role": "assistant", "content": "ok"}]}

    def evaluate(self, item, completion):
        return completion == item["messages"][0]["content"]


def values(task):
    return [int(item["messages"][0]["content"]) for item in task]


def test_slicing_follows_python_ranges():
    assert values(Numbers(10)) == list(range(10))
    assert values(Numbers(10, start=2, stop=8, step=3)) == [2, 5]
    assert values(Numbers(10, stop=100)) == list(range(10))
    assert len(Numbers(10, start=3)) == 7 and Numbers(10, start=3)[0]["messages"][0]["content"] == "3"
    with pytest.raises(ValueError, match="bad slice"):
        Numbers(10, start=5, stop=2)


def test_reward_defaults_to_the_evaluation():
    task = Numbers(3)
    assert task.reward(task[1], "1") == 1.0 and task.reward(task[1], "2") == 0.0


def test_sequence_plays_tasks_in_order_and_locates_items():
    seq = TaskSequence([Numbers(2), Numbers(13, start=10)])
    assert len(seq) == 5 and values(seq) == [0, 1, 10, 11, 12]
    task, j = seq.locate(3)
    assert task is seq.tasks[1] and j == 1


def test_mixture_is_a_seeded_shuffle_with_weights_by_repetition():
    a, b = Numbers(4), Numbers(102, start=100)
    mix = TaskMixture([a, a, b], seed=7)
    assert len(mix) == 10
    assert sorted(values(mix)) == sorted([0, 1, 2, 3] * 2 + [100, 101])
    assert values(mix) == values(TaskMixture([a, a, b], seed=7))
    assert values(mix) != values(TaskMixture([a, a, b], seed=8))
    assert collections.Counter(values(mix))[100] == 1


def test_render_mc():
    text, letters = render_mc("What is 2 + 2?", ["3", "4", " 5 "])
    assert letters == ["A", "B", "C"]
    assert text == "What is 2 + 2?\n\nA. 3\nB. 4\nC. 5\n\nAnswer with the letter of the correct choice (A, B, C)."
    assert render_mc("q", ["x"] * 26)[1] == list(LETTERS)
    with pytest.raises(ValueError, match="2 to 26 choices"):
        render_mc("q", ["only one"])


def test_multiple_choice_task_items_and_scoring(tokenizer):
    task = MultipleChoiceTask([("Sky colour?", ["red", "blue"], 1), ("Grass?", ["green", "pink", "grey"], 0)])
    item = task[0]
    assert item["letters"] == ["A", "B"] and item["messages"][1]["content"] == "B"
    assert task.evaluate(item, "B") and task.evaluate(item, " B. blue") and not task.evaluate(item, "A")
    assert not task.evaluate(item, "") and task.eval_type == "categorical"
    assert task.question(1) == "Grass?\ngreen\npink\ngrey"
    prompt = tokenizer.render_for_completion(item)
    assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>")


def test_final_number():
    assert final_number("so 3 + 4 = 7\n#### 7") == "7"
    assert final_number("#### 1,234.5") == "1234.5" and final_number("#### -3") == "-3"
    assert final_number("#### 1\n#### 2") == "2" and final_number("no answer") is None


def test_gsm8k_answers_become_calculator_calls(tokenizer):
    parts = answer_parts("She has 16 - 3 = <<16-3=13>>13 eggs.\n#### 13")
    assert parts == [{"type": "text", "text": "She has 16 - 3 = "}, {"type": "python", "text": "16-3"},
                     {"type": "python_output", "text": "13"}, {"type": "text", "text": "13 eggs.\n#### 13"}]
    task = GSM8K()
    assert len(task) == 1319
    for i in range(len(task)):  # each of the 4,282 calculations is one our calculator does, to the shown result
        for part in task[i]["messages"][1]["content"]:
            if part["type"] == "python":
                shown = Fraction(next_output(task[i], part))  # one reference writes its result as "3/4"
                assert float(use_calculator(part["text"])) == pytest.approx(float(shown))
    item = task[0]
    assert task.evaluate(item, "... so she makes 18 dollars.\n#### 18")
    assert task.evaluate(item, "#### 18.0") and not task.evaluate(item, "#### 17") and not task.evaluate(item, "18")
    ids, mask = tokenizer.render_conversation(item)
    assert tokenizer.encode_special("<|python_start|>") in ids


def next_output(item, python_part):
    parts = item["messages"][1]["content"]
    return parts[parts.index(python_part) + 1]["text"]


def test_spelling_tasks_split_their_words_and_grade_replies():
    test, train = SpellingBee("test", size=300), SpellingBee("train", size=300)
    assert {text_split(w) for w in test.words} == {"test"} and not set(test.words) & set(train.words)
    assert [test[i] for i in range(3)] == [SpellingBee("test", size=300)[i] for i in range(3)]  # deterministic
    for i in range(50):
        item = test[i]
        parts = item["messages"][1]["content"]
        python = next(p for p in parts if p["type"] == "python")
        output = next(p for p in parts if p["type"] == "python_output")
        assert use_calculator(python["text"]) == output["text"]  # the Engine's tool computes the shown count
        assert test.evaluate(item, f"#### {output['text']}")
        assert not test.evaluate(item, f"#### {int(output['text']) + 1}")
    spell = SimpleSpelling("test", size=10)
    item = spell[0]
    word = item["messages"][1]["content"].replace(",", "")
    assert item["messages"][0]["content"] == f"Spell the word: {word}"
    assert spell.evaluate(item, " - ".join(word)) and not spell.evaluate(item, word[::-1] + "x")


def test_humaneval_canonical_solutions_pass_in_the_sandbox_and_wrong_ones_fail():
    task = HumanEval()
    assert len(task) == 164
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        passed = list(pool.map(lambda i: task.evaluate(task[i], task[i]["messages"][1]["content"]), range(len(task))))
    assert all(passed)
    item = task[0]
    assert not task.evaluate(item, "")
    assert not task.evaluate(item, item["messages"][0]["content"] + "    return None\n")
    body = item["messages"][1]["content"][len(item["messages"][0]["content"]):]
    assert task.evaluate(item, body)  # a reply that only continues the prompt
    fenced = "Here you go:\n```python\n" + item["messages"][1]["content"] + "```\nDone."
    assert extract_code(fenced) == item["messages"][1]["content"] and task.evaluate(item, fenced)
