"""Evaluate a chat model on Tasks (tasks/common.py), batched, and combine the results into ChatCORE.

- categorical tasks (multiple choice): the prompt is the conversation up to <|assistant_start|>;
  the answer is the letter whose logit is highest at that position among the task's letters
  (the model is never asked to produce anything else). Prompts of different lengths share a
  right-padded forward, each read at its own last position.
- generative tasks: replies are sampled by the Engine, many prompts per batch, `num_samples`
  per prompt, and checked by the task (with the calculator tool live, and HumanEval's code run in
  the sandbox). pass@k uses the unbiased estimator of Chen et al. 2021 (HumanEval paper).
ChatCORE is the mean centered accuracy, (acc - chance) / (1 - chance), over the tasks run (chance
is the mean 1/choices of a multiple-choice task, 0 for open answers); upstream's six are
ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and SpellingBee.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

from nanochat.core_eval import select_items

CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")


def pass_at_k(n, c, k):
    """Probability that at least one of k of n samples is right when c of the n are (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def letter_ids(tokenizer, letters):
    """The token id of each answer letter; each must be a single token."""
    ids = [tokenizer.encode(letter) for letter in letters]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"answer letters {letters} are not single tokens in this tokenizer")
    return [i[0] for i in ids]


@torch.no_grad()
def fit_prompt(prompt, sequence_len):
    """A categorical prompt that fits the model's context: BOS and its last sequence_len - 1 tokens
    (the question's end and the answer cue are what the letter is read after)."""
    return prompt if len(prompt) <= sequence_len else prompt[:1] + prompt[len(prompt) - sequence_len + 1:]


def categorical_answers(model, tokenizer, items, max_batch_tokens=4096, progress=True, desc="categorical"):
    """The letter each item's prompt ranks highest among item["letters"], batched by length; a
    prompt longer than the model's context is cut from the left (fit_prompt)."""
    device = model.get_device()
    prompts = [fit_prompt(tokenizer.render_for_completion(item), model.config.sequence_len) for item in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    answers = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress, leave=False)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(prompts[order[end]]) <= max_batch_tokens:
            end += 1
        batch = order[start:end]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :len(prompts[i])] = torch.tensor(prompts[i])
        last = torch.tensor([len(prompts[i]) - 1 for i in batch])
        logits = model(ids.to(device))[torch.arange(len(batch)), last.to(device)]
        for row, i in enumerate(batch):
            letters = items[i]["letters"]
            scores = logits[row, letter_ids(tokenizer, letters)]
            answers[i] = letters[int(scores.argmax())]
        bar.update(len(batch))
        start = end
    bar.close()
    return answers


def _check_all(task, items, completions, workers):
    """task.evaluate over (item, completion) pairs, in threads: HumanEval's checks are subprocesses."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: bool(task.evaluate(*pair)), zip(items, completions)))


def generative_outcomes(engine, tokenizer, task, items, num_samples=1, max_new_tokens=512, temperature=0.0,
                        top_k=None, batch_size=16, seed=42, progress=True, desc="generative"):
    """Per item, whether each of its num_samples sampled replies is right. A prompt that leaves no
    room in the model's context for a reply is not generated from and counts as wrong; a batch
    generates at most as many tokens as its longest prompt leaves room for."""
    if num_samples > 1 and temperature == 0:
        raise ValueError("num_samples > 1 needs temperature > 0: greedy samples are all the same reply")
    workers = os.cpu_count() or 1
    context = engine.model.config.sequence_len
    outcomes = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        rendered = [tokenizer.render_for_completion(item) for item in items[start:start + batch_size]]
        fits = [len(p) < context for p in rendered]
        batch = [item for item, fit in zip(items[start:start + batch_size], fits) if fit]
        prompts = [p for p, fit in zip(rendered, fits) if fit]
        if not batch:
            outcomes += [[False] * num_samples for _ in fits]
            continue
        budget = min(max_new_tokens, context - max(len(p) for p in prompts))
        sequences, _ = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=budget,
                                             temperature=temperature, top_k=top_k, seed=seed + start)
        replies = [tokenizer.decode(seq[len(prompts[r // num_samples]):]) for r, seq in enumerate(sequences)]
        paired = [item for item in batch for _ in range(num_samples)]
        checked = _check_all(task, paired, replies, workers)
        generated = iter(checked[i:i + num_samples] for i in range(0, len(checked), num_samples))
        outcomes += [next(generated) if fit else [False] * num_samples for fit in fits]
    return outcomes


def random_baseline(items):
    """Accuracy of guessing: the mean 1/choices of multiple-choice items, 0 for open answers."""
    return sum(1 / len(item["letters"]) if "letters" in item else 0.0 for item in items) / len(items)


def evaluate_chat_task(model, engine, tokenizer, task, max_problems=-1, num_samples=1, progress=True,
                       desc="task", **generate_args):
    """Accuracy (pass@1), pass@num_samples, chance and centered accuracy of one task on all its
    items, or on a fixed random max_problems of them (MMLU is ordered by subject: its first items
    would all be abstract algebra)."""
    indices = sorted(select_items(range(len(task)), max_problems))
    items = [task[i] for i in indices]
    n = len(items)
    if task.eval_type == "categorical":
        answers = categorical_answers(model, tokenizer, items, progress=progress, desc=desc)
        outcomes = [[bool(task.evaluate(item, answer))] for item, answer in zip(items, answers)]
    else:
        outcomes = generative_outcomes(engine, tokenizer, task, items, num_samples=num_samples, progress=progress,
                                       desc=desc, **generate_args)
    k = len(outcomes[0])
    accuracy = sum(pass_at_k(k, sum(o), 1) for o in outcomes) / n
    baseline = random_baseline(items)
    return {"n": n, "eval_type": task.eval_type, "accuracy": accuracy,
            f"pass@{k}": sum(pass_at_k(k, sum(o), k) for o in outcomes) / n,
            "baseline": baseline, "centered": (accuracy - baseline) / (1 - baseline)}


def chatcore(results):
    """(ChatCORE, tasks it averages): the mean centered accuracy over the CHATCORE_TASKS in results."""
    names = [name for name in CHATCORE_TASKS if name in results]
    if not names:
        return float("nan"), names
    return sum(results[name]["centered"] for name in names) / len(names), names
