"""Chat fine-tuning packing: whole conversations, the long-conversation policy, no row without a
trained token (and no NaN loss when a batch has none), exact resume, disjoint ranks."""

import json
import random

import pytest
import torch

from nanochat.chat_data import ConversationPacker, fit_conversation, sft_data_loader
from nanochat.corpus import stdlib_text
from nanochat.gpt import GPTConfig
from tests.helpers import build_model


@pytest.fixture(scope="module")
def words():
    return " ".join(stdlib_text(60_000)).split()


def make_conversations(words, n, seed, max_turns=4, max_words=60):
    """Conversations of 1..max_turns exchanges with replies of 0..max_words real words (some long
    enough to overflow a small row), a few of them with a calculator call."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, max_turns)):
            def text():
                start = rng.randrange(len(words))
                return " ".join(words[start:start + rng.randint(0, max_words)])
            messages.append({"role": "user", "content": text()})
            reply = text()
            if rng.random() < 0.2:
                reply = [{"type": "text", "text": reply}, {"type": "python", "text": "12*3"},
                         {"type": "python_output", "text": "36"}, {"type": "text", "text": "so 36"}]
            messages.append({"role": "assistant", "content": reply})
        convs.append({"messages": messages})
    return convs


def rendered(tokenizer, conversation):
    return tokenizer.render_conversation(conversation, max_tokens=10 ** 9)


def fitted(tokenizer, conversation, capacity):
    ids, mask = rendered(tokenizer, conversation)
    return fit_conversation(ids, mask, capacity, tokenizer.encode_special("<|assistant_end|>"))


def exchange(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ---------------------------------------------------------------------------
# the long-conversation policy


def test_fit_conversation_cuts_after_the_last_whole_assistant_turn(tokenizer):
    conv = {"messages": exchange("hello there", "hi") + exchange("how are you", "fine thanks")
            + exchange("and then", "the end of it all")}
    ids, mask = rendered(tokenizer, conv)
    end = tokenizer.encode_special("<|assistant_end|>")
    turn_ends = [i + 1 for i, t in enumerate(ids) if t == end]
    assert len(turn_ends) == 3 and turn_ends[-1] == len(ids)
    # exactly the whole conversation fits
    assert fitted(tokenizer, conv, len(ids)) == (ids, mask, "whole")
    # one token short: the third turn goes, the row ends right after the second
    assert fitted(tokenizer, conv, len(ids) - 1) == (ids[:turn_ends[1]], mask[:turn_ends[1]], "truncated")
    assert fitted(tokenizer, conv, turn_ends[1]) == (ids[:turn_ends[1]], mask[:turn_ends[1]], "truncated")
    assert fitted(tokenizer, conv, turn_ends[1] - 1)[2] == "truncated"
    assert fitted(tokenizer, conv, turn_ends[1] - 1)[0] == ids[:turn_ends[0]]
    # not even the first exchange fits
    assert fitted(tokenizer, conv, turn_ends[0] - 1) == ([], [], "too_long")
    assert fitted(tokenizer, conv, 1) == ([], [], "too_long")


def test_fit_conversation_drops_an_untrained_tail_and_skips_untrained(tokenizer):
    conv = {"messages": exchange("q", "a") + [{"role": "user", "content": "a question never answered"}]}
    ids, mask = rendered(tokenizer, conv)
    kept, kept_mask, status = fitted(tokenizer, conv, 10 ** 6)
    assert status == "whole" and kept[-1] == tokenizer.encode_special("<|assistant_end|>")
    assert len(kept) < len(ids) and not any(mask[len(kept):])
    assert fitted(tokenizer, {"messages": [{"role": "user", "content": "hi"}]}, 100) == ([], [], "untrained")


# ---------------------------------------------------------------------------
# rows


def check_row(tokenizer, conversations, capacity, row):
    """A row is whole fitted conversations back to back, then BOS padding with mask 0."""
    ids, mask, indices = row
    assert len(ids) == len(mask) == capacity and indices
    expected_ids, expected_mask = [], []
    for i in indices:
        part_ids, part_mask, status = fitted(tokenizer, conversations[i], capacity)
        assert status in ("whole", "truncated")
        expected_ids += part_ids
        expected_mask += part_mask
    pad = capacity - len(expected_ids)
    assert ids == expected_ids + [tokenizer.get_bos_token_id()] * pad
    assert mask == expected_mask + [0] * pad
    assert any(mask[1:])  # a trained target


@pytest.mark.parametrize("capacity", [48, 129, 513])
def test_rows_hold_whole_conversations_and_a_trained_token(tokenizer, words, capacity):
    convs = make_conversations(words, 150, seed=capacity)
    packer = ConversationPacker(convs, tokenizer, capacity, buffer_size=16, epochs=1)
    seen = []
    while (row := packer.next_row()) is not None:
        check_row(tokenizer, convs, capacity, row)
        seen += row[2]
    s = packer.stats
    fits = [i for i, c in enumerate(convs) if fitted(tokenizer, c, capacity)[0]]
    assert sorted(seen) == fits  # one epoch: every conversation that fits, once
    assert s["read"] == len(convs) == s["whole"] + s["truncated"] + s["too_long"] + s["untrained"]
    assert s["too_long"] == len(convs) - len(fits)
    assert s["pad_tokens"] == s["rows"] * capacity - sum(len(fitted(tokenizer, convs[i], capacity)[0]) for i in seen)
    if capacity == 48:  # the small row exercises both halves of the policy
        assert s["truncated"] > 0 and s["too_long"] > 0 and s["dropped_trained_tokens"] > 0


def test_adversarial_lengths(tokenizer):
    bos = tokenizer.get_bos_token_id()
    one = {"messages": exchange("", "")}  # one trained token: <|assistant_end|>
    n_one = len(rendered(tokenizer, one)[0])
    assert sum(rendered(tokenizer, one)[1]) == 1
    long_first = {"messages": exchange("word " * 200, "x")}
    two_turns = {"messages": exchange("", "") + exchange("word " * 200, "y")}
    convs = [{"messages": []}, {"messages": [{"role": "user", "content": "only a question"}]}, one,
             long_first, two_turns]
    capacity = 3 * n_one  # three one-token conversations fill a row exactly
    packer = ConversationPacker(convs, tokenizer, capacity, shuffle=False, epochs=2)
    rows = []
    while (row := packer.next_row()) is not None:
        check_row(tokenizer, convs, capacity, row)
        rows.append(row)
    # per epoch: `one` and the first turn of `two_turns` (the same tokens); over two epochs, four
    # copies fill one row exactly with three and start another
    assert [r[2] for r in rows] == [[2, 4, 2], [4]]
    assert rows[0][0] == rendered(tokenizer, one)[0] * 3
    assert rows[1][0][n_one:] == [bos] * (capacity - n_one) and not any(rows[1][1][n_one:])
    s = packer.stats
    assert (s["untrained"], s["too_long"], s["truncated"], s["whole"]) == (4, 2, 2, 2)


def test_nothing_fits_is_a_clear_error_not_a_hang(tokenizer):
    convs = [{"messages": exchange("word " * 50, "reply")}] * 3 + [{"messages": []}]
    packer = ConversationPacker(convs, tokenizer, 20)
    with pytest.raises(ValueError, match=r"3 a first exchange longer than a row of 20 tokens"):
        packer.next_row()


def test_malformed_conversation_is_named(tokenizer):
    convs = [{"messages": exchange("a", "b")}, {"messages": [{"role": "assistant", "content": "first"}]}]
    with pytest.raises(ValueError, match="conversation 1: message 0"):
        list(sft_data_loader(convs, tokenizer, 2, 64, shuffle=False, epochs=1))


def test_loader_targets_are_the_assistant_tokens(tokenizer, words):
    convs = make_conversations(words, 40, seed=1)
    batches = list(sft_data_loader(convs, tokenizer, B=3, T=96, epochs=1, buffer_size=8, seed=5))
    packer = ConversationPacker(convs, tokenizer, 97, buffer_size=8, epochs=1, seed=5)
    for inputs, targets, _ in batches:
        assert inputs.shape == targets.shape and inputs.shape[1] == 96 and inputs.dtype == torch.long
        for x, y in zip(inputs.tolist(), targets.tolist()):
            ids, mask, _ = packer.next_row()
            assert x == ids[:-1]
            assert y == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    assert packer.next_row() is None  # the loader stopped with the last row


def test_a_batch_without_trained_tokens_gives_zero_loss_not_nan():
    """The model's side of the guarantee: the mean over no targets is 0 and so are the gradients."""
    model = build_model(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.train()
    x = torch.randint(0, 64, (2, 16))
    loss = model(x, torch.full((2, 16), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any()) for p in model.parameters())
    targets = torch.full((2, 16), -1)
    targets[1, 3] = 7  # one trained token in the whole batch: its own loss, finite
    model.zero_grad()
    loss = model(x, targets)
    per_token = model(x, targets, loss_reduction="none")
    assert torch.isfinite(loss) and torch.allclose(loss, per_token[1, 3])


# ---------------------------------------------------------------------------
# resume and ranks


def test_resume_equals_uninterrupted(tokenizer, words):
    convs = make_conversations(words, 30, seed=2)  # small: several epochs, buffers across epochs
    B, T = 2, 80
    reference = list(zip(range(25), sft_data_loader(convs, tokenizer, B, T, buffer_size=6, seed=3)))
    for k in (0, 7, 11, 18):
        state = json.loads(json.dumps(reference[k][1][2]))  # as it would be saved in a checkpoint meta
        resumed = sft_data_loader(convs, tokenizer, B, T, resume_state_dict=state, buffer_size=6, seed=3)
        for j in range(k + 1, 25):
            inputs, targets, state = next(resumed)
            assert torch.equal(inputs, reference[j][1][0]) and torch.equal(targets, reference[j][1][1])
            assert state == reference[j][1][2]  # stats included
    assert reference[-1][1][2]["epoch"] >= 3


def test_resume_state_must_match(tokenizer, words):
    convs = make_conversations(words, 10, seed=4)
    _, _, state = next(sft_data_loader(convs, tokenizer, 2, 512))
    with pytest.raises(ValueError, match="cannot resume"):
        next(sft_data_loader(convs, tokenizer, 2, 1024, resume_state_dict=state))


def test_ranks_read_disjoint_conversations(tokenizer, words, monkeypatch):
    convs = make_conversations(words, 61, seed=6)
    capacity = 200
    seen = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        rows = list(sft_data_loader(convs, tokenizer, 2, capacity - 1, epochs=1, seed=9))
        packer = ConversationPacker(convs, tokenizer, capacity, rank, 3, seed=9, epochs=1)
        mine = []
        while (row := packer.next_row()) is not None:
            mine += row[2]
        assert sum(len(b[0]) for b in rows) == packer.stats["rows"]
        seen.append(set(mine))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set().union(*seen) == {i for i, c in enumerate(convs) if fitted(tokenizer, c, capacity)[0]}


def test_any_iterable_of_conversations(tokenizer, words):
    convs = make_conversations(words, 12, seed=7)
    from_list = list(sft_data_loader(convs, tokenizer, 2, 256, epochs=1))
    from_generator = list(sft_data_loader((c for c in convs), tokenizer, 2, 256, epochs=1))
    assert len(from_list) == len(from_generator) > 1
    for a, b in zip(from_list, from_generator):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
