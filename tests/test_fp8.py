"""fp8 training linear: accuracy against fp32, what autograd saves, no re-quantisation in
backward, the _scaled_mm call (layout rules checked on CPU, numerics on CUDA), conversion and
disable_fp8."""

import copy

import pytest
import torch
import torch.nn as nn

import nanochat.fp8 as fp8
from nanochat.common import Linear
from nanochat.fp8 import E4M3, E5M2, Float8Linear, convert_to_float8_training, disable_fp8, quantize_fp8


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_and_fp32_grads(layer, x, seed=0):
    """Output, input grad and weight grad of `layer` in fp8 and of the same weight in fp32."""
    grad_out = torch.randn(*x.shape[:-1], layer.out_features, generator=torch.Generator().manual_seed(seed))
    grad_out = grad_out.to(x.device, x.dtype)
    results = []
    for use_fp8 in (True, False):
        xi = x.clone().requires_grad_()
        layer.weight.grad = None
        layer.fp8_enabled = use_fp8
        y = layer(xi)
        y.backward(grad_out)
        results.append((y.detach(), xi.grad, layer.weight.grad.clone()))
    layer.fp8_enabled = True
    return results


def test_quantize_fp8_scales_to_the_format_range():
    torch.manual_seed(0)
    t = torch.randn(64, 64) * 3
    for dtype in (E4M3, E5M2):
        q, inv = quantize_fp8(t, dtype)
        assert q.dtype == dtype and inv.dtype == torch.float32 and inv.dim() == 0
        assert q.float().abs().max() == torch.finfo(dtype).max  # amax maps onto the format's max
        # Round to nearest: relative error <= 2^-(mantissa bits + 1) for normal numbers.
        bound = 2.0 ** -4 if dtype == E4M3 else 2.0 ** -3
        normal = t.abs() > t.abs().max() * 2.0 ** -6
        assert ((q.float() * inv - t).abs() <= bound * t.abs())[normal].all()
    q, _ = quantize_fp8(torch.zeros(16, 16), E4M3)
    assert torch.equal(q.float(), torch.zeros(16, 16))


def test_forward_and_backward_are_close_to_fp32():
    torch.manual_seed(0)
    layer = Float8Linear(256, 128)
    nn.init.normal_(layer.weight, std=256**-0.5)
    x = torch.randn(4, 32, 256)
    (y8, gx8, gw8), (y32, gx32, gw32) = fp8_and_fp32_grads(layer, x)
    assert y8.shape == y32.shape and gx8.shape == x.shape and gw8.shape == layer.weight.shape
    assert gw8.dtype == torch.float32
    # Round-to-nearest with m mantissa bits leaves a relative error uniform within +-2^-(m+1) of
    # the significand, RMS ~0.72 * 2^-(m+1) / sqrt(3) over significands in [1, 2): 2.6% for e4m3,
    # 5.2% for e5m2. Independent errors add in quadrature: output sqrt(2) * 2.6% = 3.7%, gradients
    # sqrt(5.2^2 + 2.6^2)% = 5.8%. Measured: 0.037, 0.059 (grad_input), 0.059 (grad_weight).
    assert relative_error(y8, y32) < 0.05
    assert relative_error(gx8, gx32) < 0.08
    assert relative_error(gw8, gw32) < 0.08


def test_matches_dequantised_reference_exactly():
    """Independent reference: dequantise with torch's own fp8 casts and multiply in float64."""
    torch.manual_seed(1)
    layer = Float8Linear(128, 64)
    x = torch.randn(48, 128)
    y = layer(x)
    x_scale, w_scale = 448 / x.abs().max(), 448 / layer.weight.detach().abs().max()
    xq = (x * x_scale).to(E4M3).double() / x_scale.double()
    wq = (layer.weight.detach() * w_scale).to(E4M3).double() / w_scale.double()
    torch.testing.assert_close(y.double(), xq @ wq.T, rtol=1e-5, atol=1e-5)


