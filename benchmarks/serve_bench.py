"""Serving throughput and latency through HTTP: continuous batching vs one request at a time.

A random d6-sized speech model (the GPT, a random projector and the whisper-base encoder) is saved
to a temporary base dir and served twice by `python -m scripts.chat_web`: with --max-batch 16
(continuous batching) and with --max-batch 1 (one request at a time: the same scheduler admitting
one row). For 1, 4 and 16 concurrent clients, each sending streaming requests back to back (a
~40-token prompt, --max-tokens new tokens at temperature 1), it measures requests/s, aggregate
tokens/s, time to first token (the first SSE chunk, sent once the first token exists) and p50/p95
latency. Then, on the continuous server with one client, how much later the first token of a
request with a clip of 1-8 s comes than without one: the encoder + prefill cost per second of audio.

    python -m benchmarks.serve_bench [--requests-per-client 2] [--max-tokens 64] [--threads 2]

Prints a table and a final JSON line.
"""

import argparse
import base64
import dataclasses
import http.client
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import soundfile as sf
import torch

from nanochat.audio import AudioPath
from nanochat.gpt import GPT, config_for_depth
from nanochat.speech_lm import SpeechLM, encoder_meta, save_speech_lm
from nanochat.tokenizer import Tokenizer, get_tokenizer
from nanochat.whisper_weights import resolve_weights

PROMPTS = ["Tell me about the history of the printing press in Europe.",
           "Write a short poem about the sea at night, with rhymes.",
           "Explain how a steam engine turns heat into motion, step by step.",
           "What are the main differences between a violin and a viola?",
           "Describe a walk through a busy market in the early morning."]


def tokenizer_for_bench():
    """The trained tokenizer under the base dir, else one trained here on the standard library."""
    try:
        return get_tokenizer()
    except FileNotFoundError:
        from nanochat.dataset import stdlib_docs
        return Tokenizer.train_from_iterator(islice(stdlib_docs(), 400), vocab_size=8192)


