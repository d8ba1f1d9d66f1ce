"""The report card: every stage appends its numbers; report.md and its plots are rebuilt from them.

Scripts call one function per event (rank 0 writes, other ranks return at once):

    from nanochat import report
    report.start_stage("sft", resume=args.resume, config=vars(args))   # once per process
    report.log_step("sft", step, loss=1.93, lrm=0.8)                    # a point of each curve
    report.log_metrics("sft", val_loss=1.71)                            # summary numbers
    report.log_eval("sft", {"ARC-Easy": 0.31, "GSM8K": 0.02})           # task accuracies, 0..1
    report.end_stage("sft")                                             # the stage's work is done
    report.write_report()                                               # report.md + PNGs

`python -m nanochat.report` rebuilds the same from the logged numbers at any time.

Records live in base_dir/report/stages/<stage>.jsonl, one JSON object per line. Each is appended
with a single write() to a file opened with O_APPEND, so records of processes logging at once
never interleave, and a crash can at worst cut the last line, which the reader skips. Nothing is
ever rewritten. A stage that starts afresh (resume=False) supersedes its earlier records: the
reader keeps only what follows its last fresh start. A resumed stage continues the same history,
and a step logged twice (before a crash and again after the resume) keeps its latest value.

Stages are the models the pipeline makes, in order: tokenizer, base, sft, rl, audio (any other
name is shown after them). Evaluations log into the stage of the model they measure (base_eval's
bits per byte into "base", chat_eval's accuracies into "sft"), so the summary table has one column
per model; an evaluation script may also start a stage of its own (e.g. "chat_eval") to have its
wall time listed. Wall time is the sum over a stage's runs of the time from start to its last
step or end record.
"""

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections import defaultdict

from nanochat.common import atomic_write, get_base_dir, logger

PIPELINE_ORDER = ("tokenizer", "base", "sft", "rl", "audio")
_TIMED_KINDS = ("start", "step", "end")


def _report_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "report")


def _stage_path(stage, base_dir=None):
    if not stage or not all(c.isalnum() or c in "_-" for c in stage):
        raise ValueError(f"stage name {stage!r}: use letters, digits, '_' and '-' (it names a file)")
    return os.path.join(_report_dir(base_dir), "stages", f"{stage}.jsonl")


def _is_rank0():
    return int(os.environ.get("RANK", 0)) == 0


def _numbers(values, what):
    """values with every number as a plain float (tensors and numpy scalars included)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, str):
            raise TypeError(f"{what} {key!r}: expected a number, got the string {value!r}")
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{what} {key!r}: expected a number, got {type(value).__name__}") from None
    return out


def _append(stage, record, base_dir=None):
    path = _stage_path(stage, base_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    line = (json.dumps({"time": time.time(), **record}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one call: appends from several processes cannot interleave within it
    finally:
        os.close(fd)


def git_commit():
    """The source tree's commit (with '-dirty' when it has uncommitted changes), or 'unknown'."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def system_info():
    """The machine, as a flat dict of strings: CPU, cores, memory, GPUs, torch, threads, Python."""
    import psutil
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = "none"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpus = ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
    return {"host": socket.gethostname(), "cpu": cpu, "cores": str(os.cpu_count()),
            "memory": f"{psutil.virtual_memory().total / 2 ** 30:.1f} GiB", "gpus": gpus,
            "torch": torch.__version__, "threads": str(torch.get_num_threads()),
            "python": platform.python_version(), "platform": platform.platform()}


# ---------------------------------------------------------------------------
# Logging: one function per event


def start_stage(stage, resume=False, config=None, base_dir=None):
    """Mark the start of a stage's run (resume=False supersedes the stage's earlier records) and
    record the command, config, git commit and machine."""
    if not _is_rank0():
        return
    _append(stage, {"kind": "start", "resume": bool(resume), "command": sys.argv,
                    "config": json.loads(json.dumps(config or {}, default=str)), "git": git_commit(),
                    "world_size": int(os.environ.get("WORLD_SIZE", 1)), "system": system_info()}, base_dir)


