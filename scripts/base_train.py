"""Pretrain the base GPT.

    python -m scripts.base_train --depth 4 --max-seq-len 512 --device-batch-size 8 ...   # CPU, minutes
    torchrun --nproc_per_node=8 -m scripts.base_train --depth 24 --target-param-data-ratio 8 --fp8

One dial (--depth) sets the model; the horizon follows from the data:param ratio unless
--num-iterations is given; the batch size is picked automatically unless --total-batch-size is.
Every step logs loss, LR multiplier, step time, tokens/s, MFU and ETA. Checkpoints are atomic
and --resume continues bit-for-bit (same loss trajectory) from the last complete one.
"""

import argparse
import dataclasses
import json
import math
import sys

import torch

from nanochat.checkpoint import checkpoint_dir_for
from nanochat.common import compute_cleanup, compute_dtype, compute_init, print0, run_cli, setup_logging
from nanochat.dataloader import tokenizing_distributed_data_loader_bestfit
from nanochat.gpt import build_gpt, config_for_depth
from nanochat.loss_eval import val_bpb
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (Run, Schedule, Start, add_training_args, resume, sample_completions, token_step,
                               train)

# Auto batch size (upstream fit): 2^19 tokens at d12's horizon, growing as horizon^0.383.
REFERENCE_BATCH = 2 ** 19
REFERENCE_TOKENS = 12 * 110e6  # d12 scaling params x ratio 12
BATCH_EXPONENT = 0.383


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default d{depth})")
    # model
    p.add_argument("--depth", type=int, default=20, help="layers; the width is depth x 64 rounded up to --head-dim")
    p.add_argument("--head-dim", type=int, default=128, help="attention head width")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    p.add_argument("--window-pattern", default="SSSL",
                   help="sliding windows per layer, tiled over the layers: S short (a quarter of the context), "
                        "L full; the last layer is always full")
    # horizon (unless --num-iterations) and batch
    p.add_argument("--target-param-data-ratio", type=float, default=12, help="training tokens per scaling parameter")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward per rank")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step (-1: automatic)")
    # optimisation
    lrs = {"embedding": (0.3, "AdamW LR of the embeddings"), "unembedding": (0.008, "AdamW LR of the lm_head"),
           "matrix": (0.02, "Muon LR of the block matrices"), "scalar": (0.5, "AdamW LR of the per-layer scalars")}
    for name, (default, what) in lrs.items():
        p.add_argument(f"--{name}-lr", type=float, default=default,
                       help=f"{what}, tuned at 2^19 tokens a step (scaled by sqrt(batch / 2^19))")
    p.add_argument("--weight-decay", type=float, default=0.28, help="Muon weight decay at the start (cosine to 0)")
    p.add_argument("--momentum-warmup-steps", type=int, default=400, help="steps of Muon momentum 0.85 -> 0.97")
    p.add_argument("--fp8", action="store_true",
                   help="tensorwise fp8 matmuls (CUDA sm89+; a slow reference path on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    # evaluation
    p.add_argument("--eval-tokens", type=int, default=10 * 2 ** 19, help="validation tokens per evaluation")
    p.add_argument("--sample-every", type=int, default=2000,
                   help="greedy samples every N steps and at the end (-1: never)")
    add_training_args(p, warmup_steps=40, warmdown_ratio=0.65, eval_every=250, evaluates="val bits per byte")
    return p.parse_args(argv)


def horizon(args, model, world_size):
    """(tokens per step, gradient accumulation steps, steps, LR scale) from the arguments and the
    model's size, printed with the model's."""
    n_scaling = model.num_scaling_params()
    target_tokens = args.target_param_data_ratio * n_scaling
    total_batch = args.total_batch_size
    if total_batch <= 0:
        total_batch = 2 ** round(math.log2(REFERENCE_BATCH * (target_tokens / REFERENCE_TOKENS) ** BATCH_EXPONENT))
    tokens_per_micro = args.device_batch_size * args.max_seq_len * world_size
    if total_batch % tokens_per_micro:
        raise ValueError(f"--total-batch-size {total_batch} must be a multiple of device_batch x seq_len x world "
                         f"= {tokens_per_micro}")
    grad_accum = total_batch // tokens_per_micro
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, round(target_tokens / total_batch))
    print0(f"model d{args.depth}: {sum(p.numel() for p in model.parameters()):,} params ({n_scaling:,} scaling), "
           f"{model.estimate_flops(args.max_seq_len):.3e} FLOPs/token, dtype {compute_dtype()}")
    print0(f"batch {total_batch:,} tokens = {args.device_batch_size} x {args.max_seq_len} x {world_size} ranks "
           f"x {grad_accum} accumulation; {num_iterations:,} steps = {num_iterations * total_batch:,} tokens "
           f"(ratio {num_iterations * total_batch / n_scaling:.1f})")
    return total_batch, grad_accum, num_iterations, math.sqrt(total_batch / REFERENCE_BATCH)  # LRs tuned at 2^19


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    _, rank, _, world_size, device = compute_init(args.device_type)
    tokenizer = get_tokenizer()
    config = config_for_depth(args.depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=args.max_seq_len,
                              window_pattern=args.window_pattern, head_dim=args.head_dim)
    model = build_gpt(config, device)
    if args.fp8:
        from nanochat.fp8 import convert_to_float8_training
        print0(f"fp8: converted {convert_to_float8_training(model)} linears")
    total_batch, grad_accum, num_iterations, lr_scale = horizon(args, model, world_size)
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * lr_scale,
                                      embedding_lr=args.embedding_lr * lr_scale, matrix_lr=args.matrix_lr * lr_scale,
                                      scalar_lr=args.scalar_lr * lr_scale, weight_decay=args.weight_decay)
    checkpoint_dir = checkpoint_dir_for("base", args.model_tag or f"d{args.depth}")
    start = resume(checkpoint_dir, device, rank, world_size) if args.resume else Start()
    if start.model_state is not None:
        model.load_state_dict(start.model_state["gpt"])
    train_model = torch.compile(model, dynamic=False) if args.compile else model
    batches = tokenizing_distributed_data_loader_bestfit(tokenizer, args.device_batch_size, args.max_seq_len,
                                                         "train", device=device, resume_state_dict=start.loader_state)
    token_bytes = get_token_bytes(tokenizer, device=device)

    def evaluate(step):
        return {"bpb": val_bpb(model, tokenizer, token_bytes, args.device_batch_size, args.eval_tokens, device)[0]}

    def sample():
        for text in sample_completions(model, tokenizer):
            print0(repr(text))

    schedule = Schedule(num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac,
                        args.momentum_warmup_steps, cosine_weight_decay=True)
    run = Run(checkpoint_dir, num_iterations, lambda: {"gpt": model.state_dict()},
              dict(model_config=dataclasses.asdict(config), user_config=vars(args), total_batch_size=total_batch),
              device, rank, world_size, args.eval_every, args.sample_every, args.save_every, args.stop_at_step,
              flops_per_token=model.estimate_flops(args.max_seq_len), wandb_name=args.run, report_stage="base")
    step_fn = token_step(train_model, batches, grad_accum)
    summary = train(model, optimizer, schedule, step_fn, run, start, evaluate, sample)
    summary["val_bpb"] = summary["val"]["bpb"] if summary["val"] else None
    print0(json.dumps(summary))
    compute_cleanup()
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
