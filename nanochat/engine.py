"""Inference: a KV cache with per-row positions, sampling, the calculator tool, and the Engine.

Each distinct prompt (with its audio, if any) is prefilled once at batch 1 and copied into as many
cache rows as it has samples; then all rows decode together, one token per step, each row at its
own position, and a row that finishes leaves the batch. So prompts of different lengths, and clips
of different lengths, share one batch without padding, and every row computes exactly what a full
forward over it would.

Context policy: a request must fit in the context the model was trained on (GPTConfig.sequence_len,
text tokens and soft audio tokens together). The rotary tables reach further (10x), but the model
never saw those positions, so a longer request is refused with the numbers instead of run
(context_budget, which the Engine and any scheduler call). Clips are refused earlier still, before
they are encoded (AudioPath's context limit).
"""

import argparse
import ast
import math
import numbers
import operator
import time
from collections import deque
from dataclasses import dataclass, field

import psutil
import torch

from nanochat.common import compute_dtype, compute_init, logger, setup_logging


def _free_memory(device):
    """Bytes free on a CPU or CUDA device; None where torch cannot say (MPS)."""
    if device.type == "cpu":
        return psutil.virtual_memory().available
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


class KVPositions:
    """Where each row's new chunk starts, kept on the host so decode never waits on the GPU."""

    def __init__(self, starts, device):
        self.starts = starts
        self.min_start, self.max_start = int(starts.min()), int(starts.max())
        self.uniform = self.min_start == self.max_start
        self.device = device
        self._starts_device = starts.to(device, non_blocking=True)

    def index(self, T):
        """(B, T) absolute positions of the chunk's tokens."""
        return self._starts_device[:, None] + torch.arange(T, device=self.device)[None, :]

    @property
    def starts_device_int32(self):
        return self._starts_device.to(torch.int32)


