"""On-disk cache of frozen-encoder features, so training epochs never re-run Whisper.

An entry is keyed by (sha256 of the clip's 16 kHz float32 sample bytes, encoder.cache_key) and
stored as one fp16 .npy file: root/<sha256(cache_key)[:16]>/<hash[:2]>/<hash>.npy. An augmented
variant of a clip (nanochat.augment.Variant: the augmentations and every parameter, seeds
included) is filed under sha256(clip hash | variant key) instead (entry_hash), so a clean clip
and its variants never share an entry, a variant is found without augmenting the audio again,
and a fixed set of variants per clip (augment.clip_variants) bounds what the cache holds: with n
variants a clip takes at most n + 1 entries per encoder. One small file
per clip is the simplest layout that is fast at our scale (~10k clips): measured on a 2-core CPU,
reading a 3 s clip's frames (150 x 512 fp16) takes ~0.2 ms and writing one ~8 ms (mostly the
fsync of the atomic write), against ~10-40 ms to encode it. Every write is atomic on its own. The .npy header
carries dtype and shape, so a truncated or foreign file is detected, logged and recomputed.

The cache grows with every clip and encoder it sees (whisper-base: ~150 KB per 3 s clip). prune()
keeps it under a size by deleting the least recently used entries (a hit refreshes an entry's
modification time); `audio_train --cache-max-gb` prunes after its warm-up, and

    python -m nanochat.feature_cache [--max-gb N]

prints what the cache holds and, with --max-gb, prunes it. Deleting entries only costs a re-encode.
"""

import argparse
import hashlib
import os

import numpy as np
import torch
from tqdm import tqdm

from nanochat.audio import SAMPLE_RATE
from nanochat.common import atomic_write, get_base_dir, logger


def audio_hash(samples):
    """sha256 hex of a clip's samples as 16 kHz float32 bytes (the cache's audio key)."""
    return hashlib.sha256(np.ascontiguousarray(samples, dtype=np.float32).tobytes()).hexdigest()


def entry_hash(clip_hash, variant=None):
    """The cache key of a clip's frames: its audio_hash, or for an augmented variant (anything
    with a .key naming it, see nanochat.augment.Variant) the sha256 of (audio hash, variant key)."""
    if variant is None or variant.key == "clean":
        return clip_hash
    return hashlib.sha256(f"{clip_hash}|{variant.key}".encode()).hexdigest()


class FeatureCache:
    """fp16 encoder features on disk, one .npy file per (clip, encoder)."""

    def __init__(self, root=None):
        self.root = root or os.path.join(get_base_dir(), "feature_cache")

    def path(self, audio_hash, cache_key):
        """Where the entry for (audio_hash, cache_key) lives."""
        key_dir = hashlib.sha256(cache_key.encode()).hexdigest()[:16]
        return os.path.join(self.root, key_dir, audio_hash[:2], audio_hash + ".npy")

    def get(self, audio_hash, cache_key):
        """The cached features as an fp16 CPU tensor (T, ...), or None on a miss. A corrupt entry
        (unreadable, not fp16, fewer than 2 dims, empty or non-finite) is removed and reported as a miss."""
        path = self.path(audio_hash, cache_key)
        if not os.path.exists(path):
            return None
        try:
            array = np.load(path, allow_pickle=False)
            problem = None
            if array.dtype != np.float16 or array.ndim < 2 or array.shape[0] == 0:
                problem = f"dtype {array.dtype}, shape {array.shape}; expected float16 (T>0, ...)"
            elif not np.isfinite(array).all():
                problem = "non-finite values"
        except (ValueError, OSError, EOFError) as e:
            problem = str(e)
        if problem is not None:
            logger.warning("feature cache: corrupt entry %s (%s); recomputing it", path, problem)
            try:
                os.remove(path)
            except OSError:  # removed by another process meanwhile, or a cache this process cannot write
                pass
            return None
        try:
            os.utime(path)  # a hit is a use: prune() deletes the least recently used entries first
        except OSError:  # a read-only or another user's cache still serves hits
            pass
        return torch.from_numpy(array)

    def put(self, audio_hash, cache_key, features):
        """Store features (T, ...) as fp16, atomically. Raises if they do not fit in fp16."""
        array = features.detach().to("cpu", torch.float16).numpy()
        if not np.isfinite(array).all():
            raise ValueError(f"features for {audio_hash} overflow fp16 (|x| > 65504) or are not finite; "
                             "they cannot be cached")
        with atomic_write(self.path(audio_hash, cache_key), "wb") as f:
            np.save(f, array, allow_pickle=False)

    def entries(self):
        """(last use, bytes, path) of every entry."""
        found = []
        for directory, _, names in os.walk(self.root):
            for name in names:
                if name.endswith(".npy"):
                    path = os.path.join(directory, name)
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:  # pruned or recomputed by another process meanwhile
                        continue
                    found.append((st.st_mtime, st.st_size, path))
        return found

    def prune(self, max_bytes, keep_used_since=None):
        """Delete the least recently used entries until the cache holds at most max_bytes, never
        one used at or after the time.time() `keep_used_since` (a running job's clips). Returns
        (entries deleted, bytes freed, bytes left)."""
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        deleted = freed = 0
        for used, size, path in entries:
            if total - freed <= max_bytes or (keep_used_since is not None and used >= keep_used_since):
                break
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            deleted, freed = deleted + 1, freed + size
        return deleted, freed, total - freed


