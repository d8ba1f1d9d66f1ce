"""Causal self-attention kernels behind one interface, for training and for cached inference.

Layout everywhere is (B, T, H, D), FlashAttention's. Two backends:
- FlashAttention-3 (Hopper, bf16), loaded at run time through the `kernels` package;
- PyTorch SDPA, which honours sliding windows in every mode: training (a cached window mask),
  chunked prefill against a cache (per-row position mask) and single-token decode (K/V sliced to
  the last window+1 positions, as upstream nanochat does).

A window of None means full causal attention; an int w lets position i see positions i-w..i.
"""

import functools

import torch
import torch.nn.functional as F

from nanochat.common import logger

FA3_KERNEL_REPO = "varunneal/flash-attention-3"


@functools.cache
def _load_fa3():
    """The FlashAttention-3 module on a Hopper GPU, else None (all other machines use SDPA)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    try:
        from kernels import get_kernel
        module = get_kernel(FA3_KERNEL_REPO)
    except Exception as exc:  # no `kernels` package, no network for the first fetch, ABI mismatch
        logger.warning("FlashAttention-3 unavailable (%s): using PyTorch SDPA", exc)
        return None
    logger.info("attention: FlashAttention-3 from %s", FA3_KERNEL_REPO)
    return module


def _use_fa3(q):
    return q.is_cuda and q.dtype == torch.bfloat16 and _load_fa3() is not None


def _fa3_window(window):
    return (-1, 0) if window is None else (window, 0)


@functools.lru_cache(maxsize=32)
def _window_mask(T, window, device):
    """Boolean (T, T) mask of a causal sliding window; cached because training reuses it every step."""
    row = torch.arange(T, device=device)[:, None]
    col = torch.arange(T, device=device)[None, :]
    return (col <= row) & (row - col <= window)


def _sdpa(q, k, v, mask=None, is_causal=False):
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=is_causal, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def attention(q, k, v, window=None, key_valid=None):
    """Causal attention over a whole sequence (training, or a forward without a cache).

    key_valid: optional (B, T) bool, False for padded positions (left-padded audio) that no
    query may attend to. A padded query still sees itself so its softmax stays finite."""
    T = q.size(1)
    if key_valid is None and _use_fa3(q):
        return _load_fa3().flash_attn_func(q, k, v, causal=True, window_size=_fa3_window(window))
    if key_valid is None and (window is None or window >= T - 1):
        return _sdpa(q, k, v, is_causal=True)
    mask = _window_mask(T, window if window is not None else T, q.device)
    if key_valid is not None:
        eye = torch.eye(T, dtype=torch.bool, device=q.device)
        mask = mask & (key_valid[:, None, :] | eye)  # (B, T, T)
        mask = mask[:, None]
    return _sdpa(q, k, v, mask=mask)


def attention_with_cache(q, k, v, k_cache, v_cache, positions, window=None):
    """Write this chunk's k, v into the cache at each row's positions and attend.

    q, k, v: (B, T, H, D) for T new tokens. k_cache, v_cache: (B, T_max, H_kv, D) of one layer.
    positions: a KVPositions with the host-side start of each row (no GPU sync per step)."""
    B, T = q.size(0), q.size(1)
    if _use_fa3(q):
        return _load_fa3().flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=positions.starts_device_int32,
            causal=True, window_size=_fa3_window(window))
    if positions.uniform:
        start = positions.min_start
        k_cache[:, start:start + T] = k
        v_cache[:, start:start + T] = v
    else:
        index = positions.index(T)  # (B, T) absolute position of every new token
        rows = torch.arange(B, device=q.device)[:, None]
        k_cache[rows, index] = k
        v_cache[rows, index] = v

    if positions.uniform and positions.min_start == 0:
        return attention(q, k, v, window=window)  # prefill of an empty cache: the chunk is all there is
    end = positions.max_start + T
    lo = 0 if window is None else max(0, positions.min_start - window)
    keys, values = k_cache[:, lo:end], v_cache[:, lo:end]
    if positions.uniform and T == 1:
        # Single-token decode: slicing to the last window+1 keys is the whole mask.
        return _sdpa(q, keys, values)
    query_pos = positions.index(T)[:, :, None]                      # (B, T, 1)
    key_pos = torch.arange(lo, end, device=q.device)[None, None]    # (1, 1, Tk)
    mask = key_pos <= query_pos
    if window is not None:
        mask = mask & (query_pos - key_pos <= window)
    return _sdpa(q, keys, values, mask=mask[:, None])
