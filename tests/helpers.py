"""Shared test helpers."""

import torch

from nanochat.gpt import GPT


def build_model(config, seed=0, perturb=0.05):
    """A GPT built the way training builds it (meta device, init_weights), then nudged off its
    init so zero-initialised projections, smear and the gates all carry signal."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
            model.smear_lambda.fill_(0.7)
            model.backout_lambda.fill_(0.3)
    return model.eval()


def stdlib_text(max_chars=400_000):
    """Real text for tests: the interpreter's own standard library sources (always installed)."""
    import pathlib
    import sysconfig
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return chunks
