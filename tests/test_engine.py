"""The Engine: cached sampling against full forwards (logits), batching, seeds, the context policy,
bad requests, the calculator tool."""


import pytest
import torch

from nanochat.engine import CalculatorError, Engine, KVCache, context_budget, use_calculator
from nanochat.gpt import GPTConfig
from tests.helpers import build_model

CONFIG = GPTConfig(sequence_len=256, vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG, perturb=0.1)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return Engine(model, tokenizer)


@torch.no_grad()
def greedy_with_full_forwards(model, prompt, n, audio=None):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]), audio_features=audio)[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def run(engine, prompt, **kwargs):
    columns = [column for column, _ in engine.generate(prompt, **kwargs)]
    return [list(row) for row in zip(*columns)]


def prompt_of(tokenizer, text):
    return tokenizer.encode(text, prepend="<|bos|>")


def test_temperature_zero_is_greedy_full_forward(engine, model, tokenizer):
    prompt = prompt_of(tokenizer, "def main(argv):")
    got = run(engine, prompt, max_tokens=40, temperature=0)[0]
    assert got == greedy_with_full_forwards(model, prompt, len(got))
    assert len(got) >= 10  # the check covered real decoding, not an immediate stop


def test_seeds_reproduce_and_samples_differ(engine, tokenizer):
    prompt = prompt_of(tokenizer, "import os")
    a = run(engine, prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=7)
    b = run(engine, prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=7)
    c = run(engine, prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=8)
    assert a == b
    assert a != c
    assert len({tuple(row) for row in a}) > 1


def test_top_k_one_is_greedy(engine, tokenizer):
    prompt = prompt_of(tokenizer, "class Foo:")
    for tiny in (1e-6, 1e-40, 5e-324):  # 15 / 1e-40 overflows fp32: it must still sample, greedily
        assert run(engine, prompt, max_tokens=15, temperature=tiny) == run(engine, prompt, max_tokens=15, temperature=0)
    assert run(engine, prompt, max_tokens=15, temperature=0.8, top_k=1) == run(engine, prompt, max_tokens=15, temperature=0)
    assert run(engine, prompt, max_tokens=15, temperature=0.8, top_p=1e-9) == run(engine, prompt, max_tokens=15, temperature=0)


def test_prompts_of_different_lengths_batch_like_one_by_one(engine, tokenizer):
    texts = ["x", "return self._data[key] if key in self", "for i in range(10):\n    print(i)"]
    prompts = [prompt_of(tokenizer, t) for t in texts]
    batched = run(engine, prompts, num_samples=2, max_tokens=25, temperature=0)
    for i, prompt in enumerate(prompts):
        alone = run(engine, prompt, max_tokens=25, temperature=0)[0]
        assert batched[2 * i] == alone and batched[2 * i + 1] == alone


def test_audio_prompts_of_different_lengths(engine, model, tokenizer):
    prompt = prompt_of(tokenizer, "print(")
    clips = [torch.randn(1, 9, 64), torch.randn(1, 23, 64)]
    batched = run(engine, [prompt, prompt], max_tokens=20, temperature=0, audio_features=clips)
    for row, clip in zip(batched, clips):
        assert row == greedy_with_full_forwards(model, prompt, len(row), audio=clip)
    assert batched[0] != batched[1]


@torch.no_grad()
def test_batched_and_chunked_prefills_equal_one_prefill(engine, model):
    """Prompts of different lengths with clips of different lengths (and none) prefilled in one
    forward, and a long prompt prefilled in chunks that also split its clip: every row's cache
    (keys, values, length, smear state) is that of its prefill alone, and its first logits are
    the full forward's."""
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (3, 40, 11, 1)]
    clips = [torch.randn(1, 9, 64), None, torch.randn(1, 30, 64), torch.randn(1, 2, 64)]

    def same_row(cache, row, single):
        n = int(single.lengths[0])
        assert int(cache.lengths[row]) == n
        for mine, theirs in ((cache.k, single.k), (cache.v, single.v)):
            assert (mine[:, row, :n] - theirs[:, 0, :n]).abs().max() <= 1e-5
        assert (cache.smear_prev[row] - single.smear_prev[0]).abs().max() <= 1e-6

    cache, first = engine.prefill_batch(prompts, clips)
    for i, (prompt, clip) in enumerate(zip(prompts, clips)):
        single, alone = engine.prefill(prompt, clip)
        same_row(cache, i, single)
        full = model(torch.tensor([prompt]), audio_features=clip)[0, -1]
        assert (first[i] - full).abs().max() <= 1e-4 and (alone[0] - full).abs().max() <= 1e-4

    prompt, clip = prompts[1], clips[2]  # 30 soft tokens, then 40 text tokens
    chunked = KVCache(model, 1, 70)
    for start, stop in [(0, 12), (12, 30), (30, 31), (31, 64), (64, 70)]:
        logits = engine.prefill_chunk(chunked, prompt, clip, start, stop)
    single, alone = engine.prefill(prompt, clip)
    same_row(chunked, 0, single)
    assert (logits - model(torch.tensor([prompt]), audio_features=clip)[:, -1]).abs().max() <= 1e-4


