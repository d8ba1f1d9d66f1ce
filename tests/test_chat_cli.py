"""The chat CLI end to end. Text: a tiny model that memorised a two-exchange conversation (one reply
calls the calculator), saved as an sft checkpoint: `-p` in a subprocess prints exactly its reply,
a conversation in a pseudo-terminal gets both replies and the prompt back, the context guard's
notice. Audio: a tiny audio checkpoint (conftest: trained for a few steps), a real wav file, the
one-shot command and the REPL in subprocesses, and clear errors for bad input."""

import dataclasses
import fcntl
import io
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

from nanochat.checkpoint import last_step, save_checkpoint
from nanochat.common import run_cli
from nanochat.speech_lm import audio_checkpoint_dir
from nanochat.tokenizer import reply_text
from nanochat.engine import Engine
from scripts.chat_cli import HELP, Chat, main, parse_args
from tests.helpers import point_at
from tests.test_conversation import chatty, fresh_reply, random_model  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def text_world(tmp_path_factory, tokenizer, chatty):  # noqa: F811
    """A base dir holding the tokenizer and the chatty model as the sft checkpoint "chatty":
    (env, [(user text, reply text as the CLI prints it)])."""
    model, exchanges = chatty
    root = tmp_path_factory.mktemp("chat_cli_text")
    tokenizer.save(str(root / "tokenizer"))
    save_checkpoint(str(root / "sft_checkpoints" / "chatty"), 1, {"gpt": model.state_dict()}, None,
                    {"step": 1, "model_config": dataclasses.asdict(model.config)})
    env = {"NANOCHAT_BASE_DIR": str(root)}
    return env, [(user, reply_text(tokenizer, reply)) for user, reply in exchanges]


def test_one_shot_prints_the_reply_and_nothing_else(text_world):
    env, exchanges = text_world
    proc = run_cli_process(env, "--source", "sft", "--temperature", "0", "-p", exchanges[0][0])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == exchanges[0][1] + "\n"


def test_two_turns_in_a_terminal(text_world):
    """The REPL in a pseudo-terminal (line editing on, as a person gets it): each reply streams
    in full, and the prompt comes back after it."""
    env, exchanges = text_world
    terminal = Terminal([sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", "--source", "sft",
                         "--temperature", "0"], env)
    try:
        terminal.read_until("\n> ")
        for user, reply in exchanges:
            terminal.write(user + "\n")
            terminal.read_until(f"{user}\n{reply}\n\n> ")  # the echo, the reply, the prompt again
        terminal.write("/help\n")
        terminal.read_until(HELP + "\n\n> ")
        terminal.write("/quit\n")
        assert terminal.wait() == 0
    finally:
        terminal.close()


def test_the_guard_drops_old_turns_with_a_notice(text_world):
    """Messages in a 128-position context that keeps room for a 60-token reply: old exchanges go,
    with a notice on stderr, and the conversation goes on."""
    env, _ = text_world
    message = "word " * 20
    proc = run_cli_process(env, "--source", "sft", "--max-tokens", "60", stdin=f"{message}\n" * 3 + "/quit\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    notice = "(context full: dropped the oldest exchange to make room for this message and a 60-token reply)"
    assert notice in proc.stderr and set(proc.stderr.splitlines()) == {notice}
    assert proc.stdout.count("\n> ") == 4  # a prompt before each message and before /quit


def test_ctrl_c_stops_a_reply_and_keeps_what_was_said(random_model, tokenizer):
    """Ctrl-C lands inside the model's 6th forward (a prefill and 5 decode steps in): the reply is
    the 5 tokens shown, and the next turn, prefilled from scratch (the cache may be half-written),
    answers as a fresh render of that history does."""
    engine = Engine(random_model, tokenizer)
    chat = Chat(None, engine, parse_args(["--source", "sft", "--temperature", "0", "--max-tokens", "20"]))
    calls, armed = [], [True]

    def ctrl_c(module, args):
        calls.append(args[0].size(1))
        if len(calls) == 6 and armed:
            armed.clear()
            raise KeyboardInterrupt

    hook = random_model.register_forward_pre_hook(ctrl_c)
    try:
        screen = io.StringIO()
        chat.say("def main(argv):", out=screen)
        said = chat.conversation.exchanges[-1].reply
        assert len(said) == 5 and screen.getvalue() == reply_text(tokenizer, said) + " (stopped)\n"
        expected = fresh_reply(engine, [("def main(argv):", said)], "import os", max_tokens=20, temperature=0)
        calls.clear()
        chat.say("import os", out=io.StringIO())
        assert chat.conversation.exchanges[-1].reply == expected
        assert calls[0] == len(chat.conversation.tokens) - len(expected) - 1  # the whole history, prefilled again
    finally:
        hook.remove()


def test_text_errors(text_world, capsys, monkeypatch):
    env, _ = text_world
    monkeypatch.setenv("NANOCHAT_BASE_DIR", env["NANOCHAT_BASE_DIR"])
    assert run_cli(main, ["--source", "rl", "-p", "hi", "--device-type", "cpu"]) == 1
    assert "no rl checkpoint" in capsys.readouterr().err
    assert run_cli(main, ["--source", "sft", "-p", "word " * 200, "--device-type", "cpu"]) == 1
    assert "request too long" in capsys.readouterr().err
    assert run_cli(main, ["--source", "sft", "--temperature", "-1", "--device-type", "cpu"]) == 1
    assert "temperature must be a finite number >= 0" in capsys.readouterr().err
    assert run_cli(main, ["--source", "sft", "--max-tokens", "0", "--device-type", "cpu"]) == 1
    assert "max_tokens must be None" in capsys.readouterr().err
    proc = run_cli_process(env, "--source", "sft", stdin="/audio clip.wav\nhi\n")
    assert "error: --source sft is a text model" in proc.stdout and proc.returncode == 0


def run_cli_process(env, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", *args],
                          env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, input=stdin, capture_output=True,
                          text=True, timeout=300)


class Terminal:
    """A process on a pseudo-terminal: write keys, read what the screen shows (line endings as
    "\n", escape sequences removed)."""

    ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")

    def __init__(self, argv, env):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # Ctrl-C is SIGINT
                                     env={**os.environ, **env, "OMP_NUM_THREADS": "1", "TERM": "dumb"})
        os.close(slave)
        self.screen = ""

    def write(self, text):
        os.write(self.master, text.encode())

    def read_until(self, text, timeout=120):
        """Read until `text` has appeared since the last read_until; what came before it goes."""
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"waited {timeout} s for {text!r}; the terminal shows {self.screen[-2000:]!r}")
            try:
                chunk = os.read(self.master, 65536).decode(errors="replace")
            except OSError:  # the process closed the terminal
                raise AssertionError(f"the process ended before {text!r}; it showed {self.screen[-2000:]!r}") from None
            self.screen += self.ESCAPES.sub("", chunk.replace("\r\n", "\n"))
        self.screen = self.screen[self.screen.index(text) + len(text):]

    def wait(self, timeout=60):
        return self.proc.wait(timeout=timeout)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture(scope="module")
