"""Serve a nanochat model: the chat page (microphone and upload included) and an OpenAI-compatible API.

    python -m scripts.chat_web                          # the newest audio checkpoint, else RL, SFT, base
    python -m scripts.chat_web --source base --tag d4   # a text model (it refuses audio)
    python -m scripts.chat_web --host 0.0.0.0 --api-key SECRET

Then open the printed URL, or point any OpenAI client at URL/v1. On CUDA every visible GPU gets a
copy of the model and its own continuous-batching scheduler (--gpus to use fewer); on CPU one.
"""

import argparse
import os

import torch
import uvicorn

from nanochat.chat_request import Limits
from nanochat.common import compute_init, setup_logging
from nanochat.openai_api import Replica, bind, create_app, url_of
from nanochat.scheduler import Scheduler
from nanochat.speech_lm import CHAT_SOURCES, load_chat_model
from tasks.spoken import SpokenContinuation, SpokenQuestions, SpokenTranscription


def parse_args(argv=None):
    d = Limits()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, choices=CHAT_SOURCES,
                   help="checkpoint kind (default: the newest audio checkpoint, else rl, else sft, else base)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest of that kind)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    p.add_argument("--gpus", type=int, default=None, help="on CUDA, how many GPUs to serve from (default: all)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every /v1 route (default: $NANOCHAT_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests decoding together per scheduler")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="most prompt positions prefilled per scheduler step, so running streams keep flowing "
                        "(default: 256 on CPU, 512 on GPUs; see nanochat/scheduler.py)")
    p.add_argument("--max-queue", type=int, default=256, help="most requests waiting for a row; past it a 503")
    p.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a request may wait for a row; then a 503")
    p.add_argument("--max-messages", type=int, default=d.max_messages, help="most messages in a request")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="most characters of text in a request")
    p.add_argument("--max-audio-mb", type=float, default=d.max_audio_bytes / 2 ** 20, help="largest audio file, MiB")
    p.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds, help="longest audio clip, seconds")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most new tokens a request may ask for")
    p.add_argument("--max-temperature", type=float, default=d.max_temperature, help="highest temperature allowed")
    p.add_argument("--max-top-k", type=int, default=d.max_top_k, help="largest top_k allowed")
    return p.parse_args(argv)


def devices(device_type, gpus):
    """The devices to serve from: every (or the first `gpus`) CUDA device, else the one device."""
    _, _, _, _, device = compute_init(device_type)
    if device.type != "cuda":
        return [device]
    count = torch.cuda.device_count() if gpus is None else min(gpus, torch.cuda.device_count())
    return [torch.device("cuda", i) for i in range(count)]


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    limits = Limits(args.max_messages, args.max_chars, int(args.max_audio_mb * 2 ** 20), args.max_audio_seconds,
                    args.max_tokens, args.max_temperature, args.max_top_k)
    replicas, tokenizer, name = [], None, None
    for device in devices(args.device_type, args.gpus):
        speech_lm, gpt, tokenizer, name = load_chat_model(args.source, args.tag, args.step, device)
        scheduler = Scheduler(gpt, tokenizer, args.max_batch, args.max_queue, args.queue_timeout,
                              name=f"scheduler-{device}", prefill_tokens=args.prefill_tokens).start()
        replicas.append(Replica(scheduler, speech_lm))
    prompts = [task.prompt for task in (SpokenTranscription, SpokenQuestions, SpokenContinuation)]
    app = create_app(replicas, tokenizer, name, limits, args.api_key, SpokenTranscription.prompt, prompts)
    sock = bind(args.host, args.port)
    url = url_of(sock)
    hears = "text and audio" if replicas[0].speech_lm is not None else "text only"
    print(f"serving {name} ({hears}, {len(replicas)} x {replicas[0].scheduler.model.get_device()}) at {url}\n"
          f"  chat page: {url}/   OpenAI API: {url}/v1" + ("   (API key required)" if args.api_key else ""), flush=True)
    try:
        # Open streams get a few seconds to end, so Ctrl-C never waits for a long generation.
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)).run(sockets=[sock])
    finally:
        for replica in replicas:
            replica.scheduler.close()


if __name__ == "__main__":
    main()
