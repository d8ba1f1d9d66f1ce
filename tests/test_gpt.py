"""The GPT: cached inference vs full forwards, the audio hook, dtype policy, known sizes."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat.engine import KVCache
from nanochat import gpt as gpt_module
from nanochat.gpt import GPT, GPTConfig, config_for_depth, layer_windows
from tests.helpers import build_model

T = 200  # longer than the short window (128) of small_config


def tokens(B, n, vocab=300, seed=0):
    return torch.randint(0, vocab, (B, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_config_exercises_every_feature(small_model):
    assert small_model.windows == [128, 128, None, None]
    assert set(small_model.value_embeds.keys()) == {"1", "3"}
    assert small_model.config.n_kv_head < small_model.config.n_head
    assert small_model.smear_lambda.item() != 0 and small_model.backout_lambda.item() != 0


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[20] + [1] * (T - 20), [70, 90, 40], [1] * T])
def test_cached_forward_equals_full_forward(small_model, chunks):
    idx = tokens(2, T)
    full = small_model(idx)
    cache = KVCache(small_model, 2, T)
    pieces, t = [], 0
    for n in chunks:
        pieces.append(small_model(idx[:, t:t + n], kv_cache=cache))
        t += n
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4


@torch.no_grad()
def test_last_only_logits(small_model):
    idx, audio = tokens(2, 30), torch.randn(2, 7, 64)
    full = small_model(idx, audio_features=audio)
    torch.testing.assert_close(small_model(idx, audio_features=audio, last_only=True), full[:, -1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="last_only"):
        small_model(idx, idx, last_only=True)


@torch.no_grad()
def test_cached_forward_with_audio_prefix_equals_full_forward(small_model):
    idx = tokens(2, 150)
    audio = torch.randn(2, 37, 64)
    full = small_model(idx, audio_features=audio)
    cache = KVCache(small_model, 2, 37 + 150)
    pieces = [small_model(idx[:, :30], kv_cache=cache, audio_features=audio)]
    pieces.append(small_model(idx[:, 30:100], kv_cache=cache))
    pieces += [small_model(idx[:, t:t + 1], kv_cache=cache) for t in range(100, 150)]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4


@torch.no_grad()
def test_audio_shapes_and_text_only_loss(small_model):
    B, T_text, T_a = 3, 40, 25
    idx, targets = tokens(B, T_text), tokens(B, T_text, seed=1)
    targets[0, :5] = -1
    audio = torch.randn(B, T_a, 64)
    logits = small_model(idx, audio_features=audio)
    assert logits.shape == (B, T_text, 300) and logits.dtype == torch.float32
    loss = small_model(idx, targets, audio_features=audio)
    valid = targets != -1
    by_hand = -(logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0])[valid].mean()
    torch.testing.assert_close(loss, by_hand, atol=1e-5, rtol=1e-5)
    per_token = small_model(idx, targets, audio_features=audio, loss_reduction="none")
    assert per_token.shape == (B, T_text) and (per_token[~valid] == 0).all()


def test_softcap_equals_tanh_form():
    x = torch.linspace(-200, 200, 100_001, dtype=torch.float64)
    reference = 15 * torch.tanh(x / 15)
    assert (gpt_module.softcap(x.float()).double() - reference).abs().max() < 5e-6  # fp32 tanh: 1.3e-6
    assert (gpt_module.softcap(x) - reference).abs().max() < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_matches_logits_and_autograd(small_model, monkeypatch, reduction):
    """The chunked loss with in-pass gradients vs cross-entropy on the model's own logits with
    autograd: same loss, same gradient for every parameter, over several chunks."""
    monkeypatch.setattr(gpt_module, "LOSS_CHUNK_ELEMENTS_CPU", 37 * small_model.config.vocab_size)
    idx, targets = tokens(3, 50), tokens(3, 50, seed=1)
    targets[:, ::4] = -1

    def grads(loss):
        small_model.zero_grad(set_to_none=True)
        loss.backward()
        return {name: p.grad.clone() for name, p in small_model.named_parameters() if p.grad is not None}

    fused = small_model(idx, targets, loss_reduction=reduction)
    fused_grads = grads(fused * 1.5)
    plain = F.cross_entropy(small_model(idx).transpose(1, 2), targets, ignore_index=-1, reduction=reduction)
    plain_grads = grads(plain * 1.5)
    small_model.zero_grad(set_to_none=True)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and "lm_head.weight" in fused_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        per_token = small_model(idx, targets, loss_reduction="none")
    torch.testing.assert_close(per_token, small_model(idx, targets, loss_reduction="none").detach(), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_zero_length_audio_is_no_audio(small_model):
    idx = tokens(2, 50)
    torch.testing.assert_close(small_model(idx, audio_features=torch.zeros(2, 0, 64)), small_model(idx),
                               atol=0, rtol=0)


@torch.no_grad()
def test_audio_changes_the_text_logits(small_model):
    idx = tokens(1, 30)
    a, b = torch.randn(1, 10, 64), torch.randn(1, 10, 64)
    assert (small_model(idx, audio_features=a) - small_model(idx, audio_features=b)).abs().max() > 1e-3


@torch.no_grad()
def test_left_padded_audio_batch_equals_each_clip_alone(small_model):
    idx = tokens(2, 30)
    short, long = torch.randn(1, 12, 64), torch.randn(1, 40, 64)
    padded = torch.cat([F.pad(short, (0, 0, 28, 0)), long])  # left-pad the short clip to 40 frames
    batched = small_model(idx, audio_features=padded, audio_lengths=torch.tensor([12, 40]))
    torch.testing.assert_close(batched[0:1], small_model(idx[0:1], audio_features=short), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1:2], small_model(idx[1:2], audio_features=long), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_right_padded_prefill_batch_equals_each_row_alone(small_model):
    """Prompts of different lengths with clips of different lengths (and none) prefilled in one
    forward (text right-padded with loud junk, clips left-padded): each row's first logits and
    every decode step after it, in the same cache, equal full forwards over that row alone. So the
    padding is never seen, each row's keys sit at its own positions and its smear state is its own.
    The longest row passes the short window (128)."""
    B, steps = 4, 12
    texts = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate([5, 120, 17, 1])]
    clips = [None, torch.randn(1, 30, 64), torch.randn(1, 13, 64), torch.randn(1, 2, 64)]
    text_lengths = torch.tensor([len(t) for t in texts])
    audio_lengths = torch.tensor([0 if c is None else c.size(1) for c in clips])
    idx = torch.full((B, int(text_lengths.max())), 299)
    audio = torch.full((B, int(audio_lengths.max()), 64), 7.0)
    for i, (t, c) in enumerate(zip(texts, clips)):
        idx[i, :len(t)] = t
        if c is not None:
            audio[i, audio.size(1) - c.size(1):] = c[0]
    cache = KVCache(small_model, B, int((text_lengths + audio_lengths).max()) + steps)
    logits = small_model(idx, kv_cache=cache, audio_features=audio, audio_lengths=audio_lengths,
                         text_lengths=text_lengths, last_only=True)[:, -1]
    assert cache.lengths.tolist() == (text_lengths + audio_lengths).tolist()
    sequences = [t.tolist() for t in texts]
    for step in range(steps + 1):
        for i, (seq, clip) in enumerate(zip(sequences, clips)):
            alone = small_model(torch.tensor([seq]), audio_features=clip)[0, -1]
            assert (logits[i] - alone).abs().max().item() <= 1e-4, (step, i)
        if step == steps:
            break
        nxt = tokens(B, 1, seed=100 + step)
        for seq, t in zip(sequences, nxt[:, 0].tolist()):
            seq.append(t)
        logits = small_model(nxt, kv_cache=cache)[:, -1]


def test_bad_text_lengths_raise(small_model):
    cache = KVCache(small_model, 2, 20)
    with pytest.raises(ValueError, match="empty kv_cache with last_only"):
        small_model(tokens(2, 5), kv_cache=cache, text_lengths=torch.tensor([5, 3]))
    with pytest.raises(ValueError, match=r"text_lengths must hold B=2 lengths in \[1, 5\]"):
        small_model(tokens(2, 5), kv_cache=cache, text_lengths=torch.tensor([6, 3]), last_only=True)
    with pytest.raises(ValueError, match=r"audio_lengths must hold B=2 lengths in \[0, T_a=4\]"):
        small_model(tokens(2, 5), kv_cache=cache, text_lengths=torch.tensor([5, 3]), last_only=True,
                    audio_features=torch.randn(2, 4, 64), audio_lengths=torch.tensor([4, 9]))


def test_bad_audio_shapes_raise(small_model):
    with pytest.raises(ValueError, match="audio_features must be"):
        small_model(tokens(2, 5), audio_features=torch.randn(2, 4, 63))
    with pytest.raises(ValueError, match="audio_lengths"):
        small_model(tokens(1, 5), kv_cache=KVCache(small_model, 1, 20), audio_features=torch.randn(1, 4, 64),
                    audio_lengths=torch.tensor([4]))


def test_rotary_table_limit_is_a_clear_error(small_model):
    too_long = small_model.cos.size(0) + 1
    with pytest.raises(ValueError, match="rotary table"):
        small_model(torch.zeros(1, too_long, dtype=torch.long))


def test_init_values():
    model = build_model(GPTConfig(sequence_len=64, vocab_size=100, n_layer=5, n_head=2, n_kv_head=2, n_embd=32),
                        perturb=0)
    torch.testing.assert_close(model.resid_lambdas.data, torch.linspace(1.15, 1.05, 5))
    torch.testing.assert_close(model.x0_lambdas.data, torch.linspace(0.20, 0.05, 5))
    for block in model.blocks:
        assert (block.attn.c_proj.weight == 0).all() and (block.mlp.c_proj.weight == 0).all()
        s = 3 ** 0.5 / 32 ** 0.5
        assert block.mlp.c_fc.weight.abs().max() <= 0.4 * s
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert model.padded_vocab_size == 128 and model.lm_head.weight.shape == (128, 32)


def test_window_pattern():
    cfg = config_for_depth(12)
    assert (cfg.n_embd, cfg.n_head) == (768, 6)
    assert layer_windows(cfg) == [512, 512, 512, None] * 2 + [512, 512, 512, None]
    cfg = GPTConfig(sequence_len=1000, n_layer=3, window_pattern="L")
    assert layer_windows(cfg) == [None, None, None]
    cfg = GPTConfig(sequence_len=1000, n_layer=3, window_pattern="S")
    assert layer_windows(cfg) == [256, 256, None]  # 250 rounds up to 256; the last layer is full
    with pytest.raises(ValueError):
        layer_windows(GPTConfig(window_pattern="SXL"))


@pytest.mark.parametrize("depth,total,scaling", [(12, 286e6, 110e6), (20, 896e6, 435e6), (24, 1.38e9, 730e6)])
def test_parameter_counts_match_upstream(depth, total, scaling):
    with torch.device("meta"):
        model = GPT(config_for_depth(depth))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(total, rel=0.01)
    assert model.num_scaling_params() == pytest.approx(scaling, rel=0.01)


def test_flops_per_token_d24():
    """Upstream reports 4.78e9 FLOPs/token at d24 (sequence 2048, SSSL windows)."""
    with torch.device("meta"):
        model = GPT(config_for_depth(24))
    assert model.estimate_flops() == pytest.approx(4.78e9, rel=0.02)


class DtypeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.dtypes.add(t.dtype)
        return out


def test_fp32_default_has_no_low_precision_anywhere(small_model):
    from nanochat.common import COMPUTE_DTYPE
    if os.environ.get("NANOCHAT_DTYPE"):
        pytest.skip("NANOCHAT_DTYPE is set in this environment")
    assert COMPUTE_DTYPE == torch.float32
    assert {p.dtype for p in small_model.parameters()} == {torch.float32}
    recorder = DtypeRecorder()
    with recorder:
        loss = small_model(tokens(2, 40), tokens(2, 40, seed=3), audio_features=torch.randn(2, 5, 64))
        loss.backward()
    assert recorder.dtypes == {torch.float32}


def run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    return result


def test_dtype_env_override_bf16_forward():
    code = (
        "import torch\n"
        "from nanochat.common import COMPUTE_DTYPE, COMPUTE_DTYPE_REASON\n"
        "from tests.helpers import build_model\n"
        "from nanochat.gpt import GPTConfig\n"
        "m = build_model(GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))\n"
        "out = m(torch.zeros(1, 8, dtype=torch.long))\n"
        "print(COMPUTE_DTYPE, m.wte.weight.dtype, m.blocks[0].attn.c_q.weight.dtype, m.cos.dtype, out.dtype, COMPUTE_DTYPE_REASON)\n")
    result = run_python(code, NANOCHAT_DTYPE="bfloat16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:5] == ["torch.bfloat16", "torch.bfloat16", "torch.float32", "torch.bfloat16",
                                         "torch.float32"]
    assert "NANOCHAT_DTYPE=bfloat16" in result.stdout
    bad = run_python("import nanochat.common", NANOCHAT_DTYPE="float8")
    assert bad.returncode != 0 and "NANOCHAT_DTYPE='float8'" in bad.stderr
    fp16 = run_python("import nanochat.common", NANOCHAT_DTYPE="float16")
    assert fp16.returncode == 0 and "grad scaler" in fp16.stderr


def test_training_step_reduces_loss(small_config):
    model = build_model(small_config, perturb=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = tokens(4, 64)
    losses = []
    for _ in range(15):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
