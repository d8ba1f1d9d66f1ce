"""scripts/chat_sft.py end to end on a tiny base checkpoint: trains on the real mixture, inherits the
base run's shape and LRs, resumes to exactly the uninterrupted run, writes its report record, and
chat_eval --source sft loads what it saved."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint import load_checkpoint, save_checkpoint
from nanochat.gpt import GPTConfig
from scripts import chat_eval, chat_sft
from tests.helpers import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_LRS = dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5)
# Small parts of the real mixture; ARC practice needs the OLMo eval download, tested in test_contamination.
ARGS = ["--model-tag", "tiny", "--chitchat", "40", "--chatterbot", "40", "--arithmetic", "60", "--spelling", "60",
        "--arc", "0", "--identity", "40", "--eval-tasks", "Identity,Arithmetic", "--eval-problems", "4",
        "--eval-batches", "1", "--max-new-tokens", "8", "--device-type", "cpu"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A base dir with the test tokenizer and a tiny 'base_train' checkpoint (2 layers, context 64)."""
    root = tmp_path_factory.mktemp("sft")
    tokenizer.save(str(root / "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    model = build_model(config)
    meta = {"model_config": dataclasses.asdict(config), "step": 10, "total_batch_size": 2 ** 13,
            "user_config": {"device_batch_size": 4, **BASE_LRS}}
    save_checkpoint(str(root / "base_checkpoints" / "tiny"), 10, {"gpt": model.state_dict()}, None, meta)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(root))
        yield root


def sft(*args):
    return chat_sft.main([*ARGS, *args])


@pytest.mark.timeout(600)
def test_sft_trains_resumes_exactly_and_chat_eval_loads_it(base_dir, capsys):
    straight = sft("--tag", "straight", "--num-iterations", "4", "--eval-every", "2")
    log = capsys.readouterr().out
    assert "4 steps of 1 x 4 rows x 64 tokens" in log  # the base run's batch and the model's context
    assert straight["steps"] == 4 and math.isfinite(straight["final_loss"])
    assert set(straight["val"]) == {"step", "bpb", "Identity", "Arithmetic"} and straight["val"]["bpb"] > 0

    sft("--tag", "resumed", "--num-iterations", "4", "--eval-every", "2", "--save-every", "2", "--stop-at-step", "2")
    resumed = sft("--tag", "resumed", "--num-iterations", "4", "--eval-every", "2", "--resume")
    assert resumed["final_loss"] == straight["final_loss"] and resumed["val"] == straight["val"]
    a, _, meta = load_checkpoint(str(base_dir / "sft_checkpoints" / "straight"))
    b, _, _ = load_checkpoint(str(base_dir / "sft_checkpoints" / "resumed"))
    for name, tensor in a["gpt"].items():
        assert torch.equal(tensor, b["gpt"][name]), name

    # The LRs are the base run's effective ones (x sqrt(2^13 / 2^19)), recorded for a later stage.
    assert meta["learning_rates"] == pytest.approx({k: v / 8 for k, v in BASE_LRS.items()})
    assert meta["origin"]["step"] == 10 and meta["model_config"]["sequence_len"] == 64

    records = [json.loads(line) for line in open(base_dir / "report" / "stages" / "sft.jsonl")]
    kinds = [r["kind"] for r in records]
    assert "end" in kinds and kinds[-1] == "eval"
    assert records[-1]["values"] == {name: resumed["val"][name] for name in ("Identity", "Arithmetic")}
    assert [r["step"] for r in records if r["kind"] == "step" and "loss" in r["values"]][-4:] == [1, 2, 3, 4]

    evaluated = chat_eval.main(["--source", "sft", "--model-tag", "straight", "-a", "Identity", "--max-problems", "3",
                                "--max-new-tokens", "4", "--device-type", "cpu"])
    assert evaluated["step"] == 4 and evaluated["tasks"]["Identity"]["n"] == 3
    assert os.path.exists(base_dir / "report" / "chat_eval_sft.md")


def test_sft_bad_settings_are_clear_errors(base_dir):
    with pytest.raises(ValueError, match="longer than the model's context 64"):
        sft("--tag", "long", "--max-seq-len", "128", "--num-iterations", "1")
    with pytest.raises(ValueError, match=r"--eval-tasks: unknown tasks \['Poetry'\]"):
        sft("--tag", "bad", "--eval-tasks", "Identity,Poetry", "--num-iterations", "1")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_two_ranks_train_and_resume_exactly(base_dir):
    """chat_sft under torchrun on 2 gloo ranks: each rank keeps its own packer state in the
    checkpoint, and a run stopped after step 2 resumes to the weights of the run that never stopped."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "scripts.chat_sft", *ARGS, "--num-iterations", "4", "--eval-every", "-1", *args]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    straight = torchrun("--tag", "ddp")
    torchrun("--tag", "ddp-resumed", "--save-every", "2", "--stop-at-step", "2")
    resumed = torchrun("--tag", "ddp-resumed", "--resume")
    assert straight["steps"] == resumed["steps"] == 4 and math.isfinite(straight["final_loss"])
    assert resumed["final_loss"] == straight["final_loss"]
    a, _, meta = load_checkpoint(str(base_dir / "sft_checkpoints" / "ddp"))
    b, _, _ = load_checkpoint(str(base_dir / "sft_checkpoints" / "ddp-resumed"))
    assert len(meta["loader_states"]) == 2 and meta["loader_states"][0] != meta["loader_states"][1]
    for name, tensor in a["gpt"].items():
        assert torch.equal(tensor, b["gpt"][name]), name