def test_finished_rows_leave_the_batch(model, tokenizer):
    """A row that stops early leaves the cache; the others decode exactly as they would alone."""
    prompts = [prompt_of(tokenizer, t) for t in ("x", "import os", "for i in range(10):", "class Foo:")]
    engine = Engine(model, tokenizer)
    free = [run(engine, p, max_tokens=25, temperature=0)[0] for p in prompts]
    # A token that row 0 emits early but some other row never does within the budget: make it the stop.
    stop = next(t for t in free[0][1:] if any(t not in row for row in free[1:]))
    engine.stop_tokens = {stop}
    alone = [run(engine, p, max_tokens=25, temperature=0)[0] for p in prompts]
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].size(0)))
    try:
        columns = list(engine.generate(prompts, max_tokens=25, temperature=0))
    finally:
        hook.remove()
    for i, expected in enumerate(alone):
        tokens = [column[i] for column, _ in columns]
        masks = [m[i] for _, m in columns]
        assert tokens[:len(expected)] == expected
        assert tokens[len(expected):] == [stop] * (len(tokens) - len(expected))  # a finished row repeats its stop
        assert masks == [1] * len(expected) + [0] * (len(tokens) - len(expected))
    assert len(alone[0]) < len(columns)
    decode_sizes = batch_sizes[len(prompts):]  # after the batch-1 prefills
    assert decode_sizes[0] == len(prompts) and decode_sizes[-1] < len(prompts)
    assert decode_sizes == sorted(decode_sizes, reverse=True)


