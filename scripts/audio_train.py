"""Give the GPT ears: train a projector from frozen Whisper frames into the GPT (stage 1), then the GPT
with it (stage 2), on the spoken tasks (transcribe, answer spoken questions, continue a sentence).

    python -m scripts.audio_train --stage 1 --tag s1                                  # GPT frozen
    python -m scripts.audio_train --stage 2 --init-from s1 --tag s2 --text-mix 0.5    # GPT tuned too
    torchrun --nproc_per_node=8 -m scripts.audio_train ...

Encoder frames come from the on-disk feature cache (fp16): every clip is encoded once, before the
first step, and never again (nor by later runs with the same encoder). The loss is next-token
cross-entropy on the assistant's reply only; clips of different lengths share a batch, left-padded
and masked (nanochat.speech_batches). Every step logs loss, LR multiplier, tokens/s and ETA;
checkpoints are atomic and --resume continues exactly where the last one stopped.
"""

import argparse
import dataclasses
import json
import sys

import torch
import torch.distributed as dist

from nanochat.audio import AudioPath
from nanochat.augment import ORDER
from nanochat.checkpoint import build_model, checkpoint_dir_for
from nanochat.common import compute_cleanup, compute_dtype, compute_init, get_base_dir, print0, run_cli, setup_logging
from nanochat.feature_cache import FeatureCache
from nanochat.speech_batches import WaveformAugment, batch_stream, build_items, prepare_cache, speech_step
from nanochat.speech_data import default_data_dir
from nanochat.speech_eval import held_out_scores
from nanochat.speech_lm import (Regularisers, SpeechLM, audio_checkpoint_dir, encoder_meta, load_speech_lm,
                                speech_lm_from_state)
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Run, Schedule, Start, add_training_args, resume, train as train_loop
from nanochat.whisper_weights import whisper_id
from tasks.common import TaskMixture
from tasks.spoken import TASKS, SpokenQuestions, SpokenTranscription
from tasks.suites import sft_parts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), default=1, help="1: projector only; 2: projector + GPT")
    p.add_argument("--tag", default=None, help="output: base_dir/audio_checkpoints/<tag> (default s<stage>)")
    # where the model starts
    p.add_argument("--source", default="base", help="text checkpoint kind to start from: base_dir/<source>_checkpoints")
    p.add_argument("--model-tag", default=None, help="its tag (default: the newest)")
    p.add_argument("--model-step", type=int, default=None, help="its step (default: the last)")
    p.add_argument("--init-from", default=None, help="start from this audio checkpoint tag instead (e.g. stage 1's)")
    # the audio path (ignored with --init-from and --resume: the checkpoint's own is used)
    p.add_argument("--whisper", default=None, help="tiny.en | base | an HF id | a local dir (default: "
                   "$WHISPER_MS_ID / $WHISPER_HF_ID / openai/whisper-base)")
    p.add_argument("--layers", default="last", help="last | weighted | comma-separated hidden-state indices")
    p.add_argument("--pad", default="longest", choices=("longest", "30s"),
                   help="encoder framing: trim a batch to its longest clip, or Whisper's own 30 s windows")
    p.add_argument("--stack", type=int, default=4, help="encoder frames (50 Hz) per soft token")
    p.add_argument("--encoder-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="what the frozen Whisper encoder computes in (default: the compute dtype, NANOCHAT_DTYPE)")
    # data
    p.add_argument("--data-dir", default=None, help="speech shards (default base_dir/speech)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="spoken tasks to train on")
    p.add_argument("--chat-mix", type=float, default=0.0,
                   help="text conversations of the chat SFT mixture (tasks/suites.py sft_parts) per spoken one: "
                        "a model started from --source sft/rl stays a chat model while it learns to hear")
    p.add_argument("--text-mix", type=float, default=0.0,
                   help="typed-question conversations (no audio) per spoken item, stage 2: keeps the GPT a text model")
    p.add_argument("--batch-size", type=int, default=16, help="conversations per step per rank")
    p.add_argument("--epochs", type=float, default=2.0, help="horizon, unless --num-iterations is given")
    p.add_argument("--seed", type=int, default=0, help="data order")
    p.add_argument("--cache-max-gb", type=float, default=None,
                   help="after the warm-up, delete least recently used feature-cache entries beyond this size "
                        "(never this run's)")
    # augmentation and regularisation (training only)
    p.add_argument("--variants", type=int, default=0,
                   help="augmented waveform variants per clip (nanochat.augment; each encoded once into the "
                        "feature cache): a draw hears the clean clip or one of them, uniformly (0: clean only)")
    p.add_argument("--augment", nargs="+", default=list(ORDER), choices=list(ORDER),
                   help="augmentations a variant draws from")
    p.add_argument("--augment-p", type=float, default=0.5, help="probability of each augmentation in a variant")
    p.add_argument("--time-masks", type=int, default=0, help="SpecAugment time masks per clip on the encoder frames")
    p.add_argument("--time-frac", type=float, default=0.05, help="longest time mask, as a fraction of the clip")
    p.add_argument("--channel-masks", type=int, default=0, help="SpecAugment channel masks per clip")
    p.add_argument("--channel-width", type=int, default=0, help="widest channel mask (encoder channels)")
    p.add_argument("--token-dropout", type=float, default=0.0, help="dropout probability on the soft tokens")
    # optimisation
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW LR of the projector (and layer weights)")
    p.add_argument("--gpt-lr-scale", type=float, default=0.1, help="stage 2: GPT LRs = base_train's defaults x this")
    p.add_argument("--weight-decay", type=float, default=0.0, help="stage 2: Muon weight decay of the GPT")
    # evaluation
    p.add_argument("--eval-items", type=int, default=32, help="held-out (val split) conversations for the val loss")
    add_training_args(p, warmup_steps=20, warmdown_ratio=0.5, eval_every=100, evaluates="val loss and WER")
    return p.parse_args(argv)


def start_model(args, start, device, rank, world_size):
    """(SpeechLM, its checkpoint meta: stage, GPT config, encoder, origin): the resumed run's, an
    audio checkpoint's (--init-from), or a text checkpoint's GPT with a fresh audio path."""
    if start.meta is not None:
        model = speech_lm_from_state(start.model_state, start.meta, device, phase="train")
        return model, {k: start.meta[k] for k in ("stage", "model_config", "encoder", "origin")}
    # Rank 0 alone fetches or converts the Whisper weights: under torch.distributed, transformers'
    # save_pretrained writes no files on other ranks, so a conversion there fails (import_ct2).
    if world_size > 1 and rank != 0:
        dist.barrier()
    if args.init_from:
        model, meta = load_speech_lm(audio_checkpoint_dir(args.init_from), device=device, phase="train")
        origin, encoder = {**meta["origin"], "init_from": args.init_from, "init_step": meta["step"]}, meta["encoder"]
    else:
        checkpoint_dir = checkpoint_dir_for(args.source, args.model_tag)
        gpt, meta = build_model(checkpoint_dir, args.model_step, device, phase="train")
        layers = args.layers if args.layers in ("last", "weighted") else [int(i) for i in args.layers.split(",")]
        dtype = getattr(torch, args.encoder_dtype) if args.encoder_dtype else compute_dtype()
        audio = AudioPath(gpt.config.n_embd, args.stack, context=gpt.config.sequence_len,
                          model_id=whisper_id(args.whisper), layers=layers, pad=args.pad, dtype=dtype)
        model = SpeechLM(gpt, audio.to(device))
        origin = {"source": args.source, "checkpoint_dir": checkpoint_dir, "step": meta["step"]}
        encoder = encoder_meta(model, whisper_id(args.whisper))
    if world_size > 1 and rank == 0:
        dist.barrier()
    model_config = dataclasses.asdict(model.gpt.config)
    return model, {"stage": args.stage, "model_config": model_config, "encoder": encoder, "origin": origin}


def load_items(args, world_size):
    """(training items, held-out items for evaluation), with clear errors for too little data."""
    data_dir = args.data_dir or default_data_dir()
    tasks = {name: TASKS[name](data_dir, "train") for name in args.tasks}
    typed = (tasks.get("question") or SpokenQuestions(data_dir, "train")) if args.text_mix else None
    chat = TaskMixture(list(sft_parts(seed=args.seed).values()), seed=args.seed) if args.chat_mix else None
    items = build_items(list(tasks.values()), args.text_mix, typed, args.chat_mix, chat)
    if len(items) < args.batch_size * world_size:
        raise ValueError(f"{len(items)} training conversations in {data_dir} are fewer than one step's "
                         f"{args.batch_size} x {world_size} ranks: build more clips or lower --batch-size")
    val_items = []
    if args.eval_every > 0:
        try:
            val_items = build_items([TASKS[name](data_dir, "val") for name in args.tasks])
        except (FileNotFoundError, ValueError) as e:  # no val shards, or a task without val clips
            print0(f"no held-out evaluation: {e}")
        order = torch.randperm(len(val_items), generator=torch.Generator().manual_seed(0)).tolist()
        val_items = [val_items[i] for i in order[:args.eval_items]]
    return items, val_items


def train(args):
    """Run a training job; returns (the trained SpeechLM, the summary dict printed last)."""
    _, rank, _, world_size, device = compute_init(args.device_type)
    if (args.text_mix or args.chat_mix) and args.stage == 1:
        raise ValueError("--text-mix and --chat-mix train the GPT on text: they need --stage 2 (stage 1 freezes the GPT)")
    out_dir = audio_checkpoint_dir(args.tag or f"s{args.stage}")
    start = resume(out_dir, device, rank, world_size) if args.resume else Start()
    if start.meta and start.meta["stage"] != args.stage:
        raise ValueError(f"{out_dir} holds a stage {start.meta['stage']} run; "
                         f"resume it with --stage {start.meta['stage']}")
    model, meta = start_model(args, start, device, rank, world_size)
    model.regularisers = Regularisers(args.time_masks, args.time_frac, args.channel_masks, args.channel_width,
                                      args.token_dropout)
    waveform = WaveformAugment(args.variants, tuple(args.augment), args.augment_p, args.seed)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model.gpt.config.vocab_size:
        raise ValueError(f"the tokenizer in {get_base_dir()} has {tokenizer.get_vocab_size()} tokens but the GPT "
                         f"was trained with {model.gpt.config.vocab_size}: use the tokenizer of its base run")
    optimizer = model.setup_optimizer(args.stage, args.lr, args.gpt_lr_scale, args.weight_decay)
    items, val_items = load_items(args, world_size)
    steps_per_epoch = len(items) // (args.batch_size * world_size)
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, round(args.epochs * steps_per_epoch))
    n_audio, n_gpt = sum(p.numel() for p in model.audio_parameters()), sum(p.numel() for p in model.gpt.parameters())
    gpt_note = f"+ {n_gpt:,} GPT params" if args.stage == 2 else f"(the GPT's {n_gpt:,} frozen)"
    print0(f"stage {args.stage}: training {n_audio:,} audio params {gpt_note}; encoder {meta['encoder']['cache_key']}, "
           f"stack {model.projector.stack}")
    print0(f"{len(items):,} training conversations ({steps_per_epoch} steps/epoch of {args.batch_size} x {world_size} "
           f"ranks), {num_iterations} steps, {len(val_items)} held-out for eval")
    cache, max_tokens = FeatureCache(), model.gpt.config.sequence_len
    prepare_cache(model, cache, items + val_items, rank, world_size, args.cache_max_gb)
    stream = batch_stream([item.duration for item in items], args.batch_size, rank, world_size, args.seed,
                          start.loader_state)
    heard = [item for item in val_items if isinstance(item.task, SpokenTranscription)]
    evaluate = (lambda step: held_out_scores(model, tokenizer, cache, val_items, heard, args.batch_size, max_tokens,
                                             device)) if val_items and rank == 0 else None
    run = Run(out_dir, num_iterations, model.state_dicts, {**meta, "user_config": vars(args)}, device, rank,
              world_size, args.eval_every, save_every=args.save_every, stop_at_step=args.stop_at_step,
              wandb_name=args.run, report_stage="audio" if args.stage == 2 else "audio_s1")
    schedule = Schedule(num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
    step_fn = speech_step(model, tokenizer, cache, items, stream, max_tokens, device, world_size, waveform, args.seed,
                          rank)
    summary = {"stage": args.stage, **train_loop(model, optimizer, schedule, step_fn, run, start, evaluate)}
    print0(json.dumps(summary))
    compute_cleanup()
    return model, summary


def main(argv=None):
    setup_logging()
    return train(parse_args(argv))[1]


if __name__ == "__main__":
    sys.exit(run_cli(main))
