"""The recipes' command lines: runs/speedrun.sh --dry-run checks every command's arguments with the
entry point's own parser (nanochat/dryrun.py), and a misspelt flag fails it."""

import os
import subprocess
import sys

import pytest

from nanochat.dryrun import module_and_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_module_and_args_reads_python_and_torchrun_commands():
    assert module_and_args(["python", "-m", "scripts.base_train", "--depth", "4"]) == ("scripts.base_train",
                                                                                     ["--depth", "4"])
    assert module_and_args(["torchrun", "--standalone", "--nproc_per_node=8", "-m", "scripts.chat_sft", "--",
                            "--source", "base"]) == ("scripts.chat_sft", ["--source", "base"])
    assert module_and_args(["bash", "runs/setup.sh"]) is None


@pytest.mark.parametrize("args, code, message", [
    (["--depth", "24", "--fp8"], 0, "ok: scripts.base_train parses its 3 arguments"),
    (["--depht", "24"], 2, "unrecognized arguments: --depht 24"),
    (["--depth", "twenty"], 2, "argument --depth: invalid int value: 'twenty'"),
])
def test_dryrun_checks_arguments_without_running(tmp_path, args, code, message):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "nanochat.dryrun", "python", "-m", "scripts.base_train", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == code and message in out.stdout + out.stderr
    assert not os.listdir(tmp_path)  # parsed only: nothing trained, nothing written


def test_speedrun_dry_run_parses_every_command(tmp_path):
    # `python` on PATH is this interpreter, so the recipe checks against this checkout.
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    commands = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    checked = [line for line in out.stdout.splitlines() if line.startswith("  ok: ")]
    modules = [c for c in commands if " -m " in c]
    assert len(modules) >= 12 and len(checked) == len(modules)
    for stage in ("scripts.base_train", "scripts.chat_sft", "scripts.chat_rl", "scripts.audio_train",
                  "scripts.chat_eval", "nanochat.report"):
        assert any(f"ok: {stage} " in line for line in checked), stage
    assert "--fp8" in out.stdout and "--depth 24" in out.stdout
