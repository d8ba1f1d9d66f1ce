"""A tiny regression net trained with MuonAdamW, used by tests/test_optim.py.

Under torchrun each rank takes its slice of one global batch and MuonAdamW averages the
gradients; run in-process (no process group) it takes the whole batch. The test compares the
two. Usage: python -m torch.distributed.run --nproc_per_node=2 tests/_dist_optim_worker.py OUT
"""

import io
import sys

import torch
import torch.nn.functional as F

from nanochat.optim import MuonAdamW

BATCH = 16
STEPS = 5
RESUME_AT = 3


def make_params(seed=0):
    """Parameters for every code path: an AdamW matrix whose numel (24*15 = 360) and vector
    (3 elements) do not divide into shards evenly, and Muon groups of 3 wide and 2 tall matrices
    (3 pads to 4 slots over 2 ranks)."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(inp=(24, 15), w1=(16, 24), w2=(16, 24), w3=(16, 24), v1=(32, 16), v2=(32, 16),
                  out=(3, 32), gain=(3,))
    return {name: (torch.randn(shape, generator=g) * 0.3).requires_grad_() for name, shape in shapes.items()}


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 15, generator=g), torch.randn(BATCH, 3, generator=g)


def loss_fn(p, x, y):
    h = x @ p["inp"].T
    h = torch.relu(h @ p["w1"].T) + torch.tanh(h @ p["w2"].T) + h @ p["w3"].T
    h = torch.relu(h @ p["v1"].T) * torch.sigmoid(h @ p["v2"].T)
    return F.mse_loss((h @ p["out"].T) * p["gain"], y)


def make_optimizer(p, shard_threshold):
    return MuonAdamW([
        dict(kind="adamw", params=[p["inp"], p["out"]], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
        dict(kind="adamw", params=[p["gain"]], lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="muon", params=[p["w1"], p["w2"], p["w3"]], lr=0.02, momentum=0.95, weight_decay=0.2),
        dict(kind="muon", params=[p["v1"], p["v2"]], lr=0.03, momentum=0.9, ns_steps=6, weight_decay=0.2),
    ], shard_threshold=shard_threshold)


def train(p, opt, x, y, first_step, last_step):
    """Steps [first_step, last_step) with a schedule that mutates the groups as the trainer does."""
    for step in range(first_step, last_step):
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1 - 0.1 * step)
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.02 * step
        opt.zero_grad()
        loss_fn(p, x, y).backward()
        opt.step()


def state_snapshot(p, opt):
    """The optimizer state this rank holds: AdamW first moments, Muon momentum buffers."""
    return dict(inp=opt.state[p["inp"]]["exp_avg"], gain=opt.state[p["gain"]]["exp_avg"],
                w=opt.state[p["w1"]]["momentum_buffer"], v=opt.state[p["v1"]]["momentum_buffer"])


def run(shard_threshold, rank=0, world=1):
    """Final parameters after STEPS steps on this rank's share of the batch; the same run stopped
    at RESUME_AT, its optimizer state round-tripped through torch.save, and resumed; and the
    optimizer state."""
    x, y = make_batch()
    per_rank = BATCH // world
    x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]

    p = make_params()
    opt = make_optimizer(p, shard_threshold)
    train(p, opt, x, y, 0, STEPS)

    first = make_params()
    opt_first = make_optimizer(first, shard_threshold)
    train(first, opt_first, x, y, 0, RESUME_AT)
    buffer = io.BytesIO()
    torch.save(opt_first.state_dict(), buffer)
    buffer.seek(0)
    resumed = {name: t.detach().clone().requires_grad_() for name, t in first.items()}
    opt_resumed = make_optimizer(resumed, shard_threshold)
    opt_resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(resumed, opt_resumed, x, y, RESUME_AT, STEPS)

    return ({name: t.detach() for name, t in p.items()}, {name: t.detach() for name, t in resumed.items()},
            state_snapshot(p, opt))


def main(out_path):
    from nanochat.common import compute_cleanup, compute_init
    _, rank, _, world, _ = compute_init("cpu")
    results = {}
    for mode, threshold in (("sharded", 0), ("all_reduce", 2**40)):
        results[mode], results[mode + "_resumed"], results[mode + "_state"] = run(threshold, rank, world)
    torch.save(results, f"{out_path}.rank{rank}")
    compute_cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
