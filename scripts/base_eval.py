"""Evaluate a base checkpoint: validation bits per byte, in-context copying and a few greedy samples.

    python -m scripts.base_eval [--model-tag d4] [--step N] [--eval-tokens 524288]

Writes base_dir/report/base_eval.md and prints a final JSON line.
"""

import argparse
import json
import os
import sys

import torch

from nanochat.checkpoint import checkpoint_dir_for, load_model
from nanochat.common import atomic_write, compute_init, get_base_dir, print0, run_cli, setup_logging
from nanochat.dataloader import tokenizing_distributed_data_loader_bestfit
from nanochat.loss_eval import evaluate_copy, val_bpb
from nanochat.tokenizer import get_token_bytes
from nanochat.training import sample_completions

COPY_TOKENS = 64  # half of the shortest sliding window (128), so every layer sees the first copy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-tag", default=None, help="checkpoint folder under base_checkpoints (default: newest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    parser.add_argument("--device-batch-size", type=int, default=8, help="rows per forward per rank")
    parser.add_argument("--eval-tokens", type=int, default=2 ** 19, help="validation tokens for bits per byte")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per sample")
    args = parser.parse_args(argv)
    setup_logging()
    _, rank, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model("base", device=device, model_tag=args.model_tag, step=args.step)
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
    if rank == 0:
        for s in samples:
            print0(repr(s))
        with atomic_write(os.path.join(get_base_dir(), "report", "base_eval.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    result = dict(val_bpb=bpb, copy_loss_first=copy_first, copy_loss_second=copy_second,
                  step=meta["step"], checkpoint=source)
    print0(json.dumps(result))
    return result


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(run_cli(main))
