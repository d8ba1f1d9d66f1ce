"""Waveform augmentations for spoken data: the same sentence as if said by another speaker, in a
room, over a noisy or band-limited channel, at another level.

Every function maps 16 kHz mono float32 samples to 16 kHz mono float32 samples and is a pure
function of its arguments (random parts take an explicit integer seed), so a variant is fully
described by its parameters: that description (Variant.key) is what the feature cache files
augmented frames under. All keep the length except speed, which changes it by 1/factor.

    speed      resampling, tempo and pitch together: 0.9 / 1.1 (Ko et al. 2015, Interspeech)
    pitch      sox's WSOLA pitch shift, length kept: +-3 semitones (~+-19% F0)
    noise      coloured Gaussian noise (white, pink, brown: 1/f^beta spectra) at an SNR in dB
    reverb     a synthetic room: exponentially decaying Gaussian noise (Polack 1988's statistical
               model of late reverberation) with decay time RT60, plus the direct sound at a
               direct-to-reverberant ratio (DRR)
    telephone  300-3400 Hz band-pass (the ITU-T G.712 voice band) and an 8 kHz channel
    gain       a level change in dB; the result is clipped at full scale, like a recording

No recorded noise ships in an offline package (none on PyPI or Debian fits), so the noise is
synthetic; babble built from other clips would be the next step toward real rooms.
"""

import hashlib
import subprocess
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.signal
import soxr

from nanochat.audio import SAMPLE_RATE

SPEEDS = (0.9, 1.1)              # with 1.0 (no augmentation): Ko et al. 2015's three factors
PITCH_SEMITONES = 3.0            # |shift| at most
NOISE_SNR_DB = (5.0, 30.0)       # from a loud cafe to a quiet room
NOISE_COLOURS = (0.0, 1.0, 2.0)  # beta in 1/f^beta: white, pink, brown
REVERB_RT60_S = (0.2, 1.0)       # a furnished room (~0.3 s) to a lecture hall (~1 s)
REVERB_DRR_DB = (-3.0, 10.0)     # a laptop mic across a room to one close to the speaker
TELEPHONE_BAND_HZ = (300.0, 3400.0)
TELEPHONE_RATE = 8000
GAIN_DB = (-20.0, 6.0)           # quiet to a clipping-loud microphone


def speed(samples, factor):
    """Play `factor` times faster (tempo and pitch): resampled, so the length becomes len / factor."""
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    return soxr.resample(samples, SAMPLE_RATE * factor, SAMPLE_RATE, quality="HQ").astype(np.float32)


def pitch(samples, semitones):
    """Shift the pitch by `semitones` keeping the duration (sox `pitch`, WSOLA), same length."""
    try:
        proc = subprocess.run(["sox", "-D", "-t", "f32", "-r", str(SAMPLE_RATE), "-c", "1", "-", "-t", "f32", "-",
                               "pitch", f"{100 * semitones:.2f}"],
                              input=np.ascontiguousarray(samples, dtype="<f4").tobytes(), capture_output=True, check=True)
    except FileNotFoundError:
        raise RuntimeError("pitch shifting needs sox: apt-get install -y sox") from None
    return _fit(np.frombuffer(proc.stdout, dtype="<f4"), len(samples))


def coloured_noise(n, beta, seed):
    """n samples of Gaussian noise whose power spectrum falls as 1/f^beta, unit RMS."""
    m = scipy.fft.next_fast_len(max(n, 2), real=True)  # a prime-length FFT is ~10x slower
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(m))
    f = np.fft.rfftfreq(m)
    f[0] = f[1]  # no infinite gain at DC
    noise = np.fft.irfft(spectrum / f ** (beta / 2), m)[:n]
    return (noise / np.sqrt(np.mean(noise ** 2))).astype(np.float32)


def noise(samples, snr_db, beta, seed):
    """Add coloured noise (see coloured_noise) at `snr_db` below the clip's mean power."""
    power = float(np.mean(np.square(samples, dtype=np.float64)))
    scale = np.sqrt(power / 10 ** (snr_db / 10))
    return (samples + scale * coloured_noise(len(samples), beta, seed)).astype(np.float32)


def room_impulse_response(rt60, drr_db, seed):
    """A synthetic RIR: the direct sound, then Gaussian noise whose energy decays 60 dB in rt60
    seconds (Polack's model), scaled so direct / reverberant energy is `drr_db`. Lasts rt60."""
    n = max(2, int(rt60 * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    # Amplitude exp(-a t) with a = ln(10^3) / rt60: a 1000-fold amplitude (60 dB energy) drop at rt60.
    tail = np.random.default_rng(seed).standard_normal(n) * np.exp(-np.log(1000.0) * t / rt60)
    tail[0] = 0.0
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail ** 2))
    tail[0] = 1.0
    return tail


def reverb(samples, rt60, drr_db, seed):
    """Convolve with room_impulse_response (scipy.signal.fftconvolve); the tail past the clip is
    cut so the length is kept, and the peak is matched to the input's."""
    wet = scipy.signal.fftconvolve(samples, room_impulse_response(rt60, drr_db, seed))[:len(samples)]
    return _match_peak(wet, samples)


def telephone(samples):
    """The voice band of a telephone line: 300-3400 Hz band-pass (4th-order Butterworth, zero
    phase) and a trip through 8 kHz; same length, peak matched to the input's."""
    sos = scipy.signal.butter(4, TELEPHONE_BAND_HZ, btype="bandpass", fs=SAMPLE_RATE, output="sos")
    narrow = soxr.resample(scipy.signal.sosfiltfilt(sos, samples), SAMPLE_RATE, TELEPHONE_RATE, quality="HQ")
    wide = soxr.resample(narrow, TELEPHONE_RATE, SAMPLE_RATE, quality="HQ")
    return _match_peak(_fit(wide, len(samples)), samples)


