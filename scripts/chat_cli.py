"""Talk to a nanochat model in the terminal, by voice or by text; replies stream token by token.

    python -m scripts.chat_cli                                          # a conversation
    python -m scripts.chat_cli -p "Why is the sky blue?"                # one reply, then exit
    python -m scripts.chat_cli --audio clip.wav -p "What did I say?"    # one reply about a clip
    python -m scripts.chat_cli --source sft                             # a text chat model

In a conversation: /audio PATH attaches a clip, /clear starts over, /help, /quit (or Ctrl-D)
leaves; Ctrl-C stops a reply. A clip opens a conversation: the model hears it in front of the
whole conversation, the only place it was trained to, so /audio works before the first message
(or after /clear). Each turn prefills only the new tokens (the KV cache is kept between turns);
when the next message and a whole reply (--max-tokens) would not fit in the model's context, the
oldest exchanges are dropped, with a notice on stderr. An audio checkpoint (scripts.audio_train)
is loaded by default; --source rl|sft|base chats with a text model instead (no audio).
"""

import argparse
import sys

try:
    import readline  # noqa: F401 (line editing and history for input(), where the platform has it)
except ImportError:
    pass

from nanochat.common import compute_init, run_cli
from nanochat.conversation import Conversation
from nanochat.engine import Engine, check_sampling
from nanochat.speech_lm import CHAT_SOURCES, load_chat_model
from nanochat.tokenizer import StreamDecoder

HELP = """commands:
  /audio PATH   attach a clip (wav, flac, ogg, mp3); it opens a conversation, so only before the
                first message: the model hears a clip in front of the whole conversation
  /clear        start a new conversation (forgets the clip too)
  /help         this help
  /quit         leave (or Ctrl-D); Ctrl-C stops a reply"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--prompt", default=None, help="answer this one message, print the reply and exit")
    p.add_argument("--audio", default=None, help="an audio file (wav, flac, ogg, mp3) that opens the conversation")
    p.add_argument("--source", default="audio", choices=CHAT_SOURCES, help="which checkpoint kind")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest of that kind)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reply length limit, and the room kept for a reply when old turns are dropped "
                        "(default: half the model's context)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (offset by the turn number at each reply)")
    p.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    return p.parse_args(argv)


class Chat:
    """The terminal side of a Conversation: clips by path, replies streamed as text."""

    def __init__(self, speech_lm, engine, args):
        self.speech_lm, self.args = speech_lm, args
        self.conversation = Conversation(engine, args.max_tokens)
        self.turn = 0

    def attach(self, path):
        """Encode a clip (errors name the file) and open the conversation with it."""
        if self.speech_lm is None:
            raise ValueError(f"--source {self.args.source} is a text model: load an audio checkpoint to use audio")
        self.conversation.attach(self.speech_lm.embed_audio(path))

    def say(self, text, out=sys.stdout):
        """Stream the reply to `text` to `out`; Ctrl-C stops it and keeps what was said."""
        dropped = self.conversation.add_user(text)
        if dropped:
            oldest = "the oldest exchange" if dropped == 1 else f"the {dropped} oldest exchanges"
            print(f"(context full: dropped {oldest} to make room for this message and a "
                  f"{self.conversation.max_tokens}-token reply)", file=sys.stderr)
        self.turn += 1
        decoder, args = StreamDecoder(self.conversation.engine.tokenizer), self.args
        reply = self.conversation.reply(args.temperature, args.top_k, seed=args.seed + self.turn)
        try:
            for token in reply:
                out.write(decoder.add(token))
                out.flush()
        except KeyboardInterrupt:
            reply.close()
            out.write(decoder.flush() + " (stopped)\n")
            return
        out.write(decoder.flush() + "\n")

    def clear(self):
        self.conversation.clear()
        self.turn = 0


def repl(chat):
    print("/help for commands")
    while True:
        try:
            line = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command, _, rest = line.partition(" ")
        try:
            if not line:
                continue
            if command in ("/quit", "/exit"):
                return
            if command == "/clear":
                chat.clear()
                print("(new conversation)")
            elif command == "/audio":
                chat.attach(rest.strip())
                print(f"(attached {rest.strip()}: ask about it)")
            elif command.startswith("/"):
                print(HELP)
            else:
                chat.say(line)
        except (OSError, ValueError) as e:
            print(f"error: {e}")


def main(argv=None):
    args = parse_args(argv)
    check_sampling(args.temperature, args.top_k)  # before loading anything
    _, _, _, _, device = compute_init(args.device_type)
    speech_lm, gpt, tokenizer, _ = load_chat_model(args.source, args.tag, args.step, device)
    chat = Chat(speech_lm, Engine(gpt, tokenizer), args)
    if args.audio:
        chat.attach(args.audio)
    if args.prompt is None:
        repl(chat)
    else:
        chat.say(args.prompt)


if __name__ == "__main__":
    sys.exit(run_cli(main))
