"""Continuous batching: one thread owns the model and decodes every running request in one batch.

    scheduler = Scheduler(model, tokenizer, max_batch=32).start()
    scheduler.submit(Request(prompt_ids, max_tokens=64, sampling=SamplingParams(temperature=0),
                             on_event=callback))   # callback(kind, value) runs on the scheduler thread

Requests that arrive while others decode are prefilled together, in one forward over prompts of
different lengths with their audio soft tokens in front (Engine.prefill_batch), take their first
token at once and join the running batch (BatchKVCache.admit); one that stops, reaches its
max_tokens or is cancelled (its client went away) leaves at once (BatchKVCache.evict). Between two
decode steps at most `prefill_tokens` positions are prefilled (padding included), so the running
rows keep getting tokens while a burst of requests or a long prompt (prefilled in chunks over
several steps, Engine.prefill_chunk) comes in. Every row decodes at its own position with its own
sampling parameters and seeded generator (sample_rows), and the calculator tool runs per row
(Engine.advance), so a request gets the tokens it would get alone, whatever else runs beside it
(tested).

A request's events: ("token", id) for each new token (tool output included, the stop token not),
then one of ("done", "stop" | "length" | "cancelled") or ("error", exception). The queue is bounded:
submit() raises QueueFull past max_queue, and a request still waiting for a row after queue_timeout
seconds gets ("error", QueueTimeout); both are ServerBusy and carry a retry_after estimate.
On CUDA a server runs one Scheduler per GPU, each with its own copy of the model (a request goes
to the one with the least load); on CPU one.
"""

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from nanochat.common import logger
from nanochat.engine import BatchKVCache, Engine, KVCache, Row, SamplingParams, sample_rows

STATS_WINDOW_S = 10.0  # tokens/s and requests/s in stats() are averaged over this many seconds
# Prefill positions between two decode steps (padding included). Measured on this 2-core CPU (d6,
# vocab 8192, 1 thread, loaded; benchmarks/serve_bench.py --prefill-tokens 64 256 1024, 2 rounds):
# when a 365-token prompt arrives while 4 streams decode, their longest wait for a token is 53 /
# 104 / 228 ms, and the long prompt's first token comes after 189 / 132 / 151 ms (small chunks
# each pay a forward's fixed cost and a decode step). 256 keeps a stall near 100 ms and still
# prefills ten typical chat prompts (~20 tokens) in one forward. On accelerators (not measured
# here) 512, the budget vLLM found best for inter-token latency and TTFT on an A100
# (vllm-project/vllm#4580).
PREFILL_TOKENS_CPU = 256
PREFILL_TOKENS_ACCELERATOR = 512


class ServerBusy(Exception):
    """No row for the request now; retry after `retry_after` seconds (HTTP 503 + Retry-After)."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(ServerBusy):
    pass


class QueueTimeout(ServerBusy):
    pass


class SchedulerClosed(RuntimeError):
    pass


@dataclass(eq=False)
class Request:
    """One generation: prompt ids, the most new tokens, its sampling, its audio soft tokens
    (1, T_a, n_embd) or None, and on_event(kind, value), called on the scheduler thread."""
    tokens: list
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    audio: torch.Tensor = None
    on_event: object = None
    # Filled in by the scheduler (time.perf_counter() seconds).
    submitted_at: float = None
    prefill_started_at: float = None
    first_token_at: float = None
    finished_at: float = None
    completion_tokens: int = 0
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_positions(self):
        """Cache positions of the prompt: its audio soft tokens and its text."""
        return (0 if self.audio is None else self.audio.size(1)) + len(self.tokens)

    @property
    def positions(self):
        """Cache positions the request may reach: audio, prompt and every new token."""
        return self.prompt_positions + self.max_tokens

    def cancel(self):
        """Stop generating (e.g. the client disconnected); the row leaves at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self):
        return self._cancelled.is_set()


@dataclass(eq=False)
class _Active:
    """A request in the running batch and its decoding state."""
    request: Request
    row: Row
    generator: torch.Generator
    last_token: int = None


@dataclass(eq=False)
class _Chunked:
    """A prompt longer than a step's prefill budget, prefilled a chunk per step into its own cache."""
    request: Request
    cache: KVCache
    done: int = 0  # positions prefilled so far


