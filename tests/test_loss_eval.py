"""The copy probe of base_eval: known answers and a cross-check against a direct computation."""

import math

import torch
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_copy
from tests.helpers import build_model

BOS = 0


def passages(config, B=4, L=20):
    return torch.randint(1, config.vocab_size, (B, L), generator=torch.Generator().manual_seed(1))


def test_copy_losses_equal_a_direct_cross_entropy(small_model, small_config):
    p = passages(small_config)
    first, second = evaluate_copy(small_model, p, BOS)
    L = p.shape[1]
    x = torch.cat([torch.full((len(p), 1), BOS), p, p], dim=1)
    with torch.no_grad():
        logits = small_model(x[:, :-1])
    nll = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none").view(len(p), -1)
    assert abs(first - nll[:, 1:L].mean().item()) < 1e-5
    assert abs(second - nll[:, L + 1:].mean().item()) < 1e-5
    assert abs(first - second) > 1e-3  # a model with working attention sees the two copies differently


def test_a_model_blind_to_context_scores_both_copies_the_same(small_config):
    # At init every attention and MLP output projection is zero, so a token's logits depend only on
    # itself and (through smear) the token before it, which is the same in both copies. Random
    # embeddings and head make those logits far from uniform.
    model = build_model(small_config, perturb=0)
    with torch.no_grad():
        model.wte.weight.normal_()
        model.lm_head.weight.normal_()
    first, second = evaluate_copy(model, passages(small_config), BOS)
    assert first > 1.1 * math.log(small_config.vocab_size)
    assert abs(first - second) < 1e-5
