"""Issue 12's loop on Troupe's own served model: every agent and the judge is a Troupe gateway.

Two model versions (the tiny random model as champion, a perturbed copy as candidate) run as two
Ray Serve apps built from the same app config ``troupe deploy`` renders; the user agent, the host, the
synthesis character and the judge are the champion gateway itself (``model`` = a catalogue character,
the agent's instructions as a system note). Nothing is mocked: the ``openai`` client speaks HTTP to
the Router, which renders the persona card, routes and calls the model replica.

* ``troupe data synthesize`` -> ``troupe data import`` + ``validate`` (the real GX suite): counts add up.
* ``troupe evaluate --suite selfplay``: candidate vs champion on the same scenarios, paired intervals,
  transcripts and judge scores in the report.
* ``troupe evaluate --suite charactereval`` on a sample of real CharacterEval items (the committed
  mini fixture) with the gateway as judge: coverage adds up, an answer that does not parse is
  counted as such.
* ``POST /v1/feedback`` stores a user's thumbs in the same preference store the labelling page uses.

The tiny random model writes noise, so the judge's answers rarely parse: the point here is that the
joints hold (names, URLs, units, files across processes), not the scores; the stand-in tests
(test_synthesis, test_selfplay, test_judge, test_charactereval) check the logic on scripted answers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import free_port
from tests.serve_fixtures import characters_file, make_app, start_cluster, stop_cluster, tiny_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)
NOISY_GATEWAY = {
    "require_api_key": False,
    "moderation": {"mode": "flag"},
    "limits": {"requests_per_minute": 0},
}


def _perturbed_copy(src: Path, dst: Path) -> Path:
    """A second model version: the tiny model with seeded noise on every weight."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(7)
    state = load_file(str(dst / "model.safetensors"))
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def gateways(tmp_path_factory):
    from troupe.deploy import apply_apps

    d = tmp_path_factory.mktemp("dialogue-joint")
    model = tiny_model()
    candidate = _perturbed_copy(model, d / "candidate")
    chars = characters_file(d)
    db = f"sqlite:///{d / 'feedback' / 'feedback.db'}"
    port = free_port()
    start_cluster(port)
    try:
        champion_app = make_app("test", chars, model, "/champion", gateway=NOISY_GATEWAY, feedback_db_url=db)
        candidate_app = make_app("production", chars, candidate, "/candidate", gateway=NOISY_GATEWAY)
        for app in (champion_app, candidate_app):
            app["args"]["model"]["max_new_tokens"] = 16
        apply_apps([champion_app, candidate_app], "127.0.0.1", port, timeout_s=400)
        base = f"http://127.0.0.1:{port}"
        yield {"dir": d, "chars": chars, "champion": f"{base}/champion/v1", "base": base,
               "candidate": f"{base}/candidate/v1", "db": db, "model": model}  # fmt: skip
    finally:
        stop_cluster()


def _params(g: dict, tmp: Path, **extra: dict) -> Path:
    gw = g["champion"]
    agents = {
        "user": {"base_url": gw, "model": "bob", "max_tokens": 16, "price_input_per_mtok": 0.5},
        "host": {"base_url": gw, "model": "bob", "max_tokens": 8, "parse_retries": 0},
        "character": {"base_url": gw, "model": "{character_id}", "max_tokens": 16},
        "judge": {"base_url": gw, "model": "daiyu", "max_tokens": 16, "parse_retries": 1},
    }
    p = {
        "paths": {
            **{k: str(tmp / k) for k in ("imported", "validated", "splits", "synthetic", "selfplay", "charactereval")},
            "base_model": str(g["model"]),
        },
        "data": {
            "source_set": "synthetic",
            "source_sets": {"synthetic": [{"kind": "synthetic", "path": str(tmp / "synthetic")}]},
            "language_min_share": 0.0,
            "max_rejected_share": 1.0,
        },
        "registry": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "agents": agents,
        "synthesis": {"enabled": True, "characters": str(g["chars"]), "conversations": 4, "max_turns": 2,
                      "probe_share": 1.0, "concurrency": 2},
        **extra,
    }  # fmt: skip
    f = tmp / "params.yaml"
    f.write_text(yaml.safe_dump(p, allow_unicode=True))
    return f


def _cli(*args: str) -> None:
    from troupe.cli import cli

    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output


