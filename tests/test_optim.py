"""MuonAdamW: AdamW against torch.optim.AdamW, Polar Express against the paper and the SVD, the
Muon step against its formula, training, checkpoint resume, and 2-process gloo runs."""

import copy
import io
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nanochat.optim import MuonAdamW, orthogonalize, polar_express_coefficients
from tests import _dist_optim_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Algorithm 1 of Amsel et al. 2025 (arXiv:2505.16932), before their 1.01 safety factor.
PAPER_COEFFICIENTS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
]

# After normalisation the design range of singular values is [1e-3, 1] / 1.01. Five iterations map
# it into [0.8401, 1.1236] (float64 evaluation of the scalar composition); the band below leaves
# ~1% for fp32/bf16 round-off in the matrix iteration (measured extremes: 0.863 and 1.1263 in bf16).
BAND = (0.83, 1.135)


def composed_polynomial(x, steps):
    """The scalar map orthogonalize() applies to each normalised singular value, in float64."""
    for a, b, c in polar_express_coefficients(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def test_polar_express_coefficients_reproduce_the_paper():
    derived = polar_express_coefficients(len(PAPER_COEFFICIENTS), safety=1.0)
    for ours, theirs in zip(derived, PAPER_COEFFICIENTS):
        for x, y in zip(ours, theirs):
            assert x == pytest.approx(y, rel=1e-12)
    x = torch.logspace(-3, 0, 10_000, dtype=torch.float64) / 1.01
    y = composed_polynomial(x, 5)
    assert BAND[0] < y.min() < 0.85 and 1.12 < y.max() < BAND[1]


@pytest.mark.parametrize("shape", [(96, 96), (48, 128), (128, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalize_is_the_polar_factor_up_to_the_band(shape, dtype):
    torch.manual_seed(0)
    G = torch.randn(shape)
    O = orthogonalize(G, steps=5, dtype=dtype).float()
    assert O.shape == G.shape and orthogonalize(G, dtype=dtype).dtype == dtype
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)

    # The iteration is an odd polynomial of G: U^T O V is diagonal with the scalar map of S.
    # fp32 matches it to 5e-5 (measured); bf16 (8-bit mantissa, 15 chained matmuls) deviates by
    # 2.8-4.7% in relative Frobenius norm (measured over 3 seeds and these shapes).
    deviation = U.T @ O.double() @ Vh.T - torch.diag(composed_polynomial(S / (G.norm().double() * 1.01), 5))
    if dtype == torch.float32:
        assert deviation.abs().max() < 2e-4
    else:
        assert deviation.norm() / S.numel() ** 0.5 < 0.06

    # Singular values inside the design range land in the band; Gaussian square matrices have a
    # few below 1e-3 (sigma_min ~ n^-1.5 of the norm), which are pushed up but not all the way.
    singular = torch.linalg.svdvals(O.double())
    in_range = S / G.norm().double() >= 1e-3
    assert in_range.sum() >= min(shape) - 2
    assert (singular[in_range] > BAND[0]).all() and (singular < BAND[1]).all()
    assert (singular > 0).all()

    # Close to the exact polar factor U V^T (measured cosine 0.990-0.997).
    polar = (U @ Vh).float()
    cosine = (O * polar).sum() / (O.norm() * polar.norm())
    assert cosine > 0.985


@pytest.mark.parametrize("shape", [(32, 160), (160, 32), (3, 40, 100)])
def test_gram_iteration_matches_the_plain_iteration(shape):
    """Wide and tall matrices take the Gram path; it equals the plain iteration, run here in float64."""
    torch.manual_seed(0)
    # Gradient-like: singular values spread from 1 to 1e-4.
    G = torch.randn(shape, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    G = U @ torch.diag_embed(torch.logspace(0, -4, S.size(-1), dtype=torch.float64).expand_as(S)) @ Vh
    X = G.mT if G.size(-2) > G.size(-1) else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    for a, b, c in polar_express_coefficients(5):
        A = X @ X.mT
        X = a * X + b * A @ X + c * A @ A @ X
    expected = X.mT if G.size(-2) > G.size(-1) else X
    got = orthogonalize(G.float(), steps=5, dtype=torch.float32).double()
    assert (got - expected).abs().max() < 2e-5  # the plain fp32 iteration: 3e-6 (measured)


def test_orthogonalize_batches_and_maps_zero_to_zero():
    torch.manual_seed(0)
    G = torch.randn(3, 16, 40)
    stacked = orthogonalize(G, dtype=torch.float32)
    for i in range(3):
        torch.testing.assert_close(stacked[i], orthogonalize(G[i], dtype=torch.float32), atol=1e-5, rtol=0)
    assert torch.equal(orthogonalize(torch.zeros(8, 4), dtype=torch.float32), torch.zeros(8, 4))


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    reference = copy.deepcopy(model)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = MuonAdamW([dict(kind="adamw", params=model.parameters(), **hyper)])
    theirs = torch.optim.AdamW(reference.parameters(), **hyper)
    initial = [p.detach().clone() for p in model.parameters()]
    for _ in range(10):
        x, y = torch.randn(32, 10), torch.randn(32, 4)
        for m, opt in ((model, ours), (reference, theirs)):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for p, q, p0 in zip(model.parameters(), reference.parameters(), initial):
        assert (p - p0).abs().max() > 1e-2  # the runs moved well past the tolerance
        assert (p - q).abs().max() <= 1e-6


def test_muon_step_matches_its_formula():
    """Two steps against the spec written out by hand: Nesterov momentum, Polar Express,
    sqrt(rows/cols) LR multiplier for tall matrices, cautious weight decay."""
    torch.manual_seed(0)
    p = torch.randn(48, 24, requires_grad=True)
    lr, momentum, wd = 0.1, 0.9, 0.5
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=lr, momentum=momentum, weight_decay=wd)])
    expected, buf = p.detach().clone(), torch.zeros(48, 24)
    for _ in range(2):
        g = torch.randn(48, 24)
        p.grad = g.clone()
        opt.step()
        buf = momentum * buf + (1 - momentum) * g
        update = orthogonalize((1 - momentum) * g + momentum * buf, dtype=torch.float32)
        mask = (update * expected) > 0
        assert 0.3 < mask.float().mean() < 0.7  # the mask really selects
        uncautious = expected - lr * math.sqrt(2) * (update + wd * expected)
        expected = expected - lr * math.sqrt(2) * (update + wd * mask * expected)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)
        assert (p.detach() - uncautious).abs().max() > 1e-3


