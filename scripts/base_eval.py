"""Evaluate a base checkpoint: CORE, validation bits per byte, in-context copying and a few greedy samples.

    python -m scripts.base_eval [--model-tag d4] [--step N] [--eval-tokens 524288]
    python -m scripts.base_eval --max-per-task 200          # CORE on a subset: minutes on a CPU
    python -m scripts.base_eval --core-tasks arc_easy,copa  # some CORE tasks only

CORE (nanochat/core_eval.py) runs DCLM's in-context tasks whose data installs offline and prints
which of the 22 are missing. Writes base_dir/report/base_eval.md and prints a final JSON line.
"""

import argparse
import json
import os
import sys

import torch

from nanochat import report
from nanochat.checkpoint import checkpoint_dir_for, load_model
from nanochat.common import atomic_write, compute_init, get_base_dir, print0, run_cli, setup_logging
from nanochat.core_eval import evaluate_core
from nanochat.dataloader import tokenizing_distributed_data_loader_bestfit
from nanochat.loss_eval import evaluate_copy, val_bpb
from nanochat.tokenizer import get_token_bytes
from nanochat.training import sample_completions

COPY_TOKENS = 64  # half of the shortest sliding window (128), so every layer sees the first copy


def core_markdown(core):
    """The CORE section of the report: one row per task, then the tasks missing offline."""
    lines = ["", f"## CORE: {core['core']:.4f}", "",
             f"Mean centered accuracy over the {len(core['covered'])} of DCLM's 22 tasks with offline data.", "",
             "| task | type | shots | n | accuracy | chance | centered | data |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {label} | {r['kind']} | {r['shots']} | {r['n']} | {r['accuracy']:.4f} | {r['baseline']:.2f} | "
              f"{r['centered']:+.4f} | {r['source']} |" for label, r in core["tasks"].items()]
    return lines + ["", f"Missing offline: {', '.join(core['missing'])}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-tag", default=None, help="checkpoint folder under base_checkpoints (default: newest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    parser.add_argument("--device-batch-size", type=int, default=8, help="rows per forward per rank")
    parser.add_argument("--eval-tokens", type=int, default=2 ** 19, help="validation tokens for bits per byte")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per sample")
    parser.add_argument("--max-per-task", type=int, default=-1,
                        help="CORE items per task, a fixed random subset (-1: all; 0: skip CORE)")
    parser.add_argument("--core-tasks", default=None, help="comma-separated CORE task labels (default: all offline)")
    parser.add_argument("--max-rows", type=int, default=64, help="CORE sequences per forward")
    args = parser.parse_args(argv)
    setup_logging()
    _, rank, _, world_size, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model("base", device=device, model_tag=args.model_tag, step=args.step)
    core = None
    if args.max_per_task != 0:
        tasks = None if args.core_tasks is None else args.core_tasks.split(",")
        core = evaluate_core(model, tokenizer, tasks, args.max_per_task, rank, world_size, log=print0,
                             max_rows=args.max_rows, progress=rank == 0)
        print0(f"CORE {core['core']:.4f} over {len(core['covered'])} of 22 tasks; missing offline: "
               f"{', '.join(core['missing'])}")
    T = model.config.sequence_len
    token_bytes = get_token_bytes(tokenizer, device=device)
    bpb, tokens = val_bpb(model, tokenizer, token_bytes, args.device_batch_size, args.eval_tokens, device)
    # The first COPY_TOKENS tokens after BOS of one fresh val batch, each row shown twice.
    passages = next(tokenizing_distributed_data_loader_bestfit(
        tokenizer, args.device_batch_size, T, "val", device=device))[0][:, 1:COPY_TOKENS + 1]
    copy_first, copy_second = evaluate_copy(model, passages, tokenizer.get_bos_token_id())
    samples = sample_completions(model, tokenizer, max_tokens=args.max_tokens)

    source = checkpoint_dir_for("base", args.model_tag)
    lines = ["# Base model evaluation", "", f"checkpoint: `{source}` step {meta['step']}", "",
             f"validation bits per byte: **{bpb:.4f}** ({tokens:,} tokens)",
             "", f"in-context copying: loss {copy_first:.2f} nats on a {COPY_TOKENS}-token val passage, "
             f"{copy_second:.2f} on its repeat (near 0 when the model copies)",
             "", "## Greedy samples", ""] + [f"- `{s!r}`" for s in samples]
    if core is not None:
        lines += core_markdown(core)
    if rank == 0:
        for s in samples:
            print0(repr(s))
        with atomic_write(os.path.join(get_base_dir(), "report", "base_eval.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    report.log_metrics("base", val_bpb=bpb, **({} if core is None else {"core": core["core"]}))
    result = dict(val_bpb=bpb, copy_loss_first=copy_first, copy_loss_second=copy_second,
                  step=meta["step"], checkpoint=source)
    if core is not None:
        result.update(core=core["core"], core_tasks={k: v["centered"] for k, v in core["tasks"].items()},
                      core_missing=core["missing"], core_max_per_task=args.max_per_task)
    print0(json.dumps(result))
    return result


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(run_cli(main))
