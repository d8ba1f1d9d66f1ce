"""Give the GPT ears: train a projector from frozen Whisper frames into the GPT (stage 1), then the GPT
with it (stage 2), on the spoken tasks (transcribe, answer spoken questions, continue a sentence).

    python -m scripts.audio_train --stage 1 --tag s1                                  # GPT frozen
    python -m scripts.audio_train --stage 2 --init-from s1 --tag s2 --text-mix 0.5    # GPT tuned too
    torchrun --nproc_per_node=8 -m scripts.audio_train ...

Encoder frames come from the on-disk feature cache (fp16): every clip is encoded once, before the
first step, and never again (nor by later runs with the same encoder). The loss is next-token
cross-entropy on the assistant's reply only. Clips of different lengths share a batch: their soft
tokens are left-padded and masked (GPT.forward's audio_lengths), so an example computes the same
whatever its batch-mates; within windows of BUCKET_WINDOW batches the items are sorted by duration
before being cut into batches (then the batches are shuffled), so little compute goes to padding.
Every step logs loss, LR multiplier, tokens/s and ETA; checkpoints are atomic and --resume continues
exactly where the last one stopped.
"""

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.audio import AudioPath
from nanochat.checkpoint import build_model, checkpoint_dir_for, last_step, load_checkpoint
from nanochat.common import compute_cleanup, compute_init, get_base_dir, print0, setup_logging
from nanochat.engine import Engine
from nanochat.feature_cache import FeatureCache, encode_with_cache
from nanochat.optim import MuonAdamW
from nanochat.speech_data import default_data_dir
from nanochat.speech_lm import (SpeechLM, audio_checkpoint_dir, collate, encoder_meta, generate_replies,
                                load_frames, load_speech_lm, save_speech_lm)
from nanochat.tokenizer import get_tokenizer
from scripts.base_train import Progress, lr_multiplier
from scripts.audio_eval import pooled_wer
from tasks.spoken import SpokenContinuation, SpokenQuestions, SpokenTranscription

TASKS = {"transcribe": SpokenTranscription, "question": SpokenQuestions, "continue": SpokenContinuation}
BUCKET_WINDOW = 8  # batches per duration-sorted window: less padding, still a fresh mix every epoch
WARM_CHUNK = 512   # clips per feature-cache pass before training (bounds the memory it holds)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    p.add_argument("--stage", type=int, choices=(1, 2), default=1, help="1: projector only; 2: projector + GPT")
    p.add_argument("--tag", default=None, help="output: base_dir/audio_checkpoints/<tag> (default s<stage>)")
    # where the model starts
    p.add_argument("--source", default="base", choices=("base", "sft"), help="text checkpoint to start from")
    p.add_argument("--model-tag", default=None, help="its tag (default: the newest)")
    p.add_argument("--model-step", type=int, default=None, help="its step (default: the last)")
    p.add_argument("--init-from", default=None, help="start from this audio checkpoint tag instead (e.g. stage 1's)")
    # the audio path (ignored with --init-from and --resume: the checkpoint's own is used)
    p.add_argument("--whisper", default=None, help="tiny.en | base | an HF id | a local dir (default: "
                   "$WHISPER_MS_ID / $WHISPER_HF_ID / openai/whisper-base)")
    p.add_argument("--layers", default="last", help="last | weighted | comma-separated hidden-state indices")
    p.add_argument("--pad", default="longest", choices=("longest", "30s"))
    p.add_argument("--stack", type=int, default=4, help="encoder frames (50 Hz) per soft token")
    # data
    p.add_argument("--data-dir", default=None, help="speech shards (default base_dir/speech)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--text-mix", type=float, default=0.0,
                   help="typed-question conversations (no audio) per spoken item, stage 2: keeps the GPT a text model")
    p.add_argument("--batch-size", type=int, default=16, help="conversations per step per rank")
    p.add_argument("--epochs", type=float, default=2.0, help="horizon, unless --num-iterations is given")
    p.add_argument("--num-iterations", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0, help="data order")
    p.add_argument("--cache-max-gb", type=float, default=None,
                   help="after the warm-up, delete least recently used feature-cache entries beyond this size "
                        "(never this run's)")
    # optimisation
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW LR of the projector (and layer weights)")
    p.add_argument("--gpt-lr-scale", type=float, default=0.1, help="stage 2: GPT LRs = base_train's defaults x this")
    p.add_argument("--weight-decay", type=float, default=0.0, help="stage 2: Muon weight decay of the GPT")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--warmdown-ratio", type=float, default=0.5)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    # evaluation and checkpoints
    p.add_argument("--eval-every", type=int, default=100, help="val loss and WER every N steps (-1: never)")
    p.add_argument("--eval-items", type=int, default=32, help="held-out (val split) conversations for the val loss")
    p.add_argument("--save-every", type=int, default=-1, help="also checkpoint every N steps (-1: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint of --tag")
    p.add_argument("--stop-at-step", type=int, default=-1, help="exit after this step, as if killed (for resume tests)")
    return p.parse_args(argv)


