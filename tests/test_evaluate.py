"""Evaluation metrics on crafted replies, and the LLM judge over HTTP.

The judge endpoint is a small OpenAI-compatible HTTP server on loopback standing in for a real LLM
judge (no model API is reachable here); the real `openai` client talks to it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from troupe.config import ConfigError
from troupe.contract import Character
from troupe.evaluate import distinct_n, judge_scores, score_replies

CHARS = {
    "max": Character(id="max", name="Max", language="en"),
    "lin": Character(id="lin", name="林", language="zh"),
}


def _s(cid, did, reply, ref="We fly at dawn, want to come along?"):
    return {"character_id": cid, "dialogue_id": did, "reply": reply, "reference": ref, "context": []}


def test_rule_metrics_count_each_violation():
    samples = [
        _s("max", "d1", "We fly at dawn, want to come along?<emotion>happy</emotion>"),  # perfect copy
        _s("max", "d1", "We fly at dawn, want to come along?"),  # repeats the previous reply of d1
        _s("max", "d2", "As an AI, I do not fly planes."),  # leakage
        _s("max", "d3", "Max: sure thing<emotion>joy</emotion>"),  # name prefix + bad markup
        _s("lin", "d4", "今天的花很好看呢，要不要来看看？", ref="今天的花很好看呢，要不要来看看？"),
    ]
    m = score_replies(samples, CHARS)
    assert m["replies"] == 5
    assert m["assistant_leakage"] == pytest.approx(1 / 5)
    assert m["name_prefix"] == pytest.approx(1 / 5)
    assert m["markup_validity"] == pytest.approx(4 / 5)
    assert m["self_repetition"] == pytest.approx(1 / 5)
    assert m["language_consistency"] == 1.0
    assert 0 < m["rouge_l"] < 1 and m["bleu"] > 0
    wrong_lang = score_replies([_s("lin", "d5", "Sure, the flowers are lovely today, come see them!")], CHARS)
    assert wrong_lang["language_consistency"] == 0.0


def test_distinct_n():
    assert distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)
    assert distinct_n([["a"]], 2) == 0.0


class _Judge(BaseHTTPRequestHandler):
    answer = json.dumps({"human_likeness": 7, "purposefulness": 5, "consistency": 9, "engagement": 6})
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append((self.path, self.headers.get("Authorization"), body))
        out = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": _Judge.answer},
                }
            ],
        }
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture()
def judge_url():
    srv = HTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/v1"
    srv.shutdown()


def test_judge_scores_over_openai_compatible_http(judge_url, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    cfg = {"endpoint": judge_url, "model": "judge-1", "api_key_env": "JUDGE_KEY"}
    scores = judge_scores([_s("max", "d1", "hi"), _s("max", "d2", "yo")], CHARS, cfg)
    assert scores == {
        "judge_human_likeness": 7,
        "judge_purposefulness": 5,
        "judge_consistency": 9,
        "judge_engagement": 6,
    }
    path, auth, body = _Judge.seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "judge-1"
    monkeypatch.setattr(_Judge, "answer", "I think it is good")
    with pytest.raises(ConfigError, match="not JSON"):
        judge_scores([_s("max", "d1", "hi")], CHARS, cfg)
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(ConfigError, match="JUDGE_KEY"):
        judge_scores([_s("max", "d1", "hi")], CHARS, cfg)


def test_truncated_replies_are_not_judged_on_markup():
    cut = _s("max", "d1", "We fly at dawn<emot")
    cut["finished"] = False
    done = _s("max", "d2", "We fly at dawn.<emotion>happy</emotion>")
    m = score_replies([cut, done], CHARS)
    assert m["truncated"] == 0.5 and m["markup_validity"] == 1.0
    broken = _s("max", "d3", "We fly at dawn<emotion>happy")
    assert score_replies([cut, broken], CHARS)["markup_validity"] == 0.0


def test_echoing_the_users_line_is_counted_and_breaks_the_rules():
    """The CharacterEval failure seen in the real-data run: the reply repeats the other speaker's line."""
    from troupe.checks import check_reply

    line = "（笑道）想是在草里睡着了，说得是梦话？"
    echo = _s("lin", "d1", "想是在草里睡着了，说得是梦话？", ref="爷爷呀！我睡他怎么晓得？")
    echo["context"] = [{"role": "user", "content": line, "name": "孙悟空"}]
    answer = _s("lin", "d2", "爷爷呀！我睡着了怎么晓得？", ref="爷爷呀！我睡他怎么晓得？")
    answer["context"] = echo["context"]
    m = score_replies([echo, answer], CHARS)
    assert m["echo_user"] == 0.5
    chk = check_reply(echo["reply"], character_name="林", language="zh", user_text=line)
    assert chk.echo_user and "echoes the user's line" in chk.violations
    assert not check_reply(echo["reply"], character_name="林", language="zh").echo_user  # no user line given


