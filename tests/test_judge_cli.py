"""``troupe judge calibrate | ratings`` end to end: the CLI (click, in process) against a scripted judge
(tests/openai_standin.py: real uvicorn HTTP on loopback, the real ``openai`` client through
AgentClient), MLflow on a temporary SQLite store set through ``registry.tracking_uri``. The judges are
scripted per test: copying the humans, random, always preferring one model, position-biased.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.openai_standin import StandIn
from tests.test_judge import CHARS, CONTEXT, _labels, _reply_blocks
from troupe.cli import cli
from troupe.contract import write_jsonl
from troupe.dialogue.contract import DIMENSIONS, Conversation, Scenario

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")


def _invoke(tmp_path: Path, url: str, *args: str) -> dict:
    """Run ``troupe judge ...`` with the judge at ``url`` and MLflow under ``tmp_path``; returns the
    MLflow run's metrics, params and tags as ``{"out": stdout, "metrics": ..., "tags": ...}``."""
    sets = [
        f"agents.judge.base_url={url}",
        "agents.judge.model=judge-1",
        f"registry.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "registry.experiment=judge-cli-test",
    ]
    argv = ["judge", *args, "--params", PARAMS]
    for s in sets:
        argv += ["--set", s]
    r = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return {"out": r.output}


def _run(tmp_path: Path, run_id: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)


# ----------------------------------------------------------------------------------------- calibrate


def _setup_labels(tmp_path: Path, n: int) -> tuple[list, Path]:
    labels = _labels(n, seed=0)
    export = tmp_path / "export"
    export.mkdir()
    write_jsonl(export / "labels.jsonl", labels)
    chars = tmp_path / "characters.jsonl"
    write_jsonl(chars, list(CHARS.values()))
    return labels, chars


def test_calibrate_a_copying_judge_agrees_and_a_random_one_does_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    labels, chars = _setup_labels(tmp_path, 30)
    truth = {lab.reply_a: (lab, "a") for lab in labels} | {lab.reply_b: (lab, "b") for lab in labels}

    def copies(messages, model, body):
        lab, side = truth[re.search(r"reply-\d+-[ab]", messages[-1]["content"]).group(0)]
        return json.dumps({"dimensions": lab.dimensions[side]})

    def random_judge(messages, model, body):
        # random but fixed per reply (requests arrive in any order): the same draw on every run
        rng = random.Random(re.search(r"reply-\d+-[ab]", messages[-1]["content"]).group(0))
        return json.dumps({"dimensions": {d: rng.randint(1, 10) for d in DIMENSIONS}})

    docs = {}
    for name, respond in (("copy", copies), ("random", random_judge)):
        out = tmp_path / name
        with StandIn(respond) as s:
            # default labels path: feedback.export_dir/labels.jsonl
            got = _invoke(
                tmp_path, s.base_url, "calibrate", "--out", str(out), "--characters", str(chars),
                "--concurrency", "6", "--resamples", "300",
                "--set", f"feedback.export_dir={tmp_path / 'export'}",
            )  # fmt: skip
        assert len(s.requests) == 60  # both sides of 30 labels
        assert "spearman_human_likeness" in got["out"]  # the printed table
        docs[name] = json.loads((out / "calibration.json").read_text())
        assert (out / "calibration.md").read_text().count("| spearman_") == len(DIMENSIONS)
        assert docs[name]["labels"] == 30 and docs[name]["scores"]["ok"] == 60
    copy, rand = docs["copy"]["metrics"], docs["random"]["metrics"]
    for d in DIMENSIONS:
        c, r = copy[f"spearman_{d}"], rand[f"spearman_{d}"]
        assert c["n"] == r["n"] == 60 and c["value"] == pytest.approx(1.0) and c["lo"] > 0.9
        assert r["lo"] < 0.0 < r["hi"] and r["note"] == "ok"
    strict = sum(lab.choice in ("a", "b") for lab in labels)
    assert copy["choice_agreement"]["n"] == strict and copy["choice_agreement"]["value"] == 1.0
    assert rand["choice_agreement"]["lo"] < 0.5 < rand["choice_agreement"]["hi"]
    run = _run(tmp_path, docs["copy"]["mlflow_run_id"])
    assert run.data.metrics["calibration.spearman_consistency"] == pytest.approx(1.0)
    assert run.data.metrics["calibration.spearman_consistency.n"] == 60
    assert run.data.metrics["calibration.choice_agreement.lo"] == pytest.approx(
        copy["choice_agreement"]["lo"]
    )
    assert run.data.tags["troupe.role"] == "judge-calibration"


