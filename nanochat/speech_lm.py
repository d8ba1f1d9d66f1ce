"""The speech LM: a frozen Whisper encoder and a projector in front of the GPT (LLaVA / Ultravox style).

    SpeechLM(gpt, AudioPath(n_embd, stack, context=sequence_len, model_id=..., layers=..., pad=...))

Training reads encoder frames from the on-disk FeatureCache (nanochat.speech_batches), so only the
projector (and the GPT in stage 2) runs per step; chat runs the whole path on raw audio
(embed_audio). Both give the GPT the same soft tokens: the projector groups `stack` frames from
the start of a clip and zero-pads its tail, so a batch is projected right-padded and only then
left-aligned for the GPT (whose padded-audio batches are left-padded, see GPT.forward).

Checkpoints live in base_dir/audio_checkpoints/<tag>: model_state {"gpt", "projector",
"layer_weights" (layers="weighted" only)} and meta with the GPT config, the encoder config (whose
cache_key is checked against the weights found when loading) and the checkpoint it started from.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.audio import AudioPath
from nanochat.checkpoint import (checkpoint_dir_for, gpt_from_state, last_step, load_checkpoint, load_model,
                                 save_checkpoint)
from nanochat.common import compute_dtype, get_base_dir
from nanochat.tokenizer import get_tokenizer


def left_align(tokens, lengths):
    """Rows of (B, T, C) whose first lengths[b] entries are valid -> the same rows with those entries
    moved to the end and zeros in front (the left padding GPT.forward's audio_lengths expects)."""
    B, T, _ = tokens.shape
    shift = T - lengths.to(tokens.device)[:, None]                 # (B, 1) pad in front of each row
    source = torch.arange(T, device=tokens.device)[None, :] - shift  # (B, T) where each slot reads from
    valid = source >= 0
    gathered = tokens.gather(1, source.clamp(min=0)[:, :, None].expand(-1, -1, tokens.size(2)))
    return gathered * valid[:, :, None].to(tokens.dtype)


def spec_augment(frames, lengths, time_masks=0, time_frac=0.05, channel_masks=0, channel_width=0, generator=None):
    """SpecAugment-style masking of encoder frames (B, T, C...) right-padded, valid frames (B,):
    per row, `time_masks` spans of up to time_frac x its length (the adaptive masks of Park et
    al. 2020) and `channel_masks` spans of up to channel_width channels (of the last axis) are
    zeroed. Returns a new tensor; padding stays zero."""
    B, T, C = frames.shape[0], frames.shape[1], frames.shape[-1]
    keep = torch.ones(B, T, C, dtype=torch.bool)
    rand = lambda high: int(torch.randint(high + 1, (), generator=generator))  # noqa: E731 (0..high)
    for b, n in enumerate(lengths.tolist()):
        for _ in range(time_masks):
            width = rand(int(time_frac * n))
            start = rand(n - width)
            keep[b, start:start + width] = False
        for _ in range(channel_masks):
            width = rand(min(channel_width, C))
            start = rand(C - width)
            keep[b, :, start:start + width] = False
    keep = keep.to(frames.device).view(B, T, *([1] * (frames.dim() - 3)), C)
    return frames * keep.to(frames.dtype)


@dataclass
class Regularisers:
    """SpeechLM's regularisers of the audio path, active only in training mode (all off by default):
    SpecAugment-style masks on the encoder frames (`time_masks` spans of up to `time_frac` of a
    clip, `channel_masks` spans of up to `channel_width` channels; see spec_augment) and dropout
    with probability `token_dropout` on the soft tokens."""
    time_masks: int = 0
    time_frac: float = 0.05
    channel_masks: int = 0
    channel_width: int = 0
    token_dropout: float = 0.0


class SpeechLM(nn.Module):
    """GPT + AudioPath (frozen Whisper encoder, optional learnable layer weights, projector), with
    optional training-time Regularisers."""

    def __init__(self, gpt, audio, regularisers=None):
        super().__init__()
        self.gpt = gpt
        self.audio = audio
        self.regularisers = regularisers or Regularisers()

    @property
    def encoder(self):
        return self.audio.encoder

    @property
    def projector(self):
        return self.audio.projector

    def audio_parameters(self):
        """The trainable audio-side parameters: the projector and, for layers="weighted", the layer weights."""
        params = list(self.projector.parameters())
        if self.encoder.layer_weights is not None:
            params.append(self.encoder.layer_weights)
        return params

    def setup_optimizer(self, stage, lr=2e-3, gpt_lr_scale=0.1, weight_decay=0.0):
        """MuonAdamW: AdamW at `lr` on the audio parameters; in stage 2 also the GPT's own groups
        (GPT.optimizer_groups with this Muon weight decay) at their LRs x gpt_lr_scale. Stage 1
        freezes the GPT (no gradients, not in the optimizer)."""
        from nanochat.optim import MuonAdamW
        groups = [dict(kind="adamw", params=self.audio_parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8,
                       weight_decay=0.0)]
        if stage == 1:
            self.gpt.requires_grad_(False)
        else:
            groups += [dict(group, lr=group["lr"] * gpt_lr_scale)
                       for group in self.gpt.optimizer_groups(weight_decay=weight_decay)]
        return MuonAdamW(groups)

    def soft_tokens(self, frames, lengths):
        """Cached encoder frames (B, T, ...) right-padded with zeros, valid frames (B,) ->
        (soft tokens (B, T_a, n_embd) left-padded, valid tokens (B,))."""
        r = self.regularisers
        if self.training and (r.time_masks or r.channel_masks):
            frames = spec_augment(frames, lengths, r.time_masks, r.time_frac, r.channel_masks, r.channel_width)
        hidden = self.encoder.mix(frames.to(compute_dtype()))
        tokens, lengths = self.projector(hidden, lengths)
        tokens = F.dropout(tokens, r.token_dropout, self.training)
        return left_align(tokens, lengths), lengths

    def forward(self, idx, targets=None, frames=None, frame_lengths=None, loss_reduction="mean"):
        """GPT.forward with the clips' frames in front of the text (frames None: text only).
        A row with frame_lengths 0 is a text-only example inside an audio batch."""
        if frames is None:
            return self.gpt(idx, targets, loss_reduction=loss_reduction)
        audio, lengths = self.soft_tokens(frames, frame_lengths)
        # Without padding the GPT keeps its fast unmasked attention path.
        audio_lengths = None if bool((lengths == audio.size(1)).all()) else lengths
        return self.gpt(idx, targets, loss_reduction=loss_reduction, audio_features=audio, audio_lengths=audio_lengths)

    @torch.no_grad()
    def embed_audio(self, audio, sampling_rate=None):
        """One clip (a file path, or an array with its sampling_rate) -> soft tokens (1, T_a, n_embd)."""
        tokens, lengths = self.audio(audio, sampling_rate)
        return tokens[:1, :int(lengths[0])]

    def state_dicts(self):
        """{module name: state} for nanochat.checkpoint.save_checkpoint."""
        state = {"gpt": self.gpt.state_dict(), "projector": self.projector.state_dict()}
        if self.encoder.layer_weights is not None:
            state["layer_weights"] = self.encoder.layer_weights.detach().clone()
        return state

    def load_state_dicts(self, state):
        self.gpt.load_state_dict(state["gpt"], strict=True)
        self.projector.load_state_dict(state["projector"], strict=True)
        if self.encoder.layer_weights is not None:
            if "layer_weights" not in state:
                raise ValueError("checkpoint has no layer_weights but the encoder uses layers='weighted'")
            with torch.no_grad():
                self.encoder.layer_weights.copy_(state["layer_weights"])


def encoder_meta(model, model_id):
    """What rebuilds the audio path: the Whisper id as asked for, where its weights were found, their
    cache_key (weights + layers + framing + dtype checksum), layers, pad, the encoder's dtype and the
    projector's stack."""
    enc = model.encoder
    return {"model_id": model_id, "weights_dir": str(enc.weights_dir), "cache_key": enc.cache_key,
            "layers": enc.layers, "pad": enc.pad, "dtype": str(enc.dtype).removeprefix("torch."),
            "stack": model.projector.stack, "out_dim": enc.out_dim}


def build_audio_path(config, encoder):
    """An AudioPath for a GPT of this config from encoder_meta(), its encoder in the dtype it was
    trained with (fp32 for checkpoints that do not say); refuses Whisper weights other than the ones
    trained with, and clips longer than the GPT's context holds."""
    dtype = getattr(torch, encoder.get("dtype", "float32"))
    audio = AudioPath(config.n_embd, encoder["stack"], context=config.sequence_len, model_id=encoder["model_id"],
                      layers=encoder["layers"], pad=encoder["pad"], dtype=dtype)
    if audio.encoder.cache_key != encoder["cache_key"]:
        raise ValueError(f"the Whisper weights found ({audio.encoder.weights_dir}, {audio.encoder.cache_key}) are not "
                         f"the ones this checkpoint was trained with ({encoder['weights_dir']}, {encoder['cache_key']}); "
                         f"point WHISPER_HF_ID / WHISPER_MS_ID at those weights")
    return audio


def audio_checkpoint_dir(tag=None):
    """base_dir/audio_checkpoints/<tag>; without a tag, the most recently written one."""
    return checkpoint_dir_for("audio", tag)


def save_speech_lm(checkpoint_dir, step, model, optimizer_state, meta, rank=0):
    """save_checkpoint of every trained module; meta must hold model_config and encoder."""
    save_checkpoint(checkpoint_dir, step, model.state_dicts(), optimizer_state, meta, rank)


def load_speech_lm(checkpoint_dir, step=None, device="cpu", phase="eval"):
    """(SpeechLM, meta) restored from an audio checkpoint."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"no audio checkpoint directory {checkpoint_dir}: train one with "
                                f"`python -m scripts.audio_train`")
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    if "encoder" not in meta:
        raise ValueError(f"{checkpoint_dir} is a text checkpoint (no encoder in its meta), not an audio one")
    return speech_lm_from_state(model_state, meta, device, phase), meta


def speech_lm_from_state(model_state, meta, device="cpu", phase="eval"):
    """The SpeechLM of a loaded audio checkpoint (load_checkpoint's model_state and meta)."""
    gpt = gpt_from_state(model_state, meta, device, phase)
    model = SpeechLM(gpt, build_audio_path(gpt.config, meta["encoder"]).to(device))
    model.load_state_dicts(model_state)
    model.train(phase == "train")
    return model


CHAT_SOURCES = ("audio", "rl", "sft", "base")  # checkpoint kinds a chat can load
DEFAULT_CHAT_CHAIN = ("audio", "rl", "sft", "base")  # what a chat loads when not told, first found wins


def load_chat_model(source=None, tag=None, step=None, device="cpu"):
    """(SpeechLM or None, GPT, tokenizer, name like "audio/s2") to chat with. source: one of
    CHAT_SOURCES; None takes the first of DEFAULT_CHAT_CHAIN with a checkpoint (with `tag`, if
    given). A text checkpoint gives no SpeechLM: it cannot take audio."""
    if source is None:
        for candidate in DEFAULT_CHAT_CHAIN:
            try:
                if last_step(checkpoint_dir_for(candidate, tag)) is not None:
                    source = candidate
                    break
            except FileNotFoundError:
                continue
        else:
            raise FileNotFoundError(f"no {', '.join(DEFAULT_CHAT_CHAIN)} checkpoint{f' tagged {tag}' if tag else ''} "
                                    f"under {get_base_dir()}: train one first (bash runs/cpu.sh)")
    if source not in CHAT_SOURCES:
        raise ValueError(f"source must be one of {CHAT_SOURCES}, got {source!r}")
    checkpoint_dir = checkpoint_dir_for(source, tag)
    name = f"{source}/{os.path.basename(checkpoint_dir)}"
    if source == "audio":
        speech_lm, _ = load_speech_lm(checkpoint_dir, step, device)
        return speech_lm, speech_lm.gpt, get_tokenizer(), name
    gpt, tokenizer, _ = load_model(source, device, model_tag=tag, step=step)
    return None, gpt, tokenizer, name