def test_decoding_a_budget_cut_reply_drops_the_partial_character(tiny_model_dir):
    """A Chinese character split over byte-level BPE tokens, cut by max_new_tokens, is not shown as U+FFFD."""
    from transformers import AutoTokenizer

    from troupe.generation import REPLACEMENT_CHAR, decode_reply

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tok("你好，八戒", add_special_tokens=False)["input_ids"]
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith(REPLACEMENT_CHAR))
    assert tok.decode(ids[:cut]).endswith(REPLACEMENT_CHAR)  # what a plain decode shows
    text = decode_reply(tok, ids[:cut])
    assert REPLACEMENT_CHAR not in text and "你好，八戒".startswith(text)
    assert decode_reply(tok, ids) == "你好，八戒"


def test_evaluate_reads_and_writes_uris(tiny_model_dir, tmp_path, monkeypatch):
    """On a cluster every input and output of evaluate is a URI (S3 on a moto server here): the model
    and splits are downloaded, metrics/report published to paths.eval only when the step succeeds."""
    import json
    from pathlib import Path

    import yaml
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port
    from troupe import storage
    from troupe.contract import Character, Dialogue, read_jsonl, write_jsonl
    from troupe.evaluate import evaluate

    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                     "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}.items():  # fmt: skip
            monkeypatch.setenv(k, v)
        import boto3

        boto3.client("s3").create_bucket(Bucket="evalbox")
        sample = Path(__file__).resolve().parents[1] / "data" / "sample"
        chars = read_jsonl(sample / "characters.jsonl", Character)
        ds = read_jsonl(sample / "dialogues.jsonl", Dialogue)
        splits = tmp_path / "splits"
        splits.mkdir()
        write_jsonl(splits / "characters.jsonl", chars)
        for name in ("train", "heldout_dialogues", "heldout_characters"):
            write_jsonl(splits / f"{name}.jsonl", ds[:2])
        storage.upload(splits, "s3://evalbox/run/splits")
        storage.upload(tiny_model_dir, "s3://evalbox/run/base_model")
        params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
        params["paths"].update(splits="s3://evalbox/run/splits", base_model="s3://evalbox/run/base_model",
                               eval="s3://evalbox/run/eval")  # fmt: skip
        params["eval"].update(models=["base"], max_new_tokens=4)
        params["split"]["max_eval_dialogues"] = 1
        metrics = evaluate(params)
        published = json.loads(storage.read_text("s3://evalbox/run/eval/metrics.json"))
        assert published == json.loads(json.dumps(metrics)) and "base" in published
        assert storage.exists("s3://evalbox/run/eval/report.html")
        params["eval"]["models"] = ["sft"]
        params["paths"]["sft_model"] = "s3://evalbox/run/missing"
        with pytest.raises(Exception, match=r"paths\.sft_model"):
            evaluate(params)
    finally:
        srv.stop()
