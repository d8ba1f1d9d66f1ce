"""scripts/chat_rl.py end to end on a tiny model that has memorised the first training problems:
two RL steps through main() (the weights move, checkpoints load in chat_eval's way, the report
card gets the stage), a run stopped after step 1 and resumed equals the uninterrupted one bit for
bit; the arithmetic reward on known replies; a group's rollouts (one prefill) equal the same
samples generated one by one."""

import dataclasses
import json
import os
import subprocess
import sys
from decimal import Decimal

import pytest
import torch

from nanochat.checkpoint import load_checkpoint, load_model, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig
from nanochat.rl import rollout_seeds, sample_rollouts
from scripts import chat_rl
from tasks.arithmetic import Arithmetic
from tasks.common import final_number
from tests.helpers import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS, SAMPLES, STEPS = 2, 4, 2
ARGS = ["--source", "sft", "--model-tag", "tiny", "--level", "easy", "--prompts-per-step", str(PROMPTS),
        "--num-samples", str(SAMPLES), "--max-new-tokens", "24", "--temperature", "1.5",
        "--device-batch-size", "3", "--init-lr-frac", "0.1", "--num-iterations", str(STEPS), "--eval-problems", "4",
        "--eval-samples", "2", "--gsm8k-problems", "0", "--eval-every", "1", "--device-type", "cpu"]


def memorise(tokenizer, conversations, steps=150):
    """A tiny GPT trained on a few rendered conversations until it mostly replays them."""
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64)
    model = build_model(config, perturb=0).train()
    rendered = [tokenizer.render_conversation(c) for c in conversations]
    width = max(len(ids) for ids, _ in rendered) - 1
    x = torch.tensor([ids[:-1] + [0] * (width + 1 - len(ids)) for ids, _ in rendered])
    y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (width + 1 - len(ids))
                      for ids, mask in rendered])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), config


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A base dir with the tokenizer and an SFT checkpoint "tiny" that has memorised the problems
    RL trains on (easy level, seed 0) and the first test-split ones."""
    root = tmp_path_factory.mktemp("rl_world")
    tokenizer.save(str(root / "tokenizer"))
    train = Arithmetic("train", size=PROMPTS * STEPS, level="easy")
    held_out = Arithmetic("test", size=4, level="easy")
    model, config = memorise(tokenizer, list(train) + list(held_out))
    save_checkpoint(str(root / "sft_checkpoints" / "tiny"), 7, {"gpt": model.state_dict()}, None,
                    {"step": 7, "model_config": dataclasses.asdict(config)})
    return root, model


def rewards_logged(output):
    return [line.split("| reward ")[1].split()[0] for line in output.splitlines() if "| reward " in line]


def run(root, *args):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(root))
        return chat_rl.main([*ARGS, *args])


def test_rl_steps_resume_bit_equal_and_load_as_rl(world):
    root, sft = world
    full = run(root, "--output-tag", "full")
    assert full["steps"] == STEPS and full["before"]["arithmetic_n"] == 4
    assert full["before"]["arithmetic_pass@1"] > 0  # it memorised the first held-out problems
    assert set(full["val"]) == {"step", "arithmetic_pass@1", "arithmetic_pass@2", "arithmetic_n"}
    state, _, meta = load_checkpoint(str(root / "rl_checkpoints" / "full"))
    assert meta["rl_source"] == {"source": "sft", "checkpoint": str(root / "sft_checkpoints" / "tiny"), "step": 7}
    moved = [k for k, v in sft.state_dict().items() if not torch.equal(v, state["gpt"][k])]
    assert moved, "two RL steps left every weight as it was: no group had mixed rewards"

    # stopped after step 1 (as if killed), then resumed: the same weights and evaluations
    run(root, "--output-tag", "resumed", "--stop-at-step", "1", "--save-every", "1")
    resumed = run(root, "--output-tag", "resumed", "--resume")
    again, _, _ = load_checkpoint(str(root / "rl_checkpoints" / "resumed"))
    assert all(torch.equal(v, again["gpt"][k]) for k, v in state["gpt"].items())
    assert resumed["val"] == full["val"] and resumed["before"] == full["before"]
    assert resumed["final_loss"] == full["final_loss"]

    # scripts.chat_eval --source rl loads it (the same loader)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(root))
        model, _, meta = load_model("rl", model_tag="full")
    assert meta["step"] == STEPS and all(torch.equal(v, state["gpt"][k]) for k, v in model.state_dict().items())

    stage = [json.loads(line) for line in open(root / "report" / "stages" / "rl.jsonl")]
    kinds = [r["kind"] for r in stage]
    assert kinds.count("end") == 3 - 1 and "eval" in kinds  # full and the resumed run ended; the stopped one not
    metrics = {k: v for r in stage if r["kind"] == "metrics" for k, v in r["values"].items()}
    assert metrics["arithmetic_pass@1_after"] == full["val"]["arithmetic_pass@1"]


def test_arithmetic_reward_on_known_replies():
    """The RL reward is 1.0 exactly when the reply's final "####" number is the answer."""
    task = Arithmetic("test", size=10, level="hard")
    item = task[0]
    answer = final_number(item["messages"][-1]["content"][-1]["text"])
    expression = item["messages"][-1]["content"][0]["text"]
    call = f"<|python_start|>{expression}<|python_end|><|output_start|>{answer}<|output_end|>"
    assert task.reward(item, call + f"\n\n#### {answer}") == 1.0
    assert task.reward(item, f"#### {answer}.0") == 1.0  # numerically equal, with or without the call
    assert task.reward(item, call) == 0.0  # the tool's output alone is not an answer
    assert task.reward(item, call + f"\n\n#### {Decimal(answer) + 1}") == 0.0
    assert task.reward(item, f"#### {answer}\n\n#### 0") == (1.0 if Decimal(answer) == 0 else 0.0)  # the last counts
    assert task.reward(item, "") == 0.0 and isinstance(task.reward(item, ""), float)


