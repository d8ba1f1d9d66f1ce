"""Check a recipe's command line without running it: the entry point parses its arguments with its
own argparse parser, and stops there.

    python -m nanochat.dryrun python -m scripts.base_train --depth 24 --fp8
    python -m nanochat.dryrun torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --source base

Recipes (runs/speedrun.sh --dry-run) pass every command through this, so a renamed or misspelt
flag fails on a laptop instead of an hour into a rented GPU node. A command that is not a Python
module (bash, pip) is only printed. Exit status: 0 when the arguments parse, argparse's 2 (and its
message, which names the flag) when they do not.
"""

import argparse
import runpy
import sys


class _Parsed(BaseException):
    """Raised by the first parse_args call of the entry point, once its arguments parsed (a
    BaseException, so an entry point's own error handling lets it through)."""


def module_and_args(command):
    """(module, argv) of a `python -m M ...` or `torchrun [options] -m M [--] ...` command; None
    for anything else."""
    if len(command) >= 3 and command[0] in ("python", "python3", sys.executable) and command[1] == "-m":
        return command[2], command[3:]
    if command and command[0] == "torchrun" and "-m" in command:
        i = command.index("-m")
        args = command[i + 2:]
        return command[i + 1], args[1:] if args[:1] == ["--"] else args
    return None


def check(module, argv):
    """Import `module` as __main__ with sys.argv = [module, *argv] and stop at its first
    parse_args: returns None when the arguments parse; argparse exits 2 with its message when not."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    saved_argv = sys.argv
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Parsed:
        return None
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    raise RuntimeError(f"{module} finished without parsing any arguments: it cannot be dry-run checked")


def main():
    command = sys.argv[1:]
    target = module_and_args(command)
    if target is None:
        print(f"  (not a Python entry point: printed only) {' '.join(command)}")
        return 0
    try:
        check(*target)
    except ImportError as exc:
        print(f"error: {exc}: the recipe names an entry point this checkout does not have", file=sys.stderr)
        return 1
    print(f"  ok: {target[0]} parses its {len(target[1])} arguments")
    return 0


if __name__ == "__main__":
    sys.exit(main())
