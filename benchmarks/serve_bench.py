"""Serving throughput and latency through HTTP: continuous batching vs one request at a time.

A random d6-sized speech model (the GPT, a random projector and the whisper-base encoder) is saved
to a temporary base dir and served by `python -m scripts.chat_web`: with --max-batch 16 (continuous
batching; once per --prefill-tokens budget given) and with --max-batch 1 (one request at a time:
the same scheduler admitting one row), each in turn, for --repeats rounds, so every configuration
sees the same machine and the spread over rounds shows its noise. For 1, 4 and 16 concurrent
clients, each sending streaming requests back to back (a 17-21-token prompt, --max-tokens new
tokens at temperature 1), it measures requests/s, aggregate tokens/s, time to first token (the
first SSE chunk, sent once the first token exists) split into the mean time queued in the
scheduler, in the prefill and the rest (HTTP, parsing, tokenization, streaming), the p99 gap
between chunks of a stream, and p50/p95 latency. On the continuous servers, 4 streams decode while
prompts as long as the context allows arrive: the longest gap the streams see (what the prefill
budget bounds) and the long prompts' own TTFT. On the first continuous server with one client, how
much later the first token of a request with a clip of 1-8 s comes than without one: the encoder +
prefill cost per second of audio.

    python -m benchmarks.serve_bench [--repeats 3] [--prefill-tokens 64 256 1024] [--threads 1]

Prints tables (median and range over the rounds) and a final JSON line.
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


def get(server, path):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("GET", path)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def stream(server, body):
    """One streaming request: (seconds to the first chunk, seconds to [DONE], completion tokens,
    prompt tokens, the gaps in seconds between content chunks after the first)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True,
                                                                "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
    first, usage, chunks = None, {}, []
    for line in response:
        if not line.startswith(b"data: "):
            continue
        now = time.perf_counter()
        first = first or now
        if line.strip() == b"data: [DONE]":
            break
        event = json.loads(line[6:])
        usage = event.get("usage") or usage
        if any(c["delta"].get("content") for c in event.get("choices", [])):
            chunks.append(now)
    end = time.perf_counter()
    conn.close()
    gaps = [b - a for a, b in zip(chunks, chunks[1:])]
    return first - start, end - start, usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0), gaps


def percentile(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def load_test(server, clients, per_client, max_tokens):
    """`clients` threads, each sending `per_client` requests back to back. The server's /stats
    counters before and after give the mean time a request queued (for the step in flight and the
    prefills ahead of it) and spent in its prefill; the rest of the mean TTFT is HTTP, request
    parsing, tokenization and streaming."""
    def client(i):
        return [stream(server, {"messages": [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}],
                                "max_tokens": max_tokens, "temperature": 1.0, "seed": 1000 * i + k})
                for k in range(per_client)]
    before = get(server, "/stats")["schedulers"]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        per_client = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    later = [r[0] for rs in per_client for r in rs[1:]]  # the burst at the start left out
    after = get(server, "/stats")["schedulers"]
    ttft, latency, tokens, _, gaps = zip(*results)
    gaps = [g for gs in gaps for g in gs]
    n = len(results)

    def mean_of(key):
        return sum(a[key] - b[key] for a, b in zip(after, before)) / n
    return {"clients": clients, "requests": n, "requests_per_s": n / wall,
            "tokens_per_s": sum(tokens) / wall, "mean_tokens": sum(tokens) / n,
            "ttft_mean": sum(ttft) / n, "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
            "ttft_p95_later": percentile(later, 95),
            "queue_mean": mean_of("queue_seconds"), "prefill_mean": mean_of("prefill_seconds"),
            "prefill_forwards": sum(a["prefills"] - b["prefills"] for a, b in zip(after, before)),
            "gap_p50": percentile(gaps, 50), "gap_p99": percentile(gaps, 99),
            "latency_p50": percentile(latency, 50), "latency_p95": percentile(latency, 95)}


def long_prompt_test(server, streamers, max_tokens, repeats=3):
    """`streamers` clients stream `max_tokens` tokens each while another sends `repeats` prompts as
    long as the context allows, one after another: the longest gap the streamers see between two
    chunks, and the long prompts' time to first token."""
    context = get(server, "/health")["context"]
    words = " ".join(PROMPTS * 40).split()
    long_text = " ".join(words[:int(0.6 * (context - max_tokens))])  # ~1.3 tokens a word; checked below

    def streamer(i):
        return stream(server, {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                               "max_tokens": max_tokens, "temperature": 1.0, "seed": i})

    def long_client():
        time.sleep(0.3)  # the streamers are decoding by now
        return [stream(server, {"messages": [{"role": "user", "content": long_text}], "max_tokens": 1,
                                "temperature": 0}) for _ in range(repeats)]
    with ThreadPoolExecutor(streamers + 1) as pool:
        decoding = [pool.submit(streamer, i) for i in range(streamers)]
        longs = pool.submit(long_client).result()
        gaps = [g for f in decoding for g in f.result()[4]]
    return {"streamers": streamers, "long_prompt_tokens": longs[0][3], "long_ttft_p50": percentile([r[0] for r in longs], 50),
            "stream_gap_p50": percentile(gaps, 50), "stream_gap_max": max(gaps)}


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


