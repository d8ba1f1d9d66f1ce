"""Shared test helpers."""

import contextlib
import os

import torch

from nanochat.gpt import build_gpt


def build_model(config, seed=0, perturb=0.05):
    """A GPT built the way training builds it (meta device, init_weights), then nudged off its
    init so zero-initialised projections, smear and the gates all carry signal."""
    torch.manual_seed(seed)
    model = build_gpt(config)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
            model.smear_lambda.fill_(0.7)
            model.backout_lambda.fill_(0.3)
    return model.eval()


@contextlib.contextmanager
def offline_base_dir(path):
    """NANOCHAT_BASE_DIR at `path` and no hub probe while the block runs (where the CTranslate2 ->
    HF conversion of the offline Whisper weights lands), then the environment as it was."""
    saved = {k: os.environ.get(k) for k in ("NANOCHAT_BASE_DIR", "HF_HUB_OFFLINE")}
    os.environ["NANOCHAT_BASE_DIR"] = str(path)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def point_at(mp, env):
    """Point this process at a tiny world's base dir (tests.test_audio_train.build_tiny_world's env:
    offline, an empty HF cache, no Whisper override) for the life of the MonkeyPatch `mp`."""
    import huggingface_hub.constants
    for k, v in env.items():
        mp.setenv(k, v)
    mp.delenv("WHISPER_MS_ID", raising=False)
    mp.delenv("WHISPER_HF_ID", raising=False)
    # huggingface_hub read HF_HUB_CACHE when it was imported.
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
