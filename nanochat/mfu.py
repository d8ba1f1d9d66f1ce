"""Model FLOPs utilisation: achieved FLOP/s against the device's peak.

Peaks are dense (no sparsity) vendor figures; a CPU has no table entry that fits every SKU,
so its peak is measured with a large matmul in the compute dtype."""

import time

import torch

# Dense bf16 tensor-core peaks in FLOP/s (vendor datasheets).
GPU_PEAK_BF16 = {
    "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A10": 125e12, "L4": 121e12, "L40": 181e12, "4090": 165e12, "5090": 209e12,
}


_best_measured = {}  # (device type, dtype, n) -> the best FLOP/s any call in this process has seen


def measured_matmul_peak(device_type="cpu", dtype=torch.float32, n=1024, repeats=20):
    """Best FLOP/s of an n x n matmul on this device: what a perfectly efficient model could reach.
    The best of many short runs, and of every earlier call in this process: other processes can
    hold the cores through a whole measurement (a run started beside a test suite measured half
    the quiet peak and logged MFU over 100%), so callers re-measure now and then."""
    device = torch.device(device_type)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    key = (device_type, dtype, n)
    _best_measured[key] = max(_best_measured.get(key, 0.0), 2 * n ** 3 / best)
    return _best_measured[key]


def peak_flops(device, dtype):
    """(peak FLOP/s, where the figure comes from) for MFU on this device and dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                # Without bf16, a tensor-core GPU runs fp32 matmuls as TF32 at half the bf16 rate.
                return (peak if dtype == torch.bfloat16 else peak / 2), f"datasheet {name}"
    return measured_matmul_peak(device.type, dtype), f"measured {device.type} {dtype} matmul"