def world(served_audio_model):
    """The session's tiny audio checkpoint (conftest), with this process pointed at its base dir."""
    *_, root, env, wav = served_audio_model
    with pytest.MonkeyPatch.context() as mp:
        point_at(mp, env)
        yield root, env, wav


def test_one_shot_answers_about_a_wav_file(world):
    _, env, wav = world
    proc = run_cli_process(env, "--audio", str(wav), "-p", "Repeat what you heard.", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()  # 12 tokens of a tiny model: something, not nothing


def test_repl_attaches_clears_and_quits(world):
    _, env, wav = world
    script = (f"/audio {wav}\nRepeat what you heard.\n/audio /no/such.wav\n/audio {wav}\n/clear\n/audio {wav}\n"
              f"hello\n/quit\n")
    proc = run_cli_process(env, "--max-tokens", "6", "--temperature", "0", stdin=script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count(f"(attached {wav}") == 2 and "(new conversation)" in out
    assert "error: audio file not found: /no/such.wav" in out  # the REPL reports it and goes on
    assert "error: a clip can only open a conversation" in out  # a clip cannot join one under way


def test_missing_or_bad_audio_is_a_clear_error(world, capsys, tmp_path):
    assert run_cli(main, ["--audio", str(tmp_path / "nope.wav"), "-p", "hi", "--device-type", "cpu"]) == 1
    assert f"audio file not found: {tmp_path / 'nope.wav'}" in capsys.readouterr().err
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    assert run_cli(main, ["--audio", str(bad), "-p", "hi", "--device-type", "cpu"]) == 1
    assert f"could not decode {bad}" in capsys.readouterr().err
    silent = tmp_path / "silent.wav"
    sf = pytest.importorskip("soundfile")
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    assert run_cli(main, ["--audio", str(silent), "-p", "hi", "--device-type", "cpu"]) == 1
    assert "silent" in capsys.readouterr().err


def test_empty_audio_and_directories_name_the_path(world, capsys, tmp_path):
    empty = tmp_path / "empty.wav"
    pytest.importorskip("soundfile").write(empty, np.zeros((0, 1), dtype=np.float32), 16000)
    assert run_cli(main, ["--audio", str(empty), "-p", "hi", "--device-type", "cpu"]) == 1
    assert last_line(capsys) == f"error: {empty}: empty audio (no samples)"
    assert run_cli(main, ["--audio", str(tmp_path), "-p", "hi", "--device-type", "cpu"]) == 1
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
    assert run_cli(main, ["--tag", broken.name, "-p", "hi", "--device-type", "cpu"]) == 1
    err = last_line(capsys)
    assert err.startswith(f"error: checkpoint {'meta' if name == 'meta' else 'file'} {path} {problem}"), err
    assert err.endswith("to fall back to the previous checkpoint, or train again")


def test_missing_checkpoint_is_a_clear_error(world, capsys):
    assert run_cli(main, ["--tag", "never-trained", "-p", "hi", "--device-type", "cpu"]) == 1
    assert "no audio checkpoint" in capsys.readouterr().err
    assert run_cli(main, ["--source", "sft", "-p", "hi", "--device-type", "cpu"]) == 1
    assert "no sft checkpoint" in capsys.readouterr().err


def test_text_model_refuses_audio(world, capsys):
    _, _, wav = world
    assert run_cli(main, ["--source", "base", "--audio", str(wav), "-p", "hi", "--device-type", "cpu"]) == 1
    assert "is a text model" in capsys.readouterr().err