class KVCache:
    """Keys and values of every layer, (L, B, T_max, H_kv, D), plus each row's length and the last
    text embedding (smear state)."""

    def __init__(self, model, batch_size, seq_len):
        cfg = model.config
        head_dim = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch_size, seq_len, cfg.n_kv_head, head_dim)
        device = model.get_device()
        need, free = 2 * math.prod(shape) * compute_dtype().itemsize, _free_memory(device)
        if free is not None and need > free:  # on CPU, zero-filling past it would wake the OOM killer
            raise ValueError(f"a KV cache of {batch_size} rows x {seq_len} positions needs {need / 1e9:.3g} GB and "
                             f"{device} has {free / 1e9:.3g} GB free: ask for fewer samples, prompts or tokens")
        self.k = torch.zeros(shape, dtype=compute_dtype(), device=device)
        self.v = torch.zeros(shape, dtype=compute_dtype(), device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # host side, see KVPositions
        self.smear_prev = None
        self.positions = None
        self.capacity = seq_len

    def begin_chunk(self, T):
        """Called by the model before a forward of T new positions."""
        if int(self.lengths.max()) + T > self.capacity:
            raise ValueError(f"KV cache overflow: {int(self.lengths.max())} + {T} > capacity {self.capacity}")
        self.positions = KVPositions(self.lengths, self.k.device)

    def end_chunk(self, T):
        """T: the positions every row advanced by, or a (B,) tensor of each row's (a padded batch)."""
        self.lengths = self.lengths + T
        self.positions = None

    def insert(self, rows, other):
        """Copy a prefilled batch-1 cache into rows `rows` (a range) of this one."""
        n = int(other.lengths[0])
        self.k[:, rows, :n] = other.k[:, :, :n]
        self.v[:, rows, :n] = other.v[:, :, :n]
        self.lengths[rows] = n
        if other.smear_prev is not None:
            if self.smear_prev is None:
                self.smear_prev = torch.zeros(self.k.size(1), 1, other.smear_prev.size(-1),
                                              dtype=other.smear_prev.dtype, device=self.k.device)
            self.smear_prev[rows] = other.smear_prev

    def keep(self, rows):
        """Keep only the cache rows `rows` (indices, in the order given), e.g. the unfinished ones."""
        index = torch.tensor(rows, device=self.k.device)
        self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
        self.lengths = self.lengths[rows]
        if self.smear_prev is not None:
            self.smear_prev = self.smear_prev.index_select(0, index)


class BatchKVCache(KVCache):
    """A KVCache whose rows join and leave while it decodes (continuous batching).

    The running rows are always the first `size` rows of a larger storage, so every step reads them
    as one contiguous batch (`k`, `v` are views). Storage doubles in rows and positions when a row
    needs more, so joining copies only the new row (amortised); a row that leaves is overwritten by
    the last one (swap-remove), so leaving copies at most one row."""

    def __init__(self, model):
        super().__init__(model, 0, 0)
        self._k, self._v = self.k, self.v  # (L, row capacity, position capacity, H_kv, D)
        self.max_positions = model.cos.size(0)

    @property
    def size(self):
        return self.k.size(1)

    def _grow(self, rows, positions):
        k = self._k.new_zeros(self._k.size(0), rows, positions, *self._k.shape[3:])
        v = torch.zeros_like(k)
        n = int(self.lengths.max()) if self.size else 0
        k[:, :self.size, :n] = self.k[:, :, :n]
        v[:, :self.size, :n] = self.v[:, :, :n]
        self._k, self._v = k, v
        self.capacity = positions

    def admit(self, other, need, source=0):
        """Append row `source` of a prefilled cache (Engine.prefill_batch) as the last row. need: the
        positions this row may reach (its prompt plus its new tokens)."""
        rows, positions = self._k.size(1), self.capacity
        if self.size == rows or need > positions:
            grown_rows = max(1, 2 * rows) if self.size == rows else rows
            grown_positions = positions if need <= positions else max(need, min(2 * positions, self.max_positions))
            self._grow(grown_rows, grown_positions)
        n, row = int(other.lengths[source]), self.size
        self._k[:, row, :n] = other.k[:, source, :n]
        self._v[:, row, :n] = other.v[:, source, :n]
        self.k, self.v = self._k[:, :row + 1], self._v[:, :row + 1]
        self.lengths = torch.cat([self.lengths, other.lengths[source:source + 1]])
        prev = other.smear_prev[source:source + 1]  # prompts have at least one text token, so this is set
        self.smear_prev = prev if self.smear_prev is None else torch.cat([self.smear_prev, prev])

    def evict(self, row):
        """Drop row `row`; the last row moves into its place (callers mirror the move)."""
        last = self.size - 1
        if row != last:
            n = int(self.lengths[last])
            self.k[:, row, :n] = self.k[:, last, :n]
            self.v[:, row, :n] = self.v[:, last, :n]
        order = list(range(last)) if row == last else [*range(row), last, *range(row + 1, last)]
        self.lengths = self.lengths[order]
        if self.smear_prev is not None:
            self.smear_prev = self.smear_prev[order]
        self.k, self.v = self._k[:, :last], self._v[:, :last]


# ---------------------------------------------------------------------------
# What a request may ask: the one place every caller (Engine, a server's scheduler) checks it


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _finite(x):
    """A real number that is finite as a float (an int past 1e308 is not)."""
    try:
        return _is_real(x) and math.isfinite(float(x))
    except OverflowError:
        return False


def check_sampling(temperature=1.0, top_k=None, top_p=None):
    """Raise a ValueError naming the parameter if temperature, top_k or top_p cannot sample."""
    if not _finite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):  # NaN fails the comparison too
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def check_request(num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
    """Raise a ValueError naming the parameter for anything a generation request cannot mean."""
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ValueError(f"max_tokens must be None (the rest of the context) or an int >= 1, got {max_tokens!r}")
    if not _is_int(seed) or not -2 ** 63 <= seed < 2 ** 64:  # the range torch.Generator.manual_seed takes
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    check_sampling(temperature, top_k, top_p)


def context_budget(sequence_len, positions, max_tokens=None):
    """How many tokens a request may generate: max_tokens, or with None the rest of the context.

    positions: what the prompt fills (text tokens plus soft audio tokens). Refuses a request that
    does not fit in the model's trained context (sequence_len) with the numbers and the fix."""
    room = sequence_len - positions
    if room < 1:
        raise ValueError(f"request too long: the prompt fills {positions} positions (text tokens + soft audio "
                         f"tokens) of the model's {sequence_len}-position context (its training sequence_len), "
                         f"leaving no room for a reply: shorten the prompt or the clip")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ValueError(f"request too long: {positions} prompt positions + max_tokens {max_tokens} > the model's "
                         f"{sequence_len}-position context (its training sequence_len): lower max_tokens to at "
                         f"most {room}, or shorten the prompt or the clip")
    return max_tokens


# ---------------------------------------------------------------------------
# Sampling

MIN_TEMPERATURE = 1e-30


def sample_next_token(logits, generator, temperature=1.0, top_k=None, top_p=None):
    """One token per row of logits (B, V): greedy at temperature 0, else top-k / nucleus sampling."""
    check_sampling(temperature, top_k, top_p)
    if not bool(torch.isfinite(logits).all()):  # argmax would pick a NaN, multinomial would fail deep inside
        raise ValueError("the model produced NaN or inf logits: its weights or its inputs (audio features) "
                         "are not finite")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float(): torch refuses Python ints past int64. The floor keeps 15 / T finite in fp32 (T = 1e-38 made
    # inf, then NaN probabilities); at it sampling is already greedy.
    logits = logits / max(float(temperature), MIN_TEMPERATURE)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # mass before a token already exceeds p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling: temperature 0 is greedy; seed starts its own random stream."""
    temperature: float = 1.0
    top_k: int = None
    top_p: float = None
    seed: int = 42

    def generator(self, device):
        return torch.Generator(device=device).manual_seed(self.seed)


def sample_rows(logits, params, generators):
    """One token per row of logits (B, V), row i with its own params[i] and generators[i]: in a
    continuous batch every request brings its own, and draws from its stream exactly what it would
    draw alone."""
    if all(p.temperature == 0 for p in params):
        return logits.argmax(dim=-1)
    return torch.cat([sample_next_token(logits[i:i + 1], g, p.temperature, p.top_k, p.top_p)
                      for i, (p, g) in enumerate(zip(params, generators))])


# ---------------------------------------------------------------------------
# Calculator tool: a whitelist over Python's ast, never eval()

MAX_EXPRESSION_CHARS = 256
MAX_MAGNITUDE = 10 ** 30
MAX_NESTING = 64
_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class CalculatorError(ValueError):
    pass


def _calc(node, depth):
    if depth > MAX_NESTING:
        raise CalculatorError("expression nested too deeply")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _calc(node.left, depth + 1), _calc(node.right, depth + 1)
        try:
            value = _BINARY_OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        value = _UNARY_OPS[type(node.op)](_calc(node.operand, depth + 1))
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
          and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
          and len(node.args) == 1 and not node.keywords
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        value = node.func.value.value.count(node.args[0].value)
    else:
        raise CalculatorError(f"not allowed in the calculator: {ast.dump(node)[:80]}")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("number too large")
    return value


def use_calculator(expression):
    """Evaluate arithmetic (+ - * / // % parentheses, unary minus) or 'text'.count('x').

    Returns the result as text; raises CalculatorError for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise CalculatorError(f"not an expression: {exc}") from None
    value = _calc(tree.body, 0)
    return f"{value:.10g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------
# Engine


@dataclass
class Row:
    """Per-row decoding state: tokens to force (tool output), the open python block, and the stop
    token that finished the row (None while it runs)."""
    forced: deque = field(default_factory=deque)
    python_tokens: list = None
    stop_token: int = None

    @property
    def completed(self):
        return self.stop_token is not None


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.stop_tokens = {special("<|assistant_end|>"), special("<|bos|>")}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def _prompts_and_audio(self, tokens, audio_features):
        """(prompts as lists of ints, one (1, T_a, n_embd) tensor or None per prompt), checked."""
        if not isinstance(tokens, (list, tuple)):
            raise ValueError(f"tokens must be a list of token ids or a list of such lists, got {type(tokens).__name__}")
        prompts = [tokens] if any(_is_int(t) for t in tokens) else tokens
        if not prompts or any(not isinstance(p, (list, tuple)) or len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: give each prompt at least one token (e.g. <|bos|>)")
        vocab = self.model.config.vocab_size
        for p in prompts:
            if any(not _is_int(t) or not 0 <= t < vocab for t in p):
                raise ValueError(f"prompt tokens must be ints in [0, {vocab})")
        prompts = [[int(t) for t in p] for p in prompts]
        if audio_features is None or torch.is_tensor(audio_features):
            audio = [audio_features] * len(prompts)
        elif isinstance(audio_features, (list, tuple)):
            audio = list(audio_features)
        else:
            raise ValueError(f"audio_features must be None, a tensor or a list, got {type(audio_features).__name__}")
        if len(audio) != len(prompts):
            raise ValueError(f"{len(audio)} audio inputs for {len(prompts)} prompts")
        return prompts, [self._check_audio(a, f"audio_features of prompt {i}") for i, a in enumerate(audio)]

    def _check_audio(self, clip, name="audio_features"):
        """One prompt's soft audio tokens as (1, T_a, n_embd), or a ValueError naming what is wrong."""
        if clip is None:
            return None
        n_embd = self.model.config.n_embd
        if not torch.is_tensor(clip) or not clip.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {clip!r:.60}")
        clip = clip if clip.dim() != 2 else clip.unsqueeze(0)
        if clip.dim() != 3 or clip.size(0) != 1 or clip.size(2) != n_embd:
            raise ValueError(f"{name} must be (1, T_a, {n_embd}), got {tuple(clip.shape)}")
        if not bool(torch.isfinite(clip).all()):
            raise ValueError(f"{name} contain NaN or inf (a broken clip or projector)")
        return clip

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None,
                 seed=42, audio_features=None, row_seeds=None):
        """Stream (token_column, token_masks): one token per row per step, mask 1 if sampled and
        0 if forced by the calculator tool. A finished row repeats its stop token (mask 0) and
        leaves the batch: the rows still running decode without it.

        tokens: one prompt (list of ints) or several (list of lists); rows are prompt-major, each
        prompt repeated num_samples times. audio_features: None, one (1, T_a, n_embd) tensor for
        every prompt, or a list with one tensor (or None) per prompt. max_tokens None: as many as
        the longest prompt leaves room for in the model's context (see context_budget); a request
        that does not fit is a ValueError, raised before any work, as are bad parameters.

        row_seeds: one seed per row instead of `seed`'s one stream for the batch: each row then
        draws from its own stream exactly what it would draw generated alone (RL rollouts: a
        sample does not depend on which prompts share its batch, nor on the number of ranks)."""
        prompts, audio = self._prompts_and_audio(tokens, audio_features)
        check_request(num_samples, max_tokens, temperature, top_k, top_p, seed)
        if row_seeds is not None:
            if not isinstance(row_seeds, (list, tuple)) or len(row_seeds) != len(prompts) * num_samples:
                raise ValueError(f"row_seeds must be a list of {len(prompts) * num_samples} seeds (one per row: "
                                 f"{len(prompts)} prompts x {num_samples} samples), got {row_seeds!r:.80}")
            for s in row_seeds:
                check_request(seed=s)
        model = self.model
        lengths = [len(p) + (0 if a is None else a.size(1)) for p, a in zip(prompts, audio)]
        max_tokens = context_budget(model.config.sequence_len, max(lengths), max_tokens)

        cache = KVCache(model, len(prompts) * num_samples, max(lengths) + max_tokens)
        first_logits = []
        for i, (prompt, clip) in enumerate(zip(prompts, audio)):
            single, logits = self.prefill(prompt, clip)
            cache.insert(range(i * num_samples, (i + 1) * num_samples), single)
            first_logits.append(logits.expand(num_samples, -1))
        yield from self.decode(cache, torch.cat(first_logits), max_tokens, temperature, top_k, top_p, seed, row_seeds)

    @torch.inference_mode()
    def decode(self, cache, logits, max_tokens, temperature=1.0, top_k=None, top_p=None, seed=42, row_seeds=None):
        """The decode loop of generate(), from a prefilled `cache` whose rows match the rows of
        `logits` (B, V), each row's first new token's. Every token yielded but a row's last (its stop
        token, or its max_tokens-th) is forwarded into the cache, so a batch-1 cache ends holding
        the prompt and all the reply but that last token (nanochat.conversation builds on this).
        The caller checks that max_tokens fits in the cache (and row_seeds, one per row, if given)."""
        device = self.model.get_device()
        generator = torch.Generator(device=device).manual_seed(seed)
        rows = [Row() for _ in range(logits.size(0))]
        running = list(range(len(rows)))  # the rows in the cache and in logits, in that order
        if row_seeds is not None:
            params = SamplingParams(temperature, top_k, top_p)
            generators = [SamplingParams(seed=s).generator(device) for s in row_seeds]
        for step in range(max_tokens):
            if row_seeds is None:
                sampled = sample_next_token(logits, generator, temperature, top_k, top_p).tolist()
            else:
                sampled = sample_rows(logits, [params] * len(running), [generators[r] for r in running]).tolist()
            column, masks = [row.stop_token for row in rows], [0] * len(rows)
            for r, token in zip(running, sampled):
                column[r], masks[r] = self.advance(rows[r], token)
            yield column, masks
            still = [i for i, r in enumerate(running) if not rows[r].completed]
            if not still or step == max_tokens - 1:  # no forward for a token nobody will sample
                return
            if len(still) < len(running):
                cache.keep(still)
                running = [running[i] for i in still]
            ids = torch.tensor([column[r] for r in running], dtype=torch.long, device=device)[:, None]
            logits = self.model(ids, kv_cache=cache)[:, -1]

    @torch.inference_mode()
    def prefill(self, prompt, clip=None):
        """Prefill one prompt (its audio soft tokens (1, T_a, n_embd) in front, if any) at batch 1:
        (its KVCache, the logits (1, V) of its first new token)."""
        return self.prefill_batch([prompt], [clip])

    @torch.inference_mode()
    def prefill_batch(self, prompts, clips):
        """Prefill prompts of any lengths, each with its clip ((1, T_a, n_embd) or None; any lengths)
        in front, in one forward: (a KVCache with one row per prompt, each exactly as a prefill of
        that prompt alone leaves it, and the logits (B, V) of each prompt's first new token)."""
        model, device = self.model, self.model.get_device()
        clips = [self._check_audio(c, "audio_features" if len(clips) == 1 else f"audio_features of prompt {i}")
                 for i, c in enumerate(clips)]
        text = [len(p) for p in prompts]
        audio = [0 if c is None else c.size(1) for c in clips]
        cache = KVCache(model, len(prompts), max(a + t for a, t in zip(audio, text)))
        ids = torch.tensor([p + [0] * (max(text) - len(p)) for p in prompts], dtype=torch.long, device=device)
        features = None
        if max(audio):  # left-padded, as GPT.forward takes clips of different lengths
            features = torch.zeros(len(prompts), max(audio), model.config.n_embd, device=device)
            for i, c in enumerate(clips):
                if c is not None:
                    features[i, max(audio) - c.size(1):] = c[0].to(device)
        uniform = len(set(text)) == 1 and len(set(audio)) == 1
        return cache, model(ids, kv_cache=cache, audio_features=features, last_only=True,
                            audio_lengths=None if uniform else torch.tensor(audio),
                            text_lengths=None if uniform else torch.tensor(text))[:, -1]

    @torch.inference_mode()
    def prefill_chunk(self, cache, prompt, clip, start, stop):
        """Positions [start, stop) of a prompt (its clip's soft tokens, then its text) into a batch-1
        `cache` that holds [0, start): a long prompt prefilled over several steps computes what one
        prefill does. Returns the logits (1, V) at position stop - 1 (the first new token's once
        stop is the whole prompt)."""
        clip = self._check_audio(clip)
        device = self.model.get_device()
        audio_len = 0 if clip is None else clip.size(1)
        audio = clip[:, start:stop].to(device) if start < audio_len else None
        text = prompt[max(start - audio_len, 0):max(stop - audio_len, 0)]
        ids = torch.tensor([text], dtype=torch.long, device=device).view(1, len(text))
        return self.model(ids, kv_cache=cache, audio_features=audio, last_only=True)[:, -1]

    def advance(self, row, sampled):
        """The token a row takes this step: a pending tool-output token if there is one, else the
        sampled one; updates the row's tool and stop state. Returns (token, 1 if sampled else 0)."""
        token, mask = (row.forced.popleft(), 0) if row.forced else (sampled, 1)
        self._observe(row, token)
        return token, mask

    def _observe(self, row, token):
        """Track stop tokens and run the calculator when a python block closes."""
        if token in self.stop_tokens:
            row.stop_token = token
        elif token == self.python_start:
            row.python_tokens = []
        elif token == self.python_end and row.python_tokens is not None:
            expression = self.tokenizer.decode(row.python_tokens)
            row.python_tokens = None
            try:
                result = use_calculator(expression)
            except CalculatorError:
                return  # like a failed tool call: the model continues without an output block
            row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.python_tokens is not None:
            row.python_tokens.append(token)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Run generate() to the end. Returns (sequences, masks): per row, the prompt followed by
        the generated tokens up to (not including) the stop token."""
        prompts, _ = self._prompts_and_audio(tokens, kwargs.get("audio_features"))
        sequences = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(s) for s in sequences]
        done = [False] * len(sequences)
        for column, column_masks in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                    continue
                sequences[i].append(token)
                masks[i].append(mask)
        return sequences, masks


def _smoke_model_and_tokenizer(device):
    """A trained base model if one exists; else a random small GPT (and, if needed, a tokenizer
    trained on the standard library's sources) so the smoke run needs nothing but the install."""
    from nanochat.checkpoint import load_model
    try:
        model, tokenizer, _ = load_model("base", device=device)
        return model, tokenizer, "the newest base checkpoint"
    except FileNotFoundError as exc:
        logger.info("%s; using a random model", exc)
    from nanochat.gpt import GPT, config_for_depth
    from nanochat.tokenizer import Tokenizer, get_tokenizer
    try:
        tokenizer = get_tokenizer()
    except FileNotFoundError:
        from itertools import islice
        from nanochat.corpus import stdlib_docs
        tokenizer = Tokenizer.train_from_iterator(islice(stdlib_docs(), 200), vocab_size=2048)
    with torch.device("meta"):
        model = GPT(config_for_depth(2, vocab_size=tokenizer.get_vocab_size(), sequence_len=512, head_dim=64))
    model.to_empty(device=device)
    model.init_weights()
    return model.eval(), tokenizer, "a random d2 model (no checkpoint found)"


def main():
    """Smoke generation on whatever device is present: python -m nanochat.engine"""
    parser = argparse.ArgumentParser(description="Generate from the newest base checkpoint (or a random model).")
    parser.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    parser.add_argument("--prompt", default="The capital of France is", help="text to continue (after BOS)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    parser.add_argument("--num-samples", type=int, default=2, help="samples of the same prompt, decoded as one batch")
    args = parser.parse_args()
    setup_logging()
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, source = _smoke_model_and_tokenizer(device)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode(args.prompt, prepend="<|bos|>")
    start = time.perf_counter()
    sequences, _ = engine.generate_batch(prompt, num_samples=args.num_samples, max_tokens=args.max_tokens,
                                         temperature=args.temperature)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(s) - len(prompt) for s in sequences)
    print(f"model: {source}, device {device}, dtype {compute_dtype()}")
    for seq in sequences:
        print(repr(tokenizer.decode(seq)))
    print(f"{new_tokens} tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tok/s)")


if __name__ == "__main__":
    main()
