"""Pretraining batches: tokenised documents packed into rows by best fit, with exact resume.

Every document starts with BOS. A row holds T+1 tokens (inputs are its first T, targets its last
T) and is filled from a buffer of ~1000 tokenised documents: repeatedly the longest document that
still fits whole goes in; when none fits, the shortest buffered document is cropped to fill the row
exactly and the rest of it is dropped. No padding, every row starts at a document boundary, and
at most one document per row is cut.

Resume: the state saved with each batch names the last document read and every document still
in the buffer (by epoch, shard, row group and index within the row group). Restoring re-reads and re-tokenises those
documents and refills the buffer in the order they were read, so the packer sees exactly the buffer
it had and the batches continue as if never interrupted. Only naming the oldest unread position
would not do: best fit takes documents out of order, and a long document can wait in the buffer
for many row groups. The cost is a list of up to buffer_size small ints per rank.
"""

import bisect
from collections import defaultdict

import torch

from nanochat.common import get_dist_info
from nanochat.dataset import read_row_group, row_groups


class BestFitPacker:
    """Fills rows of a given length from a buffer of tokenised documents, best fit first.

    `docs` yields (doc_id, tokens) and keeps the buffer at buffer_size documents. Ties go to the
    document buffered first. crop="shortest" is the rule used for training; crop="first" (cut the
    document buffered first) is the older rule, kept to measure the difference. crop=None never
    cuts a document (chat fine-tuning packs whole conversations): a row ends short when nothing
    buffered fits the space left or the documents run out, and the caller pads it; every document
    must then fit in a row."""

    def __init__(self, docs, buffer_size=1000, crop="shortest"):
        if crop not in ("shortest", "first", None):
            raise ValueError(f"crop must be 'shortest', 'first' or None, got {crop!r}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self.docs = iter(docs)
        self.buffer_size = buffer_size
        self.crop = crop
        self._keys = []  # (length, arrival number), sorted: bisect finds the best fit
        self._buffer = {}  # arrival number -> (doc_id, tokens), in arrival order
        self._arrivals = 0
        self.last_id = None  # id of the last document taken from `docs`
        self.cropped_tokens = 0  # tokens dropped by crops so far

    def add(self, doc_id, tokens):
        """Put a document into the buffer (as if it had just arrived from `docs`)."""
        self._buffer[self._arrivals] = (doc_id, tokens)
        bisect.insort(self._keys, (len(tokens), self._arrivals))
        self._arrivals += 1

    def buffered_ids(self):
        """Ids of the buffered documents in arrival order."""
        return [doc_id for doc_id, _ in self._buffer.values()]

    def _refill(self):
        while len(self._keys) < self.buffer_size:
            try:
                doc_id, tokens = next(self.docs)
            except StopIteration:
                return
            self.last_id = doc_id
            self.add(doc_id, tokens)

    def next_row(self, capacity):
        """(row, placements) for one row of `capacity` tokens; placements lists
        (doc_id, doc length, tokens used) in row order. None once the documents run out (with
        crop=None, a row the documents ran out in is still returned, short)."""
        row, placements = [], []
        while len(row) < capacity:
            self._refill()
            if not self._keys:
                return (row, placements) if row and self.crop is None else None
            space = capacity - len(row)
            i = bisect.bisect_right(self._keys, (space, float("inf"))) - 1
            if i >= 0:  # the longest that fits; among equals the first to arrive
                i = bisect.bisect_left(self._keys, (self._keys[i][0], -1))
            elif self.crop is None:
                if not row:  # a document that never fits would stay buffered and starve every row
                    raise ValueError(f"no buffered document fits in a row of {capacity} tokens (the shortest "
                                     f"has {self._keys[0][0]}); without cropping, every document must fit")
                break
            elif self.crop == "first":
                arrival = next(iter(self._buffer))  # dicts keep insertion order
                i = bisect.bisect_left(self._keys, (len(self._buffer[arrival][1]), arrival))
            else:
                i = 0  # the shortest (first to arrive among equals)
            length, arrival = self._keys.pop(i)
            doc_id, tokens = self._buffer.pop(arrival)
            used = min(length, space)
            row.extend(tokens[:used])
            self.cropped_tokens += length - used
            placements.append((doc_id, length, used))
        return row, placements


def pack_rows(docs, capacity, buffer_size=1000, crop="shortest"):
    """Pure-python packing of a list of token lists: yields (row, placements) with document
    indices as ids, until the documents can no longer fill a row."""
    packer = BestFitPacker(enumerate(docs), buffer_size, crop)
    while (result := packer.next_row(capacity)) is not None:
        yield result


def _rank_units(split, rank, world_size, data_dir):
    """This rank's reading units (shard, row group, part, path) and the number of parts per row
    group. Ranks stride over the split's row groups; only when a split has fewer row groups than
    there are ranks (a small validation shard) is each row group also divided among ranks by
    document index (doc % parts == part), so that every rank still gets its own documents."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    groups = row_groups(split, data_dir)
    if not groups:
        raise RuntimeError(f"the {split} split has no row groups")
    parts = -(-world_size // len(groups))
    units = [(shard, rg, part, path) for shard, rg, path in groups for part in range(parts)]
    return units[rank::world_size], parts


def _tokenize(tokenizer, texts, rows, path, row_group, threads):
    """BOS + tokens of texts[j] for each j in rows; a document that cannot be encoded is a ValueError
    naming its shard, row group and row."""
    try:
        return tokenizer.encode([texts[j] for j in rows], prepend=tokenizer.get_bos_token_id(), num_threads=threads)
    except (TypeError, ValueError):
        for j in rows:
            try:
                tokenizer.encode(texts[j])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: row group {row_group}, row {j} cannot be tokenised ({e})") from None
        raise


def _document_stream(tokenizer, units, parts, start, threads, batch_size):
    """(doc_id, tokens) forever, epoch after epoch, from start = (epoch, unit, first doc index).
    doc_id = (epoch, shard, row group, doc index), which sorts in reading order."""
    epoch, first_unit, first_doc = start
    while True:
        found = False
        for u in range(first_unit, len(units)):
            shard, rg, part, path = units[u]
            texts = read_row_group(path, rg)
            mine = [j for j in range(first_doc, len(texts)) if j % parts == part]
            for b in range(0, len(mine), batch_size):
                batch = mine[b:b + batch_size]
                for j, ids in zip(batch, _tokenize(tokenizer, texts, batch, path, rg, threads)):
                    found = True
                    yield (epoch, shard, rg, j), ids
            first_doc = 0
        if not found and first_unit == 0:
            raise RuntimeError(f"this rank's share of the data ({len(units)} row groups) holds no documents")
        epoch, first_unit = epoch + 1, 0


def open_packer(tokenizer, split, rank=0, world_size=1, resume_state_dict=None, buffer_size=1000,
                tokenizer_threads=4, tokenizer_batch_size=128, data_dir=None):
    """A BestFitPacker over one rank's documents of a split, fresh or restored from a state dict
    made by packer_state()."""
    units, parts = _rank_units(split, rank, world_size, data_dir)
    state = resume_state_dict
    if state is None:
        stream = _document_stream(tokenizer, units, parts, (0, 0, 0), tokenizer_threads, tokenizer_batch_size)
        return BestFitPacker(stream, buffer_size)
    if (state.get("split"), state.get("rank"), state.get("world_size")) != (split, rank, world_size):
        raise ValueError(f"this dataloader state was saved for the {state.get('split')} split by rank "
                         f"{state.get('rank')} of {state.get('world_size')}; it cannot resume the {split} split "
                         f"on rank {rank} of {world_size}. Each rank must save and restore its own state.")
    unit_of = {(shard, rg): (u, path) for u, (shard, rg, _, path) in enumerate(units)}

    def find(shard, rg):
        if (shard, rg) not in unit_of:
            raise ValueError(f"the dataloader state names shard {shard} row group {rg}, which rank {rank} does "
                             "not read: the shards have changed since the state was saved")
        return unit_of[(shard, rg)]

    last = (state["epoch"], state["shard"], state["row_group"], state["doc"])
    start = (state["epoch"], find(state["shard"], state["row_group"])[0], state["doc"] + 1)
    stream = _document_stream(tokenizer, units, parts, start, tokenizer_threads, tokenizer_batch_size)
    packer = BestFitPacker(stream, buffer_size)
    for epoch, shard, rg, docs in state["buffer"]:
        path = find(shard, rg)[1]
        texts = read_row_group(path, rg)
        for j, ids in zip(docs, _tokenize(tokenizer, texts, docs, path, rg, tokenizer_threads)):
            packer.add((epoch, shard, rg, j), ids)
    packer.last_id = last
    return packer


def packer_state(packer, split, rank=0, world_size=1):
    """A small JSON-friendly dict from which open_packer() continues exactly where `packer` is:
    the last document read and the documents still buffered, grouped by row group."""
    epoch, shard, rg, doc = packer.last_id
    groups = defaultdict(list)  # buffered ids are in reading order, and grouping keeps that order
    for e, s, g, j in packer.buffered_ids():
        groups[(e, s, g)].append(j)
    return {"epoch": epoch, "shard": shard, "row_group": rg, "doc": doc,
            "buffer": [[e, s, g, docs] for (e, s, g), docs in groups.items()],
            "split": split, "rank": rank, "world_size": world_size}


def tokenizing_distributed_data_loader_bestfit(tokenizer, B, T, split, device="cpu", resume_state_dict=None,
                                               buffer_size=1000, tokenizer_threads=4, tokenizer_batch_size=128,
                                               data_dir=None):
    """Endless (inputs, targets, state_dict) batches for this DDP rank: inputs and targets are
    (B, T) int64 on `device`, targets shifted by one; state_dict resumes right after the batch
    (each rank must save its own). Ranks read disjoint documents."""
    _, rank, _, world_size = get_dist_info()
    packer = open_packer(tokenizer, split, rank, world_size, resume_state_dict, buffer_size,
                         tokenizer_threads, tokenizer_batch_size, data_dir)
    device = torch.device(device)
    use_cuda = device.type == "cuda"
    if use_cuda:  # page-locked staging lets the host-to-device copy run asynchronously
        staging = torch.empty((2, B, T), dtype=torch.long, pin_memory=True)
        copied = torch.cuda.Event()
    while True:
        rows = [packer.next_row(T + 1)[0] for _ in range(B)]
        state = packer_state(packer, split, rank, world_size)
        batch = torch.tensor(rows, dtype=torch.long)
        if use_cuda:
            copied.synchronize()  # the previous batch has left the staging buffer
            staging[0].copy_(batch[:, :-1])
            staging[1].copy_(batch[:, 1:])
            on_device = staging.to(device, non_blocking=True)
            copied.record()
            inputs, targets = on_device[0], on_device[1]
        else:
            inputs, targets = batch[:, :-1].contiguous().to(device), batch[:, 1:].contiguous().to(device)
        yield inputs, targets, state
