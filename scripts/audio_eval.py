"""Evaluate an audio checkpoint on voices it never heard (the test split by default).

    python -m scripts.audio_eval --tag s2
    python -m scripts.audio_eval --tag s2 --max-items 100    # a quicker look

- transcription: word error rate (normalised text, jiwer), pooled over words, overall and per voice,
  on the clean clips and on the same clips made noisy and reverberant (nanochat.augment's
  EVAL_CONDITIONS: fixed settings, the noise and room drawn per clip, so runs compare on the same audio);
- spoken questions: exact-match accuracy next to the SAME questions typed as text (the modality gap:
  typed minus spoken), overall and per question kind;
- continuation: WER of the continued sentence against the real rest of it (a fluency signal only:
  many continuations are right without matching).
Replies are greedy. The table is printed and written to base_dir/report/audio_eval.md (other
splits: audio_eval_<split>.md); the last line printed is one JSON object with every number.
"""

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

from nanochat import report
from nanochat.augment import EVAL_CONDITIONS, eval_variant, scored_conditions
from nanochat.common import atomic_write, compute_init, get_base_dir, run_cli, setup_logging
from nanochat.engine import Engine
from nanochat.feature_cache import FeatureCache, audio_hash, encode_with_cache
from nanochat.speech_data import default_data_dir
from nanochat.speech_eval import generate_replies, pooled_wer, transcription_scores
from nanochat.speech_lm import audio_checkpoint_dir, load_speech_lm
from nanochat.tokenizer import get_tokenizer
from tasks.spoken import SpokenContinuation, SpokenQuestions, SpokenTranscription


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default=None, help="audio checkpoint tag (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--split", default="test", choices=("val", "test", "train"),
                   help="train: the clips it learned from, to tell underfitting from not generalising")
    p.add_argument("--data-dir", default=None, help="speech shards (default base_dir/speech)")
    p.add_argument("--max-items", type=int, default=-1, help="per task (-1: all)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--max-tokens", type=int, default=64, help="reply length limit")
    p.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    p.add_argument("--conditions", nargs="+", default=list(EVAL_CONDITIONS), choices=list(EVAL_CONDITIONS),
                   help="acoustic conditions the transcription is scored in (clean is always scored)")
    return p.parse_args(argv)


def run_task(model, engine, tokenizer, cache, task, max_items, batch_size, max_tokens, typed=False, condition="clean"):
    """(rows, conversations, replies) of the first max_items items of a task; typed: the text twins;
    condition: the EVAL_CONDITIONS variant the clips are heard in."""
    n = len(task) if max_items < 0 else min(max_items, len(task))
    convs = [task.typed(i) if typed else task[i] for i in range(n)]
    if typed:
        frames = [None] * n
    else:
        audio = [c["audio"] for c in convs]
        variants = [eval_variant(condition, audio_hash(a)) for a in audio]
        frames = encode_with_cache(model.encoder, audio, cache, variants=variants)
    replies = generate_replies(model, engine, tokenizer, convs, frames, max_tokens, batch_size)
    return task.rows[:n], convs, replies


