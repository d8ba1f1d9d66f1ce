"""Chat fine-tuning batches: whole rendered conversations packed into rows by best fit.

Each conversation is rendered by Tokenizer.render_conversation into ids and a mask (1 on the
tokens the assistant is trained to produce: its text, its python calls, <|assistant_end|>). A
row holds T+1 tokens (inputs its first T, targets its last T) and is filled from a buffer of
rendered conversations: repeatedly the longest one that still fits whole goes in
(dataloader.BestFitPacker with crop=None); when none fits, the rest of the row is padding, BOS
with target -1. A target is -1 wherever the mask is 0, so the loss is on assistant tokens only.

A conversation longer than a row is cut after its last assistant turn that ends within the row,
so a row never ends inside a turn it trains on ("truncated"); when not even the first exchange
fits, it is skipped ("too_long"), and so is a conversation with no assistant turn ("untrained",
e.g. an empty one). Trailing tokens after the last assistant turn are dropped too: nothing after
them is trained. Every placed conversation therefore carries at least one trained token, every
row holds at least one conversation, and no row is without a trained target (upstream's SFT
loader let never-fitting conversations clog its buffer until rows were pure padding and the loss
went NaN). The model's loss also stays finite on a batch with no target (gpt.py averages over
max(1, targets)), so the guarantee does not rest on the packer alone. The counts are in `stats`.

Order and ranks: each epoch visits every conversation once, in an order shuffled by (seed,
epoch); rank r of W takes positions r, r+W, ... of that order, so ranks read disjoint
conversations. `conversations` is anything with len() and [i] (a Task, a list); another iterable
is read into a list first.

Resume: the state names the next position to read and the positions still buffered; restoring
re-renders the buffered conversations in the order they were read, so the rows continue exactly
as if never interrupted (the dataloader's scheme, for conversations).
"""

import random
import sys

import torch

from nanochat.common import get_dist_info
from nanochat.dataloader import BestFitPacker

# Conversations buffered for best fit. On 4,018 chitchat-dataset conversations (runs/cpu.sh's
# tokenizer, one epoch) the padding share of rows of 513 tokens is 20.8% with a buffer of 1, 4.1%
# with 10, 2.3% with 100 and 1.9% with 1000 (rows of 2049: 23.0%, 1.2%, 0.2%, 0.1%). 100 keeps
# nearly all of the gain while the reading order stays close to the shuffled one.
DEFAULT_BUFFER_SIZE = 100
STAT_KEYS = ("read", "whole", "truncated", "too_long", "untrained", "dropped_trained_tokens", "rows", "pad_tokens")


def fit_conversation(ids, mask, capacity, assistant_end):
    """(ids, mask, status) of a rendered conversation made to fit in `capacity` tokens.

    The kept prefix ends right after the last <|assistant_end|> within the capacity. status is
    "whole" (every trained token kept), "truncated" (later assistant turns cut), "too_long" (not
    even the first assistant turn fits: nothing kept) or "untrained" (no trained token at all)."""
    if not any(mask):
        return [], [], "untrained"
    ends = [i + 1 for i in range(min(len(ids), capacity)) if ids[i] == assistant_end and mask[i]]
    if not ends:
        return [], [], "too_long"
    cut = ends[-1]
    return ids[:cut], mask[:cut], "truncated" if any(mask[cut:]) else "whole"


