"""Chat evaluation (nanochat/chat_eval.py, scripts/chat_eval.py) on a tiny model and the real tasks."""

import dataclasses
import json
import math
import os

import pytest
import torch

from nanochat.chat_eval import (categorical_answers, chatcore, evaluate_chat_task, generative_outcomes, letter_ids,
                                pass_at_k, random_baseline)
from nanochat.checkpoint import save_checkpoint
from nanochat.core_eval import select_items
from nanochat.engine import Engine
from nanochat.eval_data import eval_data_dir
from nanochat.gpt import GPTConfig
from nanochat.report import collect
from tasks.arc import ARC
from tasks.spelling import SpellingBee
from tests.helpers import build_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                                 n_kv_head=1, n_embd=64, window_pattern="L"))


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2) and pass_at_k(5, 2, 2) == pytest.approx(0.7)


def test_categorical_answers_equal_one_prompt_at_a_time(model, tokenizer):
    task = ARC("ARC-Easy", stop=12)
    items = list(task)
    answers = categorical_answers(model, tokenizer, items, max_batch_tokens=600, progress=False)  # several batches
    for item, answer in zip(items, answers):
        prompt = torch.tensor([tokenizer.render_for_completion(item)])
        with torch.no_grad():
            last = model(prompt)[0, -1]
        scores = last[letter_ids(tokenizer, item["letters"])]
        assert answer == item["letters"][int(scores.argmax())]


def test_generative_outcomes_equal_one_prompt_at_a_time(model, tokenizer):
    task = SpellingBee("test", size=6)
    items = list(task)
    engine = Engine(model, tokenizer)
    outcomes = generative_outcomes(engine, tokenizer, task, items, max_new_tokens=12, batch_size=4, progress=False)
    for item, outcome in zip(items, outcomes):
        prompt = tokenizer.render_for_completion(item)
        (sequence,), _ = engine.generate_batch(prompt, max_tokens=12, temperature=0)
        assert outcome == [task.evaluate(item, tokenizer.decode(sequence[len(prompt):]))]
    sampled = generative_outcomes(engine, tokenizer, task, items[:2], num_samples=3, max_new_tokens=4,
                                  temperature=1.0, progress=False)
    assert [len(o) for o in sampled] == [3, 3]
    with pytest.raises(ValueError, match="temperature"):
        generative_outcomes(engine, tokenizer, task, items, num_samples=2, temperature=0.0)


def test_prompts_longer_than_the_context(model, tokenizer):
    """Categorical prompts are cut from the left to the context; a generative prompt that leaves no
    room for a reply counts as wrong without being generated from, and the others are unaffected."""
    items = list(ARC("ARC-Easy", stop=6))
    lengths = sorted(len(tokenizer.render_for_completion(item)) for item in items)
    short = build_model(dataclasses.replace(model.config, sequence_len=lengths[2]))
    answers = categorical_answers(short, tokenizer, items, progress=False)
    for item, answer in zip(items, answers):
        prompt = tokenizer.render_for_completion(item)
        kept = prompt[:1] + prompt[max(1, len(prompt) - lengths[2] + 1):]
        with torch.no_grad():
            scores = short(torch.tensor([kept]))[0, -1][letter_ids(tokenizer, item["letters"])]
        assert len(kept) <= lengths[2] and answer == item["letters"][int(scores.argmax())]
    task = SpellingBee("test", size=8)
    spelled = list(task)
    longest = max(len(tokenizer.render_for_completion(item)) for item in spelled)
    engine = Engine(build_model(dataclasses.replace(model.config, sequence_len=longest)), tokenizer)
    outcomes = generative_outcomes(engine, tokenizer, task, spelled, max_new_tokens=4, batch_size=3, progress=False)
    assert len(outcomes) == len(spelled)
    for item, outcome in zip(spelled, outcomes):
        prompt = tokenizer.render_for_completion(item)
        if len(prompt) == longest:  # no room for a reply: wrong, whatever the answer
            assert outcome == [False]


