"""Bits per byte (a tokenizer-independent validation loss) and the in-context copying probe."""

import math

import torch

from nanochat.common import get_dist_info
from nanochat.dataloader import tokenizing_distributed_data_loader_bestfit


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Sum of next-token losses (nats) over all byte-bearing targets, converted to bits, divided by
    the number of bytes those targets encode. Special tokens (0 bytes) and ignored targets (-1)
    do not count, so models with different vocabularies compare fairly."""
    total_nats = torch.zeros((), dtype=torch.float64)
    total_bytes = torch.zeros((), dtype=torch.int64)
    for _ in range(steps):
        x, y = next(batches)[:2]
        losses = model(x, y, loss_reduction="none").flatten()
        y = y.flatten()
        valid = y >= 0
        n_bytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        counted = n_bytes > 0
        total_nats += losses[counted].double().sum().cpu()
        total_bytes += n_bytes.sum().cpu()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pair = torch.stack([total_nats, total_bytes.double()]).to(token_bytes.device)
        torch.distributed.all_reduce(pair)
        total_nats, total_bytes = pair[0].cpu(), pair[1].cpu()
    if total_bytes.item() == 0:
        raise ValueError("evaluate_bpb saw no byte-bearing targets")
    return total_nats.item() / (math.log(2) * total_bytes.item())


def val_bpb(model, tokenizer, token_bytes, batch_size, eval_tokens, device):
    """evaluate_bpb over the first ~eval_tokens tokens of the validation split (all ranks
    together), packed as training packs them; returns (bits per byte, tokens evaluated)."""
    seq_len = model.config.sequence_len
    tokens_per_batch = batch_size * seq_len * get_dist_info()[3]
    steps = max(1, eval_tokens // tokens_per_batch)
    batches = tokenizing_distributed_data_loader_bestfit(tokenizer, batch_size, seq_len, "val", device=device)
    return evaluate_bpb(model, batches, steps, token_bytes), steps * tokens_per_batch


@torch.no_grad()
def evaluate_copy(model, passages, bos_id):
    """In-context copying, the skill of induction heads (Olsson et al. 2022, "In-context Learning and
    Induction Heads"): each passage (B, L) is shown twice after BOS. Returns the mean next-token loss
    in nats over the first copy and over the second, each without its first token (the one
    predicted across the seam). A model that copies scores near 0 on the second copy; one that
    cannot scores the same twice. Reading speech aloud is copying from the audio prefix, so a base
    that cannot copy text has that to learn first."""
    B, L = passages.shape
    bos = torch.full((B, 1), bos_id, dtype=passages.dtype, device=passages.device)
    x = torch.cat([bos, passages, passages], dim=1)
    losses = model(x[:, :-1], x[:, 1:], loss_reduction="none").view(B, 2 * L)
    return losses[:, 1:L].mean().item(), losses[:, L + 1:].mean().item()
