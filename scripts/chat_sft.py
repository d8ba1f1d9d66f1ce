"""Chat fine-tuning (SFT): teach a base model the conversation format, the calculator tool, who it is.

    python -m scripts.chat_sft --model-tag d4 --max-seq-len 256 --num-iterations 300    # CPU, minutes
    torchrun --nproc_per_node=8 -m scripts.chat_sft --model-tag d24

The mixture (tasks/suites.py sft_parts; a flag per part sets its items, 0 leaves it out): chitchat
windows and chatterbot dialogs (conversation), reasoning-gym arithmetic through the calculator,
letter counting with the .count() tool call, ARC validation questions (multiple-choice practice;
ARC's test split is what chat_eval scores) and the identity set. Whole conversations are packed
into rows by best fit (nanochat/chat_data.py), the loss is on the assistant's tokens only. Model
shape, row length and batch come from the base checkpoint unless given; the LRs are the base run's
effective ones times --lr-scale. Every --eval-every steps: bits per byte on held-out conversations
and accuracies on a fixed sample of eval tasks (partial ChatCORE over those of its six among them).
Checkpoints (atomic, --resume exact) go to base_dir/sft_checkpoints/<tag>, where
`python -m scripts.chat_eval --source sft` finds them; the report card gets the stage's curves,
its final val bpb and task accuracies (nanochat/report.py).
"""

import argparse
import json
import os
import sys

import torch

from nanochat import report
from nanochat.chat_data import row_steps, sft_data_loader
from nanochat.chat_eval import chatcore, evaluate_chat_task
from nanochat.checkpoint import build_model, checkpoint_dir_for
from nanochat.common import compute_cleanup, compute_init, print0, run_cli, setup_logging
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import Run, Schedule, Start, add_training_args, inherited_lrs, resume, token_step, train
from tasks.common import TaskMixture
from tasks.suites import SFT_SIZES, chat_eval_selection, chat_eval_tasks, sft_parts, sft_val_tasks

