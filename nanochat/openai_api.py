"""The HTTP server: an OpenAI-compatible API over the continuous-batching schedulers, and the chat page.

    GET  /                          the chat page (nanochat/chat_page.html)
    POST /v1/chat/completions       Chat Completions, streaming (SSE) or not, with input_audio parts
    POST /v1/audio/transcriptions   multipart `file` -> the audio model asked to repeat what it heard
    POST /v1/audio/speech           text -> speech with the offline piper voice
    GET  /v1/models, /health, /stats

Every /v1 route checks the API key when one is set. Requests are checked by nanochat.chat_request;
audio is decoded by nanochat.audio_io, encoded by the replica's Whisper encoder + projector (in a
worker thread, one clip at a time per replica) and handed to a Scheduler with the prompt. A
client that disconnects cancels its generation; a full queue or a queue timeout is a 503 with
Retry-After.
"""

import asyncio
import dataclasses
import importlib.resources
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from nanochat.audio_io import AudioInputError, read_audio, write_speech
from nanochat.chat_request import Limits, RequestError, parse_chat, parse_speech, parse_transcription, sampling_params
from nanochat.common import logger
from nanochat.scheduler import Request, SchedulerClosed, ServerBusy
from nanochat.tokenizer import StreamDecoder

PAGE = "chat_page.html"


@dataclass(eq=False)
class Replica:
    """One copy of the model: its scheduler and, for an audio model, its SpeechLM (same device)."""
    scheduler: object
    speech_lm: object = None
    encode_lock: threading.Lock = field(default_factory=threading.Lock)


class ReplyText:
    """The reply as text deltas: whole characters only, calculator calls as <<expression=result>>,
    no special tokens (StreamDecoder), cut before the first stop string; text that could be the
    start of a stop string is held back until it cannot be."""

    def __init__(self, tokenizer, stop=()):
        self.decoder, self.stop = StreamDecoder(tokenizer), list(stop)
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token):
        """The text that can be sent now ("" once a stop string was seen)."""
        if self.stopped:
            return ""
        self.text += self.decoder.add(token)
        return self._release(final=False)

    def finish(self):
        if self.stopped:
            return ""
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final):
        if self.stop:
            start = max(0, self.sent - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped, final = self.text[:min(hits)], True, True
        hold = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
                                   default=0)
        end = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta


class Generation:
    """A scheduler Request seen from asyncio: its events arrive on an asyncio.Queue."""

    def __init__(self, scheduler, tokens, max_tokens, sampling, audio=None):
        loop = asyncio.get_running_loop()
        self.queue = asyncio.Queue()
        self.request = Request(tokens, max_tokens, sampling, audio,
                               on_event=lambda kind, value: loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value)))
        scheduler.submit(self.request)

    def cancel(self):
        self.request.cancel()

    async def next(self):
        """("token", id) | ("done", reason) | ("error", exc)."""
        return await self.queue.get()


class Refusal(Exception):
    """A request the server turns away for its own reasons (busy, shutting down, failed): the response."""

    def __init__(self, response):
        super().__init__(response.status_code)
        self.response = response


def piper_voice(text, speed):
    """The default TTS voice: piper's offline `joe` (nanochat.speech_data)."""
    from nanochat.speech_data import piper_synthesize
    return piper_synthesize(text, "joe", speed)


