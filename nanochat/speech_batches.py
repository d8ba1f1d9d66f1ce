"""Speech training batches: the conversations of the spoken tasks (and their typed twins), epochs
of duration-bucketed batches that resume exactly, encoder frames from the feature cache, and the
padded tensors SpeechLM.forward takes.

Every clip is encoded once, before the first step (warm_cache), and read from the on-disk
FeatureCache from then on. Clips of different lengths share a batch: their soft tokens are
left-padded and masked (GPT.forward's audio_lengths), so an example computes the same whatever
its batch-mates; within windows of BUCKET_WINDOW batches the items are sorted by duration before
being cut into batches (then the batches are shuffled), so little compute goes to padding.
"""

import hashlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.augment import ORDER, clip_variants
from nanochat.common import print0
from nanochat.feature_cache import encode_with_cache
from nanochat.training import StepOutput

BUCKET_WINDOW = 8  # batches per duration-sorted window: less padding, still a fresh mix every epoch
WARM_CHUNK = 512   # clips per feature-cache pass before training (bounds the memory it holds)


@dataclass
class Item:
    """One training conversation: row `index` of a spoken task, its typed twin (typed: no audio), or
    item `index` of a text chat task (chat: no audio)."""
    task: object
    index: int
    typed: bool = False
    chat: bool = False

    def conversation(self):
        return self.task.typed(self.index) if self.typed else self.task[self.index]

    @property
    def heard(self):
        """Whether the conversation has a clip in front."""
        return not (self.typed or self.chat)

    @property
    def clip_id(self):
        return self.task.rows[self.index]["id"] if self.heard else None

    @property
    def duration(self):
        return self.task.rows[self.index]["duration"] if self.heard else 0.0


def build_items(tasks, text_mix=0.0, typed=None, chat_mix=0.0, chat=None):
    """Every conversation of the spoken tasks, then round(text_mix x that many) typed twins drawn in
    order (cycling) from `typed`, a task with typed(i) (tasks.spoken.SpokenQuestions), and
    round(chat_mix x that many) text conversations drawn in order (cycling) from the task `chat`
    (the chat SFT mixture, so a chat model keeps chatting while it learns to hear)."""
    items = [Item(task, i) for task in tasks for i in range(len(task))]
    spoken = len(items)
    if text_mix > 0:
        if typed is None:
            raise ValueError("text_mix needs a task with typed twins (typed=SpokenQuestions(...))")
        items += [Item(typed, i % len(typed), typed=True) for i in range(round(text_mix * spoken))]
    if chat_mix > 0:
        if chat is None or not len(chat):
            raise ValueError("chat_mix needs a task of text conversations (chat=TaskMixture(sft_parts()...))")
        items += [Item(chat, i % len(chat), chat=True) for i in range(round(chat_mix * spoken))]
    return items


@dataclass
class WaveformAugment:
    """Which waveform a training draw of a clip hears: the clean clip or one of its `variants`
    augmented variants (augment.clip_variants of the clip id with this seed, augmentations `names`,
    each applied with probability p), uniformly, chosen by (seed, step, clip). A clip's variants are
    a fixed list, so the feature cache holds at most variants + 1 entries per clip; a variant is
    encoded the first time it is drawn. The choice depends only on the step, so a resumed run
    hears what the run that never stopped heard."""
    variants: int = 0
    names: tuple = ORDER
    p: float = 0.5
    seed: int = 0

    def choose(self, items, step):
        """One augment.Variant (None: the clean clip or a typed item) per item, for this step."""
        out = []
        for item in items:
            pick = 0
            if self.variants and item.heard:
                digest = hashlib.sha256(f"{self.seed}|{step}|{item.clip_id}".encode()).hexdigest()
                pick = int(digest[:8], 16) % (self.variants + 1)
            out.append(clip_variants(item.clip_id, self.variants, self.seed, self.names, self.p)[pick - 1]
                       if pick else None)
        return out


