"""Checkpoints under damage: a save killed with SIGKILL mid-write, truncated and corrupt files, and the
temporary files a kill leaves behind (removed by the next save or load, and only ours)."""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from nanochat.checkpoint import build_model, last_step, load_checkpoint, save_checkpoint
from nanochat.gpt import GPTConfig
from tests.helpers import build_model as build_gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")

# Saves a complete step 1, then dies by SIGKILL in the middle of the k-th file write of step 2.
KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from nanochat.checkpoint import save_checkpoint
    directory, rank, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    state = {"gpt": {"w": torch.arange(6.0)}}
    save_checkpoint(directory, 1, state, {"m": torch.ones(2)}, {"step": 1}, rank=rank)
    writes, real_save = [], torch.save
    def save_then_die(obj, f):
        writes.append(1)
        if len(writes) == k:
            f.write(b"the first half of a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f)
    torch.save = save_then_die
    save_checkpoint(directory, 2, state, {"m": torch.ones(2)}, {"step": 2}, rank=rank)
""")


def killed_save(directory, rank=0, k=2):
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(directory), str(rank), str(k)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    return sorted(os.listdir(directory))


def temporaries(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def test_kill_during_save_falls_back_and_the_next_save_cleans_up(tmp_path, caplog):
    files = killed_save(tmp_path)  # rank 0 writes optim, then model (killed here), then meta
    assert "optim_000002_rank0.pt" in files and "meta_000002.json" not in files
    orphan, = temporaries(tmp_path)
    assert orphan.startswith("model_000002.pt.")
    for name in ("notes.tmp", "model_000002.pt.tmp", "model_000002.pt.my-copy.tmp"):  # not atomic_write's
        (tmp_path / name).write_text("keep me")
    with caplog.at_level(logging.INFO, logger="nanochat"):
        _, _, meta = load_checkpoint(str(tmp_path))
    assert meta["step"] == 1
    lines = [r.getMessage() for r in caplog.records if "incomplete" in r.getMessage()]
    assert lines == [f"checkpoint step 2 in {tmp_path} is incomplete (its save was interrupted: no "
                     f"meta_000002.json); falling back to step 1"]
    assert orphan in temporaries(tmp_path)  # a newer step's file: a save might still be writing it
    save_checkpoint(str(tmp_path), 2, {"gpt": {"w": torch.zeros(6)}}, None, {"step": 2})
    assert temporaries(tmp_path) == ["model_000002.pt.my-copy.tmp", "model_000002.pt.tmp", "notes.tmp"]
    model_state, _, meta = load_checkpoint(str(tmp_path))
    assert meta["step"] == 2 and torch.equal(model_state["gpt"]["w"], torch.zeros(6))


def test_a_save_leaves_other_ranks_temporaries_and_a_load_removes_finished_ones(tmp_path):
    killed_save(tmp_path, rank=1, k=1)  # rank 1 writes only its optimizer shard
    orphan, = temporaries(tmp_path)
    assert orphan.startswith("optim_000002_rank1.pt.")
    save_checkpoint(str(tmp_path), 2, {"gpt": {"w": torch.zeros(6)}}, {"m": torch.ones(2)}, {"step": 2}, rank=0)
    assert temporaries(tmp_path) == [orphan]  # rank 1 might still be writing it
    load_checkpoint(str(tmp_path))
    assert temporaries(tmp_path) == []  # step 2 is complete: nobody writes its files any more


def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path):
    model = build_gpt(CONFIG)
    meta = {"step": 3, "model_config": CONFIG.__dict__}
    save_checkpoint(str(tmp_path), 3, {"gpt": model.state_dict()}, {"m": torch.ones(2)}, meta)
    rebuilt, _ = build_model(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))

    model_file, meta_file = tmp_path / "model_000003.pt", tmp_path / "meta_000003.json"
    good_model, good_meta = model_file.read_bytes(), meta_file.read_text()
    fix = f"delete {tmp_path}/*_000003* to fall back to the previous checkpoint, or train again"
    for damage, path, message in [
        (lambda: model_file.write_bytes(good_model[:len(good_model) // 2]), model_file, "is damaged"),
        (lambda: model_file.write_bytes(b"\x80\x02}q\x00." + b"garbage" * 10), model_file, "is damaged"),
        (lambda: meta_file.write_text(good_meta[:20]), meta_file, "is not valid JSON"),
        (lambda: meta_file.write_text("[1, 2]"), meta_file, "is not a JSON object"),
    ]:
        damage()
        with pytest.raises(ValueError) as error:
            load_checkpoint(str(tmp_path))
        text = str(error.value)
        assert str(path) in text and message in text and text.endswith(fix) and "\n" not in text, text
        model_file.write_bytes(good_model)
        meta_file.write_text(good_meta)
    model_file.unlink()
    with pytest.raises(FileNotFoundError, match=f"{model_file} is missing; delete"):
        load_checkpoint(str(tmp_path))
    model_file.mkdir()
    with pytest.raises(IsADirectoryError, match=f"{model_file} is a directory"):
        load_checkpoint(str(tmp_path))


def test_last_step_counts_only_complete_steps(tmp_path):
    assert last_step(str(tmp_path / "nowhere")) is None
    for step in (5, 12):
        save_checkpoint(str(tmp_path), step, {"gpt": {}}, None, {"step": step})
    (tmp_path / "model_000020.pt").write_bytes(b"")
    assert last_step(str(tmp_path)) == 12
