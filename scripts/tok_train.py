"""Train the BPE tokenizer and save it to <base_dir>/tokenizer.

    python -m scripts.tok_train                          # the pretraining shards (nanochat.dataset)
    python -m scripts.tok_train --input my_texts/        # your own .txt/.jsonl/.parquet files
"""

import argparse
import os
import time

from tqdm import tqdm

from nanochat import report
from nanochat.common import get_base_dir
from nanochat.tokenizer import Tokenizer, get_token_bytes

# Round-trip samples printed after training: numbers (split into 1-2 digit runs), special-token
# text (must stay ordinary text), code and non-ASCII.
SAMPLES = [
    "In 1776, 56 delegates signed; in 2024 the budget was $6.75 trillion (123456789).",
    "<|user_start|>hi<|user_end|> is plain text here",
    "def area(r):\n    return 3.14159 * r ** 2\n",
    "naïve café, Straße, 東京, 😀",
]


def input_documents(folders):
    """Documents of user folders of .txt/.jsonl/.parquet files, read as nanochat.corpus reads them."""
    from nanochat.corpus import input_docs
    try:
        for folder in folders:
            yield from input_docs(folder)
    except (FileNotFoundError, ValueError) as e:  # missing folder, no text files, malformed line
        raise SystemExit(str(e)) from None


def dataset_documents():
    """Documents of the pretraining shards' train split."""
    from nanochat.dataset import parquets_iter_batched
    try:
        for batch in parquets_iter_batched(split="train"):
            yield from batch
    except FileNotFoundError as e:  # no shards yet: the message says how to get them
        raise SystemExit(f"{e}\nor train on your own text with --input FOLDER") from None


def capped_documents(documents, max_chars, doc_cap, progress):
    """Each document cut to doc_cap characters, so a few huge documents cannot dominate the pair
    counts, until max_chars characters have been given."""
    for doc in documents:
        doc = doc[:doc_cap]
        progress.update(len(doc))
        yield doc
        if progress.n >= max_chars:
            return


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=32768, help="including the special tokens")
    parser.add_argument("--max-chars", type=float, default=2e9, help="characters of text to train on")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept per document")
    parser.add_argument("--input", nargs="+", metavar="FOLDER",
                        help="folders of .txt/.jsonl/.parquet files to use instead of the pretraining shards")
    args = parser.parse_args(argv)

    report.start_stage("tokenizer", config=vars(args))
    documents = input_documents(args.input) if args.input else dataset_documents()
    progress = tqdm(total=int(args.max_chars), unit="char", unit_scale=True, desc="training text")
    start = time.time()
    tokenizer = Tokenizer.train_from_iterator(
        capped_documents(documents, int(args.max_chars), args.doc_cap, progress), args.vocab_size)
    elapsed = time.time() - start
    progress.close()
    print(f"trained a {tokenizer.get_vocab_size()}-token vocabulary on {progress.n:,} characters "
          f"in {elapsed:.1f} s")

    out_dir = os.path.join(get_base_dir(), "tokenizer")
    tokenizer.save(out_dir)
    token_bytes = get_token_bytes(tokenizer)
    bpe_bytes = token_bytes[token_bytes > 0].float()
    print(f"saved to {out_dir}; bytes per BPE token: min {bpe_bytes.min():.0f}, "
          f"mean {bpe_bytes.mean():.2f}, max {bpe_bytes.max():.0f}")
    report.log_metrics("tokenizer", vocab_size=tokenizer.get_vocab_size(), train_chars=progress.n)
    report.end_stage("tokenizer")

    for text in SAMPLES:
        ids = tokenizer.encode(text)
        status = "ok" if tokenizer.decode(ids) == text else "ROUND TRIP FAILED"
        pieces = "|".join(tokenizer.id_to_token(i) for i in ids)
        print(f"[{status}] {len(text.encode())} bytes -> {len(ids)} tokens: {pieces!r}")


if __name__ == "__main__":
    main()
