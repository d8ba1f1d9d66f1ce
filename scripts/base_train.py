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
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.checkpoint import last_step, load_checkpoint, save_checkpoint
from nanochat.common import (COMPUTE_DTYPE, compute_cleanup, compute_init, get_base_dir, print0,
                             setup_logging)
from nanochat.dataloader import tokenizing_distributed_data_loader_bestfit
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_for_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.mfu import peak_flops
from nanochat.tokenizer import get_token_bytes, get_tokenizer

# Auto batch size (upstream fit): 2^19 tokens at d12's horizon, growing as horizon^0.383.
REFERENCE_BATCH = 2 ** 19
REFERENCE_TOKENS = 12 * 110e6  # d12 scaling params x ratio 12
BATCH_EXPONENT = 0.383
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="", help="wandb run name (empty: no wandb)")
    p.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default d{depth})")
    # model
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="SSSL")
    # horizon and batch
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit number of steps (-1: from the ratio)")
    p.add_argument("--target-param-data-ratio", type=float, default=12, help="training tokens per scaling parameter")
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step (-1: automatic)")
    # optimisation
    p.add_argument("--embedding-lr", type=float, default=0.3)
    p.add_argument("--unembedding-lr", type=float, default=0.008)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=0.28)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    p.add_argument("--momentum-warmup-steps", type=int, default=400)
    p.add_argument("--fp8", action="store_true", help="tensorwise fp8 matmuls (CUDA sm89+; a slow reference path on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    # evaluation and checkpoints
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=10 * 2 ** 19)
    p.add_argument("--sample-every", type=int, default=2000)
    p.add_argument("--save-every", type=int, default=-1, help="also checkpoint every N steps (-1: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--stop-at-step", type=int, default=-1, help="exit after this step, as if killed (for resume tests)")
    return p.parse_args(argv)


