"""MuonAdamW: one optimizer for the whole model, in one process or under torchrun.

AdamW steps the embeddings, the unembedding and the scalars; Muon steps the 2-D matrices inside
the blocks (Nesterov momentum, orthogonalised by Polar Express, cautious weight decay).

Under torch.distributed there is no DDP wrapper: step() averages the gradients itself. Small
tensors are all-reduced and updated on every rank. Large ones are reduce-scattered, each rank
updates only its own shard (and keeps optimizer state only for it), then the updated shards are
all-gathered (ZeRO-2 style). Schedules belong to the trainer, which rewrites group["lr"],
group["momentum"] and group["weight_decay"] before each step; group["initial_lr"] holds the
constructor's lr for it to scale."""

import functools
import math

import torch
import torch.distributed as dist

from nanochat.common import compute_dtype

# Sharding pays once the optimizer work it saves outweighs one extra collective launch. A
# reduce-scatter plus an all-gather move the same bytes as one ring all-reduce; what sharding
# saves is (1 - 1/world) of the update math and state. Eager AdamW streams ~40 bytes per fp32
# element (p, grad, two moments, temporaries), so 2**20 elements is ~40 MB, ~12 us at H100's
# 3.35 TB/s: about one NCCL launch latency. Real models sit far from the threshold either way
# (scalars are tiny, embeddings and stacked block matrices have millions of elements).
SHARD_THRESHOLD = 2**20

# Gram iteration (gram_polar_express) for matrices at least this much wider than tall. Five steps
# with the restart cost 4 m^2 n + 14 m^3 multiply-adds against 10 m^2 n + 5 m^3, less once
# n > 1.5 m. Measured on one CPU thread, 6 stacked 384 x 1536 fp32 matrices: 233 vs 347 ms.
GRAM_MIN_ASPECT = 1.5
# The step at which the Gram iteration rebuilds X and R. Measured against a float64 reference on
# gradient-like matrices (singular values 1 to 1e-4): without a restart the error grows from 3e-6
# to 4e-5 in fp32 and the result blows up in bf16 (singular values ~50); with it, the error is the
# plain iteration's (5e-6 fp32, 3e-2 bf16).
GRAM_RESTART = 2

# Hyperparameters a group may leave out (lr and kind are required). AdamW's are torch.optim.AdamW's
# except weight decay; momentum 0.95 and 5 steps are the Muon defaults of Jordan et al. (2024).
GROUP_DEFAULTS = {
    "adamw": dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "muon": dict(momentum=0.95, ns_steps=5, weight_decay=0.0),
}


# ---------------------------------------------------------------------------
# Polar Express: the polynomial iteration that orthogonalises Muon's update


def _minimax_odd_quintic(lo, hi):
    """(a, b, c) of the odd quintic p(x) = a x + b x^3 + c x^5 that minimises max |1 - p(x)| over
    [lo, hi]. Remez exchange: the optimum equioscillates at lo, its two interior extrema and hi."""
    if lo / hi > 1 - 5e-6:
        # The interval is a point and the linear system below is singular; the limit is the
        # degree-5 Newton-Schulz polynomial (15x - 10x^3 + 3x^5) / 8 rescaled to hi.
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    nodes = [lo, (3 * lo + hi) / 4, (lo + 3 * hi) / 4, hi]
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    error = math.inf
    for _ in range(100):  # converges in under 10 exchanges for every interval Polar Express meets
        x = torch.tensor(nodes, dtype=torch.float64)
        system = torch.stack([x, x**3, x**5, signs], dim=1)
        a, b, c, new_error = torch.linalg.solve(system, torch.ones(4, dtype=torch.float64)).tolist()
        # p'(x) = a + 3b x^2 + 5c x^4 = 0 is a quadratic in x^2; its roots are the interior extrema.
        root = math.sqrt(9 * b * b - 20 * a * c)
        nodes = [lo, *sorted(math.sqrt((-3 * b + s * root) / (10 * c)) for s in (-1, 1)), hi]
        if abs(new_error - error) <= 1e-15:
            return a, b, c
        error = new_error
    raise RuntimeError(f"Remez exchange for the minimax quintic on [{lo}, {hi}] did not converge")


@functools.cache
def polar_express_coefficients(steps, ell=1e-3, cushion=0.02407327424182761, safety=1.01):
    """Per-iteration (a, b, c) of Polar Express (Amsel, Persson, Musco & Gower 2025,
    arXiv:2505.16932): greedily chosen odd quintics whose composition is the minimax approximation
    of sign(x) on [ell, 1] (their Thm. 4.1). ell = 1e-3 is their bf16 choice (Sec. 4.3). Finite
    precision (Sec. 4.4, App. G): each polynomial is fitted on [max(lo, cushion*hi), hi] so that
    round-off cannot flip small singular values, then recentred on the true interval; and
    p(x) -> p(x / safety) keeps singular values that round-off pushed past hi from growing."""
    lo, hi = ell, 1.0
    coefficients = []
    for _ in range(steps):
        a, b, c = _minimax_odd_quintic(max(lo, cushion * hi), hi)
        recentre = 2 / (a * lo + b * lo**3 + c * lo**5 + a * hi + b * hi**3 + c * hi**5)
        a, b, c = a * recentre, b * recentre, c * recentre
        coefficients.append((a / safety, b / safety**3, c / safety**5))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return tuple(coefficients)