def gain(samples, db):
    """Scale by `db` decibels, clipped at full scale (+-1) like a recording."""
    return np.clip(samples * np.float32(10 ** (db / 20)), -1.0, 1.0).astype(np.float32)


def _fit(samples, n):
    """Cut or zero-pad to exactly n samples (sox and resampling round the length)."""
    out = np.zeros(n, dtype=np.float32)
    out[:min(n, len(samples))] = samples[:n]
    return out


def _match_peak(samples, reference):
    peak = float(np.abs(samples).max())
    target = float(np.abs(reference).max())
    return (samples * (target / peak if peak > 0 else 0.0)).astype(np.float32)


# ---------------------------------------------------------------------------
# Variants: which augmentations, with which parameters. Applied in a fixed order, the order of
# the signal path: the speaker (speed, pitch), the room, the background, the line, the level.

OPS = {"speed": speed, "pitch": pitch, "reverb": reverb, "noise": noise, "telephone": telephone, "gain": gain}
ORDER = tuple(OPS)


@dataclass(frozen=True)
class Variant:
    """A chain of augmentations: ((name, ((param, value), ...)), ...) in ORDER; empty is the clean clip."""
    ops: tuple = ()

    @property
    def key(self):
        """A canonical text of every parameter: equal keys mean equal audio for the same clip."""
        return ";".join(f"{name}:" + ",".join(f"{k}={v!r}" for k, v in params) for name, params in self.ops) or "clean"

    @property
    def digest(self):
        return hashlib.sha256(self.key.encode()).hexdigest()[:16]

    def __call__(self, samples):
        """Apply the chain to 16 kHz float32 samples; the result is clipped at full scale (+-1), as a
        recording would be."""
        out = np.asarray(samples, dtype=np.float32)
        for name, params in self.ops:
            out = OPS[name](out, **dict(params))
        return np.clip(out, -1.0, 1.0) if self.ops else out


def variant(**ops):
    """A Variant from keyword arguments, e.g. variant(noise={"snr_db": 10, "beta": 1, "seed": 0})."""
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown augmentations {sorted(unknown)}; known: {list(OPS)}")
    plain = lambda v: v.item() if isinstance(v, np.generic) else v  # noqa: E731 (numpy scalars repr differently)
    return Variant(tuple((name, tuple(sorted((k, plain(v)) for k, v in ops[name].items()))) for name in ORDER
                         if name in ops))


def draw_variant(rng, names=ORDER, p=0.5):
    """A random Variant: each augmentation in `names` is applied with probability p, its
    parameters drawn from the module's ranges (rounded, so the key is short and exact)."""
    unknown = set(names) - set(OPS)
    if unknown:
        raise ValueError(f"unknown augmentations {sorted(unknown)}; known: {list(OPS)}")
    seed = lambda: int(rng.integers(2 ** 31))  # noqa: E731
    uniform = lambda low_high: round(float(rng.uniform(*low_high)), 2) + 0.0  # noqa: E731 (+0.0: no "-0.0" key)
    draws = {"speed": lambda: {"factor": float(rng.choice(SPEEDS))},
             "pitch": lambda: {"semitones": uniform((-PITCH_SEMITONES, PITCH_SEMITONES))},
             "reverb": lambda: {"rt60": uniform(REVERB_RT60_S), "drr_db": uniform(REVERB_DRR_DB), "seed": seed()},
             "noise": lambda: {"snr_db": uniform(NOISE_SNR_DB), "beta": float(rng.choice(NOISE_COLOURS)),
                               "seed": seed()},
             "telephone": lambda: {},
             "gain": lambda: {"db": uniform(GAIN_DB)}}
    # Every augmentation consumes the stream the same way whether or not it is kept, so turning
    # one off does not change the parameters the others draw.
    chosen = {}
    for name in ORDER:
        keep, params = rng.random() < p, draws[name]()
        if keep and name in names:
            chosen[name] = params
    return variant(**chosen)


def clip_variants(clip_key, n, seed=0, names=ORDER, p=0.5):
    """The fixed list of n augmented Variants of one clip (clip_key: its audio hash or id): the
    same clip, n and seed always give the same variants, so a cache can hold them all."""
    digest = int(hashlib.sha256(f"{seed}|{clip_key}".encode()).hexdigest()[:16], 16)
    rng = np.random.default_rng(digest)
    return [draw_variant(rng, names, p) for _ in range(n)]


# The held-out conditions audio_eval reports beside the clean clips: one fixed setting each (the
# seed varies per clip), so runs compare on the same audio.
EVAL_CONDITIONS = {
    "clean": {},
    "noisy": {"noise": {"snr_db": 10.0, "beta": 1.0}},           # pink noise at 10 dB SNR
    "reverberant": {"reverb": {"rt60": 0.6, "drr_db": 0.0}},      # a living room, mic ~1-2 m away
}


def scored_conditions(conditions):
    """The conditions an evaluation scores: clean always and first (the headline figures), then the
    other asked ones in order."""
    return ["clean"] + [c for c in conditions if c != "clean"]


def eval_variant(condition, clip_key):
    """The Variant of an EVAL_CONDITIONS condition for one clip (its noise / room drawn from the clip key)."""
    if condition not in EVAL_CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; known: {list(EVAL_CONDITIONS)}")
    seed = int(hashlib.sha256(f"{condition}|{clip_key}".encode()).hexdigest()[:8], 16)
    ops = {name: {**params, "seed": seed} for name, params in EVAL_CONDITIONS[condition].items()}
    return variant(**ops)
