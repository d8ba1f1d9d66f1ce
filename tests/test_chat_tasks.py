"""The SFT training tasks on their real installed data: valid conversations, known right and wrong
replies scored as such, held-out splits that never meet their training splits."""

from decimal import Decimal

import pytest

from nanochat.chat_data import row_steps
from nanochat.engine import use_calculator
from nanochat.speech_eval import normalize_text
from tasks.arithmetic import Arithmetic, question_split
from tasks.dialogue import PERSONA_FILES, Chatterbot, Chitchat, exchange_windows
from tasks.identity import CORE, KEY_FACTS, NAME, TOPICS, Identity
from tasks.suites import sft_parts


def assert_renders(tokenizer, task, n=50):
    """The first n items render as alternating conversations with trained assistant tokens."""
    for i in range(min(n, len(task))):
        ids, mask = tokenizer.render_conversation(task[i], max_tokens=100_000)
        assert sum(mask) > 0 and len(ids) == len(mask)


@pytest.mark.parametrize("level", ["easy", "mid", "hard"])
def test_arithmetic_replies_call_the_calculator_and_are_graded_on_the_answer(tokenizer, level):
    task = Arithmetic("train", size=200, seed=3, level=level)
    assert len(task) == 200
    assert_renders(tokenizer, task)
    for item in task:
        question, (call, output, final) = item["messages"][0]["content"], item["messages"][1]["content"]
        assert call["type"] == "python" and output["type"] == "python_output"
        assert question == f"Calculate {call['text']}."
        assert use_calculator(call["text"]) == output["text"]
        reference = final["text"]
        assert task.evaluate(item, "<|python_start|>...<|python_end|>" + reference)
        assert task.reward(item, reference) == 1.0
        wrong = str(Decimal(output["text"]) + 1)
        assert not task.evaluate(item, f"#### {wrong}") and task.reward(item, f"#### {wrong}") == 0.0
        assert not task.evaluate(item, output["text"])  # the tool's output alone is no answer


def test_arithmetic_test_questions_are_never_trained_on():
    train, test = Arithmetic("train", size=5000, seed=0), Arithmetic("test", size=300, seed=0)
    other_seed = Arithmetic("train", size=5000, seed=7)
    test_questions = [item["messages"][0]["content"] for item in test]
    assert len(set(test_questions)) == 300  # distinct
    train_words = {normalize_text(item["messages"][0]["content"])
                   for task in (train, other_seed) for item in task}
    assert all(question_split(q) == "test" for q in test_questions)
    # No test question is a training question, nor the start of one (which the contamination
    # check would flag: "calculate 5 3" inside "calculate 5 3 6").
    for q in map(normalize_text, test_questions):
        assert not any(t == q or t.startswith(q + " ") for t in train_words)
    # Deterministic: the same arguments, the same items.
    assert [i["messages"] for i in Arithmetic("test", size=300, seed=0)] == [i["messages"] for i in test]


def test_arithmetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        Arithmetic("val")
    with pytest.raises(ValueError, match="level"):
        Arithmetic(level="extreme")
    with pytest.raises(ValueError, match="distinct test questions"):
        Arithmetic("test", size=5000, level="easy")  # the easy space holds ~1,200 test questions


def test_identity_train_and_test_wordings_are_disjoint():
    train_questions = {normalize_text(item["messages"][0]["content"]) for item in Identity("train", size=3000)}
    test = Identity("test")
    assert len(test) == 3 * sum(len(t) for _, t, _ in TOPICS.values())
    for topic, (train_wordings, test_wordings, _) in TOPICS.items():
        assert not {normalize_text(w) for w in train_wordings} & {normalize_text(w) for w in test_wordings}, topic
    for item in test:
        asked = normalize_text(item["messages"][0]["content"])
        assert not any(asked in q for q in train_questions), asked
    assert {item["topic"] for item in test} == set(TOPICS)


def test_identity_grades_the_key_facts(tokenizer):
    test = Identity("test")
    assert_renders(tokenizer, Identity("train", size=100))
    for item in test:
        for lead in TOPICS[item["topic"]][2]:  # every written lead states its topic's facts
            assert test.evaluate(item, lead), (item["topic"], lead)
        for core in CORE:  # and so does every self-description that ends an answer
            assert test.evaluate(item, core), (item["topic"], core)
        assert not test.evaluate(item, "I am ChatGPT, a large model made by OpenAI. No.")
        assert not test.evaluate(item, "")
    by_topic = {item["topic"]: item for item in test}
    assert not test.evaluate(by_topic["audio"], f"My name is {NAME}.")  # right about the name, silent on hearing
    assert not test.evaluate(by_topic["maker"], f"I'm {NAME}, a small model that listens to speech.")
    assert not test.evaluate(by_topic["name"], "I can listen to audio.")
    assert set(KEY_FACTS) == set(TOPICS)


def test_exchange_windows_keep_whole_turns_and_lose_none():
    turns = ["a" * 10, "b" * 10, "c" * 30, "d" * 30, "e" * 5, "f" * 5, "g" * 200, "h", "unanswered"]
    windows = exchange_windows(turns, max_chars=70)
    assert [pair for window in windows for pair in window] == [turns[i:i + 2] for i in range(0, 8, 2)]
    assert windows == [[turns[0:2]], [turns[2:4], turns[4:6]], [turns[6:8]]]  # the long pair alone
    assert exchange_windows(["just one"], 70) == [] and exchange_windows([], 70) == []


def test_chitchat_windows_fit_and_splits_are_disjoint(tokenizer):
    train, val = Chitchat("train", max_chars=600), Chitchat("val", max_chars=600)
    assert len(train) > 10_000 and 50 < len(val) < len(train) // 20
    assert_renders(tokenizer, train)
    assert_renders(tokenizer, val)
    texts = lambda task: {"\n".join(m["content"] for m in item["messages"]) for item in task}  # noqa: E731
    assert not texts(train) & texts(val)
    for item in train:
        chars = sum(len(m["content"]) for m in item["messages"])
        assert chars <= 600 or len(item["messages"]) == 2
        assert [m["role"] for m in item["messages"]] == ["user", "assistant"] * (len(item["messages"]) // 2)
    with pytest.raises(ValueError, match="split"):
        Chitchat("test")


def test_chatterbot_dialogs_without_the_persona(tokenizer):
    task = Chatterbot()
    assert 1900 < len(task) < 2026  # 2,026 English dialogs, minus botprofile.yml's
    assert_renders(tokenizer, task, n=len(task))
    assert PERSONA_FILES == ("botprofile.yml",)
    assert not any("galaxy far, far away" in m["content"] for item in task for m in item["messages"])
    assert any(item["messages"][0]["content"] == "Good morning, how are you?" for item in task)


def test_sft_parts_sizes_and_unknown_parts():
    parts = sft_parts({"arithmetic": 30, "identity": 20, "chatterbot": 10, "spelling": 0})
    assert {name: len(task) for name, task in parts.items()} == {"arithmetic": 30, "identity": 20, "chatterbot": 10}
    with pytest.raises(ValueError, match="unknown SFT mixture parts"):
        sft_parts({"poetry": 10})


def test_row_steps_counts_fitted_tokens(tokenizer):
    conversations = list(Identity("train", size=40))
    lengths = [len(tokenizer.render_conversation(c, max_tokens=10_000)[0]) for c in conversations]
    capacity = max(lengths)  # everything fits whole
    assert row_steps(conversations, tokenizer, capacity, 2) == max(1, round(sum(lengths) / (2 * capacity)))
    assert row_steps(conversations[:1], tokenizer, capacity, 100) == 1
