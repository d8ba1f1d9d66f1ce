"""Every TTS voice: synthesis speed (x real time), FLAC size, and how well Whisper understands it
(its word error rate); then build throughput with 1 and 2 worker processes.

    python -m benchmarks.speech_synthesis [--clips 20] [--build-clips 40] [--asr tiny.en|base]
    python -m benchmarks.speech_synthesis --voices espeak:en-029 espeak:en-us+klatt --asr base

--asr transcribes each voice's clips with the offline Whisper checkpoints (CTranslate2, the
`ctranslate2` package) and reports the word error rate pooled over the clips' words: a voice
Whisper cannot follow would teach nothing. --voices measures any engine:voice, listed or not (a
candidate's split shows as "-"). Prints a table, then one JSON line.
"""

import argparse
import json
import random
import shutil
import tempfile
import time

from nanochat.ct2_whisper import ct2_transcriber
from nanochat import speech_data as sd
from tasks.spoken import normalize_text, word_error_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=20, help="sentences per voice")
    parser.add_argument("--build-clips", type=int, default=40, help="clips for the build throughput runs (0: skip)")
    parser.add_argument("--asr", choices=["tiny.en", "base"], help="also score each voice with Whisper")
    parser.add_argument("--voices", nargs="+", default=None, help="engine:voice ids (default: every listed voice)")
    args = parser.parse_args()

    known = {v.id: v for v in sd.VOICES}
    voices = sd.VOICES if args.voices is None else [known.get(i) or sd.Voice(*i.split(":", 1), "-") for i in args.voices]
    texts = random.Random(0).sample(sd.sentences(), args.clips)
    words = sum(len(normalize_text(t).split()) for t in texts)
    transcribe = ct2_transcriber(f"openai/whisper-{args.asr}") if args.asr else None
    rows = []
    for voice in voices:
        if not sd.voice_available(voice):
            print(f"{voice.id}: not installed, skipped")
            continue
        sd.synthesize("Warm up.", voice)  # piper and kokoro load their models on first use
        start = time.perf_counter()
        clips = [sd.synthesize(t, voice) for t in texts]
        seconds = time.perf_counter() - start
        audio = sum(len(c) for c in clips) / sd.SAMPLE_RATE
        row = {"voice": voice.id, "speaker": voice.speaker, "split": voice.split, "clips_per_s": len(clips) / seconds,
               "realtime_x": audio / seconds, "mean_clip_s": audio / len(clips),
               "flac_over_pcm": sum(len(sd.encode_audio(c)) for c in clips) / (2 * audio * sd.SAMPLE_RATE)}
        if transcribe:
            errors = [word_error_rate(t, h) * len(normalize_text(t).split()) for t, h in zip(texts, transcribe(clips))]
            row["wer"] = sum(errors) / words
        rows.append(row)
        print(f"{voice.id}: {row['realtime_x']:.1f}x real time" + (f", WER {row['wer']:.3f}" if transcribe else ""),
              flush=True)

    builds = {}
    for workers in ((1, 2) if args.build_clips else ()):
        out = tempfile.mkdtemp(prefix="speech-bench-")
        start = time.perf_counter()
        sd.build(out, {"train": args.build_clips}, seed=0, shard_size=args.build_clips, workers=workers)
        builds[workers] = args.build_clips / (time.perf_counter() - start)
        shutil.rmtree(out)

    print(f"\n| voice | speaker | split | x real time | clip s | flac/pcm |" + (f" WER ({args.asr}) |" if args.asr else ""))
    print("|---|---|---|---:|---:|---:|" + ("---:|" if args.asr else ""))
    for r in rows:
        line = (f"| {r['voice']} | {r['speaker']} | {r['split']} | {r['realtime_x']:.1f} | {r['mean_clip_s']:.2f} | "
                f"{r['flac_over_pcm']:.2f} |")
        print(line + (f" {100 * r['wer']:.1f}% |" if args.asr else ""))
    for workers, rate in builds.items():
        print(f"build (plan + synthesis + FLAC + parquet, training voices), {workers} worker(s): {rate:.1f} clips/s")
    print(json.dumps({"voices": rows, "build_clips_per_s": builds, "asr": args.asr, "clips": args.clips}))


if __name__ == "__main__":
    main()