def log_step(stage, step, base_dir=None, **values):
    """One point of each named curve at `step` (e.g. loss=2.1, val_bpb=1.6)."""
    if _is_rank0():
        _append(stage, {"kind": "step", "step": int(step), "values": _numbers(values, "step value")}, base_dir)


def log_metrics(stage, base_dir=None, **values):
    """Summary numbers of a stage (e.g. val_bpb, core, wer); a later value of a name replaces it."""
    if _is_rank0():
        _append(stage, {"kind": "metrics", "values": _numbers(values, "metric")}, base_dir)


def log_eval(stage, results, base_dir=None):
    """Task accuracies (fractions 0..1) of the stage's model, e.g. {"ARC-Easy": 0.31}."""
    if _is_rank0():
        _append(stage, {"kind": "eval", "values": _numbers(results, "accuracy")}, base_dir)


def end_stage(stage, base_dir=None):
    """Mark the stage's work as done (its wall time runs until here)."""
    if _is_rank0():
        _append(stage, {"kind": "end"}, base_dir)


# ---------------------------------------------------------------------------
# Reading


def read_stage(path):
    """The records of one stage file that count: those from its last fresh start on (all of
    them when it never started afresh). An unreadable line (a write cut by a crash) is skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                record["kind"]
            except (json.JSONDecodeError, TypeError, KeyError):
                logger.warning("%s line %d is not a complete record; skipped", path, lineno)
                continue
            if record["kind"] == "start" and not record.get("resume"):
                records = []
            records.append(record)
    return records


def collect(base_dir=None):
    """{stage: summary} from every stage file, in pipeline order. A summary holds metrics, evals
    (latest value per name), curves {name: {step: value}}, runs (the start records) and
    wall_seconds (None when the stage never logged a start)."""
    folder = os.path.join(_report_dir(base_dir), "stages")
    names = sorted(f[:-len(".jsonl")] for f in os.listdir(folder) if f.endswith(".jsonl")) \
        if os.path.isdir(folder) else []
    names.sort(key=lambda s: PIPELINE_ORDER.index(s) if s in PIPELINE_ORDER else len(PIPELINE_ORDER))
    stages = {}
    for name in names:
        summary = {"metrics": {}, "evals": {}, "curves": defaultdict(dict), "runs": [], "wall_seconds": None}
        segment_start = segment_last = None
        spans = []
        for record in read_stage(os.path.join(folder, f"{name}.jsonl")):
            kind = record["kind"]
            if kind == "start":
                if segment_start is not None:
                    spans.append(segment_last - segment_start)
                segment_start = segment_last = record["time"]
                summary["runs"].append(record)
            elif kind in _TIMED_KINDS and segment_start is not None:
                segment_last = record["time"]
            if kind == "step":
                for key, value in record["values"].items():
                    summary["curves"][key][record["step"]] = value
            elif kind == "metrics":
                summary["metrics"].update(record["values"])
            elif kind == "eval":
                summary["evals"].update(record["values"])
        if segment_start is not None:
            summary["wall_seconds"] = sum(spans) + segment_last - segment_start
        summary["curves"] = {k: dict(sorted(v.items())) for k, v in summary["curves"].items()}
        stages[name] = summary
    return stages


# ---------------------------------------------------------------------------
# Rendering


def _format(value):
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _duration(seconds):
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{s:02d}s" if hours else f"{minutes}m{s:02d}s"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def plot_curves(stage, curves, path):
    """One panel per curve of a stage, value against step."""
    import matplotlib
    matplotlib.use("Agg")  # headless: no display is needed or wanted
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        steps, values = list(points), list(points.values())
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(f"{stage}: {name}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def plot_evals(stages, path):
    """Grouped bars: one group per task, one bar per stage that evaluated it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evaluated = [s for s, summary in stages.items() if summary["evals"]]
    tasks = list(dict.fromkeys(t for s in evaluated for t in stages[s]["evals"]))
    width = 0.8 / len(evaluated)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(tasks) * max(1, len(evaluated) / 2)), 3.6))
    for i, stage in enumerate(evaluated):
        xs = [t + (i - (len(evaluated) - 1) / 2) * width for t in range(len(tasks))]
        values = [stages[stage]["evals"].get(task, float("nan")) for task in tasks]
        bars = ax.bar(xs, values, width, label=stage)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right", fontsize=9)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def render(stages, plots_dir=None):
    """report.md's text; with plots_dir, the PNGs are (re)drawn there and linked."""
    lines = ["# nanochat-audio report card", "", f"generated {time.strftime('%Y-%m-%d %H:%M:%S')} "
             f"from commit `{git_commit()}`", ""]
    if not stages:
        return "\n".join(lines + ["Nothing logged yet: run a stage (e.g. `bash runs/cpu.sh`).", ""])
    columns = [s for s, summary in stages.items() if summary["metrics"] or summary["evals"]]
    if columns:
        names = list(dict.fromkeys(k for s in columns for kind in ("metrics", "evals") for k in stages[s][kind]))
        rows = [[name] + [_format(stages[s]["metrics"].get(name, stages[s]["evals"].get(name))) for s in columns]
                for name in names]
        lines += ["## Summary", ""] + _table(["metric"] + columns, rows) + [""]
    runs = [(s, run) for s, summary in stages.items() for run in summary["runs"]]
    if runs:
        rows = [[s, time.strftime("%Y-%m-%d %H:%M", time.localtime(run["time"])), "resume" if run["resume"] else "fresh",
                 f"`{run['git']}`", run["world_size"], run["system"]["gpus"] if run["system"]["gpus"] != "none"
                 else f"CPU x {run['system']['threads']} threads"] for s, run in runs]
        lines += ["## Runs", ""] + _table(["stage", "started", "start", "commit", "ranks", "compute"], rows) + [""]
        timed = [(s, summary["wall_seconds"]) for s, summary in stages.items() if summary["wall_seconds"] is not None]
        rows = [[s, _duration(sec)] for s, sec in timed] + [["total", _duration(sum(sec for _, sec in timed))]]
        lines += ["## Wall time", ""] + _table(["stage", "wall time"], rows) + [""]
    if plots_dir is not None:
        plotted = [s for s, summary in stages.items() if summary["curves"]]
        if plotted:
            lines += ["## Training curves", ""]
            for stage in plotted:
                plot_curves(stage, stages[stage]["curves"], os.path.join(plots_dir, f"curves_{stage}.png"))
                lines += [f"![{stage} curves](curves_{stage}.png)", ""]
        if any(summary["evals"] for summary in stages.values()):
            plot_evals(stages, os.path.join(plots_dir, "evals.png"))
            lines += ["## Evaluations", "", "![task accuracies per stage](evals.png)", ""]
    info = system_info()
    lines += ["## This machine", ""] + _table(["", ""], list(info.items())) + [""]
    return "\n".join(lines)


def write_report(base_dir=None):
    """Rebuild base_dir/report/report.md and its PNGs from the logged records; returns the path."""
    folder = _report_dir(base_dir)
    text = render(collect(base_dir), plots_dir=folder)
    path = os.path.join(folder, "report.md")
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rebuild the report card (report.md and its plots) from the "
                                                 "numbers the stages logged under base_dir/report/stages.")
    parser.add_argument("--base-dir", default=None, help="base directory (default: $NANOCHAT_BASE_DIR or "
                                                         "~/.cache/nanochat)")
    parser.add_argument("--print", action="store_true", help="also print report.md")
    args = parser.parse_args(argv)
    path = write_report(args.base_dir)
    if args.print:
        with open(path, encoding="utf-8") as f:
            print(f.read())
    print(f"report card: {path}")
    return path


if __name__ == "__main__":
    main()
