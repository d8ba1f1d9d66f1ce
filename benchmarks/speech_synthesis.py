"""Synthesis speed of every TTS voice, build throughput with 1 and 2 worker processes, and
(optionally) how well Whisper understands each voice.

    python -m benchmarks.speech_synthesis [--clips 20] [--build-clips 40] [--asr tiny.en|base]

--asr transcribes each voice's clips with the offline Whisper checkpoints (CTranslate2, the
`ctranslate2` package) and reports the word error rate: a voice Whisper cannot follow would teach
nothing. Prints a table, then one JSON line.
"""

import argparse
import json
import random
import shutil
import tempfile
import time

import numpy as np

from benchmarks.ct2_whisper import ct2_transcriber
from nanochat import speech_data as sd
from tasks.spoken import word_error_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=20, help="sentences per voice")
    parser.add_argument("--build-clips", type=int, default=40, help="clips for the build throughput runs (0: skip)")
    parser.add_argument("--asr", choices=["tiny.en", "base"], help="also score each voice with Whisper")
    args = parser.parse_args()

    texts = random.Random(0).sample(sd.sentences(), args.clips)
    transcribe = ct2_transcriber(f"openai/whisper-{args.asr}") if args.asr else None
    rows = []
    for voice in sd.VOICES:
        if not sd.voice_available(voice):
            print(f"{voice.id}: not installed, skipped")
            continue
        sd.synthesize("Warm up.", voice)  # piper loads its model on first use
        start = time.perf_counter()
        clips = [sd.synthesize(t, voice) for t in texts]
        seconds = time.perf_counter() - start
        audio = sum(len(c) for c in clips) / sd.SAMPLE_RATE
        row = {"voice": voice.id, "split": voice.split, "clips_per_s": len(clips) / seconds,
               "realtime_x": audio / seconds, "mean_clip_s": audio / len(clips),
               "flac_over_pcm": sum(len(sd.encode_audio(c)) for c in clips) / (2 * audio * sd.SAMPLE_RATE)}
        if transcribe:
            row["wer"] = float(np.mean([word_error_rate(t, h) for t, h in zip(texts, transcribe(clips))]))
        rows.append(row)

    builds = {}
    for workers in ((1, 2) if args.build_clips else ()):
        out = tempfile.mkdtemp(prefix="speech-bench-")
        start = time.perf_counter()
        sd.build(out, {"train": args.build_clips}, seed=0, shard_size=args.build_clips, workers=workers)
        builds[workers] = args.build_clips / (time.perf_counter() - start)
        shutil.rmtree(out)

    header = f"{'voice':28s} {'split':5s} {'clips/s':>8s} {'x realtime':>10s} {'clip s':>6s} {'flac/pcm':>8s}"
    print(header + (f" {'WER (' + args.asr + ')':>14s}" if args.asr else ""))
    for r in rows:
        line = (f"{r['voice']:28s} {r['split']:5s} {r['clips_per_s']:8.1f} {r['realtime_x']:10.1f} "
                f"{r['mean_clip_s']:6.2f} {r['flac_over_pcm']:8.2f}")
        print(line + (f" {r['wer']:14.3f}" if args.asr else ""))
    for workers, rate in builds.items():
        print(f"build (plan + synthesis + FLAC + parquet, mixed voices), {workers} worker(s): {rate:.1f} clips/s")
    print(json.dumps({"voices": rows, "build_clips_per_s": builds, "asr": args.asr, "clips": args.clips}))


if __name__ == "__main__":
    main()
