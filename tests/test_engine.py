"""The Engine: cached sampling against full forwards, batching, seeds, the calculator tool."""

import pytest
import torch

from nanochat.engine import CalculatorError, Engine, use_calculator
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
    with pytest.raises(ValueError, match="request too long"):
        next(engine.generate([1, 2, 3], max_tokens=model.cos.size(0)))
    with pytest.raises(ValueError, match="ints in"):
        next(engine.generate([1, 10**6]))


def train_to_memorise(tokenizer, ids, steps=300):
    """A tiny model that learns to emit one transcript greedily (a real model, really trained)."""
    model = build_model(GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64),
                        perturb=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if loss.item() < 1e-3:
            break
    return model.eval()


def test_calculator_tool_output_is_forced(tokenizer):
    special = tokenizer.encode_special
    prompt = [special("<|bos|>"), special("<|user_start|>"), *tokenizer.encode("12 times 7?"),
              special("<|user_end|>"), special("<|assistant_start|>")]
    call = [special("<|python_start|>"), *tokenizer.encode("12*7"), special("<|python_end|>")]
    # The memorised transcript has a WRONG tool output: the engine must replace it with the real one.
    wrong = [special("<|output_start|>"), *tokenizer.encode("85"), special("<|output_end|>")]
    model = train_to_memorise(tokenizer, prompt + call + wrong + [special("<|assistant_end|>")])
    engine = Engine(model, tokenizer)
    columns = list(engine.generate(prompt, max_tokens=30, temperature=0))
    tokens = [c[0][0] for c in columns]
    masks = [c[1][0] for c in columns]
    assert tokens[:len(call)] == call
    forced = [special("<|output_start|>"), *tokenizer.encode("84"), special("<|output_end|>")]
    assert tokens[len(call):len(call) + len(forced)] == forced
    assert masks[:len(call)] == [1] * len(call)
    assert masks[len(call):len(call) + len(forced)] == [0] * len(forced)


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
])
def test_calculator_rejects(expression):
    with pytest.raises(CalculatorError):
        use_calculator(expression)
