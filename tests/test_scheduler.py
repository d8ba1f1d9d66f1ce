"""Continuous batching: a request decoded inside a busy, changing batch gets exactly what it gets alone
(greedy and seeded sampling), rows join at the next step and leave when done or cancelled, the
queue is bounded, and the cache that rows join and leave keeps every row intact."""

import threading
import time

import pytest
import torch

from nanochat.engine import BatchKVCache, Engine, KVCache, SamplingParams
from nanochat.gpt import GPTConfig
from nanochat.scheduler import QueueFull, QueueTimeout, Request, Scheduler, SchedulerClosed
from tests.helpers import build_model
from tests.test_engine import greedy_with_full_forwards, prompt_of, run, tool_use  # noqa: F401 (a fixture)

CONFIG = GPTConfig(sequence_len=256, vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG, perturb=0.1)


class Collector:
    """on_event for a Request: records tokens and the final event; wait() blocks until it comes."""

    def __init__(self):
        self.tokens, self.end = [], None
        self.finished = threading.Event()
        self.times = []

    def __call__(self, kind, value):
        if kind == "token":
            self.tokens.append(value)
            self.times.append(time.perf_counter())
        else:
            self.end = (kind, value)
            self.finished.set()

    def wait(self, timeout=120):
        assert self.finished.wait(timeout), "request never finished"
        return self


def request(prompt, max_tokens=20, sampling=GREEDY, audio=None):
    return Request(list(prompt), max_tokens, sampling, audio, on_event=Collector())


@pytest.fixture
def scheduler(model, tokenizer):
    s = Scheduler(model, tokenizer, max_batch=8).start()
    yield s
    s.close()


def alone(model, tokenizer, req):
    """The same request run by a fresh scheduler with nothing else to do."""
    s = Scheduler(model, tokenizer).start()
    try:
        twin = Request(list(req.tokens), req.max_tokens, req.sampling, req.audio, on_event=Collector())
        s.submit(twin)
        return twin.on_event.wait()
    finally:
        s.close()


def test_greedy_alone_is_the_full_forward_and_the_engine(scheduler, model, tokenizer):
    prompt = prompt_of(tokenizer, "def main(argv):")
    r = scheduler.submit(request(prompt, max_tokens=30)).on_event.wait()
    assert r.end == ("done", "length") and len(r.tokens) == 30
    assert r.tokens == greedy_with_full_forwards(model, prompt, 30)
    assert r.tokens == run(Engine(model, tokenizer), prompt, max_tokens=30, temperature=0)[0]


def test_a_request_in_a_busy_changing_batch_gets_what_it_gets_alone(scheduler, model, tokenizer):
    """Requests of different lengths, sampling parameters, budgets and audio join and leave at
    different steps while the others decode: each gets its tokens alone."""
    texts = ["x", "import os", "for i in range(10):\n    print(i)", "class Foo(object):", "return self._data"]
    torch.manual_seed(0)
    requests = []
    for i, text in enumerate(texts):
        requests.append(request(prompt_of(tokenizer, text), max_tokens=10 + 7 * i, sampling=GREEDY))
        requests.append(request(prompt_of(tokenizer, text), max_tokens=40 - 5 * i,
                                sampling=SamplingParams(temperature=0.9, top_k=50 if i % 2 else None,
                                                        top_p=0.9 if i % 3 else None, seed=i)))
    requests.append(request(prompt_of(tokenizer, "print("), 25, audio=torch.randn(1, 9, 64)))
    requests.append(request(prompt_of(tokenizer, "print("), 25, SamplingParams(1.0, seed=5), torch.randn(1, 17, 64)))
    sizes = []
    hook = model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].size(0)))
    try:
        for i, r in enumerate(requests):
            scheduler.submit(r)
            time.sleep(0.003 * (i % 4))  # arrive while others are decoding, at different steps
        for r in requests:
            r.on_event.wait()
    finally:
        hook.remove()
    # They shared the batch, and it shrank as they left: how many end at the same step depends on
    # when each arrived (the last forward held 1 row in most runs, 2 in one of a full-suite run).
    assert max(sizes) >= 6 and sizes[-1] < max(sizes)
    assert scheduler.stats()["active_rows"] == 0
    for r in requests:
        solo = alone(model, tokenizer, r)
        assert r.on_event.tokens == solo.tokens and r.on_event.end == solo.end
    sampled = [r.on_event.tokens for r in requests if r.sampling.temperature > 0]
    assert len({tuple(t) for t in sampled}) == len(sampled)  # the seeds differ, so do the samples


