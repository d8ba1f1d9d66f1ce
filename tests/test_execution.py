"""The sandbox that runs model-written code: what must work, and what must be contained."""

import os
import time
import uuid

import pytest

from nanochat.execution import execute


def run(code, timeout=3.0, **limits):
    start = time.perf_counter()
    result = execute(code, timeout=timeout, **limits)
    return result, time.perf_counter() - start


def test_a_correct_program_succeeds_and_its_output_comes_back():
    result, _ = run("import math\nassert math.comb(5, 2) == 10\nprint('ok')")
    assert result.success and result.returncode == 0 and result.stdout == "ok\n" and not result.timed_out


def test_a_failing_program_reports_failure_with_its_error():
    result, _ = run("def f(x):\n    return x + 1\n\nassert f(1) == 3")
    assert not result.success and result.returncode == 1 and "AssertionError" in result.stderr


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    result, seconds = run("while True:\n    pass", timeout=1.0)
    assert not result.success and result.timed_out and seconds < 5


def test_sleeping_program_is_killed_too():  # CPU limits alone would never fire
    result, seconds = run("import time\ntime.sleep(60)", timeout=1.0)
    assert not result.success and result.timed_out and seconds < 5


def test_fork_bomb_is_refused():
    result, seconds = run("import os\nwhile True:\n    os.fork()")
    assert not result.success and "os.fork" in result.stderr and seconds < 5


@pytest.mark.parametrize("code", [
    "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\np.join()",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.execv('/bin/true', ['true'])",
    "import os\nos.posix_spawn('/bin/true', ['true'], {})",
])
def test_no_new_processes(code):
    result, _ = run(code)
    assert not result.success and "PermissionError" in result.stderr


def test_os_system_is_refused(tmp_path):
    marker = tmp_path / "ran"
    result, _ = run(f"import os\nos.system('touch {marker}')")
    assert not result.success and "os.system" in result.stderr and not marker.exists()


def test_10gb_allocation_fails_with_memory_error():
    result, seconds = run("x = bytearray(10 * 1024 ** 3)\nprint(len(x))")
    assert not result.success and "MemoryError" in result.stderr and seconds < 10


def test_slow_memory_growth_stops_at_the_limit():
    result, _ = run("blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))", memory_mb=256)
    assert not result.success and "MemoryError" in result.stderr


@pytest.mark.parametrize("writer", [
    "open({path!r}, 'w').write('x')",
    "import os\nfd = os.open({path!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
    "import pathlib\npathlib.Path({path!r}).write_text('x')",
    "import os\nos.chdir(os.path.dirname({path!r}))\nopen(os.path.basename({path!r}), 'w').write('x')",
    "import shutil\nshutil.copyfile(__import__('sys').executable, {path!r})",
])
def test_writing_outside_the_sandbox_is_refused(tmp_path, writer):
    path = str(tmp_path / f"escape-{uuid.uuid4().hex}")
    result, _ = run(writer.format(path=path))
    assert not result.success and "PermissionError" in result.stderr and not os.path.exists(path)


def test_deleting_or_renaming_outside_the_sandbox_is_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    for code in (f"import os\nos.remove({str(victim)!r})", f"import os\nos.rename({str(victim)!r}, 'x')",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})", f"import os\nos.chmod({str(victim)!r}, 0)"):
        result, _ = run(code)
        assert not result.success and "PermissionError" in result.stderr
    assert victim.read_text() == "data"


def test_files_inside_the_sandbox_work_and_the_directory_is_removed_afterwards():
    result, _ = run("import os\nopen('notes.txt', 'w').write('hi')\nprint(os.getcwd())\n"
                    "print(open('notes.txt').read())")
    assert result.success
    workdir, content = result.stdout.split()
    assert content == "hi" and os.path.basename(workdir).startswith("nanochat-sandbox-")
    assert not os.path.exists(workdir)


def test_no_network():
    result, _ = run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)")
    assert not result.success and "socket" in result.stderr


def test_foreign_functions_are_refused_but_numpy_imports():
    result, _ = run("import ctypes\nctypes.CDLL(None).system(b'true')")
    assert not result.success and "ctypes" in result.stderr
    assert run("import numpy\nprint(int(numpy.arange(4).sum()))")[0].stdout == "6\n"


def test_the_limits_cannot_be_lifted():
    result, _ = run("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert not result.success and "resource.setrlimit" in result.stderr


def test_endless_output_is_cut_off():
    result, seconds = run("while True:\n    print('x' * 1000)", file_mb=1)
    assert not result.success and len(result.stdout) < 20_000 and seconds < 5