@torch.no_grad()
def engine_logits_vs_full_forwards(engine, model, prompts, clips, num_samples, **kwargs):
    """Generate, recording every logits row the engine samples from (a forward hook), then check
    each against a full forward over that row's prompt and the tokens it has so far. Returns the
    largest difference and the decode batch sizes."""
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(out[:, -1].clone()))
    try:
        columns = list(engine.generate(prompts, num_samples=num_samples, audio_features=clips, **kwargs))
    finally:
        hook.remove()
    prefills, decodes = seen[:len(prompts)], seen[len(prompts):]
    assert len(decodes) == len(columns) - 1  # a forward per sampled column after the first, no more
    rows = [(p, c) for p, c in zip(prompts, clips) for _ in range(num_samples)]
    running, generated, worst = list(range(len(rows))), [[] for _ in rows], 0.0
    for step, (column, _) in enumerate(columns):
        used = [prefills[r // num_samples][0] for r in running] if step == 0 else decodes[step - 1]
        assert len(used) == len(running)
        for r, logits in zip(running, used):
            prompt, clip = rows[r]
            full = model(torch.tensor([prompt + generated[r]]), audio_features=clip)[0, -1]
            worst = max(worst, float((logits - full).abs().max()))
            generated[r].append(column[r])
        running = [r for r in running if column[r] not in engine.stop_tokens]
    return worst, [len(d) for d in decodes]


def test_sampled_batches_match_full_forward_logits(model, tokenizer):
    """Prompts of different lengths, two sampled rows each (so a prompt's rows diverge after the
    prefill was copied into both, smear state included), some with audio, rows leaving the batch:
    every logits row the engine samples from equals a full forward's to 1e-4."""
    prompts = [prompt_of(tokenizer, t) for t in ("x", "return self._data[key] if key", "for i in range(10):")]
    clips = [None, torch.randn(1, 11, CONFIG.n_embd), torch.randn(1, 5, CONFIG.n_embd)]
    engine = Engine(model, tokenizer)
    engine.stop_tokens = set()
    free = [column for column, _ in engine.generate(prompts, num_samples=2, max_tokens=24, temperature=1.0, seed=5,
                                                     audio_features=clips)]
    engine.stop_tokens = {free[2][0]}  # what row 0 sampled third: it leaves early, taking others with it
    worst, sizes = engine_logits_vs_full_forwards(engine, model, prompts, clips, num_samples=2, max_tokens=24,
                                                  temperature=1.0, seed=5)
    assert worst <= 1e-4
    assert sizes[0] == 6 and 0 < sizes[-1] < 6 and len(sizes) == 23  # rows left, others ran to the end


def test_greedy_and_top_k_batches_match_full_forward_logits(model, tokenizer):
    prompts = [prompt_of(tokenizer, t) for t in ("import os", "class Foo(object):\n    def")]
    worst, sizes = engine_logits_vs_full_forwards(Engine(model, tokenizer), model, prompts, [None, None],
                                                  num_samples=3, max_tokens=16, temperature=0.7, top_k=5, seed=1)
    assert worst <= 1e-4 and len(sizes) >= 5


def test_generate_batch_stops_and_strips(engine, tokenizer):
    prompt = prompt_of(tokenizer, "while True:")
    sequences, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=1.0, seed=3)
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|bos|>")}
    for seq, mask in zip(sequences, masks):
        assert seq[:len(prompt)] == prompt and len(seq) == len(mask) <= len(prompt) + 12
        assert not stops & set(seq[len(prompt):])


def test_bad_requests(engine, model):
    with pytest.raises(ValueError, match="empty prompt"):
        next(engine.generate([]))
    with pytest.raises(ValueError, match="empty prompt"):
        next(engine.generate([[1, 2], []]))
    with pytest.raises(ValueError, match="request too long"):
        next(engine.generate([1, 2, 3], max_tokens=model.cos.size(0)))
    with pytest.raises(ValueError, match="ints in"):
        next(engine.generate([1, 10**6]))
    with pytest.raises(ValueError, match="tokens must be a list"):
        next(engine.generate("hello"))


@pytest.mark.parametrize("name,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.5), ("temperature", "1"),
    ("temperature", None), ("top_k", 0), ("top_k", -3), ("top_k", 2.5), ("top_k", True), ("top_k", "5"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", -0.1), ("max_tokens", 0),
    ("max_tokens", -5), ("max_tokens", 2.0), ("max_tokens", "10"), ("num_samples", 0), ("num_samples", -1),
    ("num_samples", 1.5), ("seed", None), ("seed", "x"), ("seed", 2 ** 64), ("seed", 1.5),
])
def test_bad_parameters_name_the_parameter(engine, name, value):
    with pytest.raises(ValueError, match=f"^{name} must"):
        next(engine.generate([1, 2, 3], **{"max_tokens": 4, name: value}))


def test_context_policy(model, tokenizer):
    """Requests must fit the trained context (sequence_len 256), not the 10x rotary table; None
    fills exactly the rest of it, and a prompt that leaves no room is an error."""
    engine = Engine(model, tokenizer)
    engine.stop_tokens = set()  # run every request to its budget
    n = CONFIG.sequence_len
    assert len(run(engine, list(range(n - 7)), temperature=0)[0]) == 7
    clip = torch.randn(1, 40, CONFIG.n_embd)
    assert len(run(engine, list(range(n - 47)), temperature=0, audio_features=clip)[0]) == 7
    assert len(run(engine, list(range(n - 10)), max_tokens=10, temperature=0)[0]) == 10  # exactly full
    with pytest.raises(ValueError, match=rf"{n - 9} prompt positions \+ max_tokens 10 > .*{n}-position context.*at most 9"):
        next(engine.generate(list(range(n - 9)), max_tokens=10))
    with pytest.raises(ValueError, match=f"fills {n} positions.*no room"):
        next(engine.generate(list(range(n - 40)), audio_features=clip))
    with pytest.raises(ValueError, match=f"fills {n + 1} positions"):
        next(engine.generate([[1], list(range(n + 1))]))  # the longest prompt counts
    assert context_budget(100, 90) == 10 and context_budget(100, 90, 10) == 10


def test_bad_audio_features(engine, model):
    good = torch.randn(1, 4, CONFIG.n_embd)
    cases = [(good.clone().index_fill_(1, torch.tensor([2]), float("nan")), "NaN or inf"),
             (good * float("inf"), "NaN or inf"), (torch.randn(1, 4, 7), r"must be \(1, T_a, 64\)"),
             (torch.randn(2, 4, CONFIG.n_embd), r"must be \(1, T_a, 64\)"), (torch.ones(1, 4, 64, dtype=torch.long),
             "float tensor"), ([good, "clip"], "prompt 1 must be a float tensor"), ([good], "1 audio inputs for 2")]
    for features, message in cases:
        prompts = [[1, 2], [3]] if isinstance(features, list) else [1, 2]
        with pytest.raises(ValueError, match=message):
            next(engine.generate(prompts, max_tokens=3, audio_features=features))


def test_non_finite_model_is_an_error_not_nul_tokens(tokenizer):
    model = build_model(CONFIG, perturb=0.1)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="NaN or inf logits"):
            next(Engine(model, tokenizer).generate([1, 2, 3], max_tokens=3, temperature=temperature))