def spread(values, scale=1.0, fmt="{:.0f}"):
    """'median (min-max)' of a metric over the repeats."""
    values = [v * scale for v in values]
    text = fmt.format(statistics.median(values))
    return text if len(values) == 1 else f"{text} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6, help="GPT depth of the random model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=8, help="requests each client sends in a row")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of every configuration, interleaved (the spread shows the machine's noise)")
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[None],
                        help="prefill budgets of the continuous server to compare (default: the server's own)")
    parser.add_argument("--audio-seconds", type=float, nargs="+", default=[1, 2, 4, 8], help="clip lengths to time")
    args = parser.parse_args()

    base_dir = tempfile.mkdtemp(prefix="serve_bench_")
    configs = {"one at a time": ("--max-batch", "1")}
    for budget in args.prefill_tokens:
        name = "continuous" if budget is None else f"continuous, prefill {budget}"
        configs[name] = ("--max-batch", "16") + (() if budget is None else ("--prefill-tokens", str(budget)))
    continuous = [m for m in configs if m != "one at a time"]
    rows, longs, audio = [], [], []
    try:
        config = save_bench_model(base_dir, args.depth)
        print(f"d{args.depth}: {config.n_layer} layers x {config.n_embd} wide, vocab {config.vocab_size}, "
              f"{args.max_tokens} new tokens a request, threads {args.threads or torch.get_num_threads()}, "
              f"{args.repeats} rounds, load average {os.getloadavg()[0]:.1f} at the start")
        for round_ in range(args.repeats):
            for mode, flags in configs.items():
                server = Server(base_dir, args.threads, *flags, "--max-tokens", str(args.max_tokens),
                                "--queue-timeout", "3600")
                try:
                    stream(server, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})
                    for clients in args.clients:
                        rows.append({"mode": mode, "round": round_,
                                     **load_test(server, clients, args.requests_per_client, args.max_tokens)})
                    if mode in continuous:
                        longs.append({"mode": mode, "round": round_, **long_prompt_test(server, 4, args.max_tokens)})
                    if mode == continuous[0]:
                        audio.append(audio_cost(server, args.audio_seconds))
                finally:
                    server.close()
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)

    def cells(group, key, scale=1.0, fmt="{:.0f}"):
        return spread([r[key] for r in group], scale, fmt)

    print(f"\nmedian (min-max) over {args.repeats} rounds; times in ms unless marked")
    print("| mode | clients | req/s | tok/s | TTFT p50 | TTFT p95 | p95 without the first burst "
          "| TTFT mean = queue + prefill + rest | chunk gap p99 | latency p95 (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["clients"]), []).append(r)
    for (mode, clients), group in groups.items():
        rest = [r["ttft_mean"] - r["queue_mean"] - r["prefill_mean"] for r in group]
        print(f"| {mode} | {clients} | {cells(group, 'requests_per_s', fmt='{:.2f}')} | {cells(group, 'tokens_per_s')} | "
              f"{cells(group, 'ttft_p50', 1e3)} | {cells(group, 'ttft_p95', 1e3)} | {cells(group, 'ttft_p95_later', 1e3)} | "
              f"{cells(group, 'ttft_mean', 1e3)} = "
              f"{cells(group, 'queue_mean', 1e3)} + {cells(group, 'prefill_mean', 1e3)} + {spread(rest, 1e3)} | "
              f"{cells(group, 'gap_p99', 1e3)} | {cells(group, 'latency_p95', fmt='{:.2f}')} |")
    print("\n| mode | long prompt (tokens) | its TTFT p50 | 4 streams: chunk gap p50 | longest gap |")
    print("|---|---|---|---|---|")
    by_mode = {}
    for r in longs:
        by_mode.setdefault(r["mode"], []).append(r)
    for mode, group in by_mode.items():
        print(f"| {mode} | {group[0]['long_prompt_tokens']} | {cells(group, 'long_ttft_p50', 1e3)} | "
              f"{cells(group, 'stream_gap_p50', 1e3)} | {cells(group, 'stream_gap_max', 1e3)} |")

    top, summary = max(args.clients), {}
    for mode in continuous:
        speedups = [groups[mode, top][i]["tokens_per_s"] / groups["one at a time", top][i]["tokens_per_s"]
                    for i in range(args.repeats)]
        summary[mode] = {"speedup_tokens_per_s": speedups}
        print(f"\n{mode}: at {top} clients {spread(speedups, fmt='{:.2f}')}x the aggregate tokens/s of one at a "
              f"time (target >= 3x: {'met' if min(speedups) >= 3 else 'NOT met'} in every round)")
        if 1 in args.clients and 4 in args.clients:
            ratios = [groups[mode, 4][i]["ttft_p95"] / groups[mode, 1][i]["ttft_p95"] for i in range(args.repeats)]
            summary[mode]["ttft_p95_ratio_4_vs_1"] = ratios
            later = [groups[mode, 4][i]["ttft_p95_later"] / groups[mode, 1][i]["ttft_p95_later"]
                     for i in range(args.repeats)]
            summary[mode]["ttft_p95_later_ratio_4_vs_1"] = later
            print(f"{mode}: p95 time to first token at 4 clients {spread(ratios, fmt='{:.2f}')}x the single-client "
                  f"value (target < 2x: {'met' if max(ratios) < 2 else 'NOT met'} in every round); "
                  f"{spread(later, fmt='{:.2f}')}x without each client's first request (the burst at the start)")
    per_second = [a["per_second"] for a in audio]
    print(f"audio: +{spread(per_second, 1e3)} ms to first token per second of audio (encoder + prefill; text-only "
          f"TTFT {spread([a['text_ttft'] for a in audio], 1e3)} ms); "
          + ", ".join(f"{s:g} s: +{spread([a['added'][s] for a in audio], 1e3)} ms" for s in args.audio_seconds))
    print(json.dumps({"rows": rows, "long_prompt": longs, "summary": summary,
                      "audio": [{**a, "added": {str(k): v for k, v in a["added"].items()}} for a in audio]}))


if __name__ == "__main__":
    main()
