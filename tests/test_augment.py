"""Waveform augmentations: each is deterministic by seed, keeps the sample rate and (except speed)
the length, and does what it says, measured independently: frequencies by FFT peak, SNR from the
added signal, RT60 by Schroeder backward integration, the telephone band from the spectrum."""

import shutil

import numpy as np
import pytest

from nanochat import augment as A

SR = A.SAMPLE_RATE


def tone(freq, seconds=1.0, amplitude=0.5):
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(x):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / SR)[np.argmax(spectrum)]


@pytest.fixture(scope="module")
def speech():
    """Two seconds of something speech-like and deterministic: a vowel-ish harmonic tone in bursts."""
    t = np.arange(2 * SR) / SR
    x = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12)) * (np.sin(2 * np.pi * 3 * t) > -0.3)
    return (0.9 * x / np.abs(x).max()).astype(np.float32)


needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="pitch needs sox: apt-get install -y sox")


@pytest.mark.parametrize("name", [n for n in A.ORDER])
def test_every_augmentation_is_deterministic_by_seed_and_keeps_the_invariants(name, speech):
    if name == "pitch" and shutil.which("sox") is None:
        pytest.skip("pitch needs sox")
    draw = lambda seed: A.draw_variant(np.random.default_rng(seed), names=(name,), p=1.0)  # noqa: E731
    v = draw(0)
    assert [op for op, _ in v.ops] == [name] and draw(0) == v
    out = v(speech)
    assert np.array_equal(out, v(speech)) and np.array_equal(out, draw(0)(speech.copy()))
    assert out.dtype == np.float32 and out.ndim == 1 and np.isfinite(out).all() and np.abs(out).max() <= 1.0
    if name == "speed":
        factor = dict(v.ops[0][1])["factor"]
        assert abs(len(out) - len(speech) / factor) <= 1
    else:
        assert len(out) == len(speech)
    if name != "telephone":  # the one augmentation without parameters
        others = {draw(seed).key for seed in range(1, 6)}
        assert len(others - {v.key}) >= 1
        assert any(not np.array_equal(draw(seed)(speech)[:len(out)], out[:len(draw(seed)(speech))])
                   for seed in range(1, 6))


def test_speed_changes_tempo_and_pitch_together():
    x = tone(440)
    fast = A.speed(x, 1.1)
    assert abs(len(fast) - round(len(x) / 1.1)) <= 1
    assert peak_frequency(fast) == pytest.approx(484, abs=3)
    assert peak_frequency(A.speed(x, 0.9)) == pytest.approx(396, abs=3)


@needs_sox
def test_pitch_shifts_frequency_and_keeps_duration():
    x = tone(300)
    up = A.pitch(x, 3.0)
    assert len(up) == len(x)
    assert peak_frequency(up[2000:-2000]) == pytest.approx(300 * 2 ** (3 / 12), rel=0.02)
    assert peak_frequency(A.pitch(x, -12.0)[2000:-2000]) == pytest.approx(150, rel=0.02)


@pytest.mark.parametrize("beta", A.NOISE_COLOURS)
def test_noise_is_added_at_the_asked_snr_with_its_colour(speech, beta):
    out = A.noise(speech, 12.5, beta, seed=3)
    added = out.astype(np.float64) - speech
    snr = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(added ** 2))
    assert snr == pytest.approx(12.5, abs=0.01)
    # The power spectrum falls as 1/f^beta: the log-log slope over 50 Hz - 5 kHz, band-averaged.
    n = A.coloured_noise(2 ** 16, beta, seed=4)
    power = np.abs(np.fft.rfft(n)) ** 2
    f = np.fft.rfftfreq(len(n), 1 / SR)
    edges = np.geomspace(50, 5000, 12)
    centres = np.sqrt(edges[:-1] * edges[1:])
    bands = [power[(f >= lo) & (f < hi)].mean() for lo, hi in zip(edges[:-1], edges[1:])]
    slope = np.polyfit(np.log10(centres), np.log10(bands), 1)[0]
    assert slope == pytest.approx(-beta, abs=0.15)
    assert not np.array_equal(A.noise(speech, 12.5, beta, seed=3), A.noise(speech, 12.5, beta, seed=5))


def schroeder_rt60(rir):
    """RT60 from the energy decay curve (Schroeder 1965): the -5 to -25 dB slope (T20), times 3."""
    tail = rir[1:].astype(np.float64)  # the reverberant part, without the direct sound
    edc = np.cumsum(tail[::-1] ** 2)[::-1]
    edc_db = 10 * np.log10(edc / edc[0])
    t = np.arange(len(tail)) / SR
    fit = (edc_db <= -5) & (edc_db >= -25)
    slope = np.polyfit(t[fit], edc_db[fit], 1)[0]
    return -60 / slope


