"""The report card: logged records -> report.md with its table and valid PNG plots; fresh starts
supersede, resumes continue, cut lines are skipped, concurrent appends stay whole."""

import json
import multiprocessing
import os

import matplotlib.image
import pytest

from nanochat import report


def log_pipeline(base):
    report.start_stage("base", config={"depth": 4}, base_dir=base)
    for step in range(1, 21):
        report.log_step("base", step, loss=8.0 - 0.2 * step, base_dir=base)
    report.log_step("base", 20, val_bpb=1.62, base_dir=base)
    report.end_stage("base", base_dir=base)
    report.log_metrics("base", val_bpb=1.6234, core=0.0123, base_dir=base)

    report.start_stage("sft", base_dir=base)
    for step in range(1, 16):
        report.log_step("sft", step, loss=3.0, base_dir=base)
    report.start_stage("sft", resume=True, base_dir=base)  # a crash after step 15, resumed from step 10
    for step in range(11, 31):
        report.log_step("sft", step, loss=2.0, base_dir=base)
    report.log_metrics("sft", val_loss=1.875, chatcore=0.0512, base_dir=base)
    report.log_eval("sft", {"ARC-Easy": 0.3125, "GSM8K": 0.0625, "SpellingBee": 0.5}, base_dir=base)

    report.start_stage("rl", base_dir=base)
    report.log_metrics("rl", stale_number=99.0, base_dir=base)
    report.start_stage("rl", base_dir=base)  # started afresh: the run above no longer counts
    report.log_step("rl", 1, reward=0.25, base_dir=base)
    report.log_eval("rl", {"GSM8K": 0.125, "arithmetic": 0.75}, base_dir=base)

    report.log_metrics("audio", wer=0.493, spoken_accuracy=0.5, typed_accuracy=0.517, base_dir=base)


def table_row(text, name):
    return next(line for line in text.splitlines() if line.startswith(f"| {name} |")).split(" | ")


def test_report_renders_the_logged_numbers_and_plots(tmp_path):
    base = str(tmp_path)
    log_pipeline(base)
    path = report.write_report(base)
    text = open(path, encoding="utf-8").read()
    header = table_row(text, "metric")
    assert header[1:] == ["base", "sft", "rl", "audio |"]  # pipeline order, one column per model
    assert table_row(text, "val_bpb")[1] == "1.623"
    assert table_row(text, "core")[1] == "0.0123"
    assert table_row(text, "chatcore")[2] == "0.0512"
    assert table_row(text, "ARC-Easy")[2:4] == ["0.3125", "-"]
    assert table_row(text, "GSM8K")[2:4] == ["0.0625", "0.125"]
    assert table_row(text, "wer")[4] == "0.493 |"
    assert "stale_number" not in text
    assert "## Wall time" in text and "| total |" in text and "## This machine" in text

    stages = report.collect(base)
    assert stages["sft"]["curves"]["loss"] == {**{s: 3.0 for s in range(1, 11)}, **{s: 2.0 for s in range(11, 31)}}
    assert [run["resume"] for run in stages["sft"]["runs"]] == [False, True]
    assert len(stages["rl"]["runs"]) == 1 and stages["audio"]["wall_seconds"] is None

    pngs = ["curves_base.png", "curves_sft.png", "curves_rl.png", "evals.png"]
    for name in pngs:
        assert f"]({name})" in text
        file = os.path.join(base, "report", name)
        with open(file, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(file)  # decodes the whole image
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.05  # something is drawn
    assert not os.path.exists(os.path.join(base, "report", "curves_audio.png"))  # no curve logged


def test_cli_rebuilds_the_report(tmp_path, capsys):
    log_pipeline(str(tmp_path))
    path = report.main(["--base-dir", str(tmp_path), "--print"])
    out = capsys.readouterr().out
    assert path == os.path.join(str(tmp_path), "report", "report.md") and "| chatcore |" in out


def test_wall_time_sums_each_run_to_its_last_timed_record(tmp_path):
    folder = tmp_path / "report" / "stages"
    folder.mkdir(parents=True)
    records = [{"time": 100, "kind": "start", "resume": False}, {"time": 160, "kind": "step", "step": 1, "values": {}},
               {"time": 400, "kind": "metrics", "values": {"x": 1}},  # an eval later on: not the stage's time
               {"time": 1000, "kind": "start", "resume": True}, {"time": 1030, "kind": "end"}]
    with open(folder / "sft.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"config": {}, "git": "x", "world_size": 1, "system": {}, **r}) + "\n")
        f.write('{"time": 1040, "kind": "step", "st')  # a write cut by a crash
    stages = report.collect(str(tmp_path))
    assert stages["sft"]["wall_seconds"] == 60 + 30
    assert stages["sft"]["metrics"] == {"x": 1}


def _append_many(base, worker):
    for i in range(300):
        report.log_step("base", i, base_dir=base, **{f"worker{worker}": float(i), "padding": 1e-3 * i})


def test_concurrent_appends_stay_whole(tmp_path):
    base = str(tmp_path)
    processes = [multiprocessing.get_context("spawn").Process(target=_append_many, args=(base, w)) for w in range(3)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
        assert p.exitcode == 0
    lines = open(os.path.join(base, "report", "stages", "base.jsonl")).read().splitlines()
    assert len(lines) == 900 and all(json.loads(line)["kind"] == "step" for line in lines)
    curves = report.collect(base)["base"]["curves"]
    assert all(curves[f"worker{w}"] == {i: float(i) for i in range(300)} for w in range(3))


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    report.start_stage("sft", base_dir=str(tmp_path))
    report.log_metrics("sft", loss=1.0, base_dir=str(tmp_path))
    assert not os.path.exists(tmp_path / "report")


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="stage name"):
        report.log_metrics("../sft", x=1.0, base_dir=str(tmp_path))
    with pytest.raises(TypeError, match="metric 'checkpoint'"):
        report.log_metrics("sft", checkpoint="/tmp/x", base_dir=str(tmp_path))
    text = report.render(report.collect(str(tmp_path)))
    assert "Nothing logged yet" in text
