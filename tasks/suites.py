"""The task lists the project evaluates and trains on, each in one place.

- chat_eval_tasks(): the chat benchmarks scripts/chat_eval.py runs (ChatCORE's six first).
- training_tasks(): every task the project trains on. tests/test_contamination.py checks each
  of them against every eval item (tasks/contamination.py), so a training task added here is
  covered by that test without touching it.
Both map a name to a factory: building a task loads its data, and a training task whose data
is not built yet (the spoken shards) raises FileNotFoundError naming the command that builds it.
"""

from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.hellaswag import HellaSwag
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spelling import SimpleSpelling, SpellingBee


def chat_eval_tasks():
    """{name: () -> Task} of the chat benchmarks (test splits)."""
    return {
        "ARC-Easy": lambda: ARC("ARC-Easy"),
        "ARC-Challenge": lambda: ARC("ARC-Challenge"),
        "MMLU": MMLU,
        "GSM8K": GSM8K,
        "HumanEval": HumanEval,
        "SpellingBee": lambda: SpellingBee("test", size=1000),
        "SimpleSpelling": lambda: SimpleSpelling("test", size=1000),
        "HellaSwag": HellaSwag,
    }


def training_tasks():
    """{name: () -> Task} of every task any training stage uses."""
    from tasks.spoken import SpokenContinuation, SpokenQuestions, SpokenTranscription
    return {
        "SpokenTranscription/train": lambda: SpokenTranscription(split="train"),
        "SpokenQuestions/train": lambda: SpokenQuestions(split="train"),
        "SpokenContinuation/train": lambda: SpokenContinuation(split="train"),
        "SpellingBee/train": lambda: SpellingBee("train", size=20000),
        "SimpleSpelling/train": lambda: SimpleSpelling("train", size=20000),
    }
