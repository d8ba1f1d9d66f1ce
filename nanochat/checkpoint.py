"""Checkpoints: model weights, per-rank optimizer state and a meta JSON, written atomically.

A checkpoint directory holds, per saved step,
    model_000123.pt            {module name: state dict} of the trained modules ("gpt", ...) (rank 0)
    optim_000123_rank{r}.pt    optimizer state of rank r (each rank its own shard)
    meta_000123.json           config, loader state, step, ... written LAST
so a step counts as saved only once its meta file exists: a crash mid-save leaves the previous
step as the last complete one. Everything loads with torch.load(weights_only=True).
"""

import glob
import json
import os
import re

import torch

from nanochat.common import atomic_write, get_base_dir, logger


def _path(checkpoint_dir, kind, step, rank=None):
    suffix = "json" if kind == "meta" else "pt"
    rank_part = "" if rank is None else f"_rank{rank}"
    return os.path.join(checkpoint_dir, f"{kind}_{step:06d}{rank_part}.{suffix}")


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_state, meta, rank=0):
    """Save one step. Every rank calls this (for its optimizer shard); rank 0 writes model and meta.
    Callers synchronise ranks (a barrier) before rank 0's meta marks the step complete."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optimizer_state is not None:
        with atomic_write(_path(checkpoint_dir, "optim", step, rank)) as f:
            torch.save(optimizer_state, f)
    if rank == 0:
        with atomic_write(_path(checkpoint_dir, "model", step)) as f:
            torch.save(model_state, f)
        with atomic_write(_path(checkpoint_dir, "meta", step), "w") as f:
            json.dump(meta, f, indent=2)
        logger.info("saved checkpoint step %d to %s", step, checkpoint_dir)


def last_step(checkpoint_dir):
    """The newest complete step in a directory, or None."""
    steps = [int(m.group(1)) for p in glob.glob(os.path.join(checkpoint_dir, "meta_*.json"))
             if (m := re.fullmatch(r"meta_(\d+)\.json", os.path.basename(p)))]
    return max(steps) if steps else None


def load_checkpoint(checkpoint_dir, step=None, device="cpu", load_optimizer=False, rank=0):
    """(model_state, optimizer_state or None, meta) of `step` (default: the newest complete one)."""
    step = last_step(checkpoint_dir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir} (no meta_*.json): train one first, "
                                f"e.g. `python -m scripts.base_train`")
    meta_path = _path(checkpoint_dir, "meta", step)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"checkpoint step {step} is missing or incomplete in {checkpoint_dir}")
    with open(meta_path) as f:
        meta = json.load(f)
    model_state = _load(_path(checkpoint_dir, "model", step), device)
    optimizer_state = None
    if load_optimizer:
        optimizer_state = _load(_path(checkpoint_dir, "optim", step, rank), device)
    return model_state, optimizer_state, meta


def _load(path, device):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing") from None
    except Exception as exc:
        raise RuntimeError(f"checkpoint file {path} is corrupt ({exc}); delete this step's files to fall back "
                           f"to the previous checkpoint") from exc


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
    model = build_gpt(GPTConfig(**meta["model_config"]), device)  # init_weights computes the rotary tables
    model.load_state_dict(model_state["gpt"], strict=True)
    model.train(phase == "train")
    return model


def load_model(source, device="cpu", phase="eval", model_tag=None, step=None):
    """(model, tokenizer, meta) for a trained stage, e.g. load_model("base")."""
    from nanochat.tokenizer import get_tokenizer
    model, meta = build_model(checkpoint_dir_for(source, model_tag), step, device, phase)
    return model, get_tokenizer(), meta