class ConversationPacker:
    """Rows of `capacity` tokens (ids, mask) from one rank's share of `conversations`, epoch after
    epoch (`epochs` None: forever). `state_dict()` after a row resumes right after it."""

    def __init__(self, conversations, tokenizer, capacity, rank=0, world_size=1, seed=0, shuffle=True,
                 buffer_size=DEFAULT_BUFFER_SIZE, epochs=None, resume_state_dict=None):
        if not (hasattr(conversations, "__len__") and hasattr(conversations, "__getitem__")):
            conversations = list(conversations)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(conversations) < world_size:
            raise ValueError(f"{len(conversations)} conversations cannot be shared among {world_size} ranks: "
                             "every rank needs at least one")
        self.conversations = conversations
        self.tokenizer = tokenizer
        self.capacity = capacity
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = tokenizer.encode_special("<|assistant_end|>")
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._buffered = {}  # (epoch, position) -> (conversation index, mask) of a buffered conversation
        self._order_cache = (None, None)  # (epoch, this rank's conversation indices in reading order)
        self._next = (0, 0)  # (epoch, position) of the next conversation to read
        state = resume_state_dict
        if state is not None:
            saved = (state.get("rank"), state.get("world_size"), state.get("capacity"), state.get("size"))
            if saved != (rank, world_size, capacity, len(conversations)):
                raise ValueError(f"this chat data state was saved by rank {saved[0]} of {saved[1]} for rows of "
                                 f"{saved[2]} tokens over {saved[3]} conversations; it cannot resume rank {rank} "
                                 f"of {world_size} with rows of {capacity} over {len(conversations)}")
            self.stats.update(state["stats"])
            self._next = (state["epoch"], state["position"])
        self.packer = BestFitPacker(self._stream(*self._next), buffer_size, crop=None)
        for epoch, position in [] if state is None else state["buffer"]:
            ids, mask, _, _ = self._render(epoch, position)
            self._buffered[(epoch, position)] = (self._order(epoch)[position], mask)
            self.packer.add((epoch, position), ids)

    def _order(self, epoch):
        if self._order_cache[0] != epoch:
            order = list(range(len(self.conversations)))
            if self.shuffle:
                random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self._order_cache = (epoch, order[self.rank::self.world_size])
        return self._order_cache[1]

    def _render(self, epoch, position):
        """(ids, mask, status, trained tokens dropped) of one conversation, fitted to a row."""
        index = self._order(epoch)[position]
        conversation = self.conversations[index]
        if not isinstance(conversation, dict):
            raise ValueError(f"conversation {index}: expected a dict with 'messages', got {conversation!r:.80}")
        if not conversation.get("messages"):
            return [], [], "untrained", 0
        try:
            ids, mask = self.tokenizer.render_conversation(conversation, max_tokens=sys.maxsize)
        except ValueError as e:
            raise ValueError(f"conversation {index}: {e}") from e
        kept_ids, kept_mask, status = fit_conversation(ids, mask, self.capacity, self.assistant_end)
        return kept_ids, kept_mask, status, sum(mask) - sum(kept_mask)

    def _stream(self, epoch, position):
        """(doc_id, ids) of the conversations that fit, counting every one read in stats."""
        while self.epochs is None or epoch < self.epochs:
            whole_epoch, placed = position == 0, 0
            for position in range(position, len(self._order(epoch))):
                ids, mask, status, dropped = self._render(epoch, position)
                self._next = (epoch, position + 1)
                self.stats["read"] += 1
                self.stats[status] += 1
                self.stats["dropped_trained_tokens"] += dropped
                if ids:
                    placed += 1
                    self._buffered[(epoch, position)] = (self._order(epoch)[position], mask)
                    yield (epoch, position), ids
            if whole_epoch and not placed:
                raise ValueError(f"none of rank {self.rank}'s {len(self._order(epoch))} conversations can be "
                                 f"trained on: {self.stats['untrained']} have no assistant turn and "
                                 f"{self.stats['too_long']} a first exchange longer than a row of {self.capacity} "
                                 "tokens (raise the sequence length or drop those conversations)")
            epoch, position = epoch + 1, 0
            self._next = (epoch, position)

    def next_row(self):
        """(ids, mask, indices) of one row: ids padded with BOS (mask 0) to the capacity, and the
        indices of the conversations in it, in row order. None once a finite number of epochs is
        used up."""
        result = self.packer.next_row(self.capacity)
        if result is None:
            return None
        ids, placements = result
        placed = [self._buffered.pop(doc_id) for doc_id, _, _ in placements]
        pad = self.capacity - len(ids)
        self.stats["rows"] += 1
        self.stats["pad_tokens"] += pad
        return ids + [self.bos] * pad, [m for _, mask in placed for m in mask] + [0] * pad, [i for i, _ in placed]

    def state_dict(self):
        """A small JSON-friendly dict from which a new packer continues exactly where this one is:
        the next conversation to read and the ones still buffered, in the order they were read."""
        epoch, position = self._next
        return {"epoch": epoch, "position": position, "buffer": [list(i) for i in self.packer.buffered_ids()],
                "stats": dict(self.stats), "rank": self.rank, "world_size": self.world_size,
                "capacity": self.capacity, "size": len(self.conversations)}


def sft_data_loader(conversations, tokenizer, B, T, device="cpu", resume_state_dict=None, seed=0, shuffle=True,
                    buffer_size=DEFAULT_BUFFER_SIZE, epochs=None):
    """(inputs, targets, state_dict) batches for this DDP rank: (B, T) int64 on `device`, targets
    -1 except on the assistant's tokens; state_dict (its "stats" included) resumes right after the
    batch. With `epochs` set, the last batch may have fewer than B rows and then the loader stops."""
    _, rank, _, world_size = get_dist_info()
    packer = ConversationPacker(conversations, tokenizer, T + 1, rank, world_size, seed, shuffle, buffer_size,
                                epochs, resume_state_dict)
    while True:
        rows = []
        while len(rows) < B and (row := packer.next_row()) is not None:
            rows.append(row)
        if not rows:
            return
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
        yield ids[:, :-1].contiguous().to(device), targets.to(device), packer.state_dict()
        if len(rows) < B:
            return


def row_steps(conversations, tokenizer, capacity, rows_per_step):
    """Optimizer steps of rows_per_step rows of `capacity` tokens that one epoch of `conversations`
    fills: their tokens as fitted to a row (fit_conversation) over the tokens a step holds. Best
    fit leaves ~2% of a row as padding with the default buffer (dev/LOG.md), so this runs short of
    the packer's true epoch by about that much."""
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    tokens = 0
    for conversation in conversations:
        if conversation.get("messages"):
            ids, mask = tokenizer.render_conversation(conversation, max_tokens=sys.maxsize)
            tokens += len(fit_conversation(ids, mask, capacity, assistant_end)[0])
    return max(1, round(tokens / (capacity * rows_per_step)))