def test_calibrate_with_too_few_labels_reports_n_without_an_interval(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    labels, chars = _setup_labels(tmp_path, 1)

    def flat(messages, model, body):
        if "[回复A]" in messages[-1]["content"]:
            return '{"winner": "tie"}'
        return json.dumps({"dimensions": dict.fromkeys(DIMENSIONS, 5)})

    with StandIn(flat) as s:
        _invoke(
            tmp_path, s.base_url, "calibrate", "--labels", str(tmp_path / "export" / "labels.jsonl"),
            "--characters", str(chars), "--pairwise",
        )  # fmt: skip
    doc = json.loads((tmp_path / "export" / "calibration.json").read_text())
    hl = doc["metrics"]["spearman_human_likeness"]
    assert hl["n"] == 2 and hl["lo"] is None and hl["value"] is None and hl["note"].startswith("no estimate")
    assert doc["metrics"]["choice_agreement"]["n"] in (0, 1)  # a judge tie counts; a human tie not at all
    assert "pairwise_agreement" in doc["metrics"] and len(s.requests) == 2 + 2
    # no labels at all: still a report, every metric "not measured"
    write_jsonl(tmp_path / "empty.jsonl", [])
    _invoke(
        tmp_path,
        s.base_url,
        "calibrate",
        "--labels",
        str(tmp_path / "empty.jsonl"),
        "--characters",
        str(chars),
    )
    empty = json.loads((tmp_path / "calibration.json").read_text())
    assert empty["labels"] == 0 and all(m["note"] == "not measured" for m in empty["metrics"].values())


# ------------------------------------------------------------------------------------------- ratings

QUALITY = {"GOOD": 2, "MEH": 1, "BAD": 0}


def _quality(reply: str) -> int:
    return next(q for w, q in QUALITY.items() if w in reply)


def prefers_quality(messages, model, body):
    """Prefers the better reply whichever position it is shown in; equal quality = tie."""
    a, b = (_quality(x) for x in _reply_blocks(messages[-1]["content"]))
    return json.dumps({"winner": "A" if a > b else "B" if b > a else "tie"})


def _samples(tmp_path: Path, items: int = 8) -> Path:
    rows = []
    for i in range(items):
        for model, word in (("good", "GOOD"), ("bad", "BAD"), ("champion", "MEH")):
            rows.append({
                "model": model, "split": "heldout_dialogues", "character_id": "lin", "dialogue_id": f"d{i}",
                "turn": 1, "context": CONTEXT, "reply": f"{word} reply {i}", "reference": "", "finished": True,
            })  # fmt: skip
    # an item only one model answered (left out) and one where two models said the same (a tie, not asked)
    rows.append({**rows[0], "dialogue_id": "solo"})
    rows += [
        {**rows[0], "dialogue_id": "same"},
        {**rows[1], "dialogue_id": "same", "reply": rows[0]["reply"]},
    ]
    d = tmp_path / "eval"
    d.mkdir()
    write_jsonl(d / "samples.jsonl", rows)
    (d / "eval_set.json").write_text(json.dumps({"champion_version": "7"}))
    chars = tmp_path / "characters.jsonl"
    write_jsonl(chars, list(CHARS.values()))
    return d


def test_ratings_rank_the_preferred_model_first_and_a_position_biased_judge_ties(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = _samples(tmp_path)
    args = ["ratings", "--samples", str(d / "samples.jsonl"), "--characters", str(tmp_path / "characters.jsonl"),
            "--concurrency", "8", "--resamples", "200"]  # fmt: skip
    with StandIn(prefers_quality) as s:
        got = _invoke(tmp_path, s.base_url, *args, "--out", str(tmp_path / "fair"))
    assert len(s.requests) == 8 * 3 * 2  # 8 items x 3 pairs x both orders; solo and same not asked
    doc = json.loads((tmp_path / "fair" / "ratings.json").read_text())
    r = doc["ratings"]
    assert list(r) == ["good", "champion/v7", "bad"]  # sorted best first; the champion's version named
    assert r["good"]["lo"] > 0 and r["bad"]["hi"] < 0 and r["good"]["lo"] > r["champion/v7"]["value"]
    assert doc["counts"] == {"items": 9, "unpaired": 1, "pairs": 25, "identical": 1}
    assert (
        doc["comparisons"] == 25
        and doc["judged"]["consistent"] == 24
        and doc["versions"] == {"champion": "7"}
    )
    assert "good" in got["out"] and (tmp_path / "fair" / "pairwise.jsonl").read_text().count("\n") == 24
    run = _run(tmp_path, doc["mlflow_run_id"])
    assert run.data.metrics["rating.good"] == pytest.approx(r["good"]["value"])
    assert run.data.metrics["rating.good.lo"] > 0 and run.data.metrics["rating.bad.n"] == 17
    assert run.data.tags["troupe.version.champion"] == "7" and run.data.tags["troupe.ratings_table"] == "eval"

    with StandIn(lambda m, model, b: '{"winner": "A"}') as s:
        _invoke(tmp_path, s.base_url, *args, "--out", str(tmp_path / "biased"), "--models", "good,bad",
                "--max-items", "5")  # fmt: skip
    biased = json.loads((tmp_path / "biased" / "ratings.json").read_text())
    assert len(s.requests) == 2 * biased["judged"]["asked"]
    assert biased["judged"]["asked"] + biased["judged"]["ties_without_asking"] == 5
    assert set(biased["ratings"]) == {"good", "bad"} and biased["judged"]["consistent"] == 0
    for e in biased["ratings"].values():
        assert abs(e["value"]) < 1e-6 and e["lo"] <= 0 <= e["hi"]


def _conv(sid: str, label: str, reply: str, first_user: str = "你好") -> Conversation:
    return Conversation(
        id=f"{label}-{sid}",
        scenario=Scenario(id=sid, seed=0, character_id="lin", language="zh"),
        character_id="lin",
        label=label,
        messages=[
            {"role": "user", "content": first_user},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "然后呢"},
            {"role": "assistant", "content": f"{reply} again"},
        ],
    )


def test_ratings_from_selfplay_compare_the_first_differing_reply(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sp = tmp_path / "selfplay"
    cand = [_conv(f"s{i}", "candidate", f"GOOD {i}") for i in range(6)]
    champ = [_conv(f"s{i}", "champion", f"BAD {i}") for i in range(5)]
    champ.append(_conv("s5", "champion", "BAD 5", first_user="别的话"))  # contexts diverged: left out
    for label, convs in (("candidate", cand), ("champion", champ)):
        (sp / label).mkdir(parents=True)
        write_jsonl(sp / label / "conversations.jsonl", convs)
    write_jsonl(tmp_path / "characters.jsonl", list(CHARS.values()))
    with StandIn(prefers_quality) as s:
        _invoke(tmp_path, s.base_url, "ratings", "--selfplay", str(sp), "--characters",
                str(tmp_path / "characters.jsonl"), "--resamples", "200")  # fmt: skip
    assert len(s.requests) == 5 * 2 and all(" again" not in b["messages"][-1]["content"] for b in s.requests)
    doc = json.loads((sp / "judge_ratings" / "ratings.json").read_text())
    assert doc["counts"]["diverged"] == 1 and doc["table"] == "selfplay"
    assert doc["ratings"]["candidate"]["lo"] > 0 > doc["ratings"]["champion"]["hi"]


def test_ratings_need_one_source_and_a_configured_judge(tmp_path):
    r = CliRunner().invoke(cli, ["judge", "ratings", "--params", PARAMS])
    assert r.exit_code == 2 and "exactly one of --samples" in r.output
    d = _samples(tmp_path)
    from troupe.config import ConfigError

    r = CliRunner().invoke(cli, ["judge", "ratings", "--params", PARAMS, "--samples", str(d),
                                 "--characters", str(tmp_path / "characters.jsonl")])  # fmt: skip
    assert isinstance(r.exception, ConfigError) and "agents.judge.base_url" in str(r.exception)
