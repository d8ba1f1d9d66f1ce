"""Scoring a speech LM: greedy replies to conversations with cached encoder frames, word error rate
after text normalisation (jiwer), pooled over a corpus and per voice, and the held-out loss and
WER that audio training reports as it goes.

Used by scripts/audio_train.py, scripts/audio_eval.py, tasks/spoken.py and the benchmarks, so
every WER in the project is computed the same way.
"""

import re

import jiwer
import torch

from nanochat.common import print0
from nanochat.engine import Engine, context_budget
from nanochat.feature_cache import encode_with_cache
from nanochat.speech_batches import collate, make_examples

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3})")
# A number (a leading minus only where it cannot be a hyphen) or a run of letters/digits.
_TOKEN = re.compile(r"(?<![^\W_])-?\d+(?:\.\d+)?|[^\W_]+")
WER_CLIPS = 8  # held-out transcriptions decoded at each evaluation during training


def normalize_text(text):
    """Lowercase words without punctuation; numbers stay as written ("1,000" -> "1000", "-4" kept)."""
    text = _DIGIT_COMMA.sub("", text.lower().replace("\u2019", "'").replace("'", ""))
    return " ".join(_TOKEN.findall(text))


def word_error_rate(reference, hypothesis):
    """WER of hypothesis against reference after normalize_text (jiwer); 1.0 for an empty hypothesis."""
    reference, hypothesis = normalize_text(reference), normalize_text(hypothesis)
    if not reference:
        raise ValueError("word_error_rate: the reference has no words after normalisation")
    if not hypothesis:
        return 1.0  # every reference word deleted
    return jiwer.wer(reference, hypothesis)


def pooled_wer(pairs):
    """Corpus-level WER over (reference, hypothesis) pairs after normalize_text: all word errors
    over all reference words (jiwer's list form), so long references weigh more than short ones."""
    references = [normalize_text(r) for r, _ in pairs]
    if not references or not all(references):
        raise ValueError("pooled_wer needs at least one pair, and every reference needs words after normalisation")
    return jiwer.wer(references, [normalize_text(h) for _, h in pairs])


def transcription_scores(rows, references, replies):
    """Pooled WER of transcription replies: over every clip, over the read sentences alone (the
    other clips are questions) and per voice. rows are the speech shards' rows of the clips."""
    by_voice = {}
    for row, ref, reply in zip(rows, references, replies):
        by_voice.setdefault(f"{row['engine']}:{row['voice']}", []).append((ref, reply))
    sentences = [(ref, reply) for row, ref, reply in zip(rows, references, replies) if row["task"] == "transcribe"]
    return {"n": len(references), "wer": pooled_wer(list(zip(references, replies))),
            "wer_sentences": pooled_wer(sentences) if sentences else None,
            "wer_by_voice": {v: pooled_wer(p) for v, p in sorted(by_voice.items())}}


@torch.no_grad()
def generate_replies(model, engine, tokenizer, conversations, frames, max_tokens=64, batch_size=16):
    """Greedy assistant replies (text) to conversations (their reference reply dropped), each with its
    cached frames (T, ...) or None. A reply ends at max_tokens, or earlier where the batch's longest
    prompt fills the model's context (see engine.context_budget)."""
    replies = []
    for start in range(0, len(conversations), batch_size):
        convs = conversations[start:start + batch_size]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        audio = []
        for f in frames[start:start + batch_size]:
            if f is None:
                audio.append(None)
            else:
                tokens, _ = model.soft_tokens(f[None].to(model.gpt.get_device()), torch.tensor([f.size(0)]))
                audio.append(tokens)
        longest = max(len(p) + (0 if a is None else a.size(1)) for p, a in zip(prompts, audio))
        budget = min(max_tokens, context_budget(model.gpt.config.sequence_len, longest))
        sequences, _ = engine.generate_batch(prompts, max_tokens=budget, temperature=0.0, audio_features=audio)
        replies.extend(tokenizer.decode(seq[len(p):]) for seq, p in zip(sequences, prompts))
    return replies


@torch.no_grad()
def held_out_scores(model, tokenizer, cache, items, wer_items, batch_size, max_tokens, device, show=2):
    """{"loss": nats per assistant token over `items` (speech_batches Items), "wer": pooled greedy
    WER over the first WER_CLIPS of `wer_items` (transcription items; None without any)}; prints
    the first `show` (heard, said) pairs."""
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        examples = make_examples(model, tokenizer, cache, items[start:start + batch_size], max_tokens)
        idx, targets, frames, lengths = collate(examples, device)
        total += float(model(idx, targets, frames, lengths, loss_reduction="none").sum())
        count += int((targets >= 0).sum())
    convs = [item.conversation() for item in wer_items[:WER_CLIPS]]
    frames = encode_with_cache(model.encoder, [c["audio"] for c in convs], cache)
    replies = generate_replies(model, Engine(model.gpt, tokenizer), tokenizer, convs, frames, max_tokens=48)
    pairs = [(c["messages"][-1]["content"], reply) for c, reply in zip(convs, replies)]
    for reference, reply in pairs[:show]:
        print0(f"    heard {reference!r}\n    said  {reply!r}")
    return {"loss": total / max(1, count), "wer": pooled_wer(pairs) if pairs else None}
