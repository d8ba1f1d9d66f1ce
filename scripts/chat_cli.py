"""Talk to a nanochat model in the terminal, by voice or by text; replies stream token by token.

    python -m scripts.chat_cli --audio clip.wav "What did I say?"   # one turn, then exit
    python -m scripts.chat_cli                                      # a conversation (REPL)
    python -m scripts.chat_cli --source base "The capital of France is"

In the REPL: /audio PATH attaches a clip, /clear starts over, /quit (or Ctrl-D) leaves. A clip sits
in front of the whole conversation, as in training, so attaching one starts a new conversation.
An audio checkpoint (scripts.audio_train) is loaded by default; --source base|sft chats with a text
model instead (no audio).
"""

import argparse
import sys

from nanochat.common import compute_init
from nanochat.engine import Engine
from nanochat.speech_lm import CHAT_SOURCES, load_chat_model
from nanochat.tokenizer import StreamDecoder

HELP = "commands: /audio PATH (attach a clip; starts a new conversation), /clear, /quit"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default=None, help="one message to answer (omit for a conversation)")
    p.add_argument("--audio", default=None, help="an audio file (wav, flac, ogg, mp3) the message is about")
    p.add_argument("--source", default="audio", choices=CHAT_SOURCES, help="which checkpoint kind")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest of that kind)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reply length limit (default: the rest of the model's context)")
    p.add_argument("--seed", type=int, default=42,
                   help="sampling seed (offset by the conversation length at each reply)")
    p.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    return p.parse_args(argv)


class Chat:
    """A conversation with at most one clip in front of it."""

    def __init__(self, speech_lm, gpt, tokenizer, args):
        self.speech_lm = speech_lm
        self.engine = Engine(gpt, tokenizer)
        self.tokenizer = tokenizer
        self.args = args
        self.clear()

    def clear(self):
        self.messages, self.audio = [], None

    def attach(self, path):
        """Encode a clip (errors name the file) and start a new conversation around it."""
        if self.speech_lm is None:
            raise ValueError(f"--source {self.args.source} is a text model: load an audio checkpoint to use audio")
        audio = self.speech_lm.embed_audio(path)
        self.clear()
        self.audio = audio

    def reply(self, text, out=sys.stdout):
        """Stream the assistant's reply to `text` to `out`; returns the reply."""
        self.messages.append({"role": "user", "content": text})
        tokens = self.tokenizer.render_for_completion({"messages": self.messages})
        generated, text = [], StreamDecoder(self.tokenizer)
        stream = self.engine.generate(tokens, max_tokens=self.args.max_tokens, temperature=self.args.temperature,
                                      top_k=self.args.top_k, seed=self.args.seed + len(self.messages),
                                      audio_features=self.audio)
        try:
            for column, _ in stream:
                if column[0] in self.engine.stop_tokens:
                    break
                generated.append(column[0])
                out.write(text.add(column[0]))
                out.flush()
        except ValueError:
            self.messages.pop()
            raise
        out.write(text.flush() + "\n")
        reply = self.tokenizer.decode(generated)
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def load(args, device):
    """(SpeechLM or None, GPT, tokenizer) for --source/--tag/--step."""
    speech_lm, gpt, tokenizer, _ = load_chat_model(args.source, args.tag, args.step, device)
    return speech_lm, gpt, tokenizer


def repl(chat):
    print(HELP)
    while True:
        try:
            line = input("\n> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        command, _, rest = line.partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return
            if command == "/clear":
                chat.clear()
                print("(new conversation)")
            elif command == "/audio":
                chat.attach(rest.strip())
                print(f"(attached {rest.strip()}: a new conversation about it)")
            elif command.startswith("/"):
                print(HELP)
            else:
                chat.reply(line)
        except (OSError, ValueError) as e:
            print(f"error: {e}")


def main(argv=None):
    args = parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type)
    try:
        chat = Chat(*load(args, device), args)
        if args.audio:
            chat.attach(args.audio)
        if args.prompt is None:
            repl(chat)
        else:
            chat.reply(args.prompt)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
