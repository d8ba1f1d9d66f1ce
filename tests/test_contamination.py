"""No eval item occurs in any training task the project defines (tasks/suites.py training_tasks,
walked here, so a task added there is checked without touching this file), and the check finds
contamination when there is some."""

import pytest

from tasks.common import Task
from tasks.contamination import ContaminationIndex, find_contamination
from tasks.gsm8k import GSM8K
from tasks.spelling import SpellingBee
from tasks.suites import eval_questions, training_tasks


@pytest.fixture(scope="module")
def index():
    return ContaminationIndex(eval_questions())


class Texts(Task):
    """A training task made of given user messages."""

    def __init__(self, texts):
        super().__init__()
        self.texts = texts

    def num_examples(self):
        return len(self.texts)

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": self.texts[index]},
                             {"role": "assistant", "content": [{"type": "text", "text": "Sure."}]}]}


def test_the_check_finds_reworded_copies_of_eval_items(index):
    gsm8k, bee = GSM8K(stop=50), SpellingBee("test", size=3)
    long = next(i for i in range(len(gsm8k)) if len(gsm8k.question(i).split()) > 40)
    half = " ".join(gsm8k.question(long).split()[:20])
    training = Texts([
        "Homework help! " + gsm8k.question(0).upper().replace(",", " ;") + " Thanks!!",  # case, punctuation
        "Nothing to see here: a sentence about cats and dogs that no benchmark asks about, promise.",
        "Warm-up question. " + bee.question(2) + " And then another one.",  # a short question inside a longer text
        half,  # part of a long question still shares 13-word windows
    ])
    hits = find_contamination(training, index)
    assert ("GSM8K", 0, 0) in hits and ("SpellingBee", 2, 2) in hits and ("GSM8K", long, 3) in hits
    assert not [h for h in hits if h[2] == 1]


def test_core_items_are_covered_too(index):
    core = [q for q in index.questions if q[0] == "CORE/boolq"]
    assert len(core) == 3270
    assert ("CORE/boolq", 5, 0) in find_contamination(Texts([core[5][2]]), index)


@pytest.mark.parametrize("name", list(training_tasks()))
def test_no_eval_item_in_a_training_task(index, name):
    try:
        task = training_tasks()[name]()
    except FileNotFoundError as e:
        pytest.skip(f"{name}: its data is not built here ({e})")
    assert find_contamination(task, index) == []