def test_group_rollouts_equal_samples_generated_alone(world, tokenizer):
    """Each prompt is prefilled once for its whole group, and every row samples from its own
    seeded stream: rollouts of 2 prompts x 3 samples equal the 6 samples generated one at a time."""
    _, model = world
    engine = Engine(model, tokenizer)
    task = Arithmetic("train", size=2, level="easy")
    prompts = [tokenizer.render_for_completion(item) for item in task]
    prefills = []
    prefill = engine.prefill
    engine.prefill = lambda prompt, clip=None: prefills.append(prompt) or prefill(prompt, clip)
    seeds = rollout_seeds(5, [0, 1], 3)
    group = sample_rollouts(engine, prompts, 3, max_tokens=20, temperature=2.0, row_seeds=seeds)
    assert prefills == prompts
    alone = [sample_rollouts(engine, [prompts[r // 3]], 1, max_tokens=20, temperature=2.0, row_seeds=[s])
             for r, s in enumerate(seeds)]
    assert group.tokens == [a.tokens[0] for a in alone] and group.masks == [a.masks[0] for a in alone]
    assert len(set(map(tuple, group.tokens))) > 2  # the seeds really differ: not all one greedy reply


@pytest.mark.slow
def test_torchrun_two_ranks_train_what_one_process_does(world, capsys):
    """Two gloo ranks of one prompt each against one process of two prompts: the rollouts are the
    same (every row samples from the stream of its prompt's global index), the loss is normalised
    by the whole step's sampled tokens and MuonAdamW averages the ranks' gradients, so the runs
    differ by float rounding only (gradients summed in another order)."""
    root, sft = world
    single = run(root, "--output-tag", "single", "--eval-every", "-1")
    single_rewards = rewards_logged(capsys.readouterr().out)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.chat_rl", *ARGS, "--output-tag", "ddp", "--eval-every", "-1"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rewards_logged(proc.stdout) == single_rewards and len(single_rewards) == STEPS
    assert json.loads(proc.stdout.strip().splitlines()[-1])["final_loss"] == pytest.approx(single["final_loss"],
                                                                                            rel=1e-5)
    ddp, _, meta = load_checkpoint(str(root / "rl_checkpoints" / "ddp"))
    assert len(meta["loader_states"]) == 2
    state, _, _ = load_checkpoint(str(root / "rl_checkpoints" / "single"))
    start = sft.state_dict()
    for name, tensor in state["gpt"].items():
        if tensor.dim() == 0:  # a 0-dim scalar's gradient is one sum that nearly cancels (see test_audio_train)
            continue
        moved = float((tensor - start[name]).norm())
        diff = float((ddp["gpt"][name] - tensor).norm())
        assert diff <= 1e-3 * moved + 1e-7, (name, diff, moved)


def test_row_seeds_must_match_the_rows(world, tokenizer):
    _, model = world
    with pytest.raises(ValueError, match=r"row_seeds must be a list of 4 seeds \(one per row: 2 prompts x 2"):
        next(Engine(model, tokenizer).generate([[1, 2], [3]], num_samples=2, max_tokens=2, row_seeds=[1, 2, 3]))
    with pytest.raises(ValueError, match="seed must be an int"):
        next(Engine(model, tokenizer).generate([[1, 2]], max_tokens=2, row_seeds=[0.5]))


def test_rl_on_rl_needs_its_own_tag(world):
    root, _ = world
    run(root, "--output-tag", "first", "--num-iterations", "1", "--eval-every", "-1")
    with pytest.raises(ValueError, match="give an --output-tag"):
        run(root, "--source", "rl", "--model-tag", "first")
    second = run(root, "--source", "rl", "--model-tag", "first", "--output-tag", "second", "--num-iterations", "1",
                 "--eval-every", "-1")
    assert second["steps"] == 1
    _, _, meta = load_checkpoint(str(root / "rl_checkpoints" / "second"))
    assert meta["rl_source"]["checkpoint"] == str(root / "rl_checkpoints" / "first")