def orthogonalize(G, steps=5, dtype=None):
    """Approximate polar factor U V^T (from the SVD G = U S V^T) of a matrix or a stack of
    matrices (..., rows, cols), by `steps` Polar Express iterations computed in `dtype` (default:
    the compute dtype)."""
    X = G.to(dtype or compute_dtype())
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # iterate on the wide side so that X X^T is the smaller Gram matrix
    # Bring every singular value into (0, 1/1.01], as Algorithm 1 of the paper does.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    coefficients = polar_express_coefficients(steps)
    if X.size(-1) >= GRAM_MIN_ASPECT * X.size(-2):
        X = gram_polar_express(X, coefficients)
    else:
        for a, b, c in coefficients:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X  # p(X) = a X + b (X X^T) X + c (X X^T)^2 X
    return X.mT if tall else X


def gram_polar_express(X, coefficients):
    """The Polar Express iterations of a wide X (..., m, n) carried out on m x m matrices (Gram
    Newton-Schulz, Dao AI Lab 2026): each step p(X) = P X with P = a I + b R + c R^2, R = X X^T, so
    the steps multiply into one m x m factor Q while R follows as P R P, and X meets a matmul only
    at the restart and at the end. In finite precision R drifts from (Q X)(Q X)^T (in bf16 it grows
    spurious eigenvalues and the result blows up), so at step GRAM_RESTART X and R are rebuilt."""
    R, Q = X @ X.mT, None
    for i, (a, b, c) in enumerate(coefficients):
        if i == GRAM_RESTART:
            X = Q @ X
            R, Q = X @ X.mT, None
        P = b * R + c * (R @ R)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else P @ Q
        if i + 1 not in (GRAM_RESTART, len(coefficients)):  # R is rebuilt or no longer needed
            R = P @ R @ P
    return Q @ X


def muon_direction(grad, momentum_buffer, momentum, ns_steps):
    """Muon's step direction for `grad`, updating `momentum_buffer` in place: Nesterov momentum
    (buf = momentum*buf + (1-momentum)*g; use g + momentum*(buf - g)), then orthogonalised."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    nesterov = grad.lerp(momentum_buffer, momentum)
    return orthogonalize(nesterov, ns_steps).to(grad.dtype)


def cautious_step_(p, update, lr, weight_decay):
    """p -= lr * (update + weight_decay * mask * p), mask = (update * p > 0).

    Cautious weight decay: decay only the coordinates where the update already moves the weight
    towards zero, so that decay never fights the update. This is the masking idea of "Cautious
    Optimizers" (Liang et al. 2024, arXiv:2411.16085) applied to decoupled weight decay
    ("Cautious Weight Decay", Chen et al. 2025)."""
    mask = (update * p) > 0
    p.sub_(lr * (update + weight_decay * mask * p))


def adamw_update_(p, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """One AdamW step (decoupled weight decay, bias-corrected moments) in place; `step` counts
    from 1. Same arithmetic as torch.optim.AdamW."""
    beta1, beta2 = betas
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


# ---------------------------------------------------------------------------
# The optimizer


def _world():
    """(world_size, rank) of the default process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _pad_to(flat, length):
    """A 1-D tensor zero-padded at the end to `length` (no copy when it already fits)."""
    if flat.numel() == length:
        return flat
    return torch.cat([flat, flat.new_zeros(length - flat.numel())])


def _interleave(tasks):
    """Run generator tasks round-robin until all finish. A task yields right after it launches an
    asynchronous collective, so its communication overlaps the other tasks' math."""
    while tasks:
        running = []
        for task in tasks:
            try:
                next(task)
                running.append(task)
            except StopIteration:
                pass
        tasks = running


