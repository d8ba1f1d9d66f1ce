"""Evaluate a chat model on the chat benchmarks and report ChatCORE.

    python -m scripts.chat_eval --source sft                       # ChatCORE's six tasks
    python -m scripts.chat_eval --source audio --model-tag s2      # the speech model, text in and out
    python -m scripts.chat_eval --source sft -a GSM8K --num-samples 8 --temperature 0.8   # pass@8
    python -m scripts.chat_eval --source base --max-problems 100   # a quick look

Categorical tasks (ARC, MMLU, HellaSwag) read the answer-letter logits; generative ones (GSM8K
with the calculator tool, HumanEval in the sandbox, the spelling tasks) sample replies through
the Engine (nanochat/chat_eval.py). --max-problems N scores a fixed random N items of each task
(the same N whatever the model). Writes a
table to base_dir/report/chat_eval_<source>.md and prints one JSON line last.
"""

import argparse
import json
import os
import sys
import time

import torch

from nanochat import report
from nanochat.chat_eval import CHATCORE_TASKS, chatcore, evaluate_chat_task
from nanochat.checkpoint import checkpoint_dir_for, load_model
from nanochat.common import atomic_write, compute_init, get_base_dir, print0, run_cli, setup_logging
from nanochat.engine import Engine
from tasks.suites import chat_eval_selection, chat_eval_tasks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="sft", choices=("base", "sft", "rl", "audio"),
                   help="which checkpoints: base_/sft_/rl_/audio_checkpoints (audio: its GPT, text only)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("-a", "--tasks", default=",".join(CHATCORE_TASKS),
                   help=f"comma-separated tasks, of {', '.join(chat_eval_tasks())}")
    p.add_argument("--max-problems", type=int, default=-1, help="a fixed random N items per task (-1: all)")
    p.add_argument("--num-samples", type=int, default=1, help="replies per generative item (pass@k)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--max-new-tokens", type=int, default=512, help="reply length limit")
    p.add_argument("--batch-size", type=int, default=16, help="generative prompts decoded together")
    p.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    return p.parse_args(argv)


def markdown(results, score, averaged, title):
    lines = [f"# {title}", "", "| task | type | n | accuracy | pass@k | chance | centered |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        k = next(key for key in r if key.startswith("pass@"))
        lines.append(f"| {name} | {r['eval_type']} | {r['n']} | {r['accuracy']:.4f} | {k} {r[k]:.4f} | "
                     f"{r['baseline']:.4f} | {r['centered']:+.4f} |")
    lines += ["", f"ChatCORE: **{score:.4f}** (mean centered accuracy over {len(averaged)} of "
                  f"{len(CHATCORE_TASKS)} tasks: {', '.join(averaged)})"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    _, _, _, _, device = compute_init(args.device_type)
    selected = chat_eval_selection(args.tasks, "--tasks")
    # An audio checkpoint holds the GPT's weights under "gpt" like any other: its text side loads
    # without the Whisper encoder, which text tasks never use.
    checkpoint_dir = checkpoint_dir_for(args.source, args.model_tag)
    model, tokenizer, meta = load_model(args.source, device=device, model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)
    results, start = {}, time.perf_counter()
    with torch.inference_mode():
        for name, make in selected.items():
            task = make()
            results[name] = evaluate_chat_task(
                model, engine, tokenizer, task, max_problems=args.max_problems, num_samples=args.num_samples,
                desc=name, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                batch_size=args.batch_size)
            r = results[name]
            print0(f"{name:<15} n={r['n']:<6} accuracy {r['accuracy']:.4f}  chance {r['baseline']:.4f}  "
                   f"centered {r['centered']:+.4f}")
    score, averaged = chatcore(results)
    title = f"Chat eval: {args.source} {os.path.basename(checkpoint_dir)} step {meta['step']}"
    text = markdown(results, score, averaged, title)
    print0(text)
    with atomic_write(os.path.join(get_base_dir(), "report", f"chat_eval_{args.source}.md"), "w") as f:
        f.write(text)
    # Evaluations log into the stage of the model they measure: the sources are the stage names.
    report.log_eval(args.source, {name: r["accuracy"] for name, r in results.items()})
    if len(averaged) == len(CHATCORE_TASKS):  # a partial average is no ChatCORE: it would replace the real one
        report.log_metrics(args.source, chatcore=score)
    summary = {"source": args.source, "checkpoint": checkpoint_dir, "step": meta["step"], "chatcore": score,
               "chatcore_tasks": averaged, "seconds": round(time.perf_counter() - start, 1), "tasks": results}
    print0(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