def save_bench_model(base_dir, depth):
    """A random speech model (d`depth` GPT, whisper-base, stack 4) as an audio checkpoint in base_dir."""
    tokenizer = tokenizer_for_bench()
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    config = config_for_depth(depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=512)
    with torch.device("meta"):
        gpt = GPT(config)
    gpt.to_empty(device="cpu")
    gpt.init_weights()
    weights_dir, _ = resolve_weights("openai/whisper-base")
    model = SpeechLM(gpt, AudioPath(config.n_embd, 4, model_id=str(weights_dir)))
    with torch.no_grad():  # off the zero init so every layer (and the projector) does real work
        for p in list(gpt.parameters()) + list(model.projector.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    meta = {"step": 0, "model_config": dataclasses.asdict(config), "encoder": encoder_meta(model, str(weights_dir))}
    save_speech_lm(os.path.join(base_dir, "audio_checkpoints", f"bench_d{depth}"), 0, model, None, meta)
    return config


class Server:
    """scripts.chat_web in a subprocess on a free port."""

    def __init__(self, base_dir, threads, *flags):
        env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "HF_HUB_OFFLINE": "1"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu", "--port", "0",
                                      *flags], env=env, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if " at http" not in line:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line!r}")
        parts = urllib.parse.urlsplit(line.split(" at ")[1].split()[0])
        self.host, self.port = parts.hostname, parts.port

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def stream(server, body):
    """One streaming request: (seconds to the first chunk, seconds to [DONE], completion tokens)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True,
                                                                "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: "):
            continue
        first = first or time.perf_counter()
        if line.strip() == b"data: [DONE]":
            break
        usage = json.loads(line[6:]).get("usage")
        tokens = usage["completion_tokens"] if usage else tokens
    end = time.perf_counter()
    conn.close()
    return first - start, end - start, tokens


def percentile(values, q):
    return float(np.percentile(values, q))


def load_test(server, clients, per_client, max_tokens):
    """`clients` threads, each sending `per_client` requests back to back."""
    def client(i):
        return [stream(server, {"messages": [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}],
                                "max_tokens": max_tokens, "temperature": 1.0, "seed": 1000 * i + k})
                for k in range(per_client)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ttft, latency, tokens = zip(*results)
    return {"clients": clients, "requests": len(results), "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(tokens) / wall, "mean_tokens": sum(tokens) / len(results),
            "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
            "latency_p50": percentile(latency, 50), "latency_p95": percentile(latency, 95)}


def audio_cost(server, seconds_list, repeats=3):
    """Median extra time to first token of a request with a clip of each length over one without."""
    rng = np.random.default_rng(0)

    def ttft(content):
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0}
        return statistics.median(stream(server, body)[0] for _ in range(repeats))
    text = "Repeat what you heard."
    base = ttft(text)
    added = {}
    for seconds in seconds_list:
        buf = io.BytesIO()
        sf.write(buf, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000, format="WAV")
        clip = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(),
                                                       "format": "wav"}}
        added[seconds] = ttft([{"type": "text", "text": text}, clip]) - base
    slope, intercept = np.polyfit(list(added), list(added.values()), 1)
    return {"text_ttft": base, "added": added, "per_second": float(slope), "intercept": float(intercept)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6, help="GPT depth of the random model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in a row")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: all cores)")
    parser.add_argument("--audio-seconds", type=float, nargs="+", default=[1, 2, 4, 8], help="clip lengths to time")
    args = parser.parse_args()

    base_dir = tempfile.mkdtemp(prefix="serve_bench_")
    try:
        config = save_bench_model(base_dir, args.depth)
        print(f"d{args.depth}: {config.n_layer} layers x {config.n_embd} wide, vocab {config.vocab_size}, "
              f"{args.max_tokens} new tokens a request, threads {args.threads or torch.get_num_threads()}")
        modes = {"continuous": ("--max-batch", "16"), "one at a time": ("--max-batch", "1")}
        rows, audio = [], None
        for mode, flags in modes.items():
            server = Server(base_dir, args.threads, *flags, "--max-tokens", str(args.max_tokens),
                            "--queue-timeout", "3600")
            try:
                stream(server, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})
                for clients in args.clients:
                    rows.append({"mode": mode, **load_test(server, clients, args.requests_per_client, args.max_tokens)})
                if mode == "continuous":
                    audio = audio_cost(server, args.audio_seconds)
            finally:
                server.close()
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)

    print("\n| mode | clients | requests | req/s | tok/s | TTFT p50 | TTFT p95 | latency p50 | latency p95 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p95'] * 1e3:.0f} ms | {r['latency_p50']:.2f} s | "
              f"{r['latency_p95']:.2f} s |")
    by = {(r["mode"], r["clients"]): r for r in rows}
    top = max(args.clients)
    speedup = by["continuous", top]["tokens_per_s"] / by["one at a time", top]["tokens_per_s"]
    ttft_ratio = by["continuous", 4]["ttft_p95"] / by["continuous", 1]["ttft_p95"] if 4 in args.clients else None
    print(f"\ncontinuous batching at {top} clients: {speedup:.2f}x the aggregate tokens/s of one at a time "
          f"(target >= 3x: {'met' if speedup >= 3 else 'NOT met'})")
    if ttft_ratio is not None:
        print(f"p95 time to first token at 4 clients: {ttft_ratio:.2f}x the single-client value "
              f"(target < 2x: {'met' if ttft_ratio < 2 else 'NOT met'})")
    print(f"audio: +{audio['per_second'] * 1e3:.0f} ms to first token per second of audio (encoder + prefill; "
          f"intercept {audio['intercept'] * 1e3:.0f} ms, text-only TTFT {audio['text_ttft'] * 1e3:.0f} ms); "
          + ", ".join(f"{s:g} s: +{a * 1e3:.0f} ms" for s, a in audio["added"].items()))
    print(json.dumps({"rows": rows, "speedup_tokens_per_s": speedup, "ttft_p95_ratio_4_vs_1": ttft_ratio,
                      "audio": {**audio, "added": {str(k): v for k, v in audio["added"].items()}}}))


if __name__ == "__main__":
    main()