class MuonAdamW(torch.optim.Optimizer):
    """AdamW and Muon param groups in one optimizer that also averages gradients across ranks.

    Each group is a dict with kind "adamw" (params, lr, betas, eps, weight_decay) or "muon"
    (params: 2-D matrices of one shape, lr, momentum, ns_steps, weight_decay). Tensors with at
    least `shard_threshold` elements (a Muon group counts as one tensor of its stacked matrices)
    are sharded across ranks; smaller ones are all-reduced. A parameter without a gradient is
    stepped as if its gradient were zero, so that every rank joins every collective.

    Optimizer state is per rank when sharded: save and load one state_dict per rank, and resume
    with the same world size and shard_threshold (load_state_dict checks both)."""

    def __init__(self, param_groups, shard_threshold=SHARD_THRESHOLD):
        groups = []
        for group in param_groups:
            kind = group.get("kind")
            if kind not in GROUP_DEFAULTS:
                raise ValueError(f"param group kind must be one of {sorted(GROUP_DEFAULTS)}, got {kind!r}")
            if "lr" not in group:
                raise ValueError(f"{kind} param group has no lr")
            unknown = set(group) - set(GROUP_DEFAULTS[kind]) - {"kind", "params", "lr", "initial_lr"}
            if unknown:
                raise ValueError(f"{kind} param group has unknown keys {sorted(unknown)}; "
                                 f"it takes params, lr, {', '.join(GROUP_DEFAULTS[kind])}")
            group = {**GROUP_DEFAULTS[kind], **group, "params": list(group["params"])}
            group.setdefault("initial_lr", group["lr"])
            if kind == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a muon param group needs 2-D matrices of one shape (they are "
                                     f"stacked and orthogonalised together), got shapes {sorted(shapes)}")
            groups.append(group)
        super().__init__(groups, defaults={})
        self.shard_threshold = shard_threshold

    @torch.no_grad()
    def step(self, closure=None):
        """Average gradients over ranks (when distributed) and update every parameter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world, rank = _world()
        tasks = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                tasks += [self._adamw_task(p, group, world, rank) for p in group["params"]]
            else:
                tasks.append(self._muon_task(group, world, rank))
        _interleave(tasks)
        return loss

    def _adamw_task(self, p, group, world, rank):
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if world > 1 and p.numel() >= self.shard_threshold:
            # Shard the flattened tensor: rank r owns elements [r*chunk, (r+1)*chunk).
            n = p.numel()
            chunk = -(-n // world)
            grad_shard = grad.new_empty(chunk)
            work = dist.reduce_scatter_single(grad_shard, _pad_to(grad.reshape(-1), chunk * world),
                                              op=dist.ReduceOp.AVG, async_op=True)
            yield
            work.wait()
            start = min(rank * chunk, n)
            own = p.view(-1)[start:min(start + chunk, n)]
            self._adamw_update(p, own, grad_shard[:own.numel()], group)
            gathered = p.new_empty(chunk * world)
            work = dist.all_gather_single(gathered, _pad_to(own, chunk), async_op=True)
            yield
            work.wait()
            p.view(-1).copy_(gathered[:n])
        else:
            if world > 1:
                work = dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)
                yield
                work.wait()
            self._adamw_update(p, p, grad, group)

    def _adamw_update(self, p, target, grad, group):
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(target), exp_avg_sq=torch.zeros_like(target))
        state["step"] += 1
        adamw_update_(target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                      group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _muon_task(self, group, world, rank):
        params = group["params"]
        n = len(params)
        rows, cols = params[0].shape
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        sharded = world > 1 and n * rows * cols >= self.shard_threshold
        if sharded:
            # Rank r owns matrices r, r + world, r + 2*world, ...; the group is padded with zero
            # matrices to a multiple of world, at most one per rank. `order` lists the matrix
            # index of each slot of the stacked tensor, rank 0's slots first.
            per_rank = -(-n // world)
            order = [i for r in range(world) for i in range(r, per_rank * world, world)]
            own = order[rank * per_rank:(rank + 1) * per_rank]
            zero = torch.zeros_like(params[0])
            grad = grads[0].new_empty(per_rank, rows, cols)
            work = dist.reduce_scatter_single(grad, torch.stack([grads[i] if i < n else zero for i in order]),
                                              op=dist.ReduceOp.AVG, async_op=True)
            yield
            work.wait()
            weights = torch.stack([params[i] if i < n else zero for i in own])
        else:
            grad = torch.stack(grads)
            if world > 1:
                work = dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)
                yield
                work.wait()
            weights = torch.stack(params)

        # The group's momentum (only this rank's matrices) lives in the state of its first param.
        state = self.state[params[0]]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        update = muon_direction(grad, state["momentum_buffer"], group["momentum"], group["ns_steps"])
        # An orthogonal update has unit singular values; sqrt(rows/cols) gives tall matrices the
        # RMS per-element step that square ones get.
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        cautious_step_(weights, update, lr, group["weight_decay"])

        if sharded:
            gathered = weights.new_empty(len(order), rows, cols)
            work = dist.all_gather_single(gathered, weights, async_op=True)
            yield
            work.wait()
            for slot, i in enumerate(order):
                if i < n:
                    params[i].copy_(gathered[slot])
        else:
            for p, w in zip(params, weights):
                p.copy_(w)

    def _layout(self):
        return {"world_size": _world()[0], "shard_threshold": self.shard_threshold}

    def state_dict(self):
        """torch.optim state plus the sharding layout it was saved under (per rank)."""
        state_dict = super().state_dict()
        state_dict["layout"] = self._layout()
        return state_dict

    def load_state_dict(self, state_dict):
        """Load this rank's state_dict; refuses one saved under a different sharding layout."""
        saved, current = state_dict.get("layout"), self._layout()
        if saved != current:
            raise ValueError(f"optimizer state was saved with layout {saved} but this run has {current}: "
                             "sharded optimizer state only resumes with the same number of ranks and "
                             "shard_threshold")
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
