"""The GPT: one file, the architecture of upstream nanochat (https://github.com/karpathy/nanochat),
and the audio_features hook.

- rotary embeddings (base 100000, tables for 10x sequence_len so audio prefixes and long prompts fit)
- QK-norm with a 1.2 scale, grouped-query attention, sliding windows from a pattern ("SSSL")
- relu^2 MLP, value embeddings with an input-dependent gate, per-layer resid/x0 scalars
- smear (bigram-like mixing of the previous token embedding), backout (subtract mid-depth residual)
- untied lm_head, vocab padded to a multiple of 64, fp32 logits soft-capped at 15
- audio_features: projected Whisper frames placed in front of the text as soft tokens
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import attention, attention_with_cache
from nanochat.common import Linear, compute_dtype

ROTARY_BASE = 100_000
ROTARY_OVERALLOC = 10      # rotary tables cover 10x sequence_len
QK_SCALE = 1.2             # after QK-norm; sharper attention than unit-norm q.k (upstream's tuning)
LOGIT_SOFTCAP = 15.0
VE_GATE_CHANNELS = 12      # the value-embedding gate reads the first 12 channels of x
SMEAR_GATE_CHANNELS = 24   # the smear gate reads the first 24 channels
VOCAB_PAD = 64
# Logit elements per chunk of the fused loss. CPU, 2^24 fp32 = 64 MB: at d6, vocab 32768, 4096 tokens
# a step took 9.2 / 8.7 / 9.4 s with 2^22 / 2^24 / 2^26 (smaller chunks redo the grad_w update more
# often, bigger ones fall out of cache). GPUs: 2^28 (1 GiB), few chunks so few kernel launches and
# grad_w passes (not yet measured on a GPU).
LOSS_CHUNK_ELEMENTS_CPU = 2 ** 24
LOSS_CHUNK_ELEMENTS_ACCELERATOR = 2 ** 28


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


def config_for_depth(depth, vocab_size=32768, sequence_len=2048, window_pattern="SSSL", head_dim=128):
    """The one-dial model family: width = depth*64 rounded up to a multiple of head_dim."""
    n_embd = math.ceil(depth * 64 / head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=n_embd, window_pattern=window_pattern)


def norm(x):
    """RMSNorm without a learned weight."""
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer_idx, n_layer):
    """Value embeddings live on alternating layers, always including the last."""
    return layer_idx % 2 == (n_layer - 1) % 2


def layer_windows(config):
    """Per-layer attention window: 'S' = sequence_len/4 rounded up to 128, 'L' = full (None).
    The last layer is always full so the final representation sees the whole context."""
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window_pattern must be made of S and L, got {config.window_pattern!r}")
    short = math.ceil(config.sequence_len / 4 / 128) * 128
    windows = [short if pattern[i % len(pattern)] == "S" else None for i in range(config.n_layer)]
    windows[-1] = None
    return windows


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by the angles of cos/sin (B|1, T, 1, D/2)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def softcap(logits):
    """LOGIT_SOFTCAP * tanh(logits / LOGIT_SOFTCAP), with tanh(y) = 2 sigmoid(2y) - 1: PyTorch's CPU
    tanh ran 13x slower than its sigmoid (1M fp32 values: 2.9 vs 0.22 ms). In fp32 a logit moves by
    at most 3.4e-6 from the exact value (fp32 tanh itself: 1.3e-6)."""
    return LOGIT_SOFTCAP * (2 * torch.sigmoid(logits * (2 / LOGIT_SOFTCAP)) - 1)


class SoftcappedCrossEntropy(torch.autograd.Function):
    """lm_head, softcap and cross-entropy (ignore_index -1) over chunks of rows, with the gradients
    computed in the same pass; backward only scales them.

    The plain path materialises the (tokens, vocab) logits several times over (logits, /15, tanh,
    log-softmax and their backward): at d6 with vocab 32768 and 4096 tokens that is 537 MB each, and
    those passes took over a third of a CPU training step (benchmarks/train_bench.py --profile).
    Here one chunk lives at a time. The softcap bounds logits to +-15, so exp() cannot overflow and
    the softmax needs no max-subtraction pass."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, reduction, grad_enabled):
        """x (N, C) in the compute dtype, weight (V_pad, C) fp32 master, targets (N,) -> the loss
        ('mean' over non-ignored targets or 'sum') or per-row losses ('none', no gradients).
        grad_enabled: torch.is_grad_enabled() of the caller (forward always runs without grad)."""
        w = weight[:vocab_size].to(x.dtype)
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)[:, None]
        grad_x_needed, grad_w_needed = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        want_grad = grad_x_needed or grad_w_needed
        if reduction not in ("mean", "sum") and want_grad:
            raise ValueError("the fused loss computes gradients only for reduction 'mean' or 'sum'")
        count = valid.sum().clamp(min=1) if reduction == "mean" else 1
        row_scale = valid.float() / count
        losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if grad_x_needed else None
        grad_w = torch.zeros_like(weight) if grad_w_needed else None  # e.g. a frozen GPT under a trained projector
        budget = LOSS_CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else LOSS_CHUNK_ELEMENTS_ACCELERATOR
        rows = max(1, budget // vocab_size)
        for start in range(0, x.size(0), rows):
            chunk = slice(start, start + rows)
            # tanh(logits / 15) in place, through the sigmoid identity (see softcap)
            capped = (x[chunk] @ w.t()).float().mul_(2 / LOGIT_SOFTCAP).sigmoid_().mul_(2).sub_(1)
            picked = capped.gather(1, safe_targets[chunk]).squeeze(1)
            probs = capped.mul(LOGIT_SOFTCAP).exp_()
            total = probs.sum(1)
            losses[chunk] = (total.log() - LOGIT_SOFTCAP * picked) * valid[chunk]
            if not want_grad:
                continue
            # d loss / d logits = (softmax - onehot) * (1 - tanh^2), times each row's share of the loss
            probs.div_(total[:, None]).scatter_add_(1, safe_targets[chunk], -torch.ones_like(picked)[:, None])
            probs.mul_(capped.square_().sub_(1)).mul_(-row_scale[chunk, None])
            grad = probs.to(x.dtype)
            if grad_x_needed:
                torch.mm(grad, w, out=grad_x[chunk])
            if grad_w_needed:
                grad_w[:vocab_size] += (grad.t() @ x[chunk]).float()
        ctx.save_for_backward(grad_x, grad_w)
        return losses if reduction == "none" else losses.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_x, grad_w)]
        return *scaled, None, None, None, None


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError("n_embd must divide into n_head heads, n_head into n_kv_head groups")
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = Linear(config.n_embd, config.n_embd)
        self.c_k = Linear(config.n_embd, kv_dim)
        self.c_v = Linear(config.n_embd, kv_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_value_embedding(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, window, kv_cache, key_valid):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, H_kv), in (0, 3)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        if kv_cache is None:
            y = attention(q, k, v, window=window, key_valid=key_valid)
        else:
            y = attention_with_cache(q, k, v, kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx],
                                     kv_cache.positions, window=window)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache, key_valid):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache, key_valid)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.windows = layer_windows(config)
        self.padded_vocab_size = math.ceil(config.vocab_size / VOCAB_PAD) * VOCAB_PAD
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.wte = nn.Embedding(self.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(self.padded_vocab_size, kv_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        self.lm_head = Linear(config.n_embd, self.padded_vocab_size)
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.smear_gate = Linear(SMEAR_GATE_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.empty(()))
        self.backout_lambda = nn.Parameter(torch.empty(()))
        self.backout_layer = config.n_layer // 2  # backout subtracts the residual after this block
        rotary_len = ROTARY_OVERALLOC * config.sequence_len
        self.register_buffer("cos", torch.empty(rotary_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(rotary_len, head_dim // 2), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (the model is built on the meta device, then materialised)."""
        n_embd = self.config.n_embd
        s = math.sqrt(3) / math.sqrt(n_embd)  # uniform(-s, s) has std 1/sqrt(n_embd)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        # Non-uniform per-layer init (upstream's tuning): early layers keep more residual and more x0.
        self.resid_lambdas.copy_(torch.linspace(1.15, 1.05, self.config.n_layer))
        self.x0_lambdas.copy_(torch.linspace(0.20, 0.05, self.config.n_layer))
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        cos, sin = self._rotary_tables(self.cos.size(0), self.cos.size(1) * 2, self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        if compute_dtype() == torch.bfloat16:
            # Embeddings are looked up, not multiplied: storing them in bf16 halves their memory.
            self.wte.to(dtype=torch.bfloat16)
            for ve in self.value_embeds.values():
                ve.to(dtype=torch.bfloat16)
            self.cos, self.sin = self.cos.to(torch.bfloat16), self.sin.to(torch.bfloat16)

    @staticmethod
    def _rotary_tables(seq_len, head_dim, device):
        inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return angles.cos(), angles.sin()

    def get_device(self):
        return self.wte.weight.device

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", *, audio_features=None, audio_lengths=None,
                text_lengths=None, last_only=False):
        """Logits (B, T, vocab) for the text positions, or the loss if targets are given.

        audio_features: (B, T_a, n_embd) projected audio frames placed in front of the text.
        audio_lengths: (B,) valid frames per row when clips of different lengths share a batch;
        the audio must then be left-padded so every clip ends right before its text (rotary
        distances between text and audio stay the same whatever the batch).
        kv_cache: prefill/decode against a cache; an audio prefix is written into it like text.
        text_lengths: (B,) valid tokens per row of a right-padded idx: prompts of different lengths
        (and clips of different lengths, left-padded as above) prefilled together into an empty
        kv_cache with last_only. Each row is packed to start at cache position 0 (its clip, then its
        text, then padding that no later token sees: the row's cache length is its own), and its
        logits and smear state come from its own last position.
        last_only: logits (B, 1, vocab) of the last position only, all a prefill needs (the lm_head
        over a whole prompt cost as much as the blocks: d6, vocab 32768)."""
        B, T = idx.shape
        if last_only and targets is not None:
            raise ValueError("last_only is for generation: it returns logits, not a loss")
        if text_lengths is not None:
            text_lengths = torch.as_tensor(text_lengths, dtype=torch.long).cpu()
            if kv_cache is None or not last_only or int(kv_cache.lengths.max()) != 0:
                raise ValueError("text_lengths (a right-padded batch of prompts) is for a prefill into an empty "
                                 "kv_cache with last_only")
            if text_lengths.shape != (B,) or not bool(((text_lengths >= 1) & (text_lengths <= T)).all()):
                raise ValueError(f"text_lengths must hold B={B} lengths in [1, {T}], got {text_lengths.tolist()}")
        x = norm(self.wte(idx))
        x = self._smear(x, kv_cache, text_lengths)
        T_a = 0 if audio_features is None else audio_features.size(1)
        if audio_features is not None:
            if audio_features.dim() != 3 or audio_features.size(0) != B or audio_features.size(2) != self.config.n_embd:
                raise ValueError(f"audio_features must be (B={B}, T_a, n_embd={self.config.n_embd}), "
                                 f"got {tuple(audio_features.shape)}")
            x = torch.cat([norm(audio_features.to(x.dtype)), x], dim=1)
            idx = F.pad(idx, (T_a, 0), value=0)  # value embeddings see token 0 over the audio
        T_full = T_a + T

        key_valid, row_lengths = None, None
        if text_lengths is not None:
            # Pack each row to start at position 0: drop its clip's left padding (a gather), so it sits
            # in the cache exactly where a prefill of that row alone puts it.
            clip = (torch.full((B,), T_a, dtype=torch.long) if audio_lengths is None
                    else torch.as_tensor(audio_lengths, dtype=torch.long).cpu())
            if clip.shape != (B,) or not bool(((clip >= 0) & (clip <= T_a)).all()):
                raise ValueError(f"audio_lengths must hold B={B} lengths in [0, T_a={T_a}], got {clip.tolist()}")
            row_lengths = clip + text_lengths
            T_full = int(row_lengths.max())
            source = ((T_a - clip)[:, None] + torch.arange(T_full)[None, :]).clamp(max=T_a + T - 1).to(x.device)
            x = x.gather(1, source[..., None].expand(-1, -1, x.size(-1)))
            idx = idx.gather(1, source)
        elif audio_lengths is not None:
            if kv_cache is not None:
                raise ValueError("audio_lengths (padded audio batches) with a kv_cache needs text_lengths: "
                                 "a batched prefill packs each row to its own positions")
            frame = torch.arange(T_a, device=x.device)[None, :]
            audio_valid = frame >= (T_a - audio_lengths.to(x.device)[:, None])
            key_valid = torch.cat([audio_valid, torch.ones(B, T, dtype=torch.bool, device=x.device)], dim=1)

        if kv_cache is None:
            if T_full > self.cos.size(0):
                raise ValueError(f"sequence of {T_full} positions exceeds the rotary table ({self.cos.size(0)})")
            cos, sin = self.cos[None, :T_full, None], self.sin[None, :T_full, None]
        else:
            kv_cache.begin_chunk(T_full)
            if kv_cache.positions.max_start + T_full > self.cos.size(0):
                raise ValueError(f"cache position {kv_cache.positions.max_start + T_full} exceeds the "
                                 f"rotary table ({self.cos.size(0)})")
            pos = kv_cache.positions.index(T_full)
            cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]

        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], kv_cache, key_valid)
            if i == self.backout_layer:
                x_mid = x
        if kv_cache is not None:
            kv_cache.end_chunk(T_full if row_lengths is None else row_lengths)
        x = x - self.backout_lambda * x_mid
        if row_lengths is not None:
            x = x[torch.arange(B, device=x.device), (row_lengths - 1).to(x.device)][:, None]
        x = norm(x[:, -1:] if last_only else x[:, T_a:])

        if targets is None or (loss_reduction == "none" and torch.is_grad_enabled()):
            logits = softcap(self.lm_head(x)[..., :self.config.vocab_size].float())
            if targets is None:
                return logits
            return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1, reduction="none")
        # The common case (a scalar loss, or per-token losses without gradients) never holds the
        # whole (B*T, vocab) logits: see SoftcappedCrossEntropy.
        rows, flat_targets = x.reshape(B * T, -1), targets.reshape(-1)
        if loss_reduction != "none":
            # Only graded positions need logits. Conversations grade the reply alone: in audio
            # training batches 61% of the text positions are the prompt or padding, and skipping
            # them took a d4 stage-2 step from 650 to 560 ms of CPU (vocab 8192, batch 16, 1 thread).
            graded = flat_targets >= 0
            rows, flat_targets = rows[graded], flat_targets[graded]
        losses = SoftcappedCrossEntropy.apply(rows, self.lm_head.weight, flat_targets, self.config.vocab_size,
                                              loss_reduction, torch.is_grad_enabled())
        return losses.view(B, T) if loss_reduction == "none" else losses

    def _smear(self, x, kv_cache, text_lengths=None):
        """x[t] += smear_lambda * sigmoid(gate(x[t])) * x[t-1] over text tokens only.

        With a cache, the previous call's last embedding continues the chain, so prefill in
        chunks and token-by-token decode compute exactly what one full forward does. A
        right-padded batch (text_lengths) leaves each row's own last embedding."""
        if x.size(1) == 0:
            return x
        prev = None if kv_cache is None else kv_cache.smear_prev
        if text_lengths is not None:
            rows = torch.arange(x.size(0), device=x.device)
            kv_cache.smear_prev = x[rows, (text_lengths - 1).to(x.device)][:, None]
        elif kv_cache is not None:
            kv_cache.smear_prev = x[:, -1:]
        if prev is not None:
            x = torch.cat([prev, x], dim=1)  # mixed in below, then dropped again
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_GATE_CHANNELS]))
        mixed = x[:, 1:] + gate * x[:, :-1]
        return mixed if prev is not None else torch.cat([x[:, :1], mixed], dim=1)

    # ------------------------------------------------------------------
    # accounting and optimisation

    def estimate_flops(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM-style (arXiv:2204.02311, App. B).

        6 FLOPs per weight of every Linear (fp8 ones included: they keep their .weight) plus
        12 * n_head * head_dim * context per layer for QK^T and AV, where a windowed layer's
        context is its window. Embedding lookups are not matmuls and are not counted."""
        seq_len = seq_len or self.config.sequence_len
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, Linear))
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * (seq_len if w is None else min(w, seq_len))
                   for w in self.windows)
        return 6 * matmul_weights + attn

    def num_scaling_params(self):
        """Parameters that scaling laws count: transformer matrices plus lm_head (no embeddings, no scalars)."""
        blocks = sum(p.numel() for p in self.blocks.parameters())
        return blocks + self.lm_head.weight.numel()

    def optimizer_groups(self, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5,
                         weight_decay=0.28, adam_betas=(0.8, 0.95)):
        """MuonAdamW param groups: Muon on the 2-D block matrices (grouped by shape), AdamW elsewhere.
        The lm_head and embedding LRs scale as (n_embd/768)^-0.5 (tuned at d12, 768 wide); the
        scalars' and the matrices' do not."""
        scale = (self.config.n_embd / 768) ** -0.5
        matrices = [p for p in self.blocks.parameters() if p.dim() == 2]
        embeddings = [self.wte.weight] + [ve.weight for ve in self.value_embeds.values()]
        scalars = [self.resid_lambdas, self.x0_lambdas, self.smear_lambda, self.backout_lambda,
                   self.smear_gate.weight]
        adam = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale, **adam),
            dict(params=embeddings, lr=embedding_lr * scale, **adam),
            dict(params=scalars, lr=scalar_lr, **adam),
        ]
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                               lr=matrix_lr, momentum=0.95, weight_decay=weight_decay))
        grouped = sum(len(g["params"]) for g in groups)
        if grouped != len(list(self.parameters())):
            raise AssertionError("optimizer_groups missed or duplicated a parameter")
        return groups

    def setup_optimizer(self, muon_shard_threshold=None, **group_settings):
        """MuonAdamW over optimizer_groups(**group_settings)."""
        from nanochat.optim import MuonAdamW
        kwargs = {} if muon_shard_threshold is None else dict(shard_threshold=muon_shard_threshold)
        return MuonAdamW(self.optimizer_groups(**group_settings), **kwargs)


def build_gpt(config, device="cpu"):
    """A freshly initialised GPT on `device`: built on the meta device (no memory or time spent on
    weights that init_weights() overwrites), then materialised and initialised."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
