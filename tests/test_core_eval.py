"""CORE scoring (nanochat/core_eval.py) against losses computed by hand with plain forwards."""

import math

import pytest
import torch

from nanochat.core_eval import (CORE_TASK_BY_LABEL, CORE_TASKS, centered_accuracy, evaluate_core, fewshot_indices,
                                item_correct, load_core_items, render_texts, score_sequences, tokenize_item)
from nanochat.gpt import GPTConfig
from tests.helpers import build_model


@pytest.fixture(scope="module")
def model(tokenizer):
    """A small perturbed GPT over the test tokenizer's vocabulary, windows shorter than its context."""
    return build_model(GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=4, n_head=4,
                                 n_kv_head=2, n_embd=64, window_pattern="SSL"))


def plain_scores(model, tokens, start):
    """Mean loss over tokens[start:] and whether each of them is the argmax: one full forward."""
    x = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(x[:, :-1])[0]
    targets = x[0, start:]
    predictions = logits[start - 1:]
    loss = torch.nn.functional.cross_entropy(predictions, targets).item()
    return loss, bool((predictions.argmax(-1) == targets).all())


def requests_for(task, tokenizer, n, max_len):
    items = load_core_items(task)
    out = []
    for i in range(n):
        shots = [items[j] for j in fewshot_indices(i, len(items), task.num_fewshot)]
        out.append(tokenize_item(tokenizer, render_texts(items[i], shots, task.kind, task.delimiter), max_len))
    return items, out


@pytest.mark.parametrize("label", ["arc_easy", "hellaswag_zeroshot", "winogrande", "lambada_openai", "squad"])
def test_batched_scores_equal_plain_forwards(model, tokenizer, label):
    """Every kind, with 10-shot contexts cropped to the model's length and several items per forward."""
    task = CORE_TASK_BY_LABEL[label]
    max_len = model.config.sequence_len
    items, requests = requests_for(task, tokenizer, 6, max_len)
    scored = score_sequences(model, requests, max_rows=5, progress=False)
    for request, item, item_scores in zip(requests, items, scored):
        assert len(item_scores) == len(request)
        expected = [plain_scores(model, tokens, start) for tokens, start in request]
        for (loss, greedy), (ref_loss, ref_greedy) in zip(item_scores, expected):
            assert loss == pytest.approx(ref_loss, abs=1e-4) and greedy == ref_greedy
        ref_losses = [loss for loss, _ in expected]
        if task.kind != "language_modeling":
            right = ref_losses.index(min(ref_losses)) == item["gold"]
            assert item_correct(task.kind, item_scores, item["gold"]) == right
        assert all(len(tokens) <= max_len for tokens, _ in request)


def test_scores_do_not_depend_on_the_batch(model, tokenizer):
    _, requests = requests_for(CORE_TASK_BY_LABEL["piqa"], tokenizer, 5, model.config.sequence_len)
    one_at_a_time = score_sequences(model, requests, max_rows=1, progress=False)
    batched = score_sequences(model, requests, max_rows=64, progress=False)
    for a, b in zip(one_at_a_time, batched):
        assert [x for x, _ in a] == pytest.approx([x for x, _ in b], abs=1e-5)


def test_rendering_puts_shots_first_and_scores_only_the_answer(tokenizer):
    shot = {"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}
    item = {"query": "Q: 2+2?", "choices": ["4", "five"], "gold": 0}
    texts = render_texts(item, [shot], "multiple_choice", "\nAnswer: ")
    prefix = "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: "
    assert texts == [(prefix, "4"), (prefix, "five")]
    (tokens, start), _ = tokenize_item(tokenizer, texts, 1000)
    assert tokens[0] == tokenizer.get_bos_token_id()
    assert tokenizer.decode(tokens[start:]) == " 4"  # the delimiter's space goes with the answer
    schema = {"context_options": ["The cat sat", "The dog sat"], "continuation": "on the mat.", "gold": 1}
    assert render_texts(schema, [], "schema", " ") == [("The cat sat ", "on the mat."), ("The dog sat ", "on the mat.")]
    (tokens, start), = tokenize_item(tokenizer, [("a b c d e f g h ", "end")], 5)
    assert len(tokens) == 5 and tokens[0] == tokenizer.get_bos_token_id() and tokenizer.decode(tokens[start:]) == " end"
    # Endings of very different lengths in a short context: each sequence keeps BOS and its answer.
    long_ending = " ".join(["word"] * 40)
    pairs = tokenize_item(tokenizer, [("a b c d e f g h ", "end"), ("a b c d e f g h ", long_ending)], 16)
    assert [len(t) for t, _ in pairs] == [len(tokenize_item(tokenizer, [("a b c d e f g h ", "end")], 1000)[0][0]), 16]
    assert tokenizer.decode(pairs[0][0][pairs[0][1]:]) == " end" and all(1 <= s < len(t) for t, s in pairs)
    short = build_model(GPTConfig(sequence_len=16, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1,
                                  n_kv_head=1, n_embd=32, window_pattern="L"))
    assert len(score_sequences(short, [pairs], progress=False)[0]) == 2  # the crash this cropping fixes


def test_fewshot_examples_are_fixed_and_never_the_item_itself():
    for i in range(50):
        shots = fewshot_indices(i, 60, 10)
        assert len(shots) == 10 == len(set(shots)) and i not in shots and shots == fewshot_indices(i, 60, 10)
    assert fewshot_indices(3, 100, 0) == []


def test_centered_accuracy_known_values():
    assert centered_accuracy(0.25, 0.25) == 0 and centered_accuracy(1.0, 0.25) == 1
    assert centered_accuracy(0.625, 0.25) == pytest.approx(0.5)
    assert centered_accuracy(0.47, 0.62) == pytest.approx(-0.39473684)  # BoolQ below its majority baseline
    assert centered_accuracy(0.1, 0.0) == pytest.approx(0.1)


def test_the_task_table_is_dclms():
    assert len(CORE_TASKS) == 22 and len(CORE_TASK_BY_LABEL) == 22
    assert {t.kind for t in CORE_TASKS} == {"multiple_choice", "schema", "language_modeling"}
    shots = {t.label: t.num_fewshot for t in CORE_TASKS}
    assert shots["hellaswag_zeroshot"] == 0 and shots["hellaswag"] == 10 and shots["agi_eval_lsat_ar"] == 3
    baselines = {t.label: t.random_baseline for t in CORE_TASKS}
    # chance with the number of choices, except BoolQ's majority answer; 0 for exact-match tasks
    assert baselines["commonsense_qa"] == 0.2 and baselines["copa"] == 0.5 and baselines["boolq"] == 0.62
    assert all(baselines[t.label] == 0 for t in CORE_TASKS if t.kind == "language_modeling")
    covered = [t.label for t in CORE_TASKS if t.loader is not None]
    assert len(covered) == 14 and "winograd" not in covered and not any(c.startswith("bigbench") for c in covered)


def test_evaluate_core_end_to_end(model, tokenizer):
    lines = []
    result = evaluate_core(model, tokenizer, ["copa", "winogrande", "lambada_openai"], max_per_task=8,
                           log=lines.append, progress=False)
    assert result["covered"] == ["copa", "lambada_openai", "winogrande"] and len(result["missing"]) == 8
    assert all(r["n"] == 8 for r in result["tasks"].values()) and len(lines) == 3
    assert result["core"] == pytest.approx(sum(r["centered"] for r in result["tasks"].values()) / 3)
    assert not math.isnan(result["core"])
    with pytest.raises(ValueError, match="unknown CORE tasks"):
        evaluate_core(model, tokenizer, ["mmlu"], max_per_task=1)
