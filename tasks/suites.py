"""The task lists the project evaluates and trains on, each in one place.

- chat_eval_tasks(): the chat benchmarks scripts/chat_eval.py runs (ChatCORE's six first, then
  the others; ChatCORE averages its six only, nanochat/chat_eval.py).
- chat_eval_selection(names): the chat benchmarks named on a command line, checked.
- training_tasks(): every task the project trains on. tests/test_contamination.py checks each
  of them against every eval item (tasks/contamination.py), so a training task added here is
  covered by that test without touching it.
- eval_questions(): the text of every eval item (the chat eval tasks and the offline CORE
  items), for the contamination index (tasks/contamination.py).
- sft_parts() / sft_val_tasks(): the chat fine-tuning mixture's parts (scripts/chat_sft.py mixes
  them with TaskMixture) and held-out conversations of the same kinds for the validation loss.
The first two map a name to a factory: building a task loads its data, and a training task whose data
is not built yet (the spoken shards) raises FileNotFoundError naming the command that builds it.
"""

from nanochat.core_eval import CORE_TASKS, load_core_items
from tasks.arc import ARC, arc_practice
from tasks.arithmetic import Arithmetic
from tasks.common import TaskMixture
from tasks.contamination import core_item_text
from tasks.dialogue import Chatterbot, Chitchat
from tasks.gsm8k import GSM8K
from tasks.hellaswag import HellaSwag
from tasks.humaneval import HumanEval
from tasks.identity import Identity
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
        "Arithmetic": lambda: Arithmetic("test", size=500),
        "Identity": lambda: Identity("test"),
    }


def chat_eval_selection(names, flag="--tasks"):
    """{name: () -> Task} of the comma-separated chat eval task `names`, in their order; an unknown
    name is a ValueError naming the `flag` it came from and the choices."""
    available = chat_eval_tasks()
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"{flag}: unknown tasks {unknown}; choose from {list(available)}")
    return {name: available[name] for name in chosen}


def training_tasks():
    """{name: () -> Task} of every task any training stage uses."""
    from tasks.spoken import SpokenContinuation, SpokenQuestions, SpokenTranscription
    return {
        "SpokenTranscription/train": lambda: SpokenTranscription(split="train"),
        "SpokenQuestions/train": lambda: SpokenQuestions(split="train"),
        "SpokenContinuation/train": lambda: SpokenContinuation(split="train"),
        "SpellingBee/train": lambda: SpellingBee("train", size=20000),
        "SimpleSpelling/train": lambda: SimpleSpelling("train", size=20000),
        # scripts/chat_sft.py's mixture (sft_train_tasks), at its largest sizes
        "Chitchat/train": lambda: Chitchat("train"),
        "Chatterbot": Chatterbot,
        "Arithmetic/train": lambda: Arithmetic("train", size=20000),
        "Arithmetic/train-hard": lambda: Arithmetic("train", size=20000, level="hard"),
        "ARC/validation": arc_practice,
        "Identity/train": lambda: Identity("train", size=5000),
    }


# Items per task in the SFT mixture (scripts/chat_sft.py's defaults). The probe in dev/LOG.md
# (2026-12-02): the d4 base learns calculator calls and counting from ~300 steps of ~30 short
# conversations, so arithmetic and counting get most items; chitchat, kept for conversational
# form, cost ~2 points of counting there.
# arithmetic_hard (reasoning-gym's defaults: up to 6 terms, parentheses, negation) is a minority so
# that RL (scripts/chat_rl.py --level hard) starts where pass@1 has room: after SFT on "mid" alone
# the d4 is at ~99% on mid and ~3% on hard, and RL learns nothing from groups that all agree.
SFT_SIZES = {"chitchat": 1500, "chatterbot": 2006, "arithmetic": 8000, "arithmetic_hard": 2000, "spelling": 8000,
             "arc": 867, "identity": 2000}


def sft_parts(sizes=None, chitchat_chars=1500, seed=0):
    """{part: Task} of the SFT mixture with {part: items} (default SFT_SIZES; 0 leaves a part out)."""
    sizes = SFT_SIZES if sizes is None else sizes
    parts = {
        "chitchat": lambda n: Chitchat("train", max_chars=chitchat_chars, stop=n),
        "chatterbot": lambda n: Chatterbot(stop=n),
        "arithmetic": lambda n: Arithmetic("train", size=n, seed=seed),
        "arithmetic_hard": lambda n: Arithmetic("train", size=n, seed=seed, level="hard"),
        "spelling": lambda n: SpellingBee("train", size=n, seed=seed),
        "arc": lambda n: arc_practice(stop=n),
        "identity": lambda n: Identity("train", size=n, seed=seed),
    }
    unknown = set(sizes) - set(parts)
    if unknown:
        raise ValueError(f"unknown SFT mixture parts {sorted(unknown)}; choose from {sorted(parts)}")
    return {name: parts[name](n) for name, n in sizes.items() if n > 0}


def sft_val_tasks(chitchat_chars=1500, size=200):
    """Held-out conversations of the SFT mixture's kinds, for the validation loss."""
    return TaskMixture([Chitchat("val", max_chars=chitchat_chars), Arithmetic("test", size=size),
                        SpellingBee("test", size=size), Identity("test")], seed=0)


def eval_questions(chat_tasks=None):
    """[(source, index, text)] of every eval item: the chat eval tasks' questions (all of
    chat_eval_tasks() unless given as {name: Task}) and the CORE items."""
    if chat_tasks is None:
        chat_tasks = {name: make() for name, make in chat_eval_tasks().items()}
    questions = [(name, i, task.question(i)) for name, task in chat_tasks.items() for i in range(len(task))]
    for spec in CORE_TASKS:
        if spec.loader is not None:
            questions += [(f"CORE/{spec.label}", i, core_item_text(item))
                          for i, item in enumerate(load_core_items(spec))]
    return questions
