"""End to end on real offline text: corpus -> tokenizer -> 30+ training steps (loss falls) ->
checkpoint -> a training process killed with SIGKILL after a checkpoint resumes to exactly the
uninterrupted result; damaged checkpoints are one-line errors."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat.checkpoint import build_model, last_step, load_checkpoint
from nanochat.corpus import build
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import Tokenizer
from scripts import base_eval, base_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 32
ARGS = ["--depth", "2", "--head-dim", "64", "--max-seq-len", "128", "--device-batch-size", "4",
        "--total-batch-size", "1024", "--num-iterations", str(STEPS), "--warmup-steps", "3",
        "--momentum-warmup-steps", "10", "--eval-every", "16", "--eval-tokens", "2048", "--sample-every", "0",
        "--device-type", "cpu"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nanochat")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(root)
    build(sources=["sotu", "bible", "python-stdlib"], num_shards=4, docs_per_row_group=256, max_doc_chars=2000)
    docs = itertools.chain.from_iterable(parquets_iter_batched("train"))
    Tokenizer.train_from_iterator(itertools.islice(docs, 2000), vocab_size=1024).save(str(root / "tokenizer"))
    yield root
    if old is None:
        os.environ.pop("NANOCHAT_BASE_DIR")
    else:
        os.environ["NANOCHAT_BASE_DIR"] = old


def losses_from(output):
    return [float(line.split("| loss ")[1].split()[0]) for line in output.splitlines() if "| loss " in line]


def trainer(base_dir, *args):
    """base_train in a fresh process, as a user runs it: the killed run, the run it resumes and the
    reference all start the same way (a long-lived test process can hold other numeric state)."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "scripts.base_train", *ARGS, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    """(losses logged, the summary printed last) of a trainer that ran to the end."""
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    return losses_from(output), json.loads(output.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_train_kill_resume_matches_uninterrupted(base_dir):
    full_losses, full = finish(trainer(base_dir, "--model-tag", "full"))
    assert len(full_losses) == STEPS
    assert full_losses[-1] < full_losses[0] - 0.4, full_losses
    assert full["val_bpb"] is not None and full["val_bpb"] < 4.0
    # base_eval on the same checkpoint and the same val batches reproduces the trainer's last val bpb.
    evaluated = base_eval.main(["--model-tag", "full", "--device-batch-size", "4", "--eval-tokens", "2048",
                                "--max-tokens", "4", "--max-per-task", "2", "--device-type", "cpu"])
    assert evaluated["val_bpb"] == pytest.approx(full["val_bpb"], abs=1e-6)
    assert evaluated["copy_loss_first"] > 0 and evaluated["copy_loss_second"] > 0

    # A training process killed with SIGKILL once its step-8 checkpoint is complete (wherever it
    # is then: a later step, or inside the next save) ...
    killed_dir = os.path.join(base_dir, "base_checkpoints", "killed")
    proc = trainer(base_dir, "--model-tag", "killed", "--save-every", "4")
    try:
        deadline = time.monotonic() + 600
        while not os.path.exists(os.path.join(killed_dir, "meta_000008.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        killed_output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = last_step(killed_dir)
    assert 8 <= resumed_from < STEPS and resumed_from % 4 == 0
    assert losses_from(killed_output)[:resumed_from] == full_losses[:resumed_from]  # the same run until then
    # ... and resumed: same loss trajectory, bit-identical weights.
    resumed_losses, resumed = finish(trainer(base_dir, "--model-tag", "killed", "--resume"))
    assert resumed_losses == full_losses[resumed_from:]
    assert resumed["val_bpb"] == full["val_bpb"]
    full_state, _, meta = load_checkpoint(os.path.join(base_dir, "base_checkpoints", "full"))
    resumed_state, _, _ = load_checkpoint(killed_dir)
    for name, tensor in full_state["gpt"].items():
        assert torch.equal(tensor, resumed_state["gpt"][name]), name
    assert meta["step"] == STEPS and json.dumps(meta)  # meta is plain JSON
    assert not [f for f in os.listdir(killed_dir) if f.endswith(".tmp")]  # what the kill left, the saves removed

    model, _ = build_model(killed_dir)
    assert model.config.n_layer == 2 and not model.training


def test_missing_checkpoint_is_a_clear_error(base_dir):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        base_train.main(ARGS + ["--model-tag", "never-trained", "--resume"])


def test_damaged_checkpoints_are_one_line_errors(base_dir, capsys):
    """base_eval on a truncated model file, base_train --resume on a truncated meta JSON: `error:`,
    the file, the fix, exit status 1, no traceback (as `python -m` runs them)."""
    from nanochat.common import run_cli
    full = os.path.join(base_dir, "base_checkpoints", "full")
    for tag, name, cut, command, problem in [
        ("bad-model", "model", 0.5, lambda: run_cli(base_eval.main, ["--model-tag", "bad-model", "--device-type", "cpu"]),
         "is damaged"),
        ("bad-meta", "meta", 0.3, lambda: run_cli(base_train.main, ARGS + ["--model-tag", "bad-meta", "--resume"]),
         "is not valid JSON"),
    ]:
        shutil.copytree(full, os.path.join(base_dir, "base_checkpoints", tag))
        path = os.path.join(base_dir, "base_checkpoints", tag, f"{name}_{STEPS:06d}.{'json' if name == 'meta' else 'pt'}")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:int(len(data) * cut)])
        os.utime(os.path.join(os.path.dirname(path), f"meta_{STEPS:06d}.json"), (1, 1))  # never the newest tag
        capsys.readouterr()
        assert command() == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: checkpoint {'meta' if name == 'meta' else 'file'} {path} {problem}"), err
        assert err.count("\n") == 1 and "to fall back to the previous checkpoint" in err