class Scheduler:
    """Owns `model` on one device; see the module docstring. max_positions: the longest request
    (audio + prompt + new tokens), by default the model's training context. prefill_tokens: the
    most prefill positions a step runs (default: PREFILL_TOKENS_CPU or _ACCELERATOR)."""

    def __init__(self, model, tokenizer, max_batch=32, max_queue=256, queue_timeout=30.0, max_positions=None,
                 name="scheduler", prefill_tokens=None):
        if prefill_tokens is None:
            prefill_tokens = PREFILL_TOKENS_CPU if model.get_device().type == "cpu" else PREFILL_TOKENS_ACCELERATOR
        if max_batch < 1 or max_queue < 0 or queue_timeout <= 0 or prefill_tokens < 1:
            raise ValueError(f"need max_batch >= 1, max_queue >= 0, queue_timeout > 0 and prefill_tokens >= 1, got "
                             f"{max_batch}, {max_queue}, {queue_timeout}, {prefill_tokens}")
        self.model, self.engine = model, Engine(model, tokenizer)
        self.max_batch, self.max_queue, self.queue_timeout = max_batch, max_queue, queue_timeout
        self.max_positions = max_positions or model.config.sequence_len
        self.prefill_tokens = prefill_tokens
        self.name = name
        self._pending = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = None
        self._active_rows = 0  # rows decoding or being prefilled in chunks
        self._chunked = None  # the _Chunked in progress, if any (scheduler thread only)
        self._recent = deque()  # (time, tokens generated, requests finished) per step, last STATS_WINDOW_S
        # queue_seconds / prefill_seconds: summed over requests that got their first token, from
        # submit to the start of their prefill, and from there to their first token.
        self.counters = dict(submitted=0, completed=0, cancelled=0, timed_out=0, rejected=0, failed=0,
                             prompt_tokens=0, completion_tokens=0, steps=0, prefills=0, queue_seconds=0.0,
                             prefill_seconds=0.0)

    # ------------------------------------------------------------------
    # the client side (any thread)

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def close(self, timeout=10.0):
        """Stop the thread; requests still queued or running get ("error", SchedulerClosed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def load(self):
        """Requests queued or running."""
        return len(self._pending) + self._active_rows

    def submit(self, request):
        """Queue a request. Raises ValueError for a request that can never run, QueueFull when the
        queue is at max_queue, SchedulerClosed after close()."""
        vocab = self.model.config.vocab_size
        if not request.tokens or any(not isinstance(t, int) or not 0 <= t < vocab for t in request.tokens):
            raise ValueError(f"a prompt needs at least one token, each an int in [0, {vocab})")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if request.positions > self.max_positions:
            raise ValueError(f"request too long: {request.positions - request.max_tokens} prompt positions + "
                             f"{request.max_tokens} new tokens > the model's context of {self.max_positions}")
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the scheduler is shut down")
            if len(self._pending) >= self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)", self.retry_after())
            request.submitted_at = time.perf_counter()
            self._pending.append(request)
            self.counters["submitted"] += 1
            self._cond.notify()
        return request

    def retry_after(self):
        """Seconds a turned-away client should wait: the queue ahead of it at the recent request rate."""
        finished = sum(n for _, _, n in list(self._recent))
        if not finished:
            return max(1, math.ceil(self.queue_timeout))
        return max(1, math.ceil(len(self._pending) * STATS_WINDOW_S / finished))

    def stats(self):
        """Queue depth, running rows, tokens/s and requests/s over the last STATS_WINDOW_S, counters."""
        now = time.perf_counter()
        recent = [(t, k, n) for t, k, n in list(self._recent) if now - t <= STATS_WINDOW_S]
        return {"queue_depth": len(self._pending), "active_rows": self._active_rows, "max_batch": self.max_batch,
                "tokens_per_s": sum(k for _, k, _ in recent) / STATS_WINDOW_S,
                "requests_per_s": sum(n for _, _, n in recent) / STATS_WINDOW_S, **self.counters}

    # ------------------------------------------------------------------
    # the scheduler thread

    def _emit(self, request, kind, value):
        if request.on_event is None:
            return
        try:
            request.on_event(kind, value)
        except Exception:  # a broken listener (e.g. its event loop closed) must not stop the others
            logger.exception("%s: event callback failed; cancelling the request", self.name)
            request.cancel()

    def _finish(self, request, kind, value):
        request.finished_at = time.perf_counter()
        if kind == "error":
            key = "timed_out" if isinstance(value, QueueTimeout) else "failed"
        else:
            key = "cancelled" if value == "cancelled" else "completed"
        self.counters[key] += 1
        self._emit(request, kind, value)

    def _take_pending(self, wait, budget):
        """Requests to prefill now, oldest first: up to the free rows and as many as one prefill
        forward of `budget` positions holds (padded to the longest). A prompt longer than a whole
        step's budget comes alone, to be chunked. Drops cancelled and timed-out ones. Blocks while
        there is nothing to do if `wait`. None once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                now = time.perf_counter()
                while self._pending and (self._pending[0].cancelled
                                         or now - self._pending[0].submitted_at > self.queue_timeout):
                    request = self._pending.popleft()
                    if request.cancelled:
                        self._finish(request, "done", "cancelled")
                    else:
                        waited = now - request.submitted_at
                        self._finish(request, "error", QueueTimeout(
                            f"no free row after {waited:.1f} s in the queue (queue_timeout {self.queue_timeout} s)",
                            self.retry_after()))
                taken, longest = [], 0
                while budget and self._pending and self._active_rows + len(taken) < self.max_batch:
                    request = self._pending[0]
                    if request.cancelled:
                        self._finish(self._pending.popleft(), "done", "cancelled")
                        continue
                    longest = max(longest, request.prompt_positions)
                    if (len(taken) + 1) * longest > budget and (taken or budget < self.prefill_tokens):
                        break
                    taken.append(self._pending.popleft())
                    if longest > budget:
                        break
                if taken or not wait:
                    return taken
                # Wake up for a new request, close(), or the next queue timeout of a waiting one.
                self._cond.wait(self.queue_timeout if self._pending else None)

    def _run(self):
        device = self.model.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        running, logits = [], None
        cache = BatchKVCache(self.model)
        with torch.inference_mode():
            while True:
                idle = not running and self._chunked is None
                admitted = self._take_pending(wait=idle, budget=0 if self._chunked else self.prefill_tokens)
                if admitted is None:
                    break
                try:
                    running, logits = self._step(cache, running, logits, admitted)
                except Exception as exc:  # e.g. out of memory: fail this batch, keep serving the next
                    logger.exception("%s: decode step failed", self.name)
                    for active in running:
                        self._finish(active.request, "error", exc)
                    running, logits, cache = [], None, BatchKVCache(self.model)
                    self._active_rows = 0 if self._chunked is None else 1
        closed = SchedulerClosed("the server is shutting down")
        with self._cond:
            chunked = [] if self._chunked is None else [self._chunked.request]
            leftover = [a.request for a in running] + chunked + list(self._pending)
            self._pending.clear()
        for request in leftover:
            self._finish(request, "error", closed)

    def _take(self, active, sampled):
        """Give a row its next token (a pending tool-output token or the sampled one) and tell its
        client. Returns why the row is done ("stop", "length", "cancelled") or None."""
        request = active.request
        if request.cancelled:
            return "cancelled"
        token, _ = self.engine.advance(active.row, sampled)
        if active.row.completed:
            return "stop"
        active.last_token = token
        request.completion_tokens += 1
        self.counters["completion_tokens"] += 1
        request.first_token_at = request.first_token_at or time.perf_counter()
        self._emit(request, "token", token)
        return "length" if request.completion_tokens >= request.max_tokens else None

    def _prefill(self, admitted):
        """One prefill forward: the next chunk of a long prompt, or the admitted requests together.
        Returns the positions it ran (padding included) and (cache, row, request, first logits
        (1, V)) for each request whose prompt is now whole; a request whose prefill fails gets its
        error (the others go on)."""
        now = time.perf_counter()
        for request in admitted:
            request.prefill_started_at = now
        if len(admitted) == 1 and admitted[0].prompt_positions > self.prefill_tokens:
            request = admitted[0]
            self._chunked = _Chunked(request, KVCache(self.model, 1, request.prompt_positions))
        if self._chunked is not None:
            return self._prefill_chunk()
        positions = len(admitted) * max(r.prompt_positions for r in admitted)
        try:
            cache, first = self.engine.prefill_batch([r.tokens for r in admitted], [r.audio for r in admitted])
        except Exception as exc:
            if len(admitted) == 1:
                logger.exception("%s: prefill failed", self.name)
                self._finish(admitted[0], "error", exc)
                return positions, []
            # One bad request must not fail the ones that arrived with it: each again, alone.
            return positions, [done for request in admitted for done in self._prefill([request])[1]]
        self.counters["prefills"] += 1
        return positions, [(cache, i, request, first[i:i + 1]) for i, request in enumerate(admitted)]

    def _prefill_chunk(self):
        chunked, request = self._chunked, self._chunked.request
        total = request.prompt_positions
        if request.cancelled:
            self._chunked = None
            self._finish(request, "done", "cancelled")
            return 0, []
        end = min(chunked.done + self.prefill_tokens, total)
        try:
            first = self.engine.prefill_chunk(chunked.cache, request.tokens, request.audio, chunked.done, end)
        except Exception as exc:
            logger.exception("%s: prefill failed", self.name)
            self._chunked = None
            self._finish(request, "error", exc)
            return self.prefill_tokens, []
        self.counters["prefills"] += 1
        positions, chunked.done = end - chunked.done, end
        if end < total:
            return positions, []
        self._chunked = None
        return positions, [(chunked.cache, 0, request, first)]

    def _step(self, cache, running, logits, admitted):
        """One step: the running rows take the tokens of the last forward; prefills run
        (Scheduler._prefill), for the requests admitted and then for any that arrived meanwhile,
        up to prefill_tokens positions in all, each request taking its first token as soon as its
        prefill is done (so a new client waits for the prefill in flight, not for a decode step
        too); finished rows leave, and one decode forward runs for every row left. Returns the
        rows still running and their next logits."""
        device = self.model.get_device()
        before = self.counters["completion_tokens"]
        finished = []
        if running:
            sampled = sample_rows(logits, [a.request.sampling for a in running],
                                  [a.generator for a in running]).tolist()
            leaving = [(i, reason) for i, (active, token) in enumerate(zip(running, sampled))
                       if (reason := self._take(active, token)) is not None]
            for i, reason in reversed(leaving):  # swap-remove from the back keeps the indices valid
                cache.evict(i)
                finished.append((running[i].request, reason))
                running[i] = running[-1]
                running.pop()
        budget = self.prefill_tokens
        while admitted or self._chunked is not None:
            positions, done = self._prefill(admitted)
            for prefilled, row, request, first in done:
                self.counters["prompt_tokens"] += request.prompt_positions
                active = _Active(request, Row(), request.sampling.generator(device))
                reason = self._take(active, sample_rows(first, [request.sampling], [active.generator]).item())
                self.counters["queue_seconds"] += request.prefill_started_at - request.submitted_at
                self.counters["prefill_seconds"] += time.perf_counter() - request.prefill_started_at
                if reason is None:
                    cache.admit(prefilled, request.positions, source=row)
                    running.append(active)
                else:
                    finished.append((request, reason))
            self._active_rows = len(running) + (self._chunked is not None)
            budget -= positions
            if self._chunked is not None or budget <= 0:
                break
            admitted = self._take_pending(wait=False, budget=budget)
        self._active_rows = len(running) + (self._chunked is not None)  # before the done events (a client sees
        # its row gone)
        now = time.perf_counter()
        self.counters["steps"] += 1
        self._recent.append((now, self.counters["completion_tokens"] - before, len(finished)))
        while self._recent and now - self._recent[0][0] > STATS_WINDOW_S:
            self._recent.popleft()
        for request, reason in finished:
            self._finish(request, "done", reason)
        if not running:
            return running, None
        ids = torch.tensor([[a.last_token] for a in running], dtype=torch.long, device=device)
        return running, self.model(ids, kv_cache=cache)[:, -1]
