"""Audio bytes in and out of the server: uploads decoded with soundfile (libsndfile: wav, flac, ogg
and mp3) with an error that says what is wrong, and synthesised speech encoded for the client.

A truncated file is refused rather than half-heard: libsndfile reads a WAV whose data chunk is cut
short, and an MP3 whose frames stop early, without complaint, so both are checked here (FLAC and
Ogg decoders fail by themselves).
"""

import io

import numpy as np
import soundfile as sf

INPUT_FORMATS = ("wav", "flac", "ogg", "mp3")
# format -> (libsndfile format, subtype, sample rate or None to keep the voice's, media type).
# OpenAI's pcm is 24 kHz 16-bit little-endian without a header; Opus only runs at 8-48 kHz.
SPEECH_FORMATS = {
    "wav": ("WAV", "PCM_16", None, "audio/wav"),
    "flac": ("FLAC", "PCM_16", None, "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", None, "audio/mpeg"),
    "opus": ("OGG", "OPUS", 24000, "audio/ogg"),
    "pcm": ("RAW", "PCM_16", 24000, "audio/L16;rate=24000;channels=1"),
}


class AudioInputError(ValueError):
    """Audio the server cannot take; status is the HTTP status it maps to."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _wav_data_truncated(data):
    """True when a RIFF/WAVE file declares more sample bytes in its data chunk than it holds."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return False
    order, pos = ("little" if data[:4] == b"RIFF" else "big"), 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4:pos + 8], order)
        if data[pos:pos + 4] == b"data":
            return size not in (0, 0xFFFFFFFF) and pos + 8 + size > len(data)  # 0 / ~0: streamed, length unknown
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    return False


def read_audio(data, name, max_bytes, max_seconds):
    """Bytes of an audio file -> (float32 samples (T,) or (T, channels), sample rate). `name` says
    which input it is in errors; over max_bytes is a 413, anything else wrong a 400."""
    if len(data) > max_bytes:
        raise AudioInputError(f"{name} is {len(data) / 2 ** 20:.1f} MiB; the limit is "
                              f"{max_bytes / 2 ** 20:.1f} MiB (--max-audio-mb)", status=413)
    if not data:
        raise AudioInputError(f"{name} is empty")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            declared, rate, kind = f.frames, f.samplerate, f.format
            if declared / rate > max_seconds:
                raise AudioInputError(f"{name} is {declared / rate:.1f} s long; the limit is {max_seconds:g} s "
                                      f"(--max-audio-seconds)")
            samples = f.read(dtype="float32")
    except sf.LibsndfileError as exc:
        raise AudioInputError(f"{name} could not be decoded as audio ({exc.error_string}); send "
                              f"{', '.join(INPUT_FORMATS)}") from None
    if (kind == "WAV" and _wav_data_truncated(data)) or len(samples) < declared:
        raise AudioInputError(f"{name} is truncated: its header promises more audio than the file holds")
    if len(samples) == 0:
        raise AudioInputError(f"{name} holds no samples")
    return samples, rate


def write_speech(samples, rate, fmt):
    """Mono float32 speech at `rate` -> (file bytes in `fmt`, media type); fmt from SPEECH_FORMATS."""
    import soxr
    container, subtype, out_rate, media_type = SPEECH_FORMATS[fmt]
    samples = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)  # int16 output must not wrap
    if out_rate is not None and out_rate != rate:
        samples, rate = soxr.resample(samples, rate, out_rate).astype(np.float32), out_rate
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=container, subtype=subtype,
             endian="LITTLE" if container == "RAW" else "FILE")
    return buf.getvalue(), media_type
