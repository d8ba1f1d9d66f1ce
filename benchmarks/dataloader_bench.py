"""Pretraining packing: tokens thrown away by best fit with crop-shortest vs crop-first, against
plain concatenation (nothing thrown away, but documents split across rows), and loader speed.

    python -m nanochat.corpus build           # the offline corpus, if not built yet
    python -m benchmarks.dataloader_bench [--max-docs 12000] [--threads 2]

Uses the saved tokenizer (scripts.tok_train) or, without one, trains a 32k BPE on the first train
documents (--train-chars). Upstream reports ~35% of tokens cropped at T=2048 with crop-shortest vs ~39% with
crop-first on FineWeb-Edu. Prints a table and a final JSON line."""

import argparse
import json
import os
import time

import torch

from nanochat.dataloader import open_packer, pack_rows, tokenizing_distributed_data_loader_bestfit
from nanochat.dataset import get_data_dir, parquets_iter_batched
from nanochat.tokenizer import Tokenizer, get_tokenizer

SEQ_LENS = (512, 2048)


def load_tokenizer(data_dir, vocab_size, train_chars):
    try:
        return get_tokenizer(), "saved"
    except FileNotFoundError:
        pass

    def texts():
        seen = 0
        for batch in parquets_iter_batched("train", data_dir=data_dir):
            for doc in batch:
                yield doc
                seen += len(doc)
                if seen >= train_chars:
                    return

    return Tokenizer.train_from_iterator(texts(), vocab_size), f"trained here on {train_chars:,} chars"


def best_fit_stats(docs, T, buffer_size, crop):
    """(fraction of the tokens of the documents taken that is dropped, fraction of documents cropped)."""
    taken = used = placed = cropped = 0
    for _, placements in pack_rows(docs, T + 1, buffer_size, crop):
        for _, length, n in placements:
            taken, used, placed, cropped = taken + length, used + n, placed + 1, cropped + (n < length)
    return 1 - used / taken, cropped / placed


def concat_stats(lengths, T):
    """Documents back to back, cut every T+1 tokens: the fraction of documents that straddle a
    row boundary and the fraction of rows that do not start at a document's BOS."""
    capacity = T + 1
    starts, position = [], 0
    for n in lengths:
        starts.append(position)
        position += n
    n_rows = position // capacity  # the last, partial row is never emitted
    emitted = [(s, n) for s, n in zip(starts, lengths) if s + n <= n_rows * capacity]
    split = sum(s // capacity != (s + n - 1) // capacity for s, n in emitted)
    at_bos = sum(s % capacity == 0 for s, _ in emitted)
    return split / len(emitted), 1 - at_bos / n_rows


def loader_speed(tokenizer, data_dir, B, T, batches, threads, device):
    """(first batch s, steady tokens/s, s to resume and pack a row, state size) of the real loader."""
    t0 = time.perf_counter()
    loader = tokenizing_distributed_data_loader_bestfit(tokenizer, B, T, "train", device=device,
                                                        tokenizer_threads=threads, data_dir=data_dir)
    next(loader)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        inputs, _, state = next(loader)
    if inputs.is_cuda:
        torch.cuda.synchronize()
    speed = batches * B * T / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    packer = open_packer(tokenizer, "train", resume_state_dict=state, tokenizer_threads=threads, data_dir=data_dir)
    packer.next_row(T + 1)
    return first, speed, time.perf_counter() - t0, len(json.dumps(state))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None,
                        help="pretraining shards (default $NANOCHAT_DATA_DIR or base_dir/base_data)")
    parser.add_argument("--max-docs", type=int, default=12000, help="train documents to pack (in reading order)")
    parser.add_argument("--buffer-size", type=int, default=1000, help="documents the best-fit packer keeps buffered")
    parser.add_argument("--vocab-size", type=int, default=32768, help="for a tokenizer trained here")
    parser.add_argument("--train-chars", type=int, default=20_000_000, help="characters for a tokenizer trained here")
    parser.add_argument("--threads", type=int, default=2, help="tokenizer threads")
    parser.add_argument("--B", type=int, default=16, help="rows per batch of the loader speed test")
    parser.add_argument("--batches", type=int, default=50, help="batches timed in the loader speed test")
    args = parser.parse_args()
    data_dir = get_data_dir(args.data_dir)

    t0 = time.perf_counter()
    tokenizer, origin = load_tokenizer(data_dir, args.vocab_size, args.train_chars)
    print(f"tokenizer: vocab {tokenizer.get_vocab_size()}, {origin} ({time.perf_counter() - t0:.1f}s)")
    texts = []
    for batch in parquets_iter_batched("train", data_dir=data_dir):
        texts += batch[:args.max_docs - len(texts)]
        if len(texts) >= args.max_docs:
            break
    docs = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id(), num_threads=args.threads)
    lengths = [len(d) for d in docs]
    total = sum(lengths)
    print(f"{len(docs):,} documents, {total:,} tokens, {sum(map(len, texts)) / (total - len(docs)):.2f} chars/token, "
          f"median {sorted(lengths)[len(lengths) // 2]} tokens per document")

    results = {"data_dir": data_dir, "docs": len(docs), "tokens": total, "buffer_size": args.buffer_size}
    print(f"\n{'T':>5} {'method':<14} {'tokens dropped':>15} {'docs cropped':>13} {'docs split':>11} {'rows off BOS':>13}")
    for T in SEQ_LENS:
        for crop in ("shortest", "first"):
            dropped, cropped = best_fit_stats(docs, T, args.buffer_size, crop)
            results[f"T{T}_crop_{crop}"] = {"tokens_dropped": dropped, "docs_cropped": cropped}
            print(f"{T:>5} {'crop-' + crop:<14} {dropped:>15.1%} {cropped:>13.1%} {'0':>11} {'0':>13}")
        split_frac, off_bos = concat_stats(lengths, T)
        results[f"T{T}_concat"] = {"docs_split": split_frac, "rows_not_at_bos": off_bos}
        print(f"{T:>5} {'concatenate':<14} {0:>15.1%} {0:>13.1%} {split_frac:>11.1%} {off_bos:>13.1%}")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"\nloader, B={args.B}, T=2048, {args.threads} tokenizer threads, {os.cpu_count()} CPUs:")
    for device in devices:
        first, speed, resume, state_bytes = loader_speed(tokenizer, data_dir, args.B, 2048, args.batches,
                                                         args.threads, device)
        results[f"loader_{device}"] = {"tokens_per_s": speed, "first_batch_s": first, "resume_s": resume,
                                       "state_json_bytes": state_bytes}
        print(f"  {device}: {speed:,.0f} tokens/s steady, first batch {first:.2f}s (fills the buffer), "
              f"resume {resume:.2f}s, state {state_bytes:,} bytes of JSON")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
