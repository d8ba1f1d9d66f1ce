"""The shared training harness (nanochat/training.py): schedules against hand-computed values, the
periodic-work rule, the log line, and a run killed after a checkpoint that resumes to exactly the
weights and log lines of the run that never stopped."""

import math

import pytest
import torch

from nanochat import report
from nanochat.gpt import GPTConfig
from nanochat.training import Run, Schedule, Start, StepOutput, due, resume, token_step, train
from tests.helpers import build_model

CONFIG = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")


def test_schedule_values():
    s = Schedule(100, warmup_steps=10, warmdown_ratio=0.5, final_lr_frac=0.1, momentum_warmup_steps=20,
                 cosine_weight_decay=True)
    def close(values, expected):
        return all(math.isclose(v, e, abs_tol=1e-12) for v, e in zip(values, expected, strict=True))

    # Warmup to step 9, constant, then a linear warmdown from step 50 (round(100 x 0.5)) to 0.1.
    assert close([s.lr_multiplier(t) for t in (0, 4, 9, 30, 50, 75, 99)], [0.1, 0.5, 1, 1, 1, 0.55, 0.118])
    assert close([s.muon_momentum(t) for t in (0, 10, 20, 49, 75)], [0.85, 0.91, 0.97, 0.97, 0.935])
    assert close([s.weight_decay_multiplier(t) for t in (0, 50, 100)], [1, 0.5, 0])


def test_schedule_apply_sets_each_group_kind():
    model = build_model(CONFIG, perturb=0)
    optimizer = model.setup_optimizer(weight_decay=0.2)
    initial = [g["lr"] for g in optimizer.param_groups]
    Schedule(10, warmup_steps=4).apply(optimizer, 0)  # LR only: Muon keeps its momentum and decay
    assert [g["lr"] for g in optimizer.param_groups] == [lr / 4 for lr in initial]
    muon = [g for g in optimizer.param_groups if g["kind"] == "muon"]
    assert muon and all(g["momentum"] == 0.95 and g["weight_decay"] == 0.2 for g in muon)  # as built
    lrm = Schedule(10, warmup_steps=4, momentum_warmup_steps=4, cosine_weight_decay=True).apply(optimizer, 5)
    assert lrm == 1.0 and [g["lr"] for g in optimizer.param_groups] == initial
    assert all(math.isclose(g["momentum"], 0.97) and math.isclose(g["weight_decay"], 0.1) for g in muon)


def test_due():
    assert [d for d in range(1, 11) if due(d, 4, d == 10)] == [4, 8, 10]
    assert not any(due(d, -1, d == 10) for d in range(1, 11)) and not due(10, 0, True)


def batches(state=0):
    """Deterministic (x, y, state) batches: batch k is drawn from a generator seeded k."""
    while True:
        g = torch.Generator().manual_seed(state)
        rows = torch.randint(CONFIG.vocab_size, (2, 17), generator=g)
        state += 1
        yield rows[:, :-1], rows[:, 1:], state


def run_job(tmp_path, capsys, start=None, **kwargs):
    model = build_model(CONFIG, perturb=0)
    if start is not None:
        model.load_state_dict(start.model_state["gpt"])
    optimizer = model.setup_optimizer()
    run = Run(str(tmp_path), 8, lambda: {"gpt": model.state_dict()}, {"note": "kept"}, **kwargs)
    step_fn = token_step(model, batches(0 if start is None else start.loader_state), grad_accum=2)
    summary = train(model, optimizer, Schedule(8, warmup_steps=2, warmdown_ratio=0.5), step_fn, run, start,
                    evaluate=lambda step: {"loss": float(step)})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    return model, summary, lines


def test_killed_run_resumes_exactly(tmp_path, capsys):
    straight, summary, lines = run_job(tmp_path / "straight", capsys, eval_every=4)
    assert summary["steps"] == 8 and summary["val"] == {"step": 8, "loss": 8.0}
    assert "| MFU" not in lines[0]  # no FLOP count given
    run_job(tmp_path / "killed", capsys, eval_every=4, save_every=3, stop_at_step=4)
    start = resume(str(tmp_path / "killed"), "cpu")
    assert start.step == 3 and start.loader_state == 6 and start.meta["note"] == "kept"  # 3 steps x 2 batches
    resumed, summary, resumed_lines = run_job(tmp_path / "killed", capsys, start=start, eval_every=4)
    assert start.model_state is None and start.optimizer_state is None  # dropped once applied
    assert summary["steps"] == 8 and summary["val"] == {"step": 8, "loss": 8.0}
    loss = [line.split("| loss ")[1].split()[0] for line in lines if "| loss " in line]
    assert [line.split("| loss ")[1].split()[0] for line in resumed_lines if "| loss " in line] == loss[3:]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="saved by 1 ranks"):
        resume(str(tmp_path / "killed"), "cpu", rank=0, world_size=2)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resume(str(tmp_path / "nothing"), "cpu")


def test_report_card_curves_survive_a_kill_and_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    _, summary, _ = run_job(tmp_path / "straight", capsys, eval_every=4, report_stage="straight")
    run_job(tmp_path / "killed", capsys, eval_every=4, save_every=3, stop_at_step=4, report_stage="killed")
    assert "end" not in [r["kind"] for r in report.read_stage(str(tmp_path / "base/report/stages/killed.jsonl"))]
    run_job(tmp_path / "killed", capsys, start=resume(str(tmp_path / "killed"), "cpu"), eval_every=4,
            report_stage="killed")
    stages = report.collect()
    straight, killed = stages["straight"], stages["killed"]
    assert sorted(straight["curves"]["loss"]) == list(range(1, 9))
    assert straight["curves"]["val_loss"] == {4: 4.0, 8: 8.0}
    assert straight["metrics"] == {"final_loss": summary["final_loss"], "train_minutes": summary["train_minutes"]}
    # Step 4 ran twice (before the kill and after the resume from step 3): the later value counts.
    assert killed["curves"] == straight["curves"] and len(killed["runs"]) == 2 and killed["runs"][1]["resume"]
    assert report.read_stage(str(tmp_path / "base/report/stages/killed.jsonl"))[-1]["kind"] == "end"


def test_step_output_fields_and_mfu_in_the_log(tmp_path, capsys):
    model = build_model(CONFIG, perturb=0)
    optimizer = model.setup_optimizer()

    def step_fn(step):
        x, y, _ = next(data)
        loss = model(x, y)
        loss.backward()
        return StepOutput(loss, x.numel(), step + 1, {"epoch": 7})

    data = batches()
    run = Run(str(tmp_path), 2, lambda: {"gpt": model.state_dict()}, flops_per_token=model.estimate_flops())
    train(model, optimizer, Schedule(2), step_fn, run, Start())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("MFU against ")
    assert lines[1].startswith("step 00001/00002 | epoch 7 | loss ") and "| MFU " in lines[1]