def epoch_batches(durations, global_batch, seed, epoch):
    """One epoch's global batches (lists of global_batch item indices): a seeded shuffle, cut to a
    multiple of global_batch, sorted by duration within windows, cut, shuffled again. They depend
    only on the global batch, so N ranks of B items see per step what one process of N x B sees."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(durations), generator=g).tolist()
    order = order[:len(order) - len(order) % global_batch]
    window = global_batch * BUCKET_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: durations[i])
        batches += [chunk[k:k + global_batch] for k in range(0, len(chunk), global_batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def batch_stream(durations, batch_size, rank, world_size, seed, state=None):
    """Endless (item indices, state) of this rank's batches: every world_size-th item of each global
    batch (so ranks get alike durations); `state` ({"epoch", "batch"}) is where a resumed stream
    continues, i.e. the batch after the one it comes with."""
    epoch, start = (0, 0) if state is None else (state["epoch"], state["batch"])
    while True:
        batches = epoch_batches(durations, batch_size * world_size, seed, epoch)
        for j in range(start, len(batches)):
            yield batches[j][rank::world_size], {"epoch": epoch, "batch": j + 1}
        epoch, start = epoch + 1, 0


def make_examples(model, tokenizer, cache, items, max_tokens, variants=None):
    """Items -> (ids, mask, cached frames or None) examples for collate(); variants: one
    augment.Variant (None: the clean clip) per item, as WaveformAugment.choose gives."""
    convs = [item.conversation() for item in items]
    variants = [None] * len(items) if variants is None else variants
    with_audio = [i for i, c in enumerate(convs) if "audio" in c]
    frames = [None] * len(convs)
    for i, f in zip(with_audio, encode_with_cache(model.encoder, [convs[i]["audio"] for i in with_audio], cache,
                                                  variants=[variants[i] for i in with_audio])):
        frames[i] = f
    return [(*tokenizer.render_conversation(conv, max_tokens), f) for conv, f in zip(convs, frames)]


def collate(examples, device):
    """Examples (ids, mask, frames (T_f, ...) or None) -> idx (B, T), targets (B, T) with -1 wherever
    mask is 0 or past the row's end, and frames (B, T_f, ...) right-padded with frame lengths (B,)
    (a text-only row has length 0); frames and lengths are None when no example has audio."""
    B = len(examples)
    T = max(len(ids) for ids, _, _ in examples) - 1
    idx = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), -1, dtype=torch.long)
    for b, (ids, mask, _) in enumerate(examples):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        idx[b, :len(ids) - 1] = ids_t[:-1]
        targets[b, :len(ids) - 1] = ids_t[1:].masked_fill(~mask_t[1:], -1)
    with_audio = [f for _, _, f in examples if f is not None]
    frames = lengths = None
    if with_audio:
        lengths = torch.tensor([0 if f is None else f.size(0) for _, _, f in examples])
        frames = with_audio[0].new_zeros(B, int(lengths.max()), *with_audio[0].shape[1:])
        for b, (_, _, f) in enumerate(examples):
            if f is not None:
                frames[b, :f.size(0)] = f
        frames, lengths = frames.to(device), lengths.to(device)
    return idx.to(device), targets.to(device), frames, lengths


def count_positions(model, examples):
    """GPT positions an example batch fills (text tokens plus soft audio tokens), padding excluded."""
    stack = model.projector.stack
    return sum(len(ids) - 1 + (0 if f is None else -(-f.size(0) // stack)) for ids, _, f in examples)


def warm_cache(model, cache, items, rank, world_size):
    """Encode every distinct clip of `items` not yet in the cache (ranks split the clips)."""
    clips = {}
    for item in items:
        if item.heard:
            clips.setdefault(item.clip_id, item)
    ids = sorted(clips)[rank::world_size]
    for start in range(0, len(ids), WARM_CHUNK):
        audio = [clips[i].conversation()["audio"] for i in ids[start:start + WARM_CHUNK]]
        encode_with_cache(model.encoder, audio, cache)


def prepare_cache(model, cache, items, rank, world_size, max_gb=None):
    """warm_cache on every rank, then (rank 0, with max_gb) delete the least recently used entries
    beyond max_gb GB, never one of `items`."""
    t0, warm_start = time.perf_counter(), time.time()
    warm_cache(model, cache, items, rank, world_size)
    if world_size > 1:
        dist.barrier()
    print0(f"feature cache ready in {time.perf_counter() - t0:.1f} s ({cache.root})")
    if max_gb is not None and rank == 0:
        # Every clip of this run was read or written during the warm-up, which refreshed its time; the
        # margin covers filesystems that store modification times in whole seconds (or two, FAT).
        deleted, freed, left = cache.prune(int(max_gb * 1e9), keep_used_since=warm_start - 2)
        print0(f"feature cache pruned: {deleted:,} entries ({freed / 1e9:.2f} GB) deleted, {left / 1e9:.2f} GB left")


def speech_step(model, tokenizer, cache, items, stream, max_tokens, device, world_size=1, waveform=None, seed=0,
                rank=0):
    """A step function for nanochat.training.train: the next batch of `stream` (batch_stream over
    `items`), its frames from the cache (each clip clean or the WaveformAugment variant it draws),
    one forward and backward of the reply loss: the mean over every rank's graded tokens, as one
    process with the whole global batch would take it (ranks grade different numbers of tokens; the
    optimizer averages their gradients)."""
    waveform = waveform or WaveformAugment()

    def step_fn(step):
        batch, state = next(stream)
        batch_items = [items[i] for i in batch]
        examples = make_examples(model, tokenizer, cache, batch_items, max_tokens, waveform.choose(batch_items, step))
        idx, targets, frames, lengths = collate(examples, device)
        # The model's random regularisers (SpeechLM.regularisers) draw from the global generator:
        # seeded per step and rank, so a resumed run draws the same masks as one that never stopped.
        torch.manual_seed(seed * 1_000_003 + step * 1009 + rank)
        loss_sum = model(idx, targets, frames, lengths, loss_reduction="sum")
        totals = torch.stack([loss_sum.detach().float(), (targets >= 0).sum().float()])
        if world_size > 1:
            dist.all_reduce(totals)
        (loss_sum * (world_size / totals[1])).backward()
        return StepOutput(totals[0] / totals[1], count_positions(model, examples), state, {"epoch": state["epoch"]})

    return step_fn
