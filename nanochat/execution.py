"""Run model-written Python in a sandbox and report whether it succeeded.

    execute("assert sum([1, 2]) == 3", timeout=5.0).success   # True

The code runs in a child interpreter (`python -I -B`: no user site, no PYTHON* variables, no
bytecode writes) inside a fresh temporary directory that is removed afterwards, with, from the
outside in:
- its own process group, killed with SIGKILL at the wall-clock limit, so an infinite loop, a
  sleep or anything it started never outlives the call;
- resource limits: CPU seconds, address space (a 10 GB allocation fails with MemoryError), the
  size of any file it writes (its captured output included) and no core dumps;
- an audit hook (PEP 578) installed before the code runs, which Python gives no way to remove,
  refusing: process creation (fork, exec, spawn, os.system, subprocess), signals, sockets (so
  no network), foreign functions (ctypes may be imported, not called), changing the limits, and
  any write, delete, rename, link or permission change outside the temporary directory.
A refused operation raises PermissionError in the child, so the program fails like any other
wrong answer. This contains careless or runaway model output, the risk HumanEval-style
evaluation has; it is not a boundary against a determined attacker (run untrusted code from
the internet in a container or VM).
"""

import inspect
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

MAX_OUTPUT_CHARS = 10_000


@dataclass
class ExecutionResult:
    success: bool  # exited with status 0 within the limits
    returncode: int  # negative: killed by that signal
    timed_out: bool
    stdout: str
    stderr: str


def _sandboxed_main():
    """The child's entry point (its source is passed with -c): limits, the audit hook, then the code.
    argv: root directory, CPU seconds, address-space bytes, file-size bytes."""
    import os
    import resource
    import sys

    root, cpu_seconds, memory_bytes, file_bytes = sys.argv[1], *map(int, sys.argv[2:5])
    for limit, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_bytes),
                         (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    root = os.path.realpath(root)
    with open(os.path.join(root, "solution.py"), encoding="utf-8") as f:
        source = f.read()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    refused = ("os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.kill",
               "os.killpg", "os.chmod", "os.chown", "os.chflags", "subprocess.", "socket.", "resource.",
               "signal.pthread_kill", "sys.addaudithook", "sys.remote_exec", "ctypes.dlsym", "ctypes.call_function",
               "ctypes.cdata", "ctypes.addressof", "ctypes.string_at", "ctypes.wstring_at", "ctypes.set_errno")
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                   "os.utime", "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                   "shutil.copytree", "shutil.unpack_archive", "shutil.make_archive"}

    def inside(path):
        if isinstance(path, int):  # an open descriptor: it was checked when it was opened
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep)

    def hook(event, args):
        if event == "open":
            path, _, flags = args
            if isinstance(flags, int) and flags & write_flags and not inside(path):
                raise PermissionError(f"sandbox: no writing outside its directory ({path!r})")
        elif event == "import" and args[0] == "_posixsubprocess":  # fork_exec itself raises no event
            raise PermissionError(f"sandbox: module {args[0]} is not allowed")
        elif event == "ctypes.dlopen" and args[0] is not None:  # None: the program itself (numpy's import)
            raise PermissionError(f"sandbox: loading {args[0]!r} is not allowed")
        elif event.startswith(refused):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in path_events:
            for path in args:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError(f"sandbox: {event} outside its directory ({path!r})")

    sys.addaudithook(hook)
    sys.argv = ["solution.py"]
    exec(compile(source, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})


_CHILD_SOURCE = textwrap.dedent(inspect.getsource(_sandboxed_main)) + "\n_sandboxed_main()\n"


def _tail(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return text if len(text) <= MAX_OUTPUT_CHARS else "...\n" + text[-MAX_OUTPUT_CHARS:]


def execute(code, timeout=5.0, memory_mb=1024, file_mb=16):
    """Run `code` in the sandbox (see the module docstring). Returns an ExecutionResult; the
    limits: `timeout` wall-clock seconds (CPU time gets the same, rounded up), `memory_mb` of
    address space, `file_mb` per written file."""
    root = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    try:
        with open(os.path.join(root, "solution.py"), "w", encoding="utf-8") as f:
            f.write(code)
        out_path, err_path = os.path.join(root, "stdout.txt"), os.path.join(root, "stderr.txt")
        limits = [str(int(timeout) + 1), str(memory_mb << 20), str(file_mb << 20)]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _CHILD_SOURCE, root, *limits], cwd=root,
                                    env={"PATH": os.defpath, "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole group: whatever the program left running goes too
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        return ExecutionResult(success=proc.returncode == 0 and not timed_out, returncode=proc.returncode,
                               timed_out=timed_out, stdout=_tail(out_path), stderr=_tail(err_path))
    finally:
        shutil.rmtree(root, ignore_errors=True)
