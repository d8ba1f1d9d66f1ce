"""Tensorwise fp8 training for nanochat's Linear layers.

Forward quantises the input and the weight to float8_e4m3fn, each with one amax-based scale,
and runs a scaled matmul. It saves the fp8 tensors and their inverse scales for backward, which
therefore neither re-quantises them nor keeps high-precision activations alive (1 byte per saved
element instead of 2-4). Backward quantises grad_output to float8_e5m2 and computes both
gradients from the saved fp8 tensors.

On CUDA with fp8 tensor cores (compute capability >= 8.9) the matmuls are torch._scaled_mm;
elsewhere a reference path dequantises to fp32 with the same numerics up to summation order."""

import functools
from contextlib import contextmanager

import torch

from nanochat.common import Linear

E4M3 = torch.float8_e4m3fn  # 3 mantissa bits, max 448: activations and weights
E5M2 = torch.float8_e5m2  # 2 mantissa bits, max 57344: gradients need the range more than precision


@functools.cache
def has_fp8_tensor_cores():
    """Whether the CUDA device has fp8 tensor cores (sm >= 8.9). Asked on first use, not at import:
    reading the capability initialises CUDA, which a process must not do before forking workers."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def quantize_fp8(t, dtype):
    """(fp8 tensor, inverse scale): t * scale rounded to `dtype`, scale = fp8_max / amax(|t|), so
    that t ~= q.float() * inverse_scale. The inverse scale is a 0-d fp32 tensor (no host sync)."""
    fp8_max = torch.finfo(dtype).max
    # An all-zero tensor (zero-initialised projections) must quantise to zeros, not NaN.
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = fp8_max / amax
    # Rounding of t*scale can overshoot fp8_max, which float8_e4m3fn (no inf) would turn into NaN.
    q = (t.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)
    return q, scale.reciprocal()


def use_scaled_mm(a, b):
    """Whether fp8_mm runs on fp8 tensor cores: torch._scaled_mm needs sm >= 8.9 and every
    dimension a multiple of 16."""
    return a.is_cuda and has_fp8_tensor_cores() and all(d % 16 == 0 for d in (*a.shape, *b.shape))


def fp8_mm(a, a_inv, b, b_inv, out_dtype):
    """(a * a_inv) @ (b * b_inv) for fp8 matrices a (M, K), b (K, N) and 0-d inverse scales."""
    if use_scaled_mm(a, b):
        # cuBLASLt takes the first operand row-major and the second column-major.
        return torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=a_inv, scale_b=b_inv,
                                out_dtype=out_dtype)
    # fp8 products are exact in fp32, so this is the tensor-core result up to summation order.
    return ((a.float() @ b.float()) * (a_inv * b_inv)).to(out_dtype)


class _Float8Matmul(torch.autograd.Function):
    """y = x @ W^T with x, W in e4m3 and grad_output in e5m2; saves only fp8 tensors and scales."""

    @staticmethod
    def forward(ctx, x, weight):
        x2d = x.reshape(-1, x.shape[-1])
        x_fp8, x_inv = quantize_fp8(x2d, E4M3)
        w_fp8, w_inv = quantize_fp8(weight, E4M3)
        ctx.save_for_backward(x_fp8, x_inv, w_fp8, w_inv)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        out = fp8_mm(x_fp8, x_inv, w_fp8.t(), w_inv, x.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        x_fp8, x_inv, w_fp8, w_inv = ctx.saved_tensors
        g_fp8, g_inv = quantize_fp8(grad_output.reshape(-1, grad_output.shape[-1]), E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_mm(g_fp8, g_inv, w_fp8, w_inv, ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = fp8_mm(g_fp8.t(), g_inv, x_fp8, x_inv, ctx.w_dtype)
        return grad_x, grad_w


class Float8Linear(Linear):
    """A Linear whose matmuls run in fp8. It keeps the fp32 master `weight` of the same shape, so
    parameter counts, FLOP estimates, checkpoints and optimizer groups are unchanged."""

    fp8_enabled = True  # disable_fp8() turns it off per module

    def forward(self, x):
        if not self.fp8_enabled:
            return super().forward(x)
        return _Float8Matmul.apply(x, self.weight)


def default_fp8_filter(module, fqn):
    """Convert only matmuls _scaled_mm can run (dims multiples of 16) and big enough (min dim
    >= 128, the upstream rule) for fp8 throughput to beat the cost of quantising. The output head
    keeps the compute dtype, as in DeepSeek-V3's fp8 recipe (arXiv:2412.19437, 3.3.1); the GPT's
    fused loss reads its weight directly."""
    dims = (module.in_features, module.out_features)
    return all(d % 16 == 0 for d in dims) and min(dims) >= 128 and fqn.split(".")[-1] != "lm_head"


def convert_to_float8_training(model, module_filter_fn=None):
    """Turn, in place, every nanochat Linear in `model` that module_filter_fn(module, fqn) accepts
    (default: default_fp8_filter) into a Float8Linear. Returns how many were converted."""
    accept = module_filter_fn or default_fp8_filter
    converted = 0
    for fqn, module in model.named_modules():
        if type(module) is Linear and accept(module, fqn):
            # Re-class rather than rebuild: the module keeps its very Parameter objects, so an
            # optimizer built earlier, hooks and state_dict keys are all unaffected.
            module.__class__ = Float8Linear
            converted += 1
    return converted


@contextmanager
def disable_fp8(model):
    """Within the block, every Float8Linear in `model` runs the plain high-precision matmul
    (for evaluation); the previous settings come back on exit."""
    modules = [m for m in model.modules() if isinstance(m, Float8Linear)]
    previous = [m.fp8_enabled for m in modules]
    for m in modules:
        m.fp8_enabled = False
    try:
        yield
    finally:
        for m, enabled in zip(modules, previous):
            m.fp8_enabled = enabled
