"""What a valid OpenAI-style request to the server is: parsing and checking request bodies against the
server's limits, with errors that name the field and the limit (the server turns them into 4xx).

The model hears at most one clip, in front of the whole conversation (as it was trained, and as in
scripts.chat_cli): an `input_audio` part may sit in any user message, but a second clip is refused.
"""

import base64
import binascii
import math
import re
import secrets
from dataclasses import dataclass, field

from nanochat.audio_io import INPUT_FORMATS, SPEECH_FORMATS
from nanochat.engine import SamplingParams
from nanochat.tokenizer import reply_parts

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_SPEECH_CHARS = 4096  # OpenAI's limit on /v1/audio/speech input
SPEED_RANGE = (0.25, 4.0)  # OpenAI's range for /v1/audio/speech speed
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")
_DATA_URL = re.compile(r"data:[\w/+.-]*;base64,", re.ASCII)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (each a flag of scripts.chat_web)."""
    max_messages: int = 64
    max_chars: int = 32_000  # all the text of a request together
    max_audio_bytes: int = 25 * 2 ** 20  # OpenAI's upload limit for transcriptions
    max_audio_seconds: float = 30.0  # Whisper's window; the model was trained on clips of a few seconds
    max_tokens: int = 1024
    max_temperature: float = 2.0  # OpenAI's range
    max_top_k: int = 1000

    @property
    def max_body_bytes(self):
        """The largest request body worth reading: base64 audio (4/3) plus text (JSON escapes a
        character to at most 12 bytes, a surrogate pair) plus 64 KiB for the rest."""
        return self.max_audio_bytes * 4 // 3 + 12 * self.max_chars + 2 ** 16


class RequestError(ValueError):
    """A request the server refuses: HTTP status, message, and the offending field (OpenAI's `param`)."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass
class AudioPart:
    """An audio clip as sent: its bytes, declared format and where it was (for errors)."""
    data: bytes
    format: str
    param: str


@dataclass
class ChatJob:
    """A checked chat request: messages the tokenizer renders, at most one clip, and the generation."""
    messages: list
    audio: AudioPart = None
    max_tokens: int = None  # None: as many as fit (up to Limits.max_tokens)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    include_usage: bool = False
    stop: list = field(default_factory=list)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body, name, default, low, high, low_open=False):
    """A finite number in [low, high] ((low, high] with low_open), or default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if not _is_number(value) or not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise RequestError(f"{name} must be a number in {interval}, got {value!r}", name)
    return value


def _integer(body, name, default, low, high, flag=None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        limit = f" ({flag})" if flag else ""
        raise RequestError(f"{name} must be an integer in [{low}, {high}]{limit}, got {value!r}", name)
    return value


def check_text(text, param):
    """Refuse text that is not valid Unicode (a lone surrogate, from JSON's \\ud800 escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{param} holds a lone surrogate (U+{ord(text[exc.start]):04X} at character "
                           f"{exc.start}): not valid Unicode text", param) from None
    return text