@torch.no_grad()
def encode_with_cache(encoder, clips, cache, batch_size=16, variants=None):
    """Frozen-encoder features for 16 kHz float32 clips, running the encoder only on cache misses.

    Calls encoder.encode (the frozen part, whose output encoder.cache_key names); with
    layers="weighted" the caller applies encoder.mix to the result. `variants` (one per clip,
    None for the clean clip) are augmentations applied to a missing clip before it is encoded.
    Returns one fp16 CPU tensor (T_i, ...) per clip, trimmed to its valid length; hits and misses
    give identical values."""
    variants = [None] * len(clips) if variants is None else variants
    if len(variants) != len(clips):
        raise ValueError(f"{len(variants)} variants for {len(clips)} clips")
    hashes = [entry_hash(audio_hash(c), v) for c, v in zip(clips, variants)]
    key = encoder.cache_key
    found = {}
    for h in hashes:
        if h not in found:
            found[h] = cache.get(h, key)
    hits = sum(found[h] is not None for h in hashes)
    # Each distinct missing clip is encoded once, sorted by length so a batch pads little.
    misses = sorted({h: i for i, h in enumerate(hashes) if found[h] is None}.items(),
                    key=lambda item: len(clips[item[1]]))
    with tqdm(total=len(misses), desc="encoding cache misses", unit="clip", disable=not misses) as bar:
        for start in range(0, len(misses), batch_size):
            batch = misses[start:start + batch_size]
            audio = [clips[i] if variants[i] is None else variants[i](clips[i]) for _, i in batch]
            features, mel_lengths = encoder.preprocess(audio, sampling_rate=SAMPLE_RATE)
            hidden, lengths = encoder.encode(features, mel_lengths)
            for (h, _), frames, n in zip(batch, hidden, lengths.tolist()):
                found[h] = frames[:n].to("cpu", torch.float16)
                cache.put(h, key, found[h])
            bar.update(len(batch))
    if misses:  # a training step reads its batch through here: all hits are not news
        logger.info("feature cache: %d hits, %d misses (%d distinct clips encoded)", hits, len(clips) - hits,
                    len(misses))
    return [found[h] for h in hashes]


def main(argv=None):
    """Print the cache's size per encoder folder; with --max-gb, prune it to that size first."""
    parser = argparse.ArgumentParser(description="Inspect or shrink the Whisper feature cache.")
    parser.add_argument("--root", default=None, help="cache folder (default base_dir/feature_cache)")
    parser.add_argument("--max-gb", type=float, default=None, help="delete least recently used entries beyond this")
    args = parser.parse_args(argv)
    cache = FeatureCache(args.root)
    if args.max_gb is not None:
        deleted, freed, _ = cache.prune(int(args.max_gb * 1e9))
        print(f"deleted {deleted:,} least recently used entries ({freed / 1e9:.2f} GB)")
    by_encoder = {}
    for _, size, path in cache.entries():
        key_dir = os.path.relpath(path, cache.root).split(os.sep)[0]
        count, total = by_encoder.get(key_dir, (0, 0))
        by_encoder[key_dir] = (count + 1, total + size)
    for key_dir, (count, total) in sorted(by_encoder.items()):
        print(f"{key_dir}: {count:,} entries, {total / 1e9:.2f} GB")
    print(f"{cache.root}: {sum(c for c, _ in by_encoder.values()):,} entries, "
          f"{sum(t for _, t in by_encoder.values()) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