def test_task_results_and_chatcore(model, tokenizer):
    engine = Engine(model, tokenizer)
    task = ARC("ARC-Challenge")
    arc = evaluate_chat_task(model, engine, tokenizer, task, max_problems=10, progress=False)
    assert arc["n"] == 10 and arc["eval_type"] == "categorical" and 0 <= arc["accuracy"] <= 1
    subset = select_items(range(len(task)), 10)
    assert len(set(subset)) == 10 and max(subset) >= 10  # a spread-out subset, not the first ten
    assert arc["baseline"] == pytest.approx(random_baseline([task[i] for i in subset]))
    assert arc["centered"] == pytest.approx((arc["accuracy"] - arc["baseline"]) / (1 - arc["baseline"]))
    assert random_baseline([{"letters": "AB"}, {"letters": "ABCD"}, {"messages": []}]) == pytest.approx(0.25)
    results = {"ARC-Easy": {"centered": 0.2}, "GSM8K": {"centered": 0.1}, "HellaSwag": {"centered": 0.9}}
    score, averaged = chatcore(results)
    assert averaged == ["ARC-Easy", "GSM8K"] and score == pytest.approx(0.15)  # HellaSwag is not one of the six


def test_chat_eval_script_end_to_end(model, tokenizer, tmp_path, monkeypatch, capsys):
    eval_data = eval_data_dir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    os.symlink(eval_data, tmp_path / "eval_data")  # the installed sets, not a second download
    tokenizer.save(str(tmp_path / "tokenizer"))
    meta = {"step": 5, "model_config": dataclasses.asdict(model.config)}
    save_checkpoint(str(tmp_path / "base_checkpoints" / "tiny"), 5, {"gpt": model.state_dict()}, None, meta)
    from scripts.chat_eval import main
    summary = first = main(["--source", "base", "-a", "ARC-Easy,SpellingBee,HumanEval", "--max-problems", "3",
                            "--max-new-tokens", "8", "--device-type", "cpu"])
    assert set(summary["tasks"]) == {"ARC-Easy", "SpellingBee", "HumanEval"} and summary["step"] == 5
    assert summary["chatcore_tasks"] == ["ARC-Easy", "HumanEval", "SpellingBee"]
    last_line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last_line["chatcore"] == pytest.approx(summary["chatcore"])
    report = (tmp_path / "report" / "chat_eval_base.md").read_text()
    assert "| ARC-Easy | categorical | 3 |" in report and "ChatCORE" in report
    with pytest.raises(ValueError, match=r"--tasks: unknown tasks \['NoSuchTask'\]"):
        main(["--source", "base", "-a", "NoSuchTask"])
    # An audio checkpoint (GPT + projector weights, encoder in the meta) is evaluated on its GPT.
    audio_state = {"gpt": model.state_dict(), "projector": {"w": torch.zeros(2)}}
    save_checkpoint(str(tmp_path / "audio_checkpoints" / "s2"), 7, audio_state, None,
                    {**meta, "step": 7, "encoder": {"model_id": "whisper"}})
    summary = main(["--source", "audio", "-a", "ARC-Easy", "--max-problems", "2", "--device-type", "cpu"])
    assert summary["step"] == 7 and summary["tasks"]["ARC-Easy"]["n"] == 2
    assert (tmp_path / "report" / "chat_eval_audio.md").exists()
    # The report card gets each task's accuracy; a ChatCORE only from all six of its tasks.
    stages = collect()
    assert stages["base"]["evals"] == {name: r["accuracy"] for name, r in first["tasks"].items()}
    assert stages["audio"]["evals"] == {"ARC-Easy": summary["tasks"]["ARC-Easy"]["accuracy"]}
    assert "chatcore" not in stages["base"]["metrics"] and "chatcore" not in stages["audio"]["metrics"]