def train_to_memorise(sequences, steps=300):
    """A tiny model that learns to emit each of a few transcripts greedily (a real model, really
    trained)."""
    model = build_model(GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64),
                        perturb=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    width = max(map(len, sequences)) - 1
    x = torch.tensor([ids[:-1] + [0] * (width - len(ids) + 1) for ids in sequences])
    y = torch.tensor([ids[1:] + [-1] * (width - len(ids) + 1) for ids in sequences])
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if loss.item() < 1e-3:
            break
    return model.eval()


@pytest.fixture(scope="module")
def tool_use(tokenizer):
    """(model, transcripts): two memorised tool calls, one the calculator answers (with a WRONG
    output in the transcript, which the engine must replace) and one it refuses."""
    special = tokenizer.encode_special

    def prompt(text):
        return [special("<|bos|>"), special("<|user_start|>"), *tokenizer.encode(text), special("<|user_end|>"),
                special("<|assistant_start|>")]

    def call(expression):
        return [special("<|python_start|>"), *tokenizer.encode(expression), special("<|python_end|>")]

    answered = dict(prompt=prompt("12 times 7?"), call=call("12*7"),
                    wrong=[special("<|output_start|>"), *tokenizer.encode("85"), special("<|output_end|>")],
                    forced=[special("<|output_start|>"), *tokenizer.encode("84"), special("<|output_end|>")])
    refused = dict(prompt=prompt("count?"), rest=call("(5).count('5')") + tokenizer.encode(" no tool"))
    end = [special("<|assistant_end|>")]
    model = train_to_memorise([answered["prompt"] + answered["call"] + answered["wrong"] + end,
                               refused["prompt"] + refused["rest"] + end])
    return model, answered, refused


def test_calculator_tool_output_is_forced(tool_use, tokenizer):
    model, t, _ = tool_use
    columns = list(Engine(model, tokenizer).generate(t["prompt"], max_tokens=30, temperature=0))
    tokens = [c[0][0] for c in columns]
    masks = [c[1][0] for c in columns]
    call, forced = t["call"], t["forced"]
    assert tokens[:len(call)] == call
    assert tokens[len(call):len(call) + len(forced)] == forced
    assert masks[:len(call)] == [1] * len(call)
    assert masks[len(call):len(call) + len(forced)] == [0] * len(forced)


def test_calculator_error_does_not_stop_generation(tool_use, tokenizer):
    """A tool call the calculator refuses (a .count() on a number) gets no output block, and the
    row decodes on to the end of what it memorised."""
    model, _, t = tool_use
    sequences, masks = Engine(model, tokenizer).generate_batch(t["prompt"], max_tokens=40, temperature=0)
    n = len(t["prompt"])
    assert sequences[0][n:] == t["rest"] and masks[0][n:] == [1] * len(t["rest"])


@pytest.mark.parametrize("expression,expected", [
    ("12*7", "84"), ("(1 + 2) * -3", "-9"), ("7/2", "3.5"), ("10/4*2", "5"), ("17 // 5", "3"),
    ("17 % 5", "2"), ("'strawberry'.count('r')", "3"), ('"banana".count("an")', "2"), ("0.1+0.2", "0.3"),
])
def test_calculator_answers(expression, expected):
    assert use_calculator(expression) == expected


@pytest.mark.parametrize("expression", [
    "__import__('os')", "().__class__", "'a'.upper()", "x + 1", "2**10", "9**9**9", "1/0",
    "'a'.count(chr(97))", "[1, 2]", "lambda: 1", "'" + "9" * 40 + "'.count('9') * " + "9" * 40,
    "1+" * 200 + "1", "-" * 100 + "1", "True + 1",
    # .count() only on a string literal, with one string literal argument
    "(5).count('5')", "(1.5).count('1')", "b'ab'.count(b'a')", "'ab'.count(b'a')", "'ab'.count(5)",
    "'ab'.count('a', 1)", "'ab'.count(x='a')", "'ab'.count()", "''.join('a')", "'a'.count('a').count('a')",
])
def test_calculator_rejects(expression):
    with pytest.raises(CalculatorError):  # never another error type, which would stop generation
        use_calculator(expression)