def test_muon_trains_a_two_layer_regression():
    torch.manual_seed(0)
    X = torch.randn(512, 32)
    teacher_in, teacher_out = torch.randn(64, 32) / 32**0.5, torch.randn(8, 64) / 64**0.5
    Y = torch.tanh(X @ teacher_in.T) @ teacher_out.T
    w_in = (torch.randn(64, 32) / 32**0.5).requires_grad_()
    w_out = torch.zeros(8, 64, requires_grad=True)
    opt = MuonAdamW([dict(kind="muon", params=[w_in], lr=0.05), dict(kind="muon", params=[w_out], lr=0.05)])
    steps, losses = 150, []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1 - step / steps)
        loss = ((torch.tanh(X @ w_in.T) @ w_out.T - Y) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.05 * losses[0]  # measured: 0.37 -> 0.0038


def test_groups_are_validated():
    a, b = torch.zeros(4, 4, requires_grad=True), torch.zeros(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(kind="sgd", params=[a], lr=1.0)])
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[a, b], lr=1.0)])
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[torch.zeros(4, requires_grad=True)], lr=1.0)])
    with pytest.raises(ValueError, match="unknown keys"):
        MuonAdamW([dict(kind="muon", params=[a], lr=1.0, betas=(0.9, 0.95))])
    with pytest.raises(ValueError, match="no lr"):
        MuonAdamW([dict(kind="adamw", params=[a])])
    opt = MuonAdamW([dict(kind="adamw", params=[a], lr=0.5), dict(kind="muon", params=[b], lr=0.02)])
    assert [g["initial_lr"] for g in opt.param_groups] == [0.5, 0.02]
    assert opt.param_groups[1]["ns_steps"] == 5


def test_state_dict_resumes_identically():
    final, resumed, _ = worker.run(shard_threshold=0)
    for name in final:
        assert torch.equal(final[name], resumed[name]), name


def test_state_dict_refuses_another_layout():
    p = worker.make_params()
    opt = worker.make_optimizer(p, shard_threshold=0)
    worker.train(p, opt, *worker.make_batch(), 0, 1)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match="same number of ranks"):
        worker.make_optimizer(p, shard_threshold=100).load_state_dict(torch.load(buffer, weights_only=True))


def test_two_gloo_ranks_match_one_process_on_the_global_batch(tmp_path):
    out = str(tmp_path / "result")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_dist_optim_worker.py"), out]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]

    single, _, single_state = worker.run(shard_threshold=2**40)
    initial = worker.make_params()
    for mode in ("sharded", "all_reduce"):
        for name, expected in single.items():
            got = ranks[0][mode][name]
            assert torch.equal(got, ranks[1][mode][name]), (mode, name)  # ranks agree bitwise
            assert torch.equal(got, ranks[0][mode + "_resumed"][name]), (mode, name)  # sharded state resumes
            # Half-batch gradients averaged across ranks equal the full-batch gradient up to fp32
            # summation order (~1e-7 relative); five Muon/Adam steps keep it there (measured 2.5e-7).
            scale = expected.abs().max()
            assert (got - expected).abs().max() <= 1e-6 * scale, (mode, name)
            assert (expected - initial[name].detach()).abs().max() > 100 * 1e-6 * scale

    def close(got, expected):
        return (got - expected).abs().max() <= 1e-6 * expected.abs().max()

    # Unsharded, every rank holds the whole state.
    for rank in ranks:
        assert all(close(rank["all_reduce_state"][k], single_state[k]) for k in single_state)
    # Sharded, each rank holds only its shard: AdamW state for its slice of the flattened tensor
    # (360 elements -> 180 + 180, 3 -> 2 + 1), Muon momentum for matrices i with i % 2 == rank
    # (group of 3 -> rank 0 owns 0 and 2, rank 1 owns 1 and a zero pad; group of 2 -> one each).
    state0, state1 = ranks[0]["sharded_state"], ranks[1]["sharded_state"]
    inp = single_state["inp"].reshape(-1)
    assert close(state0["inp"], inp[:180]) and close(state1["inp"], inp[180:])
    assert close(state0["gain"], single_state["gain"][:2]) and close(state1["gain"], single_state["gain"][2:])
    w, v = single_state["w"], single_state["v"]
    assert close(state0["w"], w[[0, 2]]) and close(state1["w"][0], w[1]) and not state1["w"][1].any()
    assert close(state0["v"], v[[0]]) and close(state1["v"], v[[1]])
