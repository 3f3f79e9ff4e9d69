"""A person labels in a real browser: the Gradio page on loopback, Debian's Chromium via Playwright.

Two items are queued. On the first the person picks the reply they prefer and ticks a broken rule
on the other one; on the second they prefer a reply but tick a rule it breaks. ``troupe feedback
export`` then yields one pair, which ``troupe train dpo``'s input builder picks up through
``feedback.pairs``, and the second item lands in the quarantine file with its reason.

Skipped only when ``/usr/bin/chromium`` is missing (``scripts/install.sh`` installs it). Nothing is
mocked; the screenshot ``page.png`` is left in the test's tmp dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import free_port
from troupe.cli import cli
from troupe.config import load_params
from troupe.contract import Message, PreferencePair, QuarantineRecord, read_jsonl
from troupe.feedback.store import NewItem, Store

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]
CTX = [Message(role="user", content="Where are you sailing tomorrow, Bob?")]
GOOD = "To the north islands, matey! Want to join my crew?"
GOOD2 = "Out past the reef at dawn. Ever seen a whale up close?"
BAD = "As an AI language model, I do not sail anywhere."
BAD2 = "Bob: I sail wherever the wind blows."
MODEL_A, MODEL_B = "secret-model-alpha", "secret-model-beta"  # must never appear on the page

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium missing (scripts/install.sh installs it)"
    ),
    pytest.mark.timeout(300),
]


def _item(ref: str, a: str, b: str) -> NewItem:
    return NewItem("bob", "Bob", "en", CTX, a, b, MODEL_A, MODEL_B, "eval", ref)


def first_replies(page) -> str:
    return page.locator("#reply-a textarea").input_value() + page.locator("#reply-b textarea").input_value()


def _label_one(page, prefer: str, tick_on: str, rule_text: str) -> None:
    """Pick the reply ``prefer`` and tick ``rule_text`` on side ``tick_on`` ("chosen" / "other")."""
    page.wait_for_function(
        "() => document.querySelector('#reply-a textarea') && document.querySelector('#reply-a textarea').value"
    )
    a = page.locator("#reply-a textarea").input_value()
    b = page.locator("#reply-b textarea").input_value()
    assert prefer in (a, b)
    side = "A" if a == prefer else "B"
    other = "B" if side == "A" else "A"
    tick = side if tick_on == "chosen" else other
    page.locator("#choice label", has_text=f"{side} is better").click()
    page.locator(f"#rules-{tick.lower()} label", has_text=rule_text).click()


def test_label_in_browser_then_export_reaches_dpo_input(tmp_path):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    from troupe.feedback.app import build_app
    from troupe.train.dpo import build_dpo_examples

    db = f"sqlite:///{tmp_path}/fb.db"
    store = Store(db)
    store.add_items([_item("one", GOOD, BAD), _item("two", GOOD2, BAD2)])
    port = free_port()
    demo = build_app(store)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("#annotator", timeout=60_000)  # fonts from the internet never load here
            page.locator("#annotator textarea, #annotator input").first.fill("alice")
            page.locator("#start").click()
            # the model names never reach the page
            page.wait_for_function("() => document.querySelector('#reply-a textarea').value")
            html = page.content()
            assert MODEL_A not in html and MODEL_B not in html
            # item order: fewest labels, then oldest: both new -> queued order is by creation time
            first = (
                page.locator("#reply-a textarea").input_value()
                + page.locator("#reply-b textarea").input_value()
            )
            prefer, rule = (GOOD, "Stays in character") if GOOD in first else (GOOD2, "Deepens each topic")
            tick_on = "other" if prefer == GOOD else "chosen"
            _label_one(page, prefer, tick_on, rule)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            page.locator("#submit").click()
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('Saved')")
            nxt = (
                (GOOD2, "Deepens each topic", "chosen")
                if prefer == GOOD
                else (GOOD, "Stays in character", "other")
            )
            page.wait_for_function(
                f"() => document.querySelector('#reply-a textarea').value.length && "
                f"(document.querySelector('#reply-a textarea').value + document.querySelector('#reply-b textarea')"
                f".value).includes({json.dumps(nxt[0])})"
            )
            _label_one(page, nxt[0], nxt[2], nxt[1])
            page.locator("#submit").click()
            page.wait_for_function(
                "() => document.querySelector('#status').innerText.includes('No items left')"
            )
            browser.close()
    finally:
        demo.close()

    rows = store.labels()
    assert len(rows) == 2 and {r.annotator for r in rows} == {"alice"}
    out = tmp_path / "export"
    res = CliRunner().invoke(
        cli,
        ["feedback", "export", "--params", str(REPO / "params.yaml"), "--set", f"feedback.db_url={db}",
         "--set", f"feedback.export_dir={out}"],
        catch_exceptions=False,
    )  # fmt: skip
    report = json.loads(res.output.strip().splitlines()[-1])
    assert report["labels"] == 2 and report["pairs"] == 1 and report["dropped"]["chosen_rule_ticked"] == 1
    (pair,) = read_jsonl(out / "pairs.jsonl", PreferencePair)
    assert (pair.chosen, pair.rejected) == (GOOD, BAD)
    assert pair.meta["rejected_rules_ticked"] == ["in_character"] and pair.meta["chosen_model"] == MODEL_A
    (q,) = read_jsonl(out / "quarantine.jsonl", QuarantineRecord)
    assert q.reason.startswith("chosen_rule_ticked: deepen_and_ask")

    # the DPO stage's input: generated pairs + the human pairs named by feedback.pairs
    from troupe.contract import write_jsonl

    splits, gen = tmp_path / "splits", tmp_path / "pairs"
    write_jsonl(splits / "characters.jsonl", [{"id": "bob", "name": "Bob", "language": "en"}])
    write_jsonl(gen / "pairs.jsonl", [])
    params = load_params(
        REPO / "params.yaml",
        [f"paths.splits={splits}", f"paths.pairs={gen}", f"feedback.pairs={out / 'pairs.jsonl'}"],
    )
    (ex,) = build_dpo_examples(params)
    assert ex["chosen"] == [{"role": "assistant", "content": GOOD}]
    assert ex["rejected"] == [{"role": "assistant", "content": BAD}]
