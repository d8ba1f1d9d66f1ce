"""The training loop's shared parts, for every trainer (scripts/base_train.py, scripts/audio_train.py):
LR and Muon schedules, the loss EMA and ETA, the per-step log line, periodic evaluation, samples
and checkpoints, atomic save and exact resume.

A trainer builds its model, optimizer and data, then hands train() a step function that runs
one optimizer step's forwards and backwards and says what it trained on:

    start = resume(checkpoint_dir, device, rank, world_size) if args.resume else Start()
    ... build the model (from start.model_state when resuming) and the optimizer ...
    summary = train(model, optimizer, Schedule(num_iterations, warmup_steps=40, ...), step_fn,
                    Run(checkpoint_dir, num_iterations, state_dicts, meta, device, ...), start)

Resume is exact: a checkpoint holds the model, one optimizer file per rank and a meta JSON with
every rank's loader state, the loss EMA and the timed seconds, so a resumed run continues with
the same batches, losses and log lines as the run that was never stopped.
"""

import argparse
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from nanochat import report
from nanochat.checkpoint import last_step, load_checkpoint, save_checkpoint
from nanochat.common import compute_dtype, print0
from nanochat.engine import Engine
from nanochat.mfu import peak_flops

LOSS_EMA = 0.9  # smoothing of the logged training loss
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:"]


# ---------------------------------------------------------------------------
# The flags every trainer shares


def add_training_args(parser: argparse.ArgumentParser, warmup_steps, warmdown_ratio, eval_every, evaluates):
    """Add the device, wandb, horizon, LR schedule, evaluation / checkpoint cadence and resume flags,
    with this trainer's defaults; `evaluates` says what its evaluation measures."""
    p = parser
    p.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    p.add_argument("--run", default="", help="wandb run name (empty: no wandb)")
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit number of steps (-1: from the data)")
    p.add_argument("--warmup-steps", type=int, default=warmup_steps, help="linear LR warmup")
    p.add_argument("--warmdown-ratio", type=float, default=warmdown_ratio,
                   help="share of the run with a linear LR warmdown")
    p.add_argument("--final-lr-frac", type=float, default=0.05, help="LR at the end, as a fraction of the peak")
    p.add_argument("--eval-every", type=int, default=eval_every,
                   help=f"{evaluates} every N steps and at the end (-1: never)")
    p.add_argument("--save-every", type=int, default=-1, help="also checkpoint every N steps (-1: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--stop-at-step", type=int, default=-1, help="exit after this step, as if killed (for resume tests)")


LR_GROUPS = ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")


def inherited_lrs(meta):
    """The per-group LRs (embedding_lr, unembedding_lr, matrix_lr, scalar_lr) a checkpoint was
    trained at, for a later stage to start from: its own "learning_rates" when it records them (a
    fine-tuned checkpoint), else base_train's flags times sqrt(its batch / 2^19), the scaling
    base_train applied (its LRs are tuned at 2^19 tokens a step)."""
    if "learning_rates" in meta:
        return dict(meta["learning_rates"])
    try:
        config, batch = meta["user_config"], meta["total_batch_size"]
        return {name: config[name] * math.sqrt(batch / 2 ** 19) for name in LR_GROUPS}
    except KeyError as e:
        raise ValueError(f"checkpoint meta has no {e} to inherit learning rates from: not a base_train "
                         "checkpoint nor one that records its learning_rates") from None


# ---------------------------------------------------------------------------
# Schedules


