"""Continuous batching: one thread owns the model and decodes every running request in one batch.

    scheduler = Scheduler(model, tokenizer, max_batch=32).start()
    scheduler.submit(Request(prompt_ids, max_tokens=64, sampling=SamplingParams(temperature=0),
                             on_event=callback))   # callback(kind, value) runs on the scheduler thread

A request that arrives while others decode is prefilled alone (its audio soft tokens in front, if
any: Engine.prefill) and joins the running batch at the next step (BatchKVCache.admit); one that
stops, reaches its max_tokens or is cancelled (its client went away) leaves at once
(BatchKVCache.evict). Every row decodes at its own position with its own sampling parameters and
seeded generator (sample_rows), and the calculator tool runs per row (Engine.advance), so a request
gets the tokens it would get alone, whatever else runs beside it (tested).

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
from nanochat.engine import BatchKVCache, Engine, Row, SamplingParams, sample_rows

STATS_WINDOW_S = 10.0  # tokens/s and requests/s in stats() are averaged over this many seconds


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
    admitted_at: float = None
    first_token_at: float = None
    finished_at: float = None
    completion_tokens: int = 0
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def positions(self):
        """Cache positions the request may reach: audio, prompt and every new token."""
        return (0 if self.audio is None else self.audio.size(1)) + len(self.tokens) + self.max_tokens

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


class Scheduler:
    """Owns `model` on one device; see the module docstring. max_positions: the longest request
    (audio + prompt + new tokens), by default the model's training context."""

    def __init__(self, model, tokenizer, max_batch=32, max_queue=256, queue_timeout=30.0, max_positions=None,
                 name="scheduler"):
        if max_batch < 1 or max_queue < 0 or queue_timeout <= 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 0 and queue_timeout > 0, got {max_batch}, "
                             f"{max_queue}, {queue_timeout}")
        self.model, self.engine = model, Engine(model, tokenizer)
        self.max_batch, self.max_queue, self.queue_timeout = max_batch, max_queue, queue_timeout
        self.max_positions = max_positions or model.config.sequence_len
        self.name = name
        self._pending = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = None
        self._active_rows = 0
        self._recent = deque()  # (time, tokens generated, requests finished) per step, last STATS_WINDOW_S
        self.counters = dict(submitted=0, completed=0, cancelled=0, timed_out=0, rejected=0, failed=0,
                             prompt_tokens=0, completion_tokens=0, steps=0)

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

    def _take_pending(self, wait):
        """Requests to admit now (up to the free rows); drops cancelled and timed-out ones. Blocks
        while there is nothing to do if `wait`. None once closed."""
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
                taken = []
                while self._pending and self._active_rows + len(taken) < self.max_batch:
                    request = self._pending.popleft()
                    if request.cancelled:
                        self._finish(request, "done", "cancelled")
                    else:
                        taken.append(request)
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
                admitted = self._take_pending(wait=not running)
                if admitted is None:
                    break
                try:
                    running, logits = self._step(cache, running, logits, admitted)
                except Exception as exc:  # e.g. out of memory: fail this batch, keep serving the next
                    logger.exception("%s: decode step failed", self.name)
                    for active in running:
                        self._finish(active.request, "error", exc)
                    running, logits, cache = [], None, BatchKVCache(self.model)
                    self._active_rows = 0
        closed = SchedulerClosed("the server is shutting down")
        with self._cond:
            leftover = [a.request for a in running] + list(self._pending)
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

    def _step(self, cache, running, logits, admitted):
        """One step: the running rows take the tokens of the last forward, the new requests are
        prefilled and take their first token (so a new client waits for its own prefill, never for
        the others'), finished rows leave, and one decode forward runs for every row left.
        Returns the rows still running and their next logits."""
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
        for request in admitted:
            try:
                single, first = self.engine.prefill(request.tokens, request.audio)
            except Exception as exc:  # this request's fault or not, the running batch goes on
                logger.exception("%s: prefill failed", self.name)
                self._finish(request, "error", exc)
                continue
            request.admitted_at = time.perf_counter()
            self.counters["prompt_tokens"] += int(single.lengths[0])
            active = _Active(request, Row(), request.sampling.generator(device))
            reason = self._take(active, sample_rows(first, [request.sampling], [active.generator]).item())
            if reason is None:
                cache.admit(single, request.positions)
                running.append(active)
            else:
                finished.append((request, reason))
        self._active_rows = len(running)  # before the done events, so a client sees its row gone
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
