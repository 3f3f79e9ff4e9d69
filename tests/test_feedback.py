"""The human preference store, its queue and export, the DPO wiring and the ``/v1/feedback`` body.

Everything real: SQLite databases in the test's tmp dir, the real ``troupe`` CLI (click runner),
sklearn's Cohen's kappa, the real DPO example builder. The Serve endpoint itself is driven over HTTP
in ``test_feedback_endpoint_http`` (slow: a local Ray cluster).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from serving import contract as scontract
from troupe.cli import cli
from troupe.config import load_params
from troupe.contract import Message, PreferencePair, QuarantineRecord, read_jsonl, write_jsonl
from troupe.dialogue.contract import HumanLabel
from troupe.feedback.cli import items_from_conversations, items_from_samples
from troupe.feedback.export import agreement, cohen_kappa, export, fleiss_kappa
from troupe.feedback.store import FeedbackError, NewItem, Store, shown_swapped

REPO = Path(__file__).resolve().parents[1]
BOB = {"id": "bob", "name": "Bob", "language": "en", "profile": {"job": "sailor"}, "examples": ["Ahoy!"]}
DAIYU = {
    "id": "daiyu",
    "name": "林黛玉",
    "language": "zh",
    "profile": {"出身": "姑苏"},
    "examples": ["你又来了。"],
}
CTX = [Message(role="user", content="Where are you sailing tomorrow, Bob?")]
GOOD = "To the north islands, matey! Want to join my crew?"
GOOD2 = "Out past the reef at dawn. Ever seen a whale up close?"
ASSISTANT = "As an AI language model, I do not sail anywhere."


def item(ref: str, a: str = GOOD, b: str = ASSISTANT, char: dict = BOB, ctx=CTX) -> NewItem:
    return NewItem(char["id"], char["name"], char["language"], list(ctx), a, b, "sft", "dpo", "eval", ref)


def as_shown(store: Store, iid: str, who: str, better_reply: str) -> str:
    """The shown side ("a"/"b") on which ``who`` sees ``better_reply``."""
    shown = store.show(iid, who)
    return "a" if shown.reply_a == better_reply else "b"


# ------------------------------------------------------------------------------------------ store


def test_store_creates_sqlite_dir_randomises_sides_and_hides_models(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/deep/dir/fb.db", seed=3)
    assert (tmp_path / "deep/dir/fb.db").is_file()
    assert store.add_items([item(f"r{i}") for i in range(12)]) == (12, 0)
    assert store.add_items([item("r0")]) == (0, 1)  # same content -> same id
    iid = store.next_item("p0").item_id
    shown = [store.show(iid, f"person{i}") for i in range(16)]
    flips = {s.swapped for s in shown}
    assert flips == {True, False}  # different people see different orders
    for s in shown:
        assert (s.reply_a, s.reply_b) == ((ASSISTANT, GOOD) if s.swapped else (GOOD, ASSISTANT))
        assert s.swapped == shown_swapped(iid, f"person{shown.index(s)}", 3)
        assert "sft" not in json.dumps(s.__dict__, default=str) and "dpo" not in json.dumps(
            s.__dict__, default=str
        )
    assert store.show(iid, "person1") == shown[1]  # stable on reload


def test_label_validation_names_the_field_and_one_label_per_person(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/fb.db")
    store.add_items([item("x")])
    iid = store.next_item("ann").item_id
    for kw, field in [
        ({"choice": "maybe"}, "choice"),
        ({"choice": "a", "broken": {"a": ["no_such_rule"]}}, "broken_rules.a"),
        ({"choice": "a", "broken": {"c": []}}, "broken_rules.c"),
        ({"choice": "a", "dims": {"b": {"engagement": 11}}}, "dimensions.b.engagement"),
        ({"choice": "a", "dims": {"a": {"charm": 5}}}, "dimensions.a.charm"),
    ]:
        with pytest.raises(FeedbackError, match=field.replace(".", r"\.")):
            store.add_label(iid, "ann", **kw)
    with pytest.raises(FeedbackError, match="annotator"):
        store.add_label(iid, "  ", "a")
    with pytest.raises(FeedbackError, match="item_id"):
        store.add_label("nope", "ann", "a")
    store.add_label(iid, "ann", "tie", dims={"a": {"engagement": 7}})
    with pytest.raises(FeedbackError, match="already labelled"):
        store.add_label(iid, "ann", "a")
    assert store.next_item("ann") is None  # done for this person
    assert store.next_item("other").item_id == iid
    assert store.counts() == {"items": 1, "labels": 1, "events": 0}


def test_next_item_covers_every_item_before_doubling_up(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/fb.db")
    store.add_items([item(f"r{i}") for i in range(3)])
    first = store.next_item("p1").item_id
    store.add_label(first, "p1", "tie")
    assert store.next_item("p2").item_id != first  # an unlabelled item comes first


# ------------------------------------------------------------------------------------------ queue


def _samples(tmp_path: Path) -> Path:
    rows = []
    for model, replies in {"sft": [GOOD, "Same reply."], "dpo": [GOOD2, "Same reply."]}.items():
        for turn, reply in zip((1, 3), replies, strict=True):
            ctx = [{"role": "user", "content": "Where to?"}]
            rows.append(
                {"model": model, "split": "heldout_dialogues", "character_id": "bob", "dialogue_id": "d1",
                 "turn": turn, "context": ctx, "reply": reply, "reference": "x", "scores": {}}
            )  # fmt: skip
    rows.append({**rows[0], "turn": 5})  # sft only: unpaired
    p = tmp_path / "samples.jsonl"
    write_jsonl(p, rows)
    return p


def test_queue_from_eval_samples_cli_counts_add_up(tmp_path):
    db = f"sqlite:///{tmp_path}/fb.db"
    chars = tmp_path / "characters.jsonl"
    write_jsonl(chars, [BOB, DAIYU])
    args = ["feedback", "queue", "--from", str(_samples(tmp_path)), "--characters", str(chars),
            "--params", str(REPO / "params.yaml"), "--set", f"feedback.db_url={db}"]  # fmt: skip
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    counts = json.loads(res.output.strip().splitlines()[-1])
    assert counts == {
        "candidates": 3,
        "items": 1,
        "identical": 1,
        "unpaired": 1,
        "added": 1,
        "already_queued": 0,
    }
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert json.loads(res.output.strip().splitlines()[-1])["already_queued"] == 1
    (lab,) = [Store(db).next_item("p")]
    assert {lab.reply_a, lab.reply_b} == {GOOD, GOOD2} and lab.character_name == "Bob"


def test_queue_needs_two_models_and_cards():
    from troupe.config import ConfigError
    from troupe.contract import Character

    rows = [{"model": m, "split": "s", "dialogue_id": "d", "turn": 1, "character_id": "bob", "context": [],
             "reply": m} for m in ("base", "sft", "dpo")]  # fmt: skip
    with pytest.raises(ConfigError, match="--models"):
        items_from_samples(rows, {"bob": Character(**BOB)})
    with pytest.raises(ConfigError, match="no persona card"):
        items_from_samples(rows, {}, ("sft", "dpo"))
    items, counts = items_from_samples(rows, {"bob": Character(**BOB)}, ("base", "dpo"))
    assert (items[0].model_a, items[0].model_b, counts["items"]) == ("base", "dpo", 1)


def test_queue_from_selfplay_takes_the_first_differing_reply():
    from troupe.contract import Character

    def conv(label: str, replies: list[str], sid: str = "s1") -> dict:
        msgs = []
        for i, r in enumerate(replies):
            msgs += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": r}]
        scn = {"id": sid, "seed": 0, "character_id": "bob", "language": "en"}
        return {
            "id": f"{sid}-{label}",
            "scenario": scn,
            "character_id": "bob",
            "messages": msgs,
            "label": label,
        }

    convs = [
        conv("candidate", ["Ahoy!", "North we go.", "x"]),
        conv("champion", ["Ahoy!", "South we go.", "y"]),
        conv("candidate", ["Same."], "s2"),
        conv("champion", ["Same."], "s2"),
        conv("candidate", ["Alone."], "s3"),
    ]
    items, counts = items_from_conversations(convs, {"bob": Character(**BOB)})
    assert counts == {"candidates": 3, "items": 1, "identical": 1, "unpaired": 1, "diverged": 0}
    (it,) = items
    assert [m.content for m in it.context] == ["u0", "Ahoy!", "u1"]
    assert (it.reply_a, it.reply_b, it.source, it.source_ref) == (
        "North we go.",
        "South we go.",
        "selfplay",
        "s1#3",
    )


# ------------------------------------------------------------------------------------------ export


def test_export_pairs_drops_and_counts_add_up(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/fb.db", seed=1)
    items = {
        "pair": item("pair"),
        "ticked": item("ticked", GOOD2, ASSISTANT),
        "checks": item("checks", ASSISTANT, GOOD),
        "tie": item("tie", GOOD, GOOD2),
        "zh": item(
            "zh",
            "你又来了，今天想聊什么呀？",
            "As an AI, I cannot.",
            DAIYU,
            [Message(role="user", content="你好")],
        ),
    }
    store.add_items(list(items.values()))
    by_ref = _ids_by_ref(store)
    # "ann" prefers GOOD over ASSISTANT, ticking no rule on it
    store.add_label(by_ref["pair"], "ann", as_shown(store, by_ref["pair"], "ann", GOOD),
                    broken={as_shown(store, by_ref["pair"], "ann", ASSISTANT): ["in_character"]},
                    dims={"a": {"engagement": 8}})  # fmt: skip
    # preferred, but the person ticked a broken rule on it -> dropped with the reason
    side = as_shown(store, by_ref["ticked"], "ann", GOOD2)
    store.add_label(by_ref["ticked"], "ann", side, broken={side: ["deepen_and_ask"]})
    # preferred an assistant-like reply -> fails check_reply -> dropped
    store.add_label(by_ref["checks"], "ann", as_shown(store, by_ref["checks"], "ann", ASSISTANT))
    store.add_label(by_ref["tie"], "ann", "tie")
    store.add_label(by_ref["zh"], "ann", as_shown(store, by_ref["zh"], "ann", "你又来了，今天想聊什么呀？"))

    report = export(store, tmp_path / "out", min_labels=1, resamples=200)
    assert report["labels"] == 5 and report["items"] == 5
    assert report["outcome_items"] == {
        "pair": 2, "chosen_rule_ticked": 1, "chosen_fails_checks": 1, "no_preference": 1, "no_majority": 0,
        "pending": 0,
    }  # fmt: skip
    assert sum(report["outcome_labels"].values()) == report["labels"]
    pairs = read_jsonl(tmp_path / "out/pairs.jsonl", PreferencePair)
    assert {(p.chosen, p.rejected) for p in pairs} == {
        (GOOD, ASSISTANT),
        ("你又来了，今天想聊什么呀？", "As an AI, I cannot."),
    }
    p = next(p for p in pairs if p.character_id == "bob")
    assert p.id.startswith("human:") and p.messages == CTX
    assert p.meta["chosen_model"] == "sft" and p.meta["rejected_rules_ticked"] == ["in_character"]
    q = read_jsonl(tmp_path / "out/quarantine.jsonl", QuarantineRecord)
    reasons = {r.record_id: r.reason for r in q}
    assert reasons[by_ref["ticked"]].startswith("chosen_rule_ticked: deepen_and_ask")
    assert reasons[by_ref["checks"]].startswith("chosen_fails_checks: assistant phrase")
    assert "fb.db" in q[0].file and q[0].raw["labels"][0]["annotator"] == "ann"
    labels = read_jsonl(tmp_path / "out/labels.jsonl", HumanLabel)
    assert len(labels) == 5
    lp = next(x for x in labels if x.item_id == by_ref["pair"])
    shown_good = lp.choice
    assert (lp.reply_a if shown_good == "a" else lp.reply_b) == GOOD
    assert (lp.model_a if shown_good == "a" else lp.model_b) == "sft"  # model follows its reply
    assert lp.dimensions == {"a": {"engagement": 8}}
    agree = json.loads((tmp_path / "out/agreement.json").read_text())
    assert agree["method"] == "none" and agree["kappa"]["n"] == 0  # one label per item


def _ids_by_ref(store: Store) -> dict[str, str]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from troupe.feedback.store import Item

    with Session(store.engine) as s:
        return {ref: iid for iid, ref in s.execute(select(Item.id, Item.source_ref))}


def test_majority_min_labels_and_agreement(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/fb.db")
    store.add_items([item(f"r{i}", GOOD, GOOD2 + f" #{i}") for i in range(6)])
    ids = _ids_by_ref(store)
    # three people: r0 2x GOOD vs 1x other -> pair; r1 one each of a/b/tie -> no majority;
    # r2 only two labels; r3..r5 only one label -> pending with min_labels=2
    plan = {
        "r0": {"p1": "good", "p2": "good", "p3": "other"},
        "r1": {"p1": "good", "p2": "other", "p3": "tie"},
        "r2": {"p1": "both_bad", "p2": "both_bad"},
        "r3": {"p1": "good"}, "r4": {"p1": "good"}, "r5": {"p2": "tie"},
    }  # fmt: skip
    for ref, votes in plan.items():
        for who, v in votes.items():
            other = GOOD2 + f" #{ref[1:]}"
            ch = {
                "good": as_shown(store, ids[ref], who, GOOD),
                "other": as_shown(store, ids[ref], who, other),
            }
            store.add_label(ids[ref], who, ch.get(v, v))
    report = export(store, tmp_path / "out", min_labels=2, resamples=200)
    assert report["outcome_items"] == {
        "pair": 1, "chosen_rule_ticked": 0, "chosen_fails_checks": 0, "no_preference": 1, "no_majority": 1,
        "pending": 3,
    }  # fmt: skip
    assert report["outcome_labels"]["pending"] == 3 and sum(report["outcome_labels"].values()) == 11
    (p,) = read_jsonl(tmp_path / "out/pairs.jsonl", PreferencePair)
    assert p.chosen == GOOD and p.meta["votes"] == {"a": 2, "b": 1}
    agree = json.loads((tmp_path / "out/agreement.json").read_text())
    assert agree["method"] == "fleiss" and agree["items"] == 3 and agree["kappa"]["n"] == 3
    # by hand: table rows (a,b,tie,both_bad) = [2,1,0,0], [1,1,1,0], [0,0,0,2]
    assert agree["kappa"]["value"] == pytest.approx(fleiss_kappa([[2, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 2]]))
    assert agree["kappa"]["lo"] <= agree["kappa"]["value"] <= agree["kappa"]["hi"]


def test_fleiss_kappa_matches_the_published_example():
    # Fleiss (1971) as worked on Wikipedia's "Fleiss' kappa" page: 10 subjects, 14 raters -> 0.210
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]  # fmt: skip
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    assert fleiss_kappa([[3, 0], [3, 0]]) == 1.0
    with pytest.raises(ValueError, match=">= 2 ratings"):
        fleiss_kappa([[1, 0]])


def test_cohen_kappa_two_annotators_with_interval(tmp_path):
    # p_o = 8/10; marginals a: 5a/5b, b: 5a/5b -> p_e = .5 -> kappa = .6
    x = ["a", "a", "a", "a", "a", "b", "b", "b", "b", "b"]
    y = ["a", "a", "a", "a", "b", "a", "b", "b", "b", "b"]
    assert cohen_kappa(x, y) == pytest.approx(0.6)
    store = Store(f"sqlite:///{tmp_path}/fb.db")
    store.add_items([item(f"r{i}", GOOD, GOOD2 + f" {i}") for i in range(10)])
    ids = _ids_by_ref(store)
    for i in range(10):
        for who, v in (("p1", x[i]), ("p2", y[i])):
            good = as_shown(store, ids[f"r{i}"], who, GOOD)
            store.add_label(ids[f"r{i}"], who, good if v == "a" else ("b" if good == "a" else "a"))
    agree = agreement(store.labels(), resamples=300)
    assert agree["method"] == "cohen" and agree["kappa"]["n"] == 10
    assert agree["kappa"]["value"] == pytest.approx(0.6) and agree["raw_agreement"] == pytest.approx(0.8)
    assert agree["kappa"]["lo"] < 0.6 < agree["kappa"]["hi"] and agree["kappa"]["method"] == "bootstrap"


# ------------------------------------------------------------------------------------------ DPO input


def test_dpo_examples_include_human_pairs_only_when_named(tmp_path):
    from troupe.train.dpo import build_dpo_examples

    splits, gen = tmp_path / "splits", tmp_path / "pairs"
    write_jsonl(splits / "characters.jsonl", [BOB, DAIYU])
    write_jsonl(gen / "pairs.jsonl", [PreferencePair(id="g1", character_id="bob", messages=CTX, chosen=GOOD,
                                                     rejected=ASSISTANT)])  # fmt: skip
    human = tmp_path / "human.jsonl"
    write_jsonl(human, [PreferencePair(id="human:1", character_id="bob", messages=CTX, chosen=GOOD2,
                                       rejected=ASSISTANT)])  # fmt: skip
    base = ["--set", f"paths.splits={splits}", "--set", f"paths.pairs={gen}"]
    params = load_params(REPO / "params.yaml", base[1::2])
    assert [e["chosen"][0]["content"] for e in build_dpo_examples(params)] == [GOOD]
    params = load_params(REPO / "params.yaml", [*base[1::2], f"feedback.pairs={human}"])
    ex = build_dpo_examples(params)
    assert [e["chosen"][0]["content"] for e in ex] == [GOOD, GOOD2]
    assert ex[1]["prompt"][0]["role"] == "system" and "Bob" in ex[1]["prompt"][0]["content"]
    write_jsonl(
        human, [PreferencePair(id="human:2", character_id="ghost", messages=CTX, chosen="a", rejected="b")]
    )
    from troupe.config import ConfigError

    with pytest.raises(ConfigError, match="human:2.*ghost"):
        build_dpo_examples(params)


# ------------------------------------------------------------------------------------------ /v1/feedback


def test_feedback_body_is_validated_naming_the_field_and_stored(tmp_path):
    ok = {"conversation_id": "c1", "character_id": "bob", "rating": "down", "reply": "As an AI...",
          "model_version": "3", "regenerated_from": "m0", "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    for bad, field in [
        ({**ok, "rating": "meh"}, "rating"),
        ({k: v for k, v in ok.items() if k != "conversation_id"}, "conversation_id"),
        ({**ok, "character_id": 5}, "character_id"),
        ({k: v for k, v in ok.items() if k != "reply"}, "message_id"),
        ({**ok, "messages": [{"role": "bot", "content": "x"}]}, "messages.0"),
        ({**ok, "stars": 5}, "stars"),
    ]:
        with pytest.raises(scontract.FeedbackFieldError) as e:
            scontract.parse_feedback(bad)
        assert e.value.field == field
    event = scontract.parse_feedback(ok)
    store = Store(f"sqlite:///{tmp_path}/fb.db")
    rid = store.add_event(event.to_dict())
    (row,) = store.events()
    assert row["id"] == rid and row["rating"] == "down" and row["regenerated_from"] == "m0"
    assert row["context"] == [{"role": "user", "content": "hi"}] and row["model_version"] == "3"
    with pytest.raises(FeedbackError, match="rating"):
        store.add_event({**event.to_dict(), "rating": "sideways"})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_feedback_endpoint_http(tmp_path):
    """``POST /v1/feedback`` over HTTP on a local Serve app (tiny model; HTTP only, no handles):
    stored with a key, 401 without, 400 naming the field, 404 unknown character, 501 when the app
    has no ``feedback_db_url``."""
    import hashlib

    import httpx

    from tests.conftest import free_port
    from tests.serve_fixtures import characters_file, make_app, start_cluster, stop_cluster, tiny_model
    from troupe.deploy import apply_apps

    db = f"sqlite:///{tmp_path}/fb.db"
    chars, model, port = characters_file(tmp_path), tiny_model(), free_port()
    key = "sk-fb-1"
    start_cluster(port)
    try:
        on = make_app("test", chars, model, "/test", **{scontract.FEEDBACK_DB_URL: db},
                      gateway={"require_api_key": True, "api_keys_sha256": [hashlib.sha256(key.encode()).hexdigest()]})  # fmt: skip
        off = make_app("production", chars, model, "/production")
        apply_apps([on, off], "127.0.0.1", port, timeout_s=400)
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        body = {"conversation_id": "c1", "character_id": "bob", "rating": "up", "message_id": "m1"}
        url = base + "/test" + scontract.FEEDBACK_ENDPOINT
        r = httpx.post(url, json=body, headers=auth, timeout=60)
        assert r.status_code == 201, r.text
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        r = httpx.post(url, json={**body, "rating": "meh"}, headers=auth, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "rating"
        r = httpx.post(url, json={**body, "character_id": "ghost"}, headers=auth, timeout=60)
        assert r.status_code == 404
        r = httpx.post(base + "/production" + scontract.FEEDBACK_ENDPOINT, json=body, timeout=60)
        assert r.status_code == 501 and scontract.FEEDBACK_DB_URL in r.json()["error"]["message"]
    finally:
        stop_cluster()
    (row,) = Store(db).events()
    assert (row["conversation_id"], row["message_id"], row["rating"]) == ("c1", "m1", "up")