@dataclass
class Schedule:
    """Per-step multipliers. LR: linear warmup over warmup_steps, constant, then a linear warmdown
    over the last warmdown_ratio of the run to final_lr_frac. Muon momentum (with
    momentum_warmup_steps): 0.85 -> 0.97 over those steps, then 0.97 -> 0.90 during the LR
    warmdown. Muon weight decay (with cosine_weight_decay): a cosine from 1x to 0. The constants are
    upstream nanochat's tuning (https://github.com/karpathy/nanochat)."""
    num_iterations: int
    warmup_steps: int = 0
    warmdown_ratio: float = 0.0
    final_lr_frac: float = 0.0
    momentum_warmup_steps: int | None = None  # None: Muon momentum stays as the optimizer was built
    cosine_weight_decay: bool = False  # False: Muon weight decay stays as built

    def _warmdown_progress(self, step):
        """How far into the warmdown `step` is (0..1), or None before it starts."""
        start = round(self.num_iterations * (1 - self.warmdown_ratio))
        if step < start:
            return None
        return (step - start) / max(1, self.num_iterations - start)

    def lr_multiplier(self, step):
        """The LR as a fraction of the peak at `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = self._warmdown_progress(step)
        return 1.0 if progress is None else 1.0 - progress * (1.0 - self.final_lr_frac)

    def muon_momentum(self, step):
        """Muon's momentum at `step` (with momentum_warmup_steps)."""
        progress = self._warmdown_progress(step)
        if progress is not None:
            return 0.97 - 0.07 * progress
        return 0.85 + 0.12 * min(1.0, step / max(1, self.momentum_warmup_steps))

    def weight_decay_multiplier(self, step):
        """Muon's weight decay as a fraction of its initial value at `step` (with cosine_weight_decay)."""
        return 0.5 * (1 + math.cos(math.pi * step / self.num_iterations))

    def apply(self, optimizer, step):
        """Set every param group's lr (from its initial_lr), and the Muon groups' momentum and
        weight decay when scheduled, for step `step` (0-based). Returns the LR multiplier."""
        lrm = self.lr_multiplier(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] != "muon":
                continue
            if self.momentum_warmup_steps is not None:
                group["momentum"] = self.muon_momentum(step)
            if self.cosine_weight_decay:
                initial = group.setdefault("initial_weight_decay", group["weight_decay"])
                group["weight_decay"] = initial * self.weight_decay_multiplier(step)
        return lrm


# ---------------------------------------------------------------------------
# Progress and the step log


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


@dataclass
class StepOutput:
    """What a step function returns: the loss to log (a tensor: read once the step is done), the
    positions this rank trained on, the loader state to resume from (the next step's data comes
    after it) and extra fields for the log line (e.g. {"epoch": 2})."""
    loss: torch.Tensor
    tokens: int
    loader_state: object
    fields: dict = field(default_factory=dict)


@dataclass
class Run:
    """One training job: where it saves, what its checkpoints hold besides the loop's own fields,
    which process this is, and when the periodic work falls due (counted in steps done)."""
    checkpoint_dir: str
    num_iterations: int
    state_dicts: Callable[[], dict]  # {module name: state dict}: the model part of a checkpoint
    meta: dict = field(default_factory=dict)  # configs and origin, saved in every checkpoint's meta
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    eval_every: int = -1  # evaluate every N steps and after the last (<= 0: never)
    sample_every: int = -1  # print samples (rank 0) every N steps and after the last (<= 0: never)
    save_every: int = -1  # also checkpoint every N steps (the last step is always saved)
    stop_at_step: int = -1  # leave after this step as if killed (for resume tests)
    flops_per_token: float | None = None  # training FLOPs per token: the log line shows MFU
    wandb_name: str = ""  # also log to this wandb run (rank 0; pip install wandb)
    report_stage: str = ""  # also append the curves and the end to this report-card stage (nanochat.report)


def due(done, every, last):
    """Whether periodic work that runs every `every` steps (<= 0: never) and after the last is due."""
    return every > 0 and (done % every == 0 or last)