def test_saves_only_fp8_tensors_and_scalar_scales():
    torch.manual_seed(0)
    layer = Float8Linear(128, 128)
    x = torch.randn(2, 16, 128, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert sorted(saved, key=str) == sorted([(E4M3, x.numel()), (torch.float32, 1),
                                             (E4M3, layer.weight.numel()), (torch.float32, 1)], key=str)
    assert x.grad is not None and layer.weight.grad is not None


def test_backward_quantises_only_grad_output(monkeypatch):
    calls = []

    def counting_quantize(t, dtype):
        calls.append(dtype)
        return quantize_fp8(t, dtype)

    monkeypatch.setattr(fp8, "quantize_fp8", counting_quantize)
    layer = Float8Linear(128, 128)
    y = layer(torch.randn(32, 128, requires_grad=True))
    assert calls == [E4M3, E4M3]  # input and weight, once each
    y.sum().backward()
    assert calls == [E4M3, E4M3, E5M2]


def test_scaled_mm_calls_follow_the_cuda_layout_rules(monkeypatch):
    """Route every matmul through the real torch._scaled_mm (it has a CPU kernel) and check each
    call against what the CUDA kernel demands: fp8 operands, not both e5m2, first row-major,
    second column-major, dims multiples of 16, 0-d fp32 scales. Results must equal the reference."""
    torch.manual_seed(0)
    layer = Float8Linear(128, 64)
    x = torch.randn(2, 16, 128)
    (y_ref, gx_ref, gw_ref), _ = fp8_and_fp32_grads(layer, x)

    real_scaled_mm, calls = torch._scaled_mm, []

    def checked_scaled_mm(a, b, scale_a, scale_b, out_dtype):
        assert a.dtype in (E4M3, E5M2) and b.dtype in (E4M3, E5M2) and (a.dtype, b.dtype) != (E5M2, E5M2)
        assert a.stride(1) == 1 and b.stride(0) == 1, "a row-major, b column-major"
        assert all(d % 16 == 0 for d in (*a.shape, *b.shape))
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.dim() == scale_b.dim() == 0
        calls.append(out_dtype)
        return real_scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)

    x_fp8, _ = quantize_fp8(x.reshape(-1, 128), E4M3)
    assert not fp8.use_scaled_mm(x_fp8, x_fp8.T)  # CPU tensors take the reference path
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm)
    monkeypatch.setattr(fp8, "use_scaled_mm", lambda a, b: True)
    (y, gx, gw), _ = fp8_and_fp32_grads(layer, x)
    monkeypatch.undo()
    assert calls == [torch.float32] * 3  # forward, grad_input, grad_weight
    for got, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert got.dtype == ref.dtype and relative_error(got, ref) < 1e-6  # fp32 rounding only


def test_conversion_filter_and_disable_fp8():
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(big=Linear(256, 128), odd=Linear(136, 130), small=Linear(64, 64),
                               torch_linear=nn.Linear(256, 256), square=Linear(128, 128)))
    weights = {name: m.weight for name, m in model.items()}
    assert convert_to_float8_training(model) == 2
    assert {n for n, m in model.items() if isinstance(m, Float8Linear)} == {"big", "square"}
    assert all(m.weight is weights[n] for n, m in model.items())  # same Parameters, same shapes
    assert isinstance(model["big"], Linear)  # FLOP counting sees it as a Linear
    assert convert_to_float8_training(model) == 0  # already converted

    x = torch.randn(8, 256)
    with disable_fp8(model):
        assert torch.equal(model["big"](x), x @ model["big"].weight.T)
    fp8_out = model["big"](x)
    assert not torch.equal(fp8_out, x @ model["big"].weight.T)
    assert relative_error(fp8_out, x @ model["big"].weight.T) < 0.05

    head = nn.ModuleDict(dict(lm_head=Linear(256, 512), c_fc=Linear(256, 512)))
    assert convert_to_float8_training(head) == 1 and type(head["lm_head"]) is Linear

    custom = nn.ModuleDict(dict(a=Linear(64, 64), b=Linear(64, 64)))
    assert convert_to_float8_training(custom, module_filter_fn=lambda m, fqn: fqn == "b") == 1
    assert type(custom["a"]) is Linear and type(custom["b"]) is Float8Linear


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fp8.has_fp8_tensor_cores()),
                    reason="needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9)")
def test_cuda_scaled_mm_matches_cpu_reference():
    torch.manual_seed(0)
    layer = Float8Linear(512, 256)
    nn.init.normal_(layer.weight, std=512**-0.5)
    x = torch.randn(4, 64, 512)
    for dtype in (torch.float32, torch.bfloat16):  # bf16 is the training activation dtype
        (y_cpu, gx_cpu, gw_cpu), _ = fp8_and_fp32_grads(layer, x.to(dtype))
        gpu_layer = copy.deepcopy(layer).cuda()
        xg = x.to("cuda", dtype)
        assert fp8.use_scaled_mm(xg.reshape(-1, 512).to(E4M3), gpu_layer.weight.T.to(E4M3))
        (y, gx, gw), _ = fp8_and_fp32_grads(gpu_layer, xg)
        assert y.dtype == gx.dtype == dtype and gw.dtype == torch.float32
        # Same fp8 operands and scales; fp32 summation order differs, then bf16 rounds (2^-8).
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
        for got, ref in ((y, y_cpu), (gx, gx_cpu), (gw, gw_cpu)):
            torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=tolerance, atol=tolerance)
