"""Checkpoints: model weights, per-rank optimizer state and a meta JSON, written atomically.

A checkpoint directory holds, per saved step,
    model_000123.pt            {module name: state dict} of the trained modules ("gpt", ...) (rank 0)
    optim_000123_rank{r}.pt    optimizer state of rank r (each rank its own shard)
    meta_000123.json           config, loader state, step, ... written LAST
so a step counts as saved only once its meta file exists: a crash mid-save leaves the previous
step as the last complete one (loading says so in one log line), and the temporary files the crash
left behind are deleted by the next save or load. Everything loads with torch.load(weights_only=True);
a damaged file is a ValueError naming it and the fix.
"""

import glob
import json
import os
import re

import torch

from nanochat.common import atomic_write, get_base_dir, logger


# A checkpoint file's name, and the name atomic_write gives its temporary file: <name>.<random>.tmp
_FILE = re.compile(r"(model|optim|meta)_(\d+)(?:_rank(\d+))?\.(?:pt|json)")
_TMP = re.compile(_FILE.pattern + r"\.[a-z0-9_]{8}\.tmp")  # mkstemp: 8 random characters


def _path(checkpoint_dir, kind, step, rank=None):
    suffix = "json" if kind == "meta" else "pt"
    rank_part = "" if rank is None else f"_rank{rank}"
    return os.path.join(checkpoint_dir, f"{kind}_{step:06d}{rank_part}.{suffix}")


def _remove_orphans(checkpoint_dir, keep):
    """Delete the temporary files of interrupted saves for which keep(kind, step, rank) is False;
    returns how many. A directory we may not write to (a shared, read-only one) is left as it is."""
    removed = 0
    for name in os.listdir(checkpoint_dir):
        m = _TMP.fullmatch(name)
        if m and not keep(m.group(1), int(m.group(2)), None if m.group(3) is None else int(m.group(3))):
            try:
                os.remove(os.path.join(checkpoint_dir, name))
                removed += 1
            except OSError:
                pass
    if removed:
        logger.info("removed %d temporary file(s) of an interrupted save from %s", removed, checkpoint_dir)
    return removed


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_state, meta, rank=0):
    """Save one step. Every rank calls this (for its optimizer shard); rank 0 writes model and meta.
    Callers synchronise ranks (a barrier) before rank 0's meta marks the step complete. Each rank
    first deletes what a killed save left of the files it writes itself (never another rank's, which
    may be in the middle of its own save)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    _remove_orphans(checkpoint_dir, lambda kind, _, r: r != rank if kind == "optim" else rank != 0)
    if optimizer_state is not None:
        with atomic_write(_path(checkpoint_dir, "optim", step, rank)) as f:
            torch.save(optimizer_state, f)
    if rank == 0:
        with atomic_write(_path(checkpoint_dir, "model", step)) as f:
            torch.save(model_state, f)
        with atomic_write(_path(checkpoint_dir, "meta", step), "w") as f:
            json.dump(meta, f, indent=2)
        logger.info("saved checkpoint step %d to %s", step, checkpoint_dir)


def last_step(checkpoint_dir, say_fallback=False):
    """The newest complete step in a directory, or None. say_fallback: log one line when a newer
    step was left incomplete by an interrupted save (so an older one is what gets loaded)."""
    names = [m for name in (os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else [])
             if (m := _FILE.fullmatch(name) or _TMP.fullmatch(name))]
    complete = [int(m.group(2)) for m in names if m.group(1) == "meta" and m.re is _FILE]
    step = max(complete) if complete else None
    if say_fallback:
        newer = sorted({int(m.group(2)) for m in names if step is None or int(m.group(2)) > step})
        if newer:
            logger.warning("checkpoint step %d in %s is incomplete (its save was interrupted: no %s); %s",
                           newer[-1], checkpoint_dir, os.path.basename(_path(checkpoint_dir, "meta", newer[-1])),
                           "no earlier complete step" if step is None else f"falling back to step {step}")
    return step


def load_checkpoint(checkpoint_dir, step=None, device="cpu", load_optimizer=False, rank=0):
    """(model_state, optimizer_state or None, meta) of `step` (default: the newest complete one).
    Also deletes the temporary files of interrupted saves of steps up to the newest complete one:
    no save can still be writing those (a step's meta is written after all its other files)."""
    newest = last_step(checkpoint_dir, say_fallback=step is None)
    step = newest if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir} (no meta_*.json): train one first, "
                                f"e.g. `python -m scripts.base_train`")
    meta_path = _path(checkpoint_dir, "meta", step)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"checkpoint step {step} is missing or incomplete in {checkpoint_dir}")
    _remove_orphans(checkpoint_dir, lambda kind, s, r: s > newest)
    fix = _fallback_hint(checkpoint_dir, step)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint meta {meta_path} is not valid JSON ({exc}): truncated or damaged; {fix}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint meta {meta_path} is not a JSON object; {fix}")
    model_state = _load(_path(checkpoint_dir, "model", step), device, fix)
    optimizer_state = None
    if load_optimizer:
        optimizer_state = _load(_path(checkpoint_dir, "optim", step, rank), device, fix)
    return model_state, optimizer_state, meta


def _fallback_hint(checkpoint_dir, step):
    """The fix for a damaged step: delete its files (the previous complete step then loads), or retrain."""
    return (f"delete {os.path.join(checkpoint_dir, f'*_{step:06d}*')} to fall back to the previous checkpoint, "
            f"or train again")


def _load(path, device, fix):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing; {fix}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"checkpoint file {path} is a directory; {fix}") from None
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"checkpoint file {path} is damaged ({cause}); {fix}") from None


def checkpoint_dir_for(source, model_tag=None):
    """base_dir/{source}_checkpoints/{model_tag}; without a tag, the most recently written one."""
    root = os.path.join(get_base_dir(), f"{source}_checkpoints")
    if model_tag is None:
        tags = [d for d in glob.glob(os.path.join(root, "*")) if last_step(d) is not None]
        if not tags:
            raise FileNotFoundError(f"no {source} checkpoint under {root}: train one first "
                                    f"(see the README's training section)")
        return max(tags, key=lambda d: os.path.getmtime(_path(d, "meta", last_step(d))))
    return os.path.join(root, model_tag)


def build_model(checkpoint_dir, step=None, device="cpu", phase="eval"):
    """A GPT restored from a checkpoint: (model, meta). phase 'eval' or 'train' sets the mode."""
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    return gpt_from_state(model_state, meta, device, phase), meta


def gpt_from_state(model_state, meta, device="cpu", phase="eval"):
    """The GPT of a loaded checkpoint (load_checkpoint's model_state and meta)."""
    from nanochat.gpt import GPTConfig, build_gpt
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint meta has no usable model_config ({exc!r}): not a GPT checkpoint") from None
    if not isinstance(model_state, dict) or "gpt" not in model_state:
        raise ValueError("checkpoint model file holds no 'gpt' weights: not a GPT checkpoint")
    model = build_gpt(config, device)  # init_weights computes the rotary tables
    model.load_state_dict(model_state["gpt"], strict=True)
    model.train(phase == "train")
    return model


def load_model(source, device="cpu", phase="eval", model_tag=None, step=None):
    """(model, tokenizer, meta) for a trained stage, e.g. load_model("base")."""
    from nanochat.tokenizer import get_tokenizer
    model, meta = build_model(checkpoint_dir_for(source, model_tag), step, device, phase)
    return model, get_tokenizer(), meta