class StepLog:
    """The per-step log line (step, extra fields, loss, LR multiplier, step time, tokens/s, MFU when
    the run has a FLOP count, ETA) and the validation line, printed on rank 0, sent to wandb when
    the run has a name and to the report card when it has a report stage."""

    def __init__(self, run, resumed=False):
        self.run = run
        if run.report_stage:
            report.start_stage(run.report_stage, resume=resumed, config=run.meta.get("user_config"))
        self.peak = None
        if run.flops_per_token:
            self.peak, source = peak_flops(run.device, compute_dtype())
            print0(f"MFU against {self.peak / 1e12:.2f} TFLOP/s ({source})")
        self.wandb = None
        if run.wandb_name and run.rank == 0:
            import wandb  # optional: pip install wandb
            self.wandb = wandb.init(project="nanochat-audio", name=run.wandb_name, config=run.meta.get("user_config"))

    def step(self, done, loss, lrm, dt, tokens, eta, fields):
        """Log step `done` (1-based): `tokens` trained on by this rank in dt seconds, ETA in seconds."""
        tok_per_s = tokens * self.run.world_size / dt
        parts = [f"step {done:05d}/{self.run.num_iterations:05d}", *(f"{k} {v}" for k, v in fields.items()),
                 f"loss {loss:.4f}", f"lrm {lrm:.3f}", f"dt {dt * 1000:.0f} ms", f"tok/s {tok_per_s:,.0f}"]
        metrics = {"step": done, "train/loss": loss, "train/lrm": lrm, "train/tok_per_s": tok_per_s}
        if self.peak:
            mfu = self.run.flops_per_token * tok_per_s / (self.peak * self.run.world_size)
            parts.append(f"MFU {100 * mfu:.1f}%")
            metrics["train/mfu"] = mfu
        print0(" | ".join(parts + [f"ETA {eta / 60:.1f} min"]))
        if self.wandb:
            self.wandb.log(metrics)
        if self.run.report_stage:
            report.log_step(self.run.report_stage, done, loss=loss, lrm=lrm)

    def validation(self, done, metrics):
        """Log an evaluation's {metric: value} after step `done`."""
        print0(" | ".join([f"step {done:05d}"] + [f"val {k} {v:.4f}" if isinstance(v, float) else f"val {k} {v}"
                                                   for k, v in metrics.items()]))
        if self.wandb:
            self.wandb.log({"step": done, **{f"val/{k}": v for k, v in metrics.items()}})
        numbers = {f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.run.report_stage and numbers:
            report.log_step(self.run.report_stage, done, **numbers)
        if self.peak:  # a measured peak only ever rises (see mfu.py): measure again now and then
            self.peak, _ = peak_flops(self.run.device, compute_dtype())

    def finish(self, completed, final_loss, train_seconds):
        """Close the wandb run, if any; a run that completed ends its report stage with its final
        (smoothed) loss and minutes of training."""
        if self.wandb:
            self.wandb.finish()
        if completed and self.run.report_stage:
            if final_loss is not None:  # None: resumed at its last step, nothing trained
                report.log_metrics(self.run.report_stage, final_loss=final_loss, train_minutes=train_seconds / 60)
            report.end_stage(self.run.report_stage)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """Greedy samples: each plain-text prompt (after BOS) with what the model writes after it."""
    bos = tokenizer.get_bos_token_id()
    prompts = [tokenizer.encode(p, prepend=bos) for p in prompts]
    sequences, _ = Engine(model, tokenizer).generate_batch(prompts, max_tokens=max_tokens, temperature=0)
    return [tokenizer.decode(s[1:]) for s in sequences]


# ---------------------------------------------------------------------------
# Save and resume


@dataclass
class Start:
    """Where a run starts: step 0 (a fresh run), or the last complete checkpoint (resume())."""
    step: int = 0
    meta: dict | None = None
    model_state: dict | None = None  # {module name: state dict}, for the trainer to load
    optimizer_state: dict | None = None  # this rank's shard, loaded by train()
    loader_state: object = None  # this rank's


def resume(checkpoint_dir, device, rank=0, world_size=1):
    """The Start of a run resumed from the last complete checkpoint in checkpoint_dir."""
    step = last_step(checkpoint_dir, say_fallback=True)
    if step is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {checkpoint_dir}")
    model_state, optimizer_state, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    if len(meta["loader_states"]) != world_size:
        raise ValueError(f"checkpoint was saved by {len(meta['loader_states'])} ranks; resume with as many "
                         f"(the optimizer state is sharded per rank)")
    print0(f"resumed from step {step} of {checkpoint_dir}")
    return Start(step, meta, model_state, optimizer_state, meta["loader_states"][rank])


def save(run, optimizer, step, loader_state, progress, val):
    """Checkpoint `step` atomically: the model (rank 0), this rank's optimizer shard, and a meta
    JSON with every rank's loader state (each rank reads its own data). Every rank calls it."""
    distributed = run.world_size > 1
    loader_states = [loader_state]
    if distributed:
        loader_states = [None] * run.world_size
        dist.all_gather_object(loader_states, loader_state)
    meta = {**run.meta, "step": step, "num_iterations": run.num_iterations, "loader_states": loader_states,
            "smooth_loss": progress.smooth_loss, "train_seconds": progress.train_seconds, "val": val}
    if distributed:
        dist.barrier()  # every optimizer shard is written before rank 0's meta marks the step complete
    save_checkpoint(run.checkpoint_dir, step, run.state_dicts(), optimizer.state_dict(), meta, run.rank)
    if distributed:
        dist.barrier()


# ---------------------------------------------------------------------------
# The loop


def train(model, optimizer, schedule, step_fn, run, start=None, evaluate=None, sample=None):
    """Train from `start` (default: a fresh run) to run.num_iterations optimizer steps.

    step_fn(step) runs step `step`'s forwards and backwards and returns a StepOutput; this loop
    sets the schedule, steps the optimizer, logs, and runs the periodic work: evaluate(done) ->
    {metric: value} (on every rank that passes one; the model in eval mode), sample() (rank 0)
    and checkpoints. The trainer loads start.model_state itself; train() loads the optimizer
    state. Returns a summary: steps done, final (smoothed) loss, minutes trained, the last
    evaluation and the checkpoint directory."""
    start = start or Start()
    if start.optimizer_state is not None:
        optimizer.load_state_dict(start.optimizer_state)
    start.model_state = start.optimizer_state = None  # applied by now: hold no second copy
    meta = start.meta or {}
    progress = Progress(run.num_iterations, start.step, meta.get("smooth_loss", 0.0), meta.get("train_seconds", 0.0))
    val, loader_state = meta.get("val"), start.loader_state
    log = StepLog(run, resumed=start.step > 0)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    done, smooth_loss = start.step, None
    model.train()
    for step in range(start.step, run.num_iterations):
        sync()
        t0 = time.perf_counter()
        out = step_fn(step)
        lrm = schedule.apply(optimizer, step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss_value = out.loss.detach().item()
        sync()
        dt = time.perf_counter() - t0

        done, loader_state = step + 1, out.loader_state
        smooth_loss, eta = progress.update(done, loss_value, dt)
        log.step(done, smooth_loss, lrm, dt, out.tokens, eta, out.fields)
        last = done == run.num_iterations
        if evaluate is not None and due(done, run.eval_every, last):
            model.eval()
            metrics = evaluate(done)
            model.train()
            val = {"step": done, **metrics}
            log.validation(done, metrics)
        if sample is not None and run.rank == 0 and due(done, run.sample_every, last):
            model.eval()
            sample()
            model.train()
        if last or due(done, run.save_every, last):
            save(run, optimizer, done, loader_state, progress, val)
        if done == run.stop_at_step:
            print0(f"stopping at step {done} as asked")
            break
    log.finish(done == run.num_iterations, smooth_loss, progress.train_seconds)
    return dict(steps=done, final_loss=smooth_loss, train_minutes=progress.train_seconds / 60, val=val,
                checkpoint_dir=run.checkpoint_dir)


def token_step(model, batches, grad_accum):
    """A step function for loaders that yield (inputs, targets, state): grad_accum forwards and
    backwards of the mean loss, each next batch fetched while the device works on the last."""
    x, y, state = next(batches)
    tokens = grad_accum * x.numel()  # rows are always full (best-fit packing)

    def step_fn(step):
        nonlocal x, y, state
        for _ in range(grad_accum):
            loss = model(x, y)
            (loss / grad_accum).backward()
            consumed = state  # resuming from it yields the batch fetched next
            x, y, state = next(batches)
        return StepOutput(loss, tokens, consumed)

    return step_fn