STAGE = "sft"  # the checkpoint kind (base_dir/sft_checkpoints) and the report-card stage


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="base", help="checkpoint kind to start from: base_dir/<source>_checkpoints")
    p.add_argument("--model-tag", default=None, help="its tag (default: the newest)")
    p.add_argument("--model-step", type=int, default=None, help="its step (default: the last)")
    p.add_argument("--tag", default=None, help="output: base_dir/sft_checkpoints/<tag> (default: --model-tag's)")
    p.add_argument("--max-seq-len", type=int, default=-1, help="row length in tokens (-1: the model's context)")
    p.add_argument("--device-batch-size", type=int, default=-1,
                   help="rows per forward per rank (-1: the source run's, else 32)")
    p.add_argument("--grad-accum", type=int, default=1, help="forwards per optimizer step")
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="LRs = the base run's effective LRs x this (x1 beat x0.3 and x3 in dev/LOG.md's probe)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="horizon in passes over the mixture, unless --num-iterations")
    p.add_argument("--seed", type=int, default=0, help="mixture items and order")
    for part, n in SFT_SIZES.items():
        p.add_argument(f"--{part}", type=int, default=n, help=f"items of the {part} part (0: none)")
    p.add_argument("--chitchat-chars", type=int, default=-1,
                   help="chitchat window size in characters (-1: 3 per token of a row, so most fit whole)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the val bits per byte")
    p.add_argument("--eval-tasks", default="Identity,Arithmetic,SpellingBee,ARC-Easy",
                   help=f"comma-separated chat eval tasks scored at each evaluation, of {', '.join(chat_eval_tasks())}")
    p.add_argument("--eval-problems", type=int, default=64, help="a fixed random N items per eval task")
    p.add_argument("--max-new-tokens", type=int, default=96, help="reply length limit in the evaluation")
    add_training_args(p, warmup_steps=0, warmdown_ratio=0.3, eval_every=100, evaluates="val bpb and task accuracies")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    _, rank, _, world_size, device = compute_init(args.device_type)
    source_dir = checkpoint_dir_for(args.source, args.model_tag)
    out_dir = checkpoint_dir_for(STAGE, args.tag or os.path.basename(source_dir))
    start = resume(out_dir, device, rank, world_size) if args.resume else Start()
    model, meta = build_model(source_dir, args.model_step, device, phase="train")
    if start.model_state is not None:
        model.load_state_dict(start.model_state["gpt"])
    tokenizer = get_tokenizer()
    base_config = meta.get("user_config", {})
    T = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
    B = args.device_batch_size if args.device_batch_size > 0 else base_config.get("device_batch_size", 32)
    if T > model.config.sequence_len:
        raise ValueError(f"--max-seq-len {T} is longer than the model's context {model.config.sequence_len}")
    lrs = inherited_lrs(meta)
    optimizer = model.setup_optimizer(weight_decay=args.weight_decay,
                                      **{name: lr * args.lr_scale for name, lr in lrs.items()})

    chars = args.chitchat_chars if args.chitchat_chars > 0 else 3 * T
    parts = sft_parts({part: getattr(args, part) for part in SFT_SIZES}, chars, args.seed)
    mixture = TaskMixture(list(parts.values()), seed=args.seed)
    print0("SFT mixture: " + ", ".join(f"{name} {len(task):,}" for name, task in parts.items()))
    num_iterations = args.num_iterations
    if num_iterations <= 0:
        rows_per_step = B * world_size * args.grad_accum
        num_iterations = max(1, round(args.epochs * row_steps(mixture, tokenizer, T + 1, rows_per_step)))
    print0(f"{num_iterations} steps of {args.grad_accum} x {B} rows x {T} tokens x {world_size} ranks; "
           f"LRs x{args.lr_scale} of {lrs}")
    batches = sft_data_loader(mixture, tokenizer, B, T, device, start.loader_state, seed=args.seed)

    val_tasks, token_bytes = sft_val_tasks(chars), get_token_bytes(tokenizer, device=device)
    eval_tasks = {name: make() for name, make in chat_eval_selection(args.eval_tasks, "--eval-tasks").items()}
    engine = Engine(model, tokenizer)

    def evaluate(step):
        val = sft_data_loader(val_tasks, tokenizer, B, T, device, shuffle=False)
        metrics = {"bpb": evaluate_bpb(model, val, args.eval_batches, token_bytes)}
        if rank == 0 and eval_tasks:
            results = {name: evaluate_chat_task(model, engine, tokenizer, task, args.eval_problems, progress=False,
                                                max_new_tokens=args.max_new_tokens)
                       for name, task in eval_tasks.items()}
            metrics.update({name: r["accuracy"] for name, r in results.items()})
            score, averaged = chatcore(results)
            if averaged:
                metrics["chatcore_partial"] = score
        return metrics

    origin = {"source": args.source, "checkpoint_dir": source_dir, "step": meta["step"]}
    user_config = {**vars(args), "device_batch_size": B, "max_seq_len": T}  # resolved: a later stage inherits them
    run = Run(out_dir, num_iterations, lambda: {"gpt": model.state_dict()},
              dict(model_config=meta["model_config"], user_config=user_config, learning_rates=lrs, origin=origin),
              device, rank, world_size, args.eval_every, save_every=args.save_every, stop_at_step=args.stop_at_step,
              wandb_name=args.run, report_stage=STAGE)
    schedule = Schedule(num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
    summary = train(model, optimizer, schedule, token_step(model, batches, args.grad_accum), run, start, evaluate)
    if summary["steps"] == num_iterations:  # the stage's summary numbers, next to its curves
        val = summary["val"] or {}
        if "bpb" in val:
            report.log_metrics(STAGE, val_bpb=val["bpb"])
        report.log_eval(STAGE, {name: val[name] for name in eval_tasks if name in val})
    print0(json.dumps(summary))
    compute_cleanup()
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
