"""The SDPA backend against a naive attention written here, in every mode the model uses."""

import math

import pytest
import torch

from nanochat.attention import attention, attention_with_cache
from nanochat.engine import KVPositions


def naive_attention(q, k, v, query_pos, key_pos, window=None, key_valid=None):
    """Loop-free but mask-explicit reference: softmax(q k^T / sqrt(D)) v with GQA by repetition."""
    B, Tq, H, D = q.shape
    groups = H // k.size(2)
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    qp, kp = query_pos[:, None, :, None], key_pos[:, None, None, :]
    allowed = kp <= qp
    if window is not None:
        allowed = allowed & (qp - kp <= window)
    if key_valid is not None:
        allowed = allowed & (key_valid[:, None, None, :] | (qp == kp))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def qkv(B, T, H, H_kv, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g), torch.randn(B, T, H_kv, D, generator=g),
            torch.randn(B, T, H_kv, D, generator=g))


@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("H,H_kv", [(4, 4), (4, 2), (6, 1)])
def test_training_attention(window, H, H_kv):
    B, T = 2, 33
    q, k, v = qkv(B, T, H, H_kv)
    pos = torch.arange(T).expand(B, T)
    expected = naive_attention(q, k, v, pos, pos, window)
    torch.testing.assert_close(attention(q, k, v, window=window), expected, atol=1e-5, rtol=1e-5)


def test_left_padded_keys_are_invisible():
    B, T, H = 3, 20, 4
    q, k, v = qkv(B, T, H, 2)
    pads = torch.tensor([0, 5, 11])
    key_valid = torch.arange(T)[None, :] >= pads[:, None]
    pos = torch.arange(T).expand(B, T)
    got = attention(q, k, v, window=6, key_valid=key_valid)
    torch.testing.assert_close(got, naive_attention(q, k, v, pos, pos, 6, key_valid), atol=1e-5, rtol=1e-5)
    # The valid part of row 1 equals that row attended on its own, without the padding.
    alone = attention(q[1:2, 5:], k[1:2, 5:], v[1:2, 5:], window=6)
    torch.testing.assert_close(got[1:2, 5:], alone, atol=1e-5, rtol=1e-5)


def run_cached(q, k, v, starts, chunk_sizes, window):
    """Feed (q, k, v) through a cache in chunks; rows start at their own positions."""
    B, T, H_kv, D = k.shape
    capacity = int(starts.max()) + T
    k_cache = torch.zeros(B, capacity, H_kv, D)
    v_cache = torch.zeros(B, capacity, H_kv, D)
    # Rows that start later than 0 first get a prefix of their own, written the same way.
    prefix_k = torch.randn(B, int(starts.max()), H_kv, D)
    prefix_v = torch.randn(B, int(starts.max()), H_kv, D)
    for b in range(B):
        n = int(starts[b])
        k_cache[b, :n], v_cache[b, :n] = prefix_k[b, :n], prefix_v[b, :n]
    outputs, lengths = [], starts.clone()
    t = 0
    for size in chunk_sizes:
        positions = KVPositions(lengths, q.device)
        outputs.append(attention_with_cache(q[:, t:t + size], k[:, t:t + size], v[:, t:t + size],
                                            k_cache, v_cache, positions, window))
        lengths = lengths + size
        t += size
    return torch.cat(outputs, dim=1), k_cache, v_cache


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunks", [[24], [10, 9, 5], [1] * 24, [8] + [1] * 16])
def test_cached_attention_equals_reference(window, chunks):
    B, T, H, H_kv = 3, 24, 4, 2
    q, k, v = qkv(B, T, H, H_kv, seed=1)
    for starts in (torch.tensor([0, 0, 0]), torch.tensor([3, 0, 7])):
        got, k_cache, v_cache = run_cached(q, k, v, starts, chunks, window)
        for b in range(B):
            n = int(starts[b])
            keys, values = k_cache[b:b + 1, :n + T], v_cache[b:b + 1, :n + T]
            query_pos = torch.arange(n, n + T)[None]
            key_pos = torch.arange(n + T)[None]
            expected = naive_attention(q[b:b + 1], keys, values, query_pos, key_pos, window)
            torch.testing.assert_close(got[b:b + 1], expected, atol=1e-5, rtol=1e-5)


def test_single_token_decode_slices_to_window():
    """With a window, one-token decode must ignore keys older than window positions."""
    B, H, D, window, n = 1, 2, 8, 4, 30
    k_cache, v_cache = torch.randn(B, n + 1, H, D), torch.randn(B, n + 1, H, D)
    q, k, v = torch.randn(B, 1, H, D), torch.randn(B, 1, H, D), torch.randn(B, 1, H, D)
    positions = KVPositions(torch.tensor([n]), q.device)
    before = attention_with_cache(q, k, v, k_cache.clone(), v_cache.clone(), positions, window)
    k_cache[:, : n - window] = 1e3  # poison everything outside the window
    after = attention_with_cache(q, k, v, k_cache, v_cache, positions, window)
    torch.testing.assert_close(before, after)
