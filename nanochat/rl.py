"""Reinforcement learning on verifiable rewards: grouped rollouts, group-relative advantages, a
token-level policy-gradient loss, and pass@k.

One step, GRPO-style and on-policy:
    rollouts = sample_rollouts(engine, prompts, group_size=k, max_tokens=256)   # k samples per prompt
    rewards = torch.tensor([task.reward(item, text) for ...])                  # one per row, 0..1
    advantages = group_advantages(rewards, k)
    inputs, targets = rollouts.batch()
    logprobs = -model(inputs, targets, loss_reduction="none")                  # 0 where target is -1
    policy_gradient_loss(logprobs, targets >= 0, advantages).backward()

Advantage = reward minus the mean of its group (the k samples of one prompt), not divided by the
group's standard deviation: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training")
shows that the division gives prompts whose samples nearly all agree (too easy or too hard: tiny
std) the largest weights, a difficulty bias; the mean alone already centres each group, and a
group whose samples all score the same gets advantage 0 and no gradient either way.

The loss is normalised per token over the batch: the sum of advantage x log-probability over every
sampled token, divided by the number of sampled tokens (DAPO, Yu et al. 2025; upstream does the
same), so every token weighs the same, instead of GRPO's per-sequence mean that weighs the tokens of
short completions more. Only sampled tokens count: the calculator's output, forced in by the
Engine (mask 0), and the prompt are never trained. The stop token is kept when the model sampled
it (Engine.generate_batch drops it), so the model is also rewarded for when it stops.

One update per batch of fresh rollouts keeps the policy ratio of PPO/GRPO at exactly 1, so its
clip never acts and the gradient is REINFORCE's; there is no KL term to a reference model
(upstream has none either; with few steps from an SFT model it has little to hold back).
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.chat_eval import generative_outcomes


@dataclass
class Rollouts:
    """Samples of `group_size` rows per prompt, prompt-major (rows i*k .. i*k+k-1 share prompt i).

    tokens[r]: the prompt then the generated tokens, the stop token included if it was sampled;
    masks[r]: 1 on sampled tokens, 0 on the prompt and on tool output forced in by the Engine;
    completions[r]: the generated text without the stop token (what a reward reads);
    stopped[r]: whether the row ended on a stop token (False: it ran out of max_tokens)."""
    prompts: list
    group_size: int
    tokens: list
    masks: list
    completions: list
    stopped: list
    pad_id: int

    def batch(self, device="cpu"):
        """(inputs, targets) of shape (rows, longest - 1): targets -1 wherever the mask is 0 and
        on the padding, so a forward with these targets grades only the sampled tokens."""
        width = max(len(t) for t in self.tokens) - 1
        inputs = torch.full((len(self.tokens), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(self.tokens), width), -1, dtype=torch.long)
        for r, (tokens, mask) in enumerate(zip(self.tokens, self.masks)):
            n = len(tokens) - 1
            inputs[r, :n] = torch.tensor(tokens[:-1])
            targets[r, :n] = torch.tensor([t if m else -1 for t, m in zip(tokens[1:], mask[1:])])
        return inputs.to(device), targets.to(device)


def sample_rollouts(engine, prompts, group_size, max_tokens, temperature=1.0, top_k=None, seed=0, row_seeds=None):
    """Rollouts of `group_size` samples for each prompt (a list of token lists). The Engine
    prefills each prompt once and copies its KV cache into the group's rows, then decodes all
    rows together; finished rows leave the batch. row_seeds (one per row, see rollout_seeds):
    each row samples from its own stream, as it would alone."""
    if not prompts or not all(isinstance(p, (list, tuple)) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists (one per prompt)")
    tokens = [list(p) for p in prompts for _ in range(group_size)]
    masks = [[0] * len(t) for t in tokens]
    stopped = [False] * len(tokens)
    for column, column_masks in engine.generate(prompts, num_samples=group_size, max_tokens=max_tokens,
                                                temperature=temperature, top_k=top_k, seed=seed,
                                                row_seeds=row_seeds):
        for r, (token, mask) in enumerate(zip(column, column_masks)):
            if stopped[r]:
                continue
            tokens[r].append(token)
            masks[r].append(mask)
            stopped[r] = token in engine.stop_tokens
    completions = [engine.tokenizer.decode(t[len(p):len(t) - s])
                   for t, p, s in zip(tokens, (p for p in prompts for _ in range(group_size)), stopped)]
    return Rollouts(prompts=[list(p) for p in prompts], group_size=group_size, tokens=tokens, masks=masks,
                    completions=completions, stopped=stopped, pad_id=engine.tokenizer.get_bos_token_id())


def group_advantages(rewards, group_size):
    """Reward minus the mean reward of its group; rewards are prompt-major, group_size per prompt."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"expected a flat list of rewards, group_size={group_size} per prompt; "
                         f"got shape {tuple(rewards.shape)}")
    groups = rewards.view(-1, group_size)
    return (groups - groups.mean(dim=1, keepdim=True)).view(-1)