def sampling_params(body, limits, vocab_size):
    """temperature, top_p, top_k (an extension, as in vLLM) and seed of a request."""
    temperature = _number(body, "temperature", 1.0, 0.0, limits.max_temperature)
    top_p = _number(body, "top_p", None, 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", None, 1, min(limits.max_top_k, vocab_size), "--max-top-k")
    seed = _integer(body, "seed", None, 0, 2 ** 63 - 1)
    return SamplingParams(temperature, top_k, None if top_p == 1.0 else top_p,
                          secrets.randbits(63) if seed is None else seed)


def _audio_part(part, param, limits):
    spec = part.get("input_audio")
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise RequestError(f"{param}.input_audio must be an object with a base64 string `data` and a `format`",
                           f"{param}.input_audio")
    fmt = spec.get("format")
    if fmt not in INPUT_FORMATS:
        raise RequestError(f"{param}.input_audio.format {fmt!r} is not supported: use one of {', '.join(INPUT_FORMATS)}",
                           f"{param}.input_audio.format")
    text = _DATA_URL.sub("", spec["data"], count=1)
    if len(text) * 3 // 4 > limits.max_audio_bytes:
        raise RequestError(f"{param}.input_audio.data is {len(text) * 3 / 4 / 2 ** 20:.1f} MiB of audio; the limit is "
                           f"{limits.max_audio_bytes / 2 ** 20:.1f} MiB (--max-audio-mb)", f"{param}.input_audio.data",
                           status=413)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{param}.input_audio.data is not valid base64", f"{param}.input_audio.data") from None
    return AudioPart(data, fmt, f"{param}.input_audio")


def _content(message, i, limits, audio):
    """(text, clips found) of a message's content: a string or a list of text / input_audio parts."""
    param = f"messages[{i}].content"
    content = message.get("content")
    if isinstance(content, str):
        return check_text(content, param), audio
    if content is None and message["role"] == "assistant":
        if message.get("tool_calls") or message.get("function_call"):
            raise RequestError(f"messages[{i}] holds tool calls: this server has no tool calling", f"messages[{i}]")
        return "", audio
    if not isinstance(content, list):
        raise RequestError(f"{param} must be a string or a list of content parts", param)
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(check_text(part["text"], f"{where}.text"))
        elif kind == "input_audio" and message["role"] == "user":
            if audio is not None:
                raise RequestError(f"{where} is a second audio clip (the first is {audio.param}); this model hears one "
                                   f"clip, in front of the whole conversation: start a new conversation for another",
                                   where)
            audio = _audio_part(part, where, limits)
        elif kind == "input_audio":
            raise RequestError(f"{where}: only user messages can hold audio", where)
        elif kind in ("image_url", "file", "input_image", "input_file"):
            raise RequestError(f"{where} is {kind!r}: this model takes text and audio only", where)
        else:
            raise RequestError(f"{where} must be {{\"type\": \"text\", \"text\": ...}} or "
                               f"{{\"type\": \"input_audio\", \"input_audio\": {{\"data\": ..., \"format\": ...}}}}", where)
    return "\n".join(texts), audio


def _unsupported(body):
    """Refuse options that would silently change the meaning of the request if ignored."""
    if body.get("n") not in (None, 1):
        raise RequestError(f"n must be 1 (one choice per request), got {body['n']!r}", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise RequestError("logprobs are not supported", "logprobs")
    if body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none", "auto"):
        raise RequestError("tools are not supported: this model has no tool calling (its calculator runs by itself)",
                           "tools")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(f"{name} is not supported (only 0)", name)
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported", "logit_bias")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise RequestError("response_format must be {\"type\": \"text\"}: JSON modes are not supported", "response_format")
    if "audio" in (body.get("modalities") or []):
        raise RequestError("audio output is not supported here: speak the reply with /v1/audio/speech", "modalities")


def parse_chat(body, limits, vocab_size):
    """A /v1/chat/completions body -> ChatJob, or RequestError naming what is wrong."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
    if len(messages) > limits.max_messages:
        raise RequestError(f"{len(messages)} messages; the limit is {limits.max_messages} (--max-messages)", "messages")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise RequestError("model must be a string", "model")
    _unsupported(body)

    system, turns, audio, chars = [], [], None, 0
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}"
                               + (" (this server has no tool calling)" if role in ("tool", "function") else ""),
                               f"messages[{i}].role")
        clips_before = audio
        text, audio = _content(message, i, limits, audio)
        chars += len(text)
        if role == "user" and not text.strip() and audio is clips_before:
            raise RequestError(f"messages[{i}] is empty: give it text or an input_audio part", f"messages[{i}].content")
        if role in ("system", "developer"):
            if turns:
                raise RequestError(f"messages[{i}]: a {role} message must come before the conversation", f"messages[{i}]")
            system.append(text)
            continue
        if turns and turns[-1]["role"] == role:  # consecutive messages of one role read as one
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    if chars > limits.max_chars:
        raise RequestError(f"the messages hold {chars} characters; the limit is {limits.max_chars} (--max-chars)",
                           "messages")
    if not turns or turns[0]["role"] != "user":
        raise RequestError("the conversation must start with a user message (after any system messages)", "messages")
    if turns[-1]["role"] != "user":
        raise RequestError("the last message must be the user's: the model replies to it", "messages")
    if system:
        turns.insert(0, {"role": "system", "content": "\n\n".join(system)})
    for turn in turns:  # a calculator call the server showed as <<expression=result>> is a tool call again
        if turn["role"] == "assistant":
            turn["content"] = reply_parts(turn["content"])

    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES
                             or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings", "stop")
    stream_options = body.get("stream_options") or {}
    if body.get("stream") not in (None, True, False) or not isinstance(stream_options, dict):
        raise RequestError("stream must be true or false, stream_options an object", "stream")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatJob(
        messages=turns, audio=audio,
        max_tokens=_integer({"max_tokens": max_tokens}, "max_tokens", None, 1, limits.max_tokens, "--max-tokens"),
        sampling=sampling_params(body, limits, vocab_size),
        stream=bool(body.get("stream")), include_usage=bool(stream_options.get("include_usage")),
        stop=[check_text(s, "stop") for s in stop or []])


@dataclass
class SpeechJob:
    text: str
    format: str
    speed: float


def parse_speech(body):
    """A /v1/audio/speech body -> SpeechJob. Every voice name speaks with the one offline voice."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise RequestError("input must be a non-empty string: the text to speak", "input")
    if len(text) > MAX_SPEECH_CHARS:
        raise RequestError(f"input is {len(text)} characters; the limit is {MAX_SPEECH_CHARS}", "input")
    fmt = body.get("response_format") or "mp3"  # OpenAI's default
    if fmt not in SPEECH_FORMATS:
        raise RequestError(f"response_format {fmt!r} is not supported: use one of {', '.join(SPEECH_FORMATS)}",
                           "response_format")
    if body.get("stream_format") not in (None, "audio"):
        raise RequestError("stream_format must be 'audio' (SSE speech is not supported)", "stream_format")
    if body.get("voice") is not None and not isinstance(body["voice"], (str, dict)):
        raise RequestError("voice must be a string", "voice")
    return SpeechJob(check_text(text, "input"), fmt, _number(body, "speed", 1.0, *SPEED_RANGE))


@dataclass
class TranscriptionJob:
    response_format: str
    temperature: float


def parse_transcription(form, limits):
    """The non-file fields of a /v1/audio/transcriptions form -> TranscriptionJob. The model reads
    English only; `prompt` (a style hint for Whisper) has nothing to steer here and is ignored."""
    fmt = form.get("response_format") or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise RequestError(f"response_format {fmt!r} is not supported: use one of {', '.join(TRANSCRIPTION_FORMATS)}",
                           "response_format")
    language = (form.get("language") or "en").lower()
    if language not in ("en", "english"):
        raise RequestError(f"language {language!r} is not supported: this model transcribes English", "language")
    if str(form.get("stream", "false")).lower() not in ("false", "0", ""):
        raise RequestError("streaming transcription is not supported", "stream")
    try:
        temperature = float(form.get("temperature") or 0.0)
    except ValueError:
        raise RequestError(f"temperature must be a number, got {form.get('temperature')!r}", "temperature") from None
    return TranscriptionJob(fmt, _number({"temperature": temperature}, "temperature", 0.0, 0.0, limits.max_temperature))