def lr_multiplier(step, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, then linear warmdown over the last warmdown_ratio of training."""
    warmdown_start = round(num_iterations * (1 - warmdown_ratio))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < warmdown_start:
        return 1.0
    progress = (step - warmdown_start) / max(1, num_iterations - warmdown_start)
    return 1.0 - progress * (1.0 - final_lr_frac)


def muon_momentum(step, num_iterations, warmup_steps, warmdown_ratio):
    """0.85 -> 0.97 over the first steps, then 0.97 -> 0.90 during the LR warmdown (seed tuning)."""
    warmdown_start = round(num_iterations * (1 - warmdown_ratio))
    if step >= warmdown_start:
        progress = (step - warmdown_start) / max(1, num_iterations - warmdown_start)
        return 0.97 - 0.07 * progress
    return 0.85 + 0.12 * min(1.0, step / max(1, warmup_steps))


LOSS_EMA = 0.9  # smoothing of the logged training loss


@dataclass
class Progress:
    """What the step log needs across a resume (both fields go into the checkpoint meta): the EMA
    of the training loss and the seconds spent in timed steps. The first step after a start
    (allocations, compilation, warm-up) is not timed."""
    num_iterations: int
    start_step: int = 0
    smooth_loss: float = 0.0
    train_seconds: float = 0.0

    def update(self, done, loss_value, dt):
        """Record step number `done` (1-based) that took dt seconds; returns (debiased loss, ETA in s)."""
        if done > self.start_step + 1:
            self.train_seconds += dt
        self.smooth_loss = LOSS_EMA * self.smooth_loss + (1 - LOSS_EMA) * loss_value
        timed_steps = done - self.start_step - 1
        eta = (self.num_iterations - done) * (self.train_seconds / timed_steps if timed_steps else dt)
        return self.smooth_loss / (1 - LOSS_EMA ** done), eta


def weight_decay_multiplier(step, num_iterations):
    """Muon weight decay follows a cosine from 1 to 0 over training."""
    return 0.5 * (1 + math.cos(math.pi * step / num_iterations))


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wandb_run = None
    if args.run and rank == 0:
        import wandb  # optional: pip install wandb
        wandb_run = wandb.init(project="nanochat-audio", name=args.run, config=vars(args))

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(tokenizer, device=device)
    config = config_for_depth(args.depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=args.max_seq_len,
                              window_pattern=args.window_pattern, head_dim=args.head_dim)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if args.fp8:
        from nanochat.fp8 import convert_to_float8_training
        print0(f"fp8: converted {convert_to_float8_training(model)} linears")
    n_params = sum(p.numel() for p in model.parameters())
    n_scaling = model.num_scaling_params()
    flops_per_token = model.estimate_flops(args.max_seq_len)

    # Horizon and batch size.
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
    lr_scale = math.sqrt(total_batch / REFERENCE_BATCH)  # LRs were tuned at 2^19 tokens per step
    print0(f"model d{args.depth}: {n_params:,} params ({n_scaling:,} scaling), {flops_per_token:.3e} FLOPs/token, "
           f"dtype {COMPUTE_DTYPE}")
    print0(f"batch {total_batch:,} tokens = {args.device_batch_size} x {args.max_seq_len} x {world_size} ranks "
           f"x {grad_accum} accumulation; {num_iterations:,} steps = {num_iterations * total_batch:,} tokens "
           f"(ratio {num_iterations * total_batch / n_scaling:.1f})")

    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * lr_scale,
                                      embedding_lr=args.embedding_lr * lr_scale,
                                      matrix_lr=args.matrix_lr * lr_scale, scalar_lr=args.scalar_lr * lr_scale,
                                      weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
        group["initial_weight_decay"] = group["weight_decay"]

    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")
    start_step, loader_state, progress = 0, None, Progress(num_iterations)
    if args.resume:
        step = last_step(checkpoint_dir)
        if step is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {checkpoint_dir}")
        model_state, optim_state, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
        model.load_state_dict(model_state["gpt"])
        optimizer.load_state_dict(optim_state)
        if len(meta["loader_states"]) != world_size:
            raise ValueError(f"checkpoint was saved by {len(meta['loader_states'])} ranks; resume with as many "
                             f"(the optimizer state is sharded per rank)")
        start_step, loader_state = step, meta["loader_states"][rank]
        progress = Progress(num_iterations, step, meta["smooth_loss"], meta["train_seconds"])
        print0(f"resumed from step {step} of {checkpoint_dir}")

    train_model = torch.compile(model, dynamic=False) if args.compile else model
    train_loader = tokenizing_distributed_data_loader_bestfit(tokenizer, args.device_batch_size, args.max_seq_len,
                                                              "train", device=device, resume_state_dict=loader_state)
    x, y, loader_state = next(train_loader)
    peak, peak_source = peak_flops(device, COMPUTE_DTYPE)
    print0(f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    engine = Engine(model, tokenizer)

    def evaluate(step):
        model.eval()
        val_loader = tokenizing_distributed_data_loader_bestfit(tokenizer, args.device_batch_size, args.max_seq_len,
                                                                "val", device=device)
        steps = max(1, args.eval_tokens // tokens_per_micro)
        bpb = evaluate_bpb(model, val_loader, steps, token_bytes)
        model.train()
        print0(f"step {step:05d} | val bpb {bpb:.4f}")
        if wandb_run:
            wandb_run.log({"step": step, "val/bpb": bpb})
        return bpb

    def sample():
        model.eval()
        bos = tokenizer.get_bos_token_id()
        prompts = [tokenizer.encode(p, prepend=bos) for p in SAMPLE_PROMPTS]
        sequences, _ = engine.generate_batch(prompts, max_tokens=16, temperature=0)
        for seq in sequences:
            print0(repr(tokenizer.decode(seq[1:])))
        model.train()

    def save(step, val_bpb):
        loader_states = [consumed_state]  # each rank reads its own documents: keep every rank's position
        if ddp:
            loader_states = [None] * world_size
            dist.all_gather_object(loader_states, consumed_state)
        meta = dict(step=step, model_config=dataclasses.asdict(config), user_config=vars(args),
                    loader_states=loader_states, smooth_loss=progress.smooth_loss,
                    train_seconds=progress.train_seconds,
                    val_bpb=val_bpb, total_batch_size=total_batch, num_iterations=num_iterations)
        if ddp:
            dist.barrier()
        save_checkpoint(checkpoint_dir, step, {"gpt": model.state_dict()}, optimizer.state_dict(), meta, rank)
        if ddp:
            dist.barrier()

    model.train()
    val_bpb, debiased, done, consumed_state = None, None, start_step, loader_state
    for step in range(start_step, num_iterations):
        sync()
        t0 = time.perf_counter()
        for _ in range(grad_accum):
            loss = train_model(x, y)
            (loss / grad_accum).backward()
            consumed_state = loader_state  # resuming from it yields the batch fetched next
            x, y, loader_state = next(train_loader)  # prefetch while the GPU works
        lrm = lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        momentum = muon_momentum(step, num_iterations, args.momentum_warmup_steps, args.warmdown_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
                group["weight_decay"] = group["initial_weight_decay"] * weight_decay_multiplier(step, num_iterations)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss_value = loss.detach().item()
        sync()
        dt = time.perf_counter() - t0

        done = step + 1
        debiased, eta = progress.update(done, loss_value, dt)
        tok_per_s = total_batch / dt
        mfu = flops_per_token * tok_per_s / (peak * world_size)
        print0(f"step {done:05d}/{num_iterations:05d} | loss {debiased:.4f} | lrm {lrm:.3f} | dt {dt * 1000:.0f} ms | "
               f"tok/s {tok_per_s:,.0f} | MFU {100 * mfu:.1f}% | ETA {eta / 60:.1f} min")
        if wandb_run:
            wandb_run.log({"step": done, "train/loss": debiased, "train/lrm": lrm, "train/tok_per_s": tok_per_s,
                           "train/mfu": mfu})

        last = done == num_iterations
        if args.eval_every > 0 and (done % args.eval_every == 0 or last):
            val_bpb = evaluate(done)
            peak, _ = peak_flops(device, COMPUTE_DTYPE)  # a measured peak only ever rises (see mfu.py)
        if args.sample_every > 0 and rank == 0 and (done % args.sample_every == 0 or last):
            sample()
        if last or (args.save_every > 0 and done % args.save_every == 0):
            save(done, val_bpb)
        if done == args.stop_at_step:
            print0(f"stopping at step {done} as asked")
            break

    summary = dict(steps=done, val_bpb=val_bpb, train_minutes=progress.train_seconds / 60, final_loss=debiased,
                   checkpoint_dir=checkpoint_dir)
    print0(json.dumps(summary))
    if wandb_run:
        wandb_run.finish()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