def test_synthesis_on_the_served_model_goes_through_import_and_validation(gateways, tmp_path):
    pf = _params(gateways, tmp_path)
    _cli("data", "synthesize", "--params", str(pf))
    out = tmp_path / "synthetic"
    summary = json.loads((out / "summary.json").read_text())
    convs = [json.loads(x) for x in (out / "conversations.jsonl").read_text().splitlines()]
    failed = (out / "failed.jsonl").read_text().splitlines()
    assert summary["scenarios"] == 4 == len(convs) + len(failed) + summary["skipped"]
    assert len(convs) >= 3, failed
    for c in convs:  # every agent was the gateway; provenance names it
        assert {r["model"] for r in c["provenance"]["agents"].values()} == {"bob", "{character_id}"}
        assert c["provenance"]["agents"]["character"]["base_url"] == gateways["champion"]
        assert sum(m["role"] == "assistant" for m in c["messages"]) >= 1
    assert summary["usage"]["user"]["prompt_tokens"] > 0  # the Router's usage counts reached the client

    _cli("data", "import", "--params", str(pf))
    _cli("data", "validate", "--params", str(pf), "--set", f"paths.base_model={gateways['model']}")
    report = json.loads((tmp_path / "validated" / "report.json").read_text())
    accepted = (tmp_path / "validated" / "dialogues.jsonl").read_text().splitlines()
    quarantined = (tmp_path / "validated" / "quarantine.jsonl").read_text().splitlines()
    assert len(accepted) + len(quarantined) == len(convs), report
    assert all(json.loads(x)["source"] == "synthetic" for x in accepted)


def test_selfplay_compares_two_served_versions_with_intervals(gateways, tmp_path):
    pf = _params(
        gateways,
        tmp_path,
        selfplay={"candidate_url": gateways["candidate"], "champion_url": gateways["champion"],
                  "conversations": 4, "max_turns": 2, "concurrency": 2, "bootstrap_resamples": 200},
    )  # fmt: skip
    _cli("evaluate", "--suite", "selfplay", "--params", str(pf))
    out = tmp_path / "selfplay"
    metrics = json.loads((out / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "candidate" in text and "champion" in text
    diffs = metrics["paired"]
    assert diffs, sorted(metrics)
    some = next(iter(diffs.values()))
    assert {"value", "n", "lo", "hi"} <= set(some) and some["n"] >= 1
    html = (out / "report.html").read_text()
    assert "candidate" in html and "champion" in html
    # the transcripts are in the report: a character reply of each side appears verbatim
    for label in ("candidate", "champion"):
        rows = [json.loads(x) for f in out.rglob("conversations.jsonl") for x in f.read_text().splitlines()]
        replies = [
            m["content"]
            for r in rows
            if r.get("label") == label
            for m in r["messages"]
            if m["role"] == "assistant"
        ]
        assert replies, label
        import html as _html

        assert any(_html.escape(r.strip())[:12] in html for r in replies if r.strip()), label


def test_charactereval_sample_with_the_served_model_as_judge(gateways, tmp_path):
    pf = _params(
        gateways,
        tmp_path,
        charactereval={"path": str(ROOT / "tests/fixtures/charactereval_mini"), "max_items": 3, "model": "base",
                       "max_new_tokens": 12},
    )  # fmt: skip
    _cli("evaluate", "--suite", "charactereval", "--params", str(pf))
    out = tmp_path / "charactereval"
    metrics = json.loads((out / "metrics.json").read_text())
    cover = metrics["coverage"]
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 3 and {s["status"] for s in scores} <= {"ok", "unparseable", "failed"}
    n_unparseable = sum(s["status"] == "unparseable" for s in scores)
    assert cover["unparseable"] == n_unparseable
    assert metrics["judge"]["base_url"] == gateways["champion"] and metrics["judge"]["model"] == "daiyu"
    report = (out / "report.html").read_text()
    assert gateways["champion"] in report and "CharacterRM" in report


def test_feedback_endpoint_writes_the_preference_store(gateways):
    from troupe.feedback.store import Store

    body = {"conversation_id": "c-1", "character_id": "bob", "reply": "Ahoy!", "rating": "down"}
    r = httpx.post(f"{gateways['base']}/champion/v1/feedback", json=body, timeout=30)
    assert r.status_code == 201, r.text
    events = Store(gateways["db"]).events()
    assert [(e["conversation_id"], e["rating"]) for e in events][-1] == ("c-1", "down")
    r = httpx.post(f"{gateways['base']}/champion/v1/feedback", json={**body, "rating": "meh"}, timeout=30)
    assert r.status_code == 400 and "rating" in r.text