def policy_gradient_loss(logprobs, mask, advantages, num_tokens=None):
    """-sum(advantage x log-probability) over the sampled tokens / num_tokens.

    logprobs (rows, T): log-probabilities of the targets; mask (rows, T): True on sampled tokens;
    advantages (rows,). num_tokens defaults to this batch's sampled tokens; with gradient
    accumulation or several ranks, pass the count of the whole step, so the summed losses are the
    token-level mean. A batch without sampled tokens gives 0, never NaN."""
    mask = mask.to(logprobs.dtype)
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else max(num_tokens, 1)
    weighted = advantages.to(logprobs.dtype)[:, None] * logprobs * mask
    return -weighted.sum() / num_tokens


def pass_at_k(n, c, k):
    """Probability that at least one of k samples drawn without replacement from n, of which c are
    correct, is correct: the unbiased estimator of Chen et al. 2021, 1 - C(n-c, k) / C(n, k), as a
    product that stays exact for large n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ---------------------------------------------------------------------------
# A training step and an evaluation, for scripts/chat_rl.py


def rank_share(start, count, rank=0, world_size=1):
    """The global indices start .. start+count-1 that this rank handles: every world_size-th one."""
    return list(range(start + rank, start + count, world_size))


def rollout_seeds(seed, prompt_ids, group_size):
    """One sampling seed per row: sample j of training prompt number p draws from stream
    seed * 2**32 + p * group_size + j, whichever step, batch or rank generates it (so a run's
    rollouts are the same on any number of ranks, and a resumed run draws what it would have)."""
    return [seed * 2 ** 32 + p * group_size + j for p in prompt_ids for j in range(group_size)]


def grpo_step(model, engine, task, prompt_ids, group_size, max_tokens, device_batch_size, temperature=1.0,
              top_k=None, seed=0, world_size=1):
    """One RL step's forwards and backwards on this rank's prompts (task items prompt_ids):
    rollouts, task.reward per row, group-relative advantages, and the token-level policy-gradient
    loss, normalised by the sampled tokens of the whole step over every rank (the optimizer
    averages gradients over ranks). Rows whose advantage is 0 (a group that all agrees) have a
    zero gradient and are not forwarded at all. Returns (the loss, {reward, sampled tokens per
    row, share of rows that stopped, rows trained}: means over every rank)."""
    items = [task[i] for i in prompt_ids]
    prompts = [engine.tokenizer.render_for_completion(item) for item in items]
    rollouts = sample_rollouts(engine, prompts, group_size, max_tokens, temperature, top_k,
                               row_seeds=rollout_seeds(seed, prompt_ids, group_size))
    rewards = torch.tensor([float(task.reward(items[r // group_size], text))
                            for r, text in enumerate(rollouts.completions)])
    advantages = group_advantages(rewards, group_size)
    device = model.get_device()
    inputs, targets = rollouts.batch(device)
    keep = advantages.nonzero().squeeze(1)
    sampled = int((targets >= 0).sum())
    totals = torch.tensor([sampled, float(rewards.sum()), sum(rollouts.stopped), len(keep), len(rewards)],
                          dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(totals)
    step_tokens, reward_sum, stopped, trained, rows = totals.tolist()
    loss = torch.zeros((), device=device)
    inputs, targets, advantages = inputs[keep.to(device)], targets[keep.to(device)], advantages[keep].to(device)
    for i in range(0, len(keep), device_batch_size):
        x, y = inputs[i:i + device_batch_size], targets[i:i + device_batch_size]
        width = int((y >= 0).any(0).nonzero().max()) + 1  # drop the columns that are padding in every row
        x, y = x[:, :width], y[:, :width]
        part = policy_gradient_loss(-model(x, y, loss_reduction="none"), y >= 0, advantages[i:i + device_batch_size],
                                    num_tokens=step_tokens / world_size)
        part.backward()
        loss += part.detach()
    if world_size > 1:  # the step's loss: each rank's part is its sum over the step-wide token count
        dist.all_reduce(loss)
        loss /= world_size
    return loss, {"reward": reward_sum / rows, "tokens": step_tokens / rows, "stopped": stopped / rows,
                  "trained": trained / rows}


def evaluate_pass_at_k(engine, task, num_problems, num_samples, rank=0, world_size=1, **generate_args):
    """pass@1 and pass@num_samples (unbiased, from num_samples replies per item) over the first
    num_problems items of `task`, the ranks splitting them; every rank gets the totals."""
    ids = rank_share(0, min(num_problems, len(task)), rank, world_size)
    outcomes = generative_outcomes(engine, engine.tokenizer, task, [task[i] for i in ids], num_samples,
                                   progress=rank == 0, **generate_args) if ids else []
    totals = torch.tensor([sum(pass_at_k(num_samples, sum(o), 1) for o in outcomes),
                           sum(pass_at_k(num_samples, sum(o), num_samples) for o in outcomes), len(outcomes)],
                          dtype=torch.float64, device=engine.model.get_device())
    if world_size > 1:
        dist.all_reduce(totals)
    first, at_k, n = totals.tolist()
    return {"pass@1": first / max(n, 1), f"pass@{num_samples}": at_k / max(n, 1), "n": int(n)}