def _error(status, message, param=None, code=None, headers=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _busy(exc):
    return _error(503, f"server busy: {exc}; retry in {exc.retry_after} s", code="server_busy",
                  headers={"Retry-After": str(exc.retry_after)})


class BodyLimit:
    """ASGI middleware: a request body over max_bytes is a 413 (declared or streamed), never read whole."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = (f"the request body is over {self.max_bytes / 2 ** 20:.1f} MiB, the most this server reads "
                   f"(from --max-audio-mb and --max-chars)")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, message, code="body_too_large")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.max_bytes:
                raise RequestError(message, status=413, code="body_too_large")
            return event
        return await self.app(scope, limited, send)


async def _json_body(request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None


async def _cancel_on_disconnect(request, generation):
    """Cancel the generation when the client goes away (the body is already read, so the next
    message the server gets for this request is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


def create_app(replicas, tokenizer, model_name, limits=Limits(), api_key=None,
               transcribe_prompt="Repeat what you heard.", audio_prompts=(), speak=piper_voice):
    """The FastAPI app serving `replicas` (a list of Replica, one per device). transcribe_prompt: what
    the audio model is asked for a transcription; audio_prompts: what the page offers to ask about a
    clip (both the model's training prompts, tasks.spoken). speak(text, speed) -> (float32 samples,
    rate): the TTS voice."""
    hears = all(r.speech_lm is not None for r in replicas)
    max_positions = min(r.scheduler.max_positions for r in replicas)
    vocab_size = tokenizer.get_vocab_size()
    page = importlib.resources.files("nanochat").joinpath(PAGE).read_text(encoding="utf-8")
    started = time.time()
    counts = {"audio_requests": 0, "speech_requests": 0, "client_errors": 0}
    speech_lock = threading.Lock()  # one synthesis at a time: piper uses every core already

    async def require_key(request: HTTPRequest):
        if api_key and not secrets.compare_digest(request.headers.get("authorization", "").encode(),
                                                  f"Bearer {api_key}".encode()):
            raise RequestError("missing or wrong API key: send the header `Authorization: Bearer <key>` (the "
                               "server's --api-key or NANOCHAT_API_KEY)", status=401, code="invalid_api_key")

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestError)
    async def request_error(request, exc):
        counts["client_errors"] += 1
        return _error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(Refusal)
    async def refusal(request, exc):
        return exc.response

    def pick():
        return min(replicas, key=lambda r: r.scheduler.load)

    async def embed(replica, data, param):
        """Audio file bytes -> (soft tokens (1, T_a, n_embd) on the replica's device, seconds)."""
        if not hears:
            raise RequestError(f"{param}: {model_name} is a text model and cannot take audio; serve an audio "
                               f"checkpoint (python -m scripts.audio_train) to talk to it", param)
        try:
            samples, rate = read_audio(data, param, limits.max_audio_bytes, limits.max_audio_seconds)
        except AudioInputError as exc:
            raise RequestError(str(exc), param, exc.status) from None

        def encode():
            with replica.encode_lock:
                return replica.speech_lm.embed_audio(samples, rate)
        try:
            audio = await run_in_threadpool(encode)
        except ValueError as exc:  # silent, non-finite, ...: the encoder's own checks
            raise RequestError(f"{param}: {exc}", param) from None
        counts["audio_requests"] += 1
        return audio, len(samples) / rate

    def budget(tokens, audio, requested):
        """max_tokens for a prompt: as asked (if it fits the context) or as many as fit."""
        used = len(tokens) + (0 if audio is None else audio.size(1))
        room = max_positions - used
        detail = f"{len(tokens)} text tokens" + ("" if audio is None else f" + {audio.size(1)} audio positions")
        if room < 1 or (requested is not None and requested > room):
            asked = "" if requested is None else f" + max_tokens {requested}"
            raise RequestError(f"the prompt is {used} positions ({detail}){asked}; the model's context is "
                               f"{max_positions}: shorten the conversation or the clip", "messages",
                               code="context_length_exceeded")
        return requested or min(limits.max_tokens, room)

    async def start(replica, tokens, max_tokens, sampling, audio, request):
        """Submit and wait for the first event: (generation, first event, disconnect watcher). A
        failure before any token is a Refusal (503 busy / shutting down, 500 failed)."""
        try:
            generation = Generation(replica.scheduler, tokens, max_tokens, sampling, audio)
        except ServerBusy as exc:
            raise Refusal(_busy(exc)) from None
        except SchedulerClosed as exc:
            raise Refusal(_error(503, str(exc))) from None
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        first = await generation.next()
        if first[0] == "error":
            watcher.cancel()
            exc = first[1]
            if isinstance(exc, ServerBusy):
                raise Refusal(_busy(exc))
            logger.error("generation failed: %r", exc)
            raise Refusal(_error(503 if isinstance(exc, SchedulerClosed) else 500, f"generation failed: {exc}"))
        return generation, first, watcher

    async def collect(generation, first, reply, watcher):
        """Every event to the end into `reply`: (finish_reason, completion tokens). Stops early on a
        stop string."""
        event, count = first, 0
        try:
            while True:
                kind, value = event
                if kind == "error":
                    raise Refusal(_error(500, f"generation failed: {value}"))
                if kind == "done":
                    reply.finish()
                    return ("stop" if reply.stopped else value), count
                count += 1
                reply.add(value)
                if reply.stopped:
                    generation.cancel()
                    return "stop", count
                event = await generation.next()
        finally:
            watcher.cancel()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "audio": hears, "context": max_positions,
                "limits": dataclasses.asdict(limits), "audio_prompts": list(audio_prompts) if hears else []}

    @app.get("/stats")
    async def stats():
        per = [r.scheduler.stats() for r in replicas]
        total = {k: sum(s[k] for s in per) for k in ("queue_depth", "active_rows", "tokens_per_s", "requests_per_s")}
        return {"model": model_name, "uptime_s": round(time.time() - started, 1), **total, **counts,
                "schedulers": per}

    def model_card():
        return {"id": model_name, "object": "model", "created": int(started), "owned_by": "nanochat"}

    @api.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @api.get("/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise RequestError(f"no model {name!r} here; this server serves {model_name!r}", "model", 404,
                               "model_not_found")
        return model_card()

    @api.post("/chat/completions")
    async def chat_completions(request: HTTPRequest):
        job = parse_chat(await _json_body(request), limits, vocab_size)
        replica = pick()
        audio = None if job.audio is None else (await embed(replica, job.audio.data, job.audio.param))[0]
        tokens = tokenizer.render_for_completion({"messages": job.messages})
        max_tokens = budget(tokens, audio, job.max_tokens)
        generation, first, watcher = await start(replica, tokens, max_tokens, job.sampling, audio, request)
        audio_positions = 0 if audio is None else audio.size(1)
        prompt_tokens = len(tokens) + audio_positions
        header = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_name,
                  "system_fingerprint": model_name}

        def usage(completion):
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                    "prompt_tokens_details": {"audio_tokens": audio_positions}}

        if not job.stream:
            reply = ReplyText(tokenizer, job.stop)
            reason, count = await collect(generation, first, reply, watcher)
            return {**header, "object": "chat.completion", "usage": usage(count), "choices": [{
                "index": 0, "message": {"role": "assistant", "content": reply.text, "refusal": None},
                "logprobs": None, "finish_reason": reason}]}

        watcher.cancel()  # from here Starlette watches the connection and cancels the stream task

        def sse(body):
            return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

        def chunk(delta, reason=None):
            return sse({**header, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]})

        async def events():
            reply, count, event = ReplyText(tokenizer, job.stop), 0, first
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = event
                    if kind == "error":  # after the 200 went out, an error can only be an event
                        yield sse({"error": {"message": f"generation failed: {value}", "type": "server_error"}})
                        break
                    if kind == "token":
                        count += 1
                    delta = reply.add(value) if kind == "token" else reply.finish()
                    if delta:
                        yield chunk({"content": delta})
                    if reply.stopped or kind == "done":
                        yield chunk({}, "stop" if reply.stopped else value)
                        if job.include_usage:
                            yield sse({**header, "object": "chat.completion.chunk", "choices": [], "usage": usage(count)})
                        break
                    event = await generation.next()
                yield "data: [DONE]\n\n"
            finally:
                generation.cancel()  # a no-op once done; stops the row if the client went away

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.post("/audio/transcriptions")
    async def transcriptions(request: HTTPRequest):
        try:
            form = await request.form(max_files=1, max_part_size=limits.max_audio_bytes + 1)
        except RequestError:
            raise
        except Exception as exc:  # starlette's multipart errors: a malformed form, a part over the size
            raise RequestError(f"could not read the multipart form ({exc})") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestError("file is required: the audio, as the multipart/form-data field `file`", "file")
        job = parse_transcription(form, limits)
        replica = pick()
        audio, seconds = await embed(replica, await upload.read(), "file")
        tokens = tokenizer.render_for_completion({"messages": [{"role": "user", "content": transcribe_prompt}]})
        sampling = sampling_params({"temperature": job.temperature, "seed": 0}, limits, vocab_size)
        generation, first, watcher = await start(replica, tokens, budget(tokens, audio, None), sampling, audio, request)
        reply = ReplyText(tokenizer)
        await collect(generation, first, reply, watcher)
        text = reply.text.strip()
        if job.response_format == "text":
            return PlainTextResponse(text)
        if job.response_format == "json":
            return {"text": text}
        seconds = round(seconds, 3)
        return {"task": "transcribe", "language": "english", "duration": seconds, "text": text,
                "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text, "tokens": [],
                              "temperature": job.temperature, "avg_logprob": None, "compression_ratio": None,
                              "no_speech_prob": None}]}

    @api.post("/audio/speech")
    async def speech(request: HTTPRequest):
        job = parse_speech(await _json_body(request))

        def synthesize():
            with speech_lock:
                return speak(job.text, job.speed)
        try:
            samples, rate = await run_in_threadpool(synthesize)
        except RuntimeError as exc:  # the voice is not installed
            return _error(501, f"text to speech is not available: {exc}", code="tts_unavailable")
        counts["speech_requests"] += 1
        data, media_type = write_speech(samples, rate, job.format)
        return Response(data, media_type=media_type)

    app.include_router(api)
    return app


def bind(host="127.0.0.1", port=0):
    """A listening socket (port 0: a free one), for uvicorn.Server.run(sockets=[...])."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def url_of(sock):
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """uvicorn serving an app from a daemon thread on a free local port (tests, benchmarks)."""

    def __init__(self, app, host="127.0.0.1", port=0):
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