class Forwards:
    """Records every model forward while open: ("prefill", rows, positions a row) or ("decode", rows)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def record(self, module, args, kwargs):
        idx, audio = args[0], kwargs.get("audio_features")
        if kwargs.get("last_only"):
            text = kwargs.get("text_lengths")
            clips = kwargs.get("audio_lengths")
            if text is None:
                width = idx.size(1) + (0 if audio is None else audio.size(1))
            else:  # a padded batch, packed: as wide as its longest row
                width = int((text + (clips if clips is not None else 0 if audio is None else audio.size(1))).max())
            self.calls.append(("prefill", idx.size(0), width))
        else:
            self.calls.append(("decode", idx.size(0)))

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self.record, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def prefills(self):
        return [c for c in self.calls if c[0] == "prefill"]


def test_requests_that_arrive_together_are_prefilled_together(model, tokenizer):
    """Prompts of different lengths, with clips of different lengths or none, queued while the
    scheduler is busy: one prefill forward for all, and each gets exactly what it gets alone."""
    s = Scheduler(model, tokenizer, max_batch=8)  # not started yet: every request is waiting at the first step
    texts = ["x", "import os", "for i in range(10):\n    print(i)", "class Foo(object):"]
    requests = [s.submit(request(prompt_of(tokenizer, t), max_tokens=15)) for t in texts]
    requests.append(s.submit(request(prompt_of(tokenizer, "print("), 15, audio=torch.randn(1, 9, 64))))
    requests.append(s.submit(request(prompt_of(tokenizer, "print("), 15, SamplingParams(1.0, seed=5),
                                     torch.randn(1, 17, 64))))
    try:
        with Forwards(model) as forwards:
            s.start()
            for r in requests:
                r.on_event.wait()
    finally:
        s.close()
    assert forwards.prefills == [("prefill", 6, max(r.prompt_positions for r in requests))]
    assert s.stats()["prefills"] == 1
    for r in requests:
        solo = alone(model, tokenizer, r)
        assert r.on_event.tokens == solo.tokens and r.on_event.end == solo.end


def test_the_prefill_budget_batches_and_chunks(model, tokenizer):
    """With a budget of 16 positions a step: between two decode steps of the running row at most
    16 positions are prefilled (padding counted), a longer prompt with a clip is prefilled in
    chunks that split its clip, a burst of short prompts in several forwards, and every request
    gets exactly what it gets alone (where nothing is chunked)."""
    s = Scheduler(model, tokenizer, max_batch=8, prefill_tokens=16).start()
    try:
        running = s.submit(request(prompt_of(tokenizer, "x"), max_tokens=100))
        while not running.on_event.tokens:
            time.sleep(0.001)
        long = request(prompt_of(tokenizer, "for i in range(10):"), max_tokens=10, audio=torch.randn(1, 23, 64))
        shorts = [request(prompt_of(tokenizer, t), max_tokens=10) for t in ("import os", "class A:", "def f(x):", "yield")]
        with Forwards(model) as forwards:
            for r in [long] + shorts:
                s.submit(r)
            for r in [long] + shorts:
                r.on_event.wait()
        running.on_event.wait()
    finally:
        s.close()
    prefills = forwards.prefills
    chunks = -(-long.prompt_positions // 16)
    assert [positions for _, _, positions in prefills[:chunks]] == [16] * (chunks - 1) + [long.prompt_positions % 16 or 16]
    assert len(prefills) > chunks + 1 and sum(rows for _, rows, _ in prefills[chunks:]) == len(shorts)
    between = [0]  # prefill positions between two decode steps
    for call in forwards.calls:
        if call[0] == "decode":
            between.append(0)
        else:
            between[-1] += call[1] * call[2]
    assert max(between) <= 16
    assert any(long.prefill_started_at < t < long.first_token_at for t in running.on_event.times)  # it kept decoding
    for r in [running, long] + shorts:
        solo = alone(model, tokenizer, r)
        assert r.on_event.tokens == solo.tokens and r.on_event.end == solo.end


def test_rows_join_at_the_next_step_and_leave_when_done(model, tokenizer):
    sizes = []
    hook = model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape))
    s = Scheduler(model, tokenizer, max_batch=8).start()
    try:
        long = s.submit(request(prompt_of(tokenizer, "import os"), max_tokens=200))
        while len(long.on_event.tokens) < 5:
            time.sleep(0.001)
        short = s.submit(request(prompt_of(tokenizer, "class Foo:"), max_tokens=5))
        short.on_event.wait()
        long.on_event.wait()
    finally:
        s.close()
        hook.remove()
    decode = [shape[0] for shape in sizes if shape[1] == 1]  # (B, 1) decode steps; prefills are (1, T)
    assert 2 in decode  # the short request ran inside the long one's batch...
    assert decode[-1] == 1  # ...and left it again
    assert short.on_event.times[0] < long.on_event.times[-1]  # it did not wait for the long one
    assert decode.count(2) <= 4  # its 5 tokens: the first from its own prefill, 4 from shared steps


def test_a_cancelled_request_leaves_and_the_others_go_on(scheduler, model, tokenizer):
    keep = scheduler.submit(request(prompt_of(tokenizer, "x"), max_tokens=60))
    cut = scheduler.submit(request(prompt_of(tokenizer, "import os"), max_tokens=200))
    while len(cut.on_event.tokens) < 3:
        time.sleep(0.001)
    cut.cancel()
    assert cut.on_event.wait().end == ("done", "cancelled")
    assert len(cut.on_event.tokens) < 200
    assert keep.on_event.wait().tokens == alone(model, tokenizer, keep).tokens
    stats = scheduler.stats()
    assert stats["cancelled"] == 1 and stats["completed"] == 1 and stats["active_rows"] == 0


def test_the_queue_is_bounded_and_times_out(model, tokenizer):
    slow = model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))  # 200 steps: > 2 s
    s = Scheduler(model, tokenizer, max_batch=1, max_queue=1, queue_timeout=0.3).start()
    try:
        busy = s.submit(request(prompt_of(tokenizer, "x"), max_tokens=200, sampling=SamplingParams(0.5, top_k=5)))
        while not busy.on_event.tokens:
            time.sleep(0.001)
        waiting = s.submit(request(prompt_of(tokenizer, "y")))
        with pytest.raises(QueueFull) as full:
            s.submit(request(prompt_of(tokenizer, "z")))
        assert full.value.retry_after >= 1
        kind, error = waiting.on_event.wait().end
        assert kind == "error" and isinstance(error, QueueTimeout) and "queue_timeout 0.3" in str(error)
        busy.cancel()
        assert busy.on_event.wait().end == ("done", "cancelled")
        assert s.stats()["timed_out"] == 1 and s.stats()["rejected"] == 1
    finally:
        s.close()
        slow.remove()


def test_bad_requests_are_refused_at_submit(scheduler, tokenizer):
    with pytest.raises(ValueError, match="context of 256"):
        scheduler.submit(request(prompt_of(tokenizer, "x"), max_tokens=256))
    with pytest.raises(ValueError, match="at least one token"):
        scheduler.submit(request([], max_tokens=5))
    with pytest.raises(ValueError, match="int in"):
        scheduler.submit(request([1, 10 ** 6], max_tokens=5))


def test_a_failing_prefill_fails_only_its_request(scheduler, model, tokenizer):
    good = scheduler.submit(request(prompt_of(tokenizer, "x"), max_tokens=30))
    bad = scheduler.submit(request(prompt_of(tokenizer, "y"), audio=torch.randn(1, 5, 65)))  # wrong width
    kind, error = bad.on_event.wait().end
    assert kind == "error" and "audio_features must be" in str(error)
    assert good.on_event.wait().tokens == alone(model, tokenizer, good).tokens


def test_close_fails_what_is_left(model, tokenizer):
    s = Scheduler(model, tokenizer, max_batch=1).start()
    running = s.submit(request(prompt_of(tokenizer, "x"), max_tokens=250))
    queued = s.submit(request(prompt_of(tokenizer, "y")))
    while not running.on_event.tokens:
        time.sleep(0.001)
    s.close()
    for r in (running, queued):
        kind, error = r.on_event.wait().end
        assert kind == "error" and isinstance(error, SchedulerClosed)
    with pytest.raises(SchedulerClosed):
        s.submit(request(prompt_of(tokenizer, "z")))


def test_load_counts_queued_requests(model, tokenizer):
    s = Scheduler(model, tokenizer)
    s.submit(request([1, 2, 3]))  # not started: it stays queued
    assert s.load == 1 and s.stats()["queue_depth"] == 1


def test_the_calculator_runs_per_row(tool_use, tokenizer):
    calc_model, t, _ = tool_use
    s = Scheduler(calc_model, tokenizer).start()
    try:
        other = s.submit(request(prompt_of(tokenizer, "import os"), max_tokens=30))
        tool = s.submit(request(t["prompt"], max_tokens=30))
        tool.on_event.wait(), other.on_event.wait()
    finally:
        s.close()
    assert tool.on_event.tokens[:len(t["call"]) + len(t["forced"])] == t["call"] + t["forced"]
    assert other.on_event.tokens == alone(calc_model, tokenizer, other).tokens  # untouched by the other's tool


@torch.no_grad()
def test_batch_cache_rows_survive_joins_and_leaves(model):
    """Rows of different lengths join (growing the storage) and leave in any order: every row's keys,
    values, length and smear state stay those of its own batch-1 prefill."""
    cache = BatchKVCache(model)
    singles, order = {}, []
    generator = torch.Generator().manual_seed(0)
    for step in range(12):
        n = 3 + 7 * step % 40
        single = KVCache(model, 1, n)
        model(torch.randint(0, 512, (1, n), generator=generator), kv_cache=single)
        cache.admit(single, need=n + 5 * step)
        singles[step], order = single, order + [step]
        if step % 3 == 2:  # leave: the second row, then the last one
            for victim in (1, -1):
                victim %= len(order)
                cache.evict(victim)
                order[victim] = order[-1]
                order.pop()
        assert cache.size == len(order) and cache.capacity >= max(3 + 7 * s % 40 + 5 * s for s in order)
        for row, name in enumerate(order):
            single, n = singles[name], int(singles[name].lengths[0])
            assert int(cache.lengths[row]) == n
            assert torch.equal(cache.k[:, row, :n], single.k[:, 0, :n]) and torch.equal(cache.v[:, row, :n], single.v[:, 0, :n])
            assert torch.equal(cache.smear_prev[row], single.smear_prev[0])