def whisper_id(name):
    """'tiny.en' -> 'openai/whisper-tiny.en'; HF ids and local directories pass through; None stays None."""
    if name is None or "/" in name or os.path.isdir(name):
        return name
    return f"openai/whisper-{name}"


# ---------------------------------------------------------------------------
# Data


@dataclass
class Item:
    """One training conversation: row `index` of a spoken task, or its typed twin (no audio)."""
    task: object
    index: int
    typed: bool = False

    def conversation(self):
        return self.task.typed(self.index) if self.typed else self.task[self.index]

    @property
    def clip_id(self):
        return None if self.typed else self.task.rows[self.index]["id"]

    @property
    def duration(self):
        return 0.0 if self.typed else self.task.rows[self.index]["duration"]


def build_items(data_dir, split, task_names, text_mix=0.0):
    """Every conversation of the chosen tasks on one split, then round(text_mix x that many) typed twins."""
    tasks = {name: TASKS[name](data_dir, split) for name in task_names}
    items = [Item(task, i) for task in tasks.values() for i in range(len(task))]
    if text_mix > 0:
        questions = tasks["question"] if "question" in tasks else SpokenQuestions(data_dir, split)
        items += [Item(questions, i % len(questions), typed=True) for i in range(round(text_mix * len(items)))]
    return items