@pytest.mark.parametrize("rt60", [0.3, 0.8])
def test_room_impulse_response_has_the_asked_rt60_and_drr(rt60):
    rir = A.room_impulse_response(rt60, drr_db=4.0, seed=7)
    assert len(rir) == int(rt60 * SR) and rir[0] == 1.0
    # The RIR is cut at rt60, which bends the last few dB of the decay curve: T20 stays within 10%.
    assert schroeder_rt60(rir) == pytest.approx(rt60, rel=0.1)
    assert 10 * np.log10(rir[0] ** 2 / np.sum(rir[1:] ** 2)) == pytest.approx(4.0, abs=1e-6)
    assert np.array_equal(rir, A.room_impulse_response(rt60, 4.0, seed=7))


def test_reverb_smears_a_click_and_keeps_length_and_peak():
    x = np.zeros(SR, dtype=np.float32)
    x[1000] = 0.8
    wet = A.reverb(x, rt60=0.5, drr_db=0.0, seed=1)
    assert len(wet) == len(x) and np.abs(wet).max() == pytest.approx(0.8, rel=1e-6)
    assert np.abs(wet[:1000]).max() < 1e-6  # causal (up to FFT rounding)
    assert np.sqrt(np.mean(wet[1200:4000] ** 2)) > 0.01  # energy after the click: the room
    # The same as a direct-form convolution with the RIR, rescaled to the input's peak.
    direct = np.convolve(x, A.room_impulse_response(0.5, 0.0, seed=1))[:len(x)]
    np.testing.assert_allclose(wet, direct * 0.8 / np.abs(direct).max(), atol=1e-6)


def test_telephone_keeps_only_the_voice_band():
    x = 0.3 * np.random.default_rng(0).standard_normal(2 * SR).astype(np.float32)
    out = A.telephone(x)
    assert len(out) == len(x) and np.abs(out).max() == pytest.approx(np.abs(x).max(), rel=1e-5)
    power = np.abs(np.fft.rfft(out)) ** 2
    f = np.fft.rfftfreq(len(out), 1 / SR)
    band = power[(f > 500) & (f < 3000)].mean()
    assert power[f > 4200].mean() < band * 1e-4    # above the 8 kHz channel's Nyquist: gone
    assert power[f < 100].mean() < band * 1e-3     # below the band-pass
    assert power[(f > 3700) & (f < 3900)].mean() < band * 0.1


def test_gain_scales_and_clips():
    x = tone(200, amplitude=0.5)
    np.testing.assert_allclose(A.gain(x, -6.0), x * 10 ** (-6 / 20), rtol=1e-6)
    loud = A.gain(x, 12.0)
    assert np.abs(loud).max() == 1.0 and (np.abs(loud) == 1.0).mean() > 0.3


def test_variant_key_names_every_parameter_and_order_is_the_signal_path():
    v = A.variant(gain={"db": -3.0}, noise={"snr_db": 10.0, "beta": 1.0, "seed": 2}, speed={"factor": 1.1})
    assert [name for name, _ in v.ops] == ["speed", "noise", "gain"]
    assert v.key == "speed:factor=1.1;noise:beta=1.0,seed=2,snr_db=10.0;gain:db=-3.0"
    assert A.variant(noise={"snr_db": np.float64(10.0), "beta": 1.0, "seed": np.int64(2)}).key == \
        "noise:beta=1.0,seed=2,snr_db=10.0"  # numpy scalars give the same key
    assert A.Variant().key == "clean" and np.array_equal(A.Variant()(tone(100)), tone(100))
    with pytest.raises(ValueError, match="unknown augmentations.*'echo'"):
        A.variant(echo={})


def test_clip_variants_are_a_fixed_set_per_clip():
    a = A.clip_variants("clip-a", 4, seed=1)
    assert a == A.clip_variants("clip-a", 4, seed=1)
    assert a[:2] == A.clip_variants("clip-a", 2, seed=1)  # more variants extend the same list
    assert a != A.clip_variants("clip-b", 4, seed=1) and a != A.clip_variants("clip-a", 4, seed=2)
    assert len({v.key for v in a}) == 4
    # Turning an augmentation off leaves the others' parameters as they were.
    only = A.clip_variants("clip-a", 4, seed=1, names=("noise", "gain"))
    for full, part in zip(a, only):
        assert dict(part.ops) == {k: p for k, p in full.ops if k in ("noise", "gain")}


def test_eval_conditions_are_fixed_settings_seeded_by_clip():
    assert A.eval_variant("clean", "x").key == "clean"
    noisy = A.eval_variant("noisy", "x")
    assert noisy == A.eval_variant("noisy", "x") and noisy != A.eval_variant("noisy", "y")
    assert dict(noisy.ops[0][1])["snr_db"] == 10.0
    with pytest.raises(ValueError, match="unknown condition 'windy'"):
        A.eval_variant("windy", "x")