def answer(conversation):
    """The reference reply as text (a calculator reply: its "#### answer")."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"].strip()


def evaluate(model, tokenizer, data_dir, split, max_items, batch_size, max_tokens, conditions=("clean",)):
    """Every metric in a dict, plus a few example (task, reference, reply) triples."""
    engine, cache = Engine(model.gpt, tokenizer), FeatureCache()
    results, examples = {"conditions": {}}, []
    transcription = SpokenTranscription(data_dir, split)
    for condition in scored_conditions(conditions):
        rows, convs, replies = run_task(model, engine, tokenizer, cache, transcription, max_items, batch_size,
                                        max_tokens, condition=condition)
        refs = [answer(c) for c in convs]
        results["conditions"][condition] = transcription_scores(rows, refs, replies)
        examples += [(f"transcription ({condition})", r, h) for r, h in zip(refs[:2], replies[:2])]
    results["transcription"] = results["conditions"]["clean"]

    questions = SpokenQuestions(data_dir, split)
    rows, convs, spoken = run_task(model, engine, tokenizer, cache, questions, max_items, batch_size, max_tokens)
    _, _, typed = run_task(model, engine, tokenizer, cache, questions, max_items, batch_size, max_tokens, typed=True)
    refs = [answer(c) for c in convs]
    right_spoken = [questions.evaluate(c, h) for c, h in zip(convs, spoken)]
    right_typed = [questions.evaluate(c, h) for c, h in zip(convs, typed)]
    kinds = defaultdict(lambda: [0, 0, 0])  # n, spoken right, typed right
    for row, s, t in zip(rows, right_spoken, right_typed):
        k = kinds[row["source"]]
        k[0], k[1], k[2] = k[0] + 1, k[1] + s, k[2] + t
    spoken_acc, typed_acc = sum(right_spoken) / len(refs), sum(right_typed) / len(refs)
    results["questions"] = {"n": len(refs), "spoken_acc": spoken_acc, "typed_acc": typed_acc,
                            "gap": typed_acc - spoken_acc,
                            "by_kind": {k: {"n": n, "spoken_acc": s / n, "typed_acc": t / n}
                                        for k, (n, s, t) in sorted(kinds.items())}}
    examples += [("spoken question", f"{row['question']} -> {r}", h) for row, r, h in zip(rows[:3], refs, spoken)]

    _, convs, replies = run_task(model, engine, tokenizer, cache, SpokenContinuation(data_dir, split),
                                 max_items, batch_size, max_tokens)
    refs = [answer(c) for c in convs]
    results["continuation"] = {"n": len(refs), "wer": pooled_wer(list(zip(refs, replies)))}
    examples += [("continuation", r, h) for r, h in zip(refs[:2], replies[:2])]
    return results, examples


def markdown(results, examples, title):
    """The report: one table of every number, then a few examples."""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    t, q, c = results["transcription"], results["questions"], results["continuation"]
    lines = [f"# {title}", "", "| task | subset | n | metric | value |", "|---|---|---:|---|---:|",
             f"| transcription | all clips | {t['n']} | WER | {pct(t['wer'])} |",
             f"| transcription | sentences only | - | WER | {pct(t['wer_sentences'])} |"]
    lines += [f"| transcription | voice {v} | - | WER | {pct(w)} |" for v, w in t["wer_by_voice"].items()]
    lines += [f"| questions | spoken | {q['n']} | accuracy | {pct(q['spoken_acc'])} |",
              f"| questions | typed (same questions) | {q['n']} | accuracy | {pct(q['typed_acc'])} |",
              f"| questions | modality gap | {q['n']} | typed - spoken | {100 * q['gap']:+.1f} pts |"]
    lines += [f"| questions | {kind} | {k['n']} | spoken / typed | {pct(k['spoken_acc'])} / {pct(k['typed_acc'])} |"
              for kind, k in q["by_kind"].items()]
    lines += [f"| continuation | all clips | {c['n']} | WER vs the real rest | {pct(c['wer'])} |", ""]
    conditions = results["conditions"]
    lines += ["Transcription WER by voice and acoustic condition:", "",
              "| voice | " + " | ".join(conditions) + " |", "|---|" + "---:|" * len(conditions),
              "| all clips | " + " | ".join(pct(s["wer"]) for s in conditions.values()) + " |"]
    lines += [f"| {v} | " + " | ".join(pct(s["wer_by_voice"][v]) for s in conditions.values()) + " |"
              for v in t["wer_by_voice"]]
    lines += ["", "Examples:", ""]
    lines += [f"- {task}: expected {ref!r}, got {reply!r}" for task, ref, reply in examples]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    _, _, _, _, device = compute_init(args.device_type)
    checkpoint_dir = audio_checkpoint_dir(args.tag)
    model, meta = load_speech_lm(checkpoint_dir, args.step, device)
    tokenizer = get_tokenizer()
    data_dir = args.data_dir or default_data_dir()
    start = time.perf_counter()
    with torch.no_grad():
        results, examples = evaluate(model, tokenizer, data_dir, args.split, args.max_items, args.batch_size,
                                     args.max_tokens, args.conditions)
    title = (f"Audio eval: {os.path.basename(checkpoint_dir)} step {meta['step']} (stage {meta['stage']}), "
             f"{args.split} split of {data_dir}")
    text = markdown(results, examples, title)
    print(text)
    name = "audio_eval.md" if args.split == "test" else f"audio_eval_{args.split}.md"
    path = os.path.join(get_base_dir(), "report", name)
    with atomic_write(path, "w") as f:
        f.write(text)
    if args.split == "test":
        t, q = results["transcription"], results["questions"]
        report.log_metrics("audio", wer=t["wer"], spoken_acc=q["spoken_acc"], typed_acc=q["typed_acc"],
                           spoken_gap=q["gap"])
    summary = {"checkpoint": checkpoint_dir, "step": meta["step"], "split": args.split,
               "seconds": round(time.perf_counter() - start, 1), **results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