def epoch_batches(durations, batch_size, world_size, seed, epoch):
    """One epoch's batches (lists of item indices), identical on every rank: a seeded shuffle, cut to
    a multiple of batch_size x world_size, sorted by duration within windows, cut, shuffled again."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(durations), generator=g).tolist()
    order = order[:len(order) - len(order) % (batch_size * world_size)]
    window = batch_size * BUCKET_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: durations[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def batch_stream(durations, batch_size, rank, world_size, seed, state=None):
    """Endless (item indices, state) of this rank's batches; `state` ({"epoch", "batch"}) is where a
    resumed stream continues, i.e. the batch after the one it comes with."""
    epoch, start = (0, 0) if state is None else (state["epoch"], state["batch"])
    while True:
        mine = epoch_batches(durations, batch_size, world_size, seed, epoch)[rank::world_size]
        for j in range(start, len(mine)):
            yield mine[j], {"epoch": epoch, "batch": j + 1}
        epoch, start = epoch + 1, 0


def make_examples(model, tokenizer, cache, items, max_tokens):
    """Items -> (ids, mask, cached frames or None) examples for collate()."""
    convs = [item.conversation() for item in items]
    with_audio = [i for i, c in enumerate(convs) if "audio" in c]
    frames = [None] * len(convs)
    for i, f in zip(with_audio, load_frames(model.encoder, cache, [convs[i]["audio"] for i in with_audio])):
        frames[i] = f
    examples = []
    for conv, f in zip(convs, frames):
        ids, mask = tokenizer.render_conversation(conv, max_tokens)
        examples.append((ids, mask, f))
    return examples


def count_positions(model, examples):
    """GPT positions an example batch fills (text tokens plus soft audio tokens), padding excluded."""
    stack = model.projector.stack
    return sum(len(ids) - 1 + (0 if f is None else -(-f.size(0) // stack)) for ids, _, f in examples)


def warm_cache(model, cache, items, rank, world_size):
    """Encode every distinct clip of `items` not yet in the cache (ranks split the clips)."""
    clips = {}
    for item in items:
        if not item.typed:
            clips.setdefault(item.clip_id, item)
    ids = sorted(clips)[rank::world_size]
    for start in range(0, len(ids), WARM_CHUNK):
        audio = [clips[i].conversation()["audio"] for i in ids[start:start + WARM_CHUNK]]
        encode_with_cache(model.encoder, audio, cache)


# ---------------------------------------------------------------------------
# Model and optimizer


def build_start_model(args, device):
    """(SpeechLM, origin, encoder meta): a text checkpoint plus a fresh audio path, or an audio
    checkpoint (--init-from)."""
    if args.init_from:
        model, meta = load_speech_lm(audio_checkpoint_dir(args.init_from), device=device, phase="train")
        return model, {**meta["origin"], "init_from": args.init_from, "init_step": meta["step"]}, meta["encoder"]
    checkpoint_dir = checkpoint_dir_for(args.source, args.model_tag)
    gpt, meta = build_model(checkpoint_dir, args.model_step, device, phase="train")
    layers = args.layers if args.layers in ("last", "weighted") else [int(i) for i in args.layers.split(",")]
    audio = AudioPath(gpt.config.n_embd, args.stack, model_id=whisper_id(args.whisper), layers=layers, pad=args.pad)
    origin = {"source": args.source, "checkpoint_dir": checkpoint_dir, "step": meta["step"]}
    model = SpeechLM(gpt, audio.to(device))
    return model, origin, encoder_meta(model, whisper_id(args.whisper))


def build_optimizer(model, stage, lr, gpt_lr_scale, weight_decay):
    """AdamW on the audio parameters; in stage 2 also the GPT's own MuonAdamW groups at scaled LRs.
    Stage 1 freezes the GPT (no gradients, not in the optimizer)."""
    groups = [dict(kind="adamw", params=model.audio_parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8,
                   weight_decay=0.0)]
    if stage == 1:
        model.gpt.requires_grad_(False)
    else:
        for group in model.gpt.setup_optimizer(weight_decay=weight_decay).param_groups:
            group = dict(group, lr=group["lr"] * gpt_lr_scale)
            group["initial_lr"] = group["lr"]
            groups.append(group)
    return MuonAdamW(groups)


# ---------------------------------------------------------------------------
# Evaluation on held-out clips


@torch.no_grad()
def evaluate(model, engine, tokenizer, cache, val_items, batch_size, max_tokens, device):
    """Val loss (nats per assistant token) over val_items and greedy transcription WER over the
    transcription items among them; returns (loss, wer, [(reference, reply), ...])."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(val_items), batch_size):
        examples = make_examples(model, tokenizer, cache, val_items[start:start + batch_size], max_tokens)
        idx, targets, frames, lengths = collate(examples, device)
        losses = model(idx, targets, frames, lengths, loss_reduction="none")
        total += float(losses.sum())
        count += int((targets >= 0).sum())
    heard = [item for item in val_items if isinstance(item.task, SpokenTranscription)][:8]
    convs = [item.conversation() for item in heard]
    frames = load_frames(model.encoder, cache, [c["audio"] for c in convs])
    replies = generate_replies(model, engine, tokenizer, convs, frames, max_tokens=48)
    pairs = [(c["messages"][-1]["content"], reply) for c, reply in zip(convs, replies)]
    wer = pooled_wer(pairs) if pairs else None
    model.train()
    return total / max(1, count), wer, pairs


