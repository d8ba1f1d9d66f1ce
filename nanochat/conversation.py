"""A multi-turn chat that keeps its KV cache between turns: each turn prefills only what is new.

The history is token ids, laid out as Tokenizer.render_conversation lays out a conversation:
<|bos|>, then per exchange <|user_start|> text <|user_end|> <|assistant_start|> reply
<|assistant_end|>. A reply stays the ids the model produced (calculator calls and their forced
outputs included), never a re-encoding of its text, so the cache always equals a fresh prefill
of the history. After a reply the cache holds all of it but its last token (Engine.decode never
forwards the token it stops on); the next turn prefills that token, <|assistant_end|> and the new
user turn in one forward.

A clip's soft tokens sit in front of <|bos|>, in front of the whole conversation, the only place
the audio stage trains them: a clip opens a conversation and cannot join one under way.

Context guard: a user turn is taken only if the history, the turn and a whole reply (max_tokens)
fit in the model's context (sequence_len); if not, the oldest exchanges are dropped (the clip
stays) and the next reply prefills the rest from scratch, since every position has moved.
"""

from dataclasses import dataclass

from nanochat.engine import KVCache, check_request, context_budget


@dataclass
class Exchange:
    """One user turn as rendered (<|user_start|> ... <|assistant_start|>) and the reply's ids
    (None until the model has answered)."""
    text: str
    prompt: list
    reply: list = None


class Conversation:
    """One conversation with a model through an Engine: add_user(text), then reply(...) streams
    the reply's token ids. max_tokens: the longest reply, and the room the context guard keeps
    for one (None: half the model's context, the other half for the conversation)."""

    def __init__(self, engine, max_tokens=None):
        sequence_len = engine.model.config.sequence_len
        max_tokens = sequence_len // 2 if max_tokens is None else max_tokens
        check_request(max_tokens=max_tokens)
        self.engine, self.max_tokens, self.sequence_len = engine, max_tokens, sequence_len
        special = engine.tokenizer.encode_special
        self.bos, self.assistant_end = special("<|bos|>"), special("<|assistant_end|>")
        self.user_start, self.user_end = special("<|user_start|>"), special("<|user_end|>")
        self.assistant_start = special("<|assistant_start|>")
        self.clear()

    def clear(self):
        """Forget everything, the clip included."""
        self.clip, self.exchanges, self.cache = None, [], None

    def attach(self, clip):
        """Open the conversation with a clip's soft tokens (1, T_a, n_embd), replacing any clip
        attached before the first message. A conversation under way cannot take one."""
        if self.exchanges:
            raise ValueError("a clip can only open a conversation (the model hears it in front of the whole "
                             "conversation, as it was trained): start a new one (/clear) to attach a clip")
        clip = self.engine._check_audio(clip, "the clip's soft tokens")
        context_budget(self.sequence_len, clip.size(1) + 1, self.max_tokens)  # clip + <|bos|> + a reply must fit
        self.clip, self.cache = clip, None

    @property
    def audio_positions(self):
        return 0 if self.clip is None else self.clip.size(1)

    @property
    def tokens(self):
        """The whole history as token ids (what a fresh prefill would take, after the clip)."""
        ids = [self.bos]
        for exchange in self.exchanges:
            ids += exchange.prompt
            if exchange.reply is not None:
                ids += exchange.reply + [self.assistant_end]
        return ids

    def add_user(self, text):
        """Take the user's next message; returns how many of the oldest exchanges the context guard
        dropped to make room for it and a max_tokens reply. A message that does not fit even
        alone is a ValueError, and the conversation is left as it was."""
        if self.exchanges and self.exchanges[-1].reply is None:
            raise ValueError("the last user message has no reply yet: call reply() first")
        prompt = [self.user_start, *self.engine.tokenizer.encode(text), self.user_end, self.assistant_start]
        lengths = [len(e.prompt) + len(e.reply) + 1 for e in self.exchanges]
        used = self.audio_positions + 1 + sum(lengths) + len(prompt)
        dropped = 0
        while dropped < len(lengths) and used + self.max_tokens > self.sequence_len:
            used -= lengths[dropped]
            dropped += 1
        context_budget(self.sequence_len, used, self.max_tokens)  # raises for a turn too long alone
        if dropped:
            del self.exchanges[:dropped]
            self.cache = None  # every position moved: prefill the kept history again
        self.exchanges.append(Exchange(text, prompt))
        return dropped

    def reply(self, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Stream the reply to the last user message as token ids (tool output included, the stop
        token not), prefilling only what the cache lacks. Closing the stream early (Ctrl-C in a
        chat) keeps the reply so far as the reply."""
        if not self.exchanges or self.exchanges[-1].reply is not None:
            raise ValueError("no user message to reply to: call add_user() first")
        check_request(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        exchange, tokens = self.exchanges[-1], self.tokens
        exchange.reply = []  # from here on the message has a reply, if only an empty one
        try:
            if self.cache is None:
                self.cache = KVCache(self.engine.model, 1, self.sequence_len)
            cached, end = int(self.cache.lengths[0]), self.audio_positions + len(tokens)
            logits = self.engine.prefill_chunk(self.cache, tokens, self.clip, cached, end)
            for column, _ in self.engine.decode(self.cache, logits, self.max_tokens, temperature, top_k, top_p, seed):
                if column[0] in self.engine.stop_tokens:
                    return
                exchange.reply.append(column[0])
                yield column[0]
        except GeneratorExit:  # closed at a yield: the cache is consistent
            raise
        except BaseException:  # e.g. Ctrl-C inside a forward: the cache may be half-written
            self.cache = None
            raise
