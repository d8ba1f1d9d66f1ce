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