# ---------------------------------------------------------------------------


def train(args):
    """Run a training job; returns (the trained SpeechLM, the summary dict printed last)."""
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.text_mix and args.stage == 1:
        raise ValueError("--text-mix trains the GPT on typed questions: it needs --stage 2 (stage 1 freezes the GPT)")
    tag = args.tag or f"s{args.stage}"
    out_dir = audio_checkpoint_dir(tag)

    if args.resume:
        step = last_step(out_dir)
        if step is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {out_dir}")
        model, meta = load_speech_lm(out_dir, step, device, phase="train")
        if meta["stage"] != args.stage:
            raise ValueError(f"{out_dir} holds a stage {meta['stage']} run; resume it with --stage {meta['stage']}")
        origin, enc_meta = meta["origin"], meta["encoder"]
    else:
        # Rank 0 alone fetches or converts the Whisper weights: under torch.distributed, transformers'
        # save_pretrained writes no files on other ranks, so a conversion there fails (import_ct2).
        if ddp and rank != 0:
            dist.barrier()
        model, origin, enc_meta = build_start_model(args, device)
        if ddp and rank == 0:
            dist.barrier()
    gpt = model.gpt
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != gpt.config.vocab_size:
        raise ValueError(f"the tokenizer in {get_base_dir()} has {tokenizer.get_vocab_size()} tokens but the GPT "
                         f"was trained with {gpt.config.vocab_size}: use the tokenizer of its base run")
    optimizer = build_optimizer(model, args.stage, args.lr, args.gpt_lr_scale, args.weight_decay)

    data_dir = args.data_dir or default_data_dir()
    items = build_items(data_dir, "train", args.tasks, args.text_mix)
    if len(items) < args.batch_size * world_size:
        raise ValueError(f"{len(items)} training conversations in {data_dir} are fewer than one step's "
                         f"{args.batch_size} x {world_size} ranks: build more clips or lower --batch-size")
    val_items = []
    if args.eval_every > 0:
        try:
            val_items = build_items(data_dir, "val", args.tasks)
        except (FileNotFoundError, ValueError) as e:  # no val shards, or a task without val clips
            print0(f"no held-out evaluation: {e}")
        order = torch.randperm(len(val_items), generator=torch.Generator().manual_seed(0)).tolist()
        val_items = [val_items[i] for i in order[:args.eval_items]]
    steps_per_epoch = len(items) // (args.batch_size * world_size)
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, round(args.epochs * steps_per_epoch))
    max_tokens = gpt.config.sequence_len
    n_audio = sum(p.numel() for p in model.audio_parameters())
    n_gpt = sum(p.numel() for p in gpt.parameters())
    gpt_note = f"+ {n_gpt:,} GPT params" if args.stage == 2 else f"(the GPT's {n_gpt:,} frozen)"
    print0(f"stage {args.stage}: training {n_audio:,} audio params {gpt_note}; encoder {enc_meta['cache_key']}, "
           f"stack {model.projector.stack}")
    print0(f"{len(items):,} training conversations ({steps_per_epoch} steps/epoch of {args.batch_size} x {world_size} "
           f"ranks), {num_iterations} steps, {len(val_items)} held-out for eval")

    cache = FeatureCache()
    t0, warm_start = time.perf_counter(), time.time()
    warm_cache(model, cache, items + val_items, rank, world_size)
    if ddp:
        dist.barrier()
    print0(f"feature cache ready in {time.perf_counter() - t0:.1f} s ({cache.root})")
    if args.cache_max_gb is not None and rank == 0:
        # Every clip of this run was read or written during the warm-up, which refreshed its time; the
        # margin covers filesystems that store modification times in whole seconds (or two, FAT).
        deleted, freed, left = cache.prune(int(args.cache_max_gb * 1e9), keep_used_since=warm_start - 2)
        print0(f"feature cache pruned: {deleted:,} entries ({freed / 1e9:.2f} GB) deleted, {left / 1e9:.2f} GB left")

    start_step, loader_state, progress = 0, None, Progress(num_iterations)
    if args.resume:
        _, optim_state, _ = load_checkpoint(out_dir, step, device, load_optimizer=True, rank=rank)
        optimizer.load_state_dict(optim_state)
        if len(meta["loader_states"]) != world_size:
            raise ValueError(f"checkpoint was saved by {len(meta['loader_states'])} ranks; resume with as many")
        start_step, loader_state = step, meta["loader_states"][rank]
        progress = Progress(num_iterations, step, meta["smooth_loss"], meta["train_seconds"])
        print0(f"resumed from step {step} of {out_dir}")
    stream = batch_stream([item.duration for item in items], args.batch_size, rank, world_size, args.seed, loader_state)
    engine = Engine(gpt, tokenizer)
    last_eval = None

    def save(step):
        loader_states = [consumed_state]
        if ddp:
            loader_states = [None] * world_size
            dist.all_gather_object(loader_states, consumed_state)
        meta = dict(step=step, stage=args.stage, model_config=dataclasses.asdict(gpt.config), encoder=enc_meta,
                    origin=origin, user_config=vars(args), loader_states=loader_states, num_iterations=num_iterations,
                    smooth_loss=progress.smooth_loss, train_seconds=progress.train_seconds, val=last_eval)
        if ddp:
            dist.barrier()
        save_speech_lm(out_dir, step, model, optimizer.state_dict(), meta, rank)
        if ddp:
            dist.barrier()

    model.train()
    done, consumed_state, debiased = start_step, loader_state, None
    for step in range(start_step, num_iterations):
        sync()
        t0 = time.perf_counter()
        batch, consumed_state = next(stream)
        examples = make_examples(model, tokenizer, cache, [items[i] for i in batch], max_tokens)
        idx, targets, frames, lengths = collate(examples, device)
        loss = model(idx, targets, frames, lengths)
        loss.backward()
        lrm = lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss_value = loss.detach().item()
        sync()
        dt = time.perf_counter() - t0

        done = step + 1
        debiased, eta = progress.update(done, loss_value, dt)
        tok_per_s = count_positions(model, examples) * world_size / dt
        print0(f"step {done:05d}/{num_iterations:05d} | epoch {consumed_state['epoch']} | loss {debiased:.4f} | "
               f"lrm {lrm:.3f} | dt {dt * 1000:.0f} ms | tok/s {tok_per_s:,.0f} | ETA {eta / 60:.1f} min")

        last = done == num_iterations
        if val_items and rank == 0 and (done % args.eval_every == 0 or last):
            val_loss, wer, samples = evaluate(model, engine, tokenizer, cache, val_items, args.batch_size,
                                              max_tokens, device)
            last_eval = {"step": done, "loss": val_loss, "wer": wer}
            wer_note = "-" if wer is None else f"{100 * wer:.1f}% ({len(samples)} clips)"
            print0(f"step {done:05d} | val loss {val_loss:.4f} | val WER {wer_note}")
            for reference, reply in samples[:2]:
                print0(f"    heard {reference!r}\n    said  {reply!r}")
        if last or (args.save_every > 0 and done % args.save_every == 0):
            save(done)
        if done == args.stop_at_step:
            print0(f"stopping at step {done} as asked")
            break

    summary = dict(stage=args.stage, steps=done, final_loss=debiased, train_minutes=progress.train_seconds / 60,
                   val=last_eval, checkpoint_dir=out_dir)
    print0(json.dumps(summary))
    compute_cleanup()
    return model, summary


def main(argv=None):
    setup_logging()
    return train(parse_args(argv))[1]


if __name__ == "__main__":
    main()
