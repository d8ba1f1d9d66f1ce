"""Shared test helpers."""

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

