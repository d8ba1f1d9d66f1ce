"""RL core: advantages of known reward groups, the policy-gradient loss's gradient against a hand
computation and against the model's own loss, pass@k against enumeration, rollouts through the
real Engine with a calculator call (forced tokens untrained, the stop token trained)."""

import itertools
import math

import pytest
import torch

from nanochat.engine import Engine
from nanochat.gpt import GPTConfig
from nanochat.rl import group_advantages, pass_at_k, policy_gradient_loss, sample_rollouts
from tests.helpers import build_model


def test_group_advantages_of_known_rewards():
    rewards = [1, 0, 0, 1,   0, 0, 0, 0,   1, 1, 1, 0]
    expected = [.5, -.5, -.5, .5,   0, 0, 0, 0,   .25, .25, .25, -.75]
    assert group_advantages(rewards, 4).tolist() == expected
    assert group_advantages([0.2, 0.6], 1).tolist() == [0.0, 0.0]  # a group of one learns nothing
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages([1, 0, 1], 4)


def test_policy_gradient_matches_a_hand_computation():
    torch.manual_seed(0)
    N, T, V = 3, 4, 5
    logits = torch.randn(N, T, V, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N, T))
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    loss = policy_gradient_loss(logprobs, mask, advantages)
    loss.backward()
    # by hand: loss = -(1/M) sum_{n,t} A_n m_nt log softmax(z_nt)[y_nt], M = 5 sampled tokens;
    # d log softmax(z)[y] / d z_v = [v == y] - softmax(z)_v
    probs = torch.softmax(logits.detach(), -1).tolist()
    M = 5
    expected, value = torch.zeros(N, T, V, dtype=torch.float64), 0.0
    for n in range(N):
        for t in range(T):
            if not mask[n, t]:
                continue
            y = int(targets[n, t])
            value -= float(advantages[n]) * math.log(probs[n][t][y]) / M
            for v in range(V):
                expected[n, t, v] = -float(advantages[n]) / M * ((v == y) - probs[n][t][v])
    assert loss.item() == pytest.approx(value, rel=1e-12)
    assert torch.allclose(logits.grad, expected, rtol=0, atol=1e-14)
    # the step's token count normalises instead when given (gradient accumulation, ranks)
    assert policy_gradient_loss(logprobs, mask, advantages, num_tokens=10).item() == pytest.approx(value * M / 10)
    # no sampled token at all: 0, not NaN
    assert policy_gradient_loss(logprobs, torch.zeros_like(mask), advantages).item() == 0.0


def test_policy_gradient_with_equal_advantages_is_the_scaled_nll():
    """Cross-check through the model: with every advantage a, the loss and its gradients are a
    times the model's own mean cross-entropy (the fused loss) over the sampled tokens."""
    config = GPTConfig(sequence_len=64, vocab_size=96, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = build_model(config).train()
    torch.manual_seed(1)
    x = torch.randint(0, 96, (3, 20))
    y = torch.randint(0, 96, (3, 20))
    y[:, :7] = -1  # the prompt
    y[1, 12:15] = -1  # forced tool output
    a = -0.75
    pg = policy_gradient_loss(-model(x, y, loss_reduction="none"), y >= 0, torch.full((3,), a))
    pg.backward()
    pg_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nll = model(x, y)
    (a * nll).backward()
    assert pg.item() == pytest.approx(a * nll.item(), rel=1e-5)
    for g, p in zip(pg_grads, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 101, 100) == 1.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_rollouts_through_the_engine_with_a_calculator_call(tokenizer):
    """A GPT whose next token depends only on its current one (output projections zero, as
    initialised; lm_head wired by hand) answers every prompt with a calculator call. The forced
    tool output is not trained, the sampled stop token is."""
    special = tokenizer.encode_special
    expr = tokenizer.encode("1+2")
    chain = [special("<|assistant_start|>"), special("<|python_start|>"), *expr, special("<|python_end|>")]
    successors = dict(zip(chain, chain[1:]))
    successors[special("<|output_end|>")] = special("<|assistant_end|>")
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=128)
    model = build_model(config, perturb=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        for token, following in successors.items():  # the final hidden state is norm(wte[token])
            h = torch.nn.functional.rms_norm(model.wte.weight[token].float(), (config.n_embd,))
            model.lm_head.weight[following] = h * (12 / config.n_embd)
    prompts = [tokenizer.render_for_completion({"messages": [{"role": "user", "content": q}]})
               for q in ("what is one plus two?", "1+2")]
    rollouts = sample_rollouts(Engine(model, tokenizer), prompts, group_size=3, max_tokens=12, temperature=0.0)

    generated = chain[1:] + [special("<|output_start|>"), *tokenizer.encode("3"), special("<|output_end|>"),
                             special("<|assistant_end|>")]
    sampled = [1] * (len(chain) - 1) + [0] * (len(generated) - len(chain)) + [1]
    assert len(rollouts.tokens) == 6 and rollouts.stopped == [True] * 6
    for r in range(6):
        prompt = prompts[r // 3]
        assert rollouts.tokens[r] == prompt + generated
        assert rollouts.masks[r] == [0] * len(prompt) + sampled
        assert rollouts.completions[r] == "<|python_start|>1+2<|python_end|><|output_start|>3<|output_end|>"
    inputs, targets = rollouts.batch()
    assert inputs.shape == targets.shape == (6, max(len(p) for p in prompts) + len(generated) - 1)
    for r in range(6):
        tokens = rollouts.tokens[r]
        n = len(tokens) - 1
        assert inputs[r, :n].tolist() == tokens[:-1]
        assert targets[r, :n].tolist() == [t if m else -1 for t, m in zip(tokens[1:], rollouts.masks[r][1:])]
        assert (targets[r, n:] == -1).all()
    assert int((targets >= 0).sum()) == 6 * sum(sampled)


def test_rollouts_that_run_out_of_tokens_are_not_stopped(tokenizer):
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=64)
    model = build_model(config)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    rollouts = sample_rollouts(Engine(model, tokenizer), [prompt], group_size=4, max_tokens=5, seed=3)
    for tokens, mask, stopped, text in zip(rollouts.tokens, rollouts.masks, rollouts.stopped, rollouts.completions):
        new = tokens[len(prompt):]
        assert 1 <= len(new) <= 5 and stopped == (new[-1] in (tokenizer.encode_special("<|assistant_end|>"),
                                                                tokenizer.get_bos_token_id()))
        assert text == tokenizer.decode(new[:len(new) - stopped])
        assert len(mask) == len(tokens)
    with pytest.raises(ValueError, match="one per prompt"):
        sample_rollouts(Engine(model, tokenizer), prompt, group_size=2, max_tokens=3)
