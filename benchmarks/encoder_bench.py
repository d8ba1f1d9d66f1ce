"""Whisper encoder latency by clip length: pad="longest" vs pad="30s" vs CTranslate2 (float32).

    python -m benchmarks.encoder_bench [--model openai/whisper-base] [--threads 2]

Times the encoder only (features are computed beforehand): the best of --reps runs after one warm-up
(as timeit advises: the minimum is the figure least disturbed by other load; medians go in the JSON).
Target: pad="longest" >= 8x faster than 30 s padding on a 3 s clip (a tenth of the window: at least
10x less work, less the fixed costs). Prints a table and a final JSON line; the 1-minute load
average is included because the timings assume a quiet CPU."""

import argparse
import json
import os
import statistics
import time

import ctranslate2
import numpy as np
import torch

from nanochat.ct2_whisper import ct2_model
from nanochat.audio import WhisperEncoder
from nanochat.whisper_weights import OFFLINE_CHECKPOINTS


def timed(fn, reps):
    """(min, median) seconds of fn() over reps runs after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="openai/whisper-base", choices=sorted(OFFLINE_CHECKPOINTS),
                        help="Whisper checkpoint (offline weights)")
    parser.add_argument("--threads", type=int, default=2, help="torch and CTranslate2 threads")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per case (the best is reported)")
    parser.add_argument("--durations", default="1,3,5,10,30", help="clip lengths in seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    longest = WhisperEncoder(args.model, pad="longest")
    padded = WhisperEncoder(args.model, pad="30s")
    ct2 = ct2_model(args.model, args.threads)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'clip s':>6} {'longest ms':>11} {'30s ms':>8} {'ct2 30s ms':>11} {'ct2 trim ms':>12} {'30s/longest':>12}")
    for seconds in map(float, args.durations.split(",")):
        # Content does not change the cost: a 16 kHz noise burst stands in for speech.
        clip = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
        f_long, l_long = longest.preprocess(clip, 16000)
        f_30, l_30 = padded.preprocess(clip, 16000)
        with torch.inference_mode():
            t_long = timed(lambda: longest(f_long, l_long), args.reps)
            t_30 = timed(lambda: padded(f_30, l_30), args.reps)
        sv_30, sv_long = (ctranslate2.StorageView.from_array(f.numpy()) for f in (f_30, f_long))
        t_ct2 = timed(lambda: ct2.encode(sv_30, to_cpu=True), args.reps)
        t_ct2_trim = timed(lambda: ct2.encode(sv_long, to_cpu=True), args.reps)
        row = {"seconds": seconds, "mel_frames": int(l_long[0]), "longest_s": t_long[0], "pad30_s": t_30[0],
               "ct2_30s_s": t_ct2[0], "ct2_trimmed_s": t_ct2_trim[0], "longest_median_s": t_long[1],
               "pad30_median_s": t_30[1], "speedup_vs_30s": t_30[0] / t_long[0]}
        rows.append(row)
        print(f"{seconds:6.0f} {1e3 * t_long[0]:11.1f} {1e3 * t_30[0]:8.1f} {1e3 * t_ct2[0]:11.1f} "
              f"{1e3 * t_ct2_trim[0]:12.1f} {row['speedup_vs_30s']:11.1f}x")
    at3 = next((r["speedup_vs_30s"] for r in rows if r["seconds"] == 3), None)
    print(json.dumps({"bench": "encoder", "model": args.model, "threads": args.threads, "reps": args.reps,
                      "load1_before": load_before, "load1_after": os.getloadavg()[0], "rows": rows,
                      "speedup_3s": at3, "target_3s": 8.0, "pass": at3 is not None and at3 >= 8.0}))


if __name__ == "__main__":
    main()
