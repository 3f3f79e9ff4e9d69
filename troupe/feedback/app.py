"""The side-by-side labelling page (Gradio): ``troupe feedback label --port N``.

A person enters their name and gets the next item (:meth:`troupe.feedback.store.Store.next_item`):
the chat so far, then two replies "Reply A" / "Reply B" in an order randomised per person and item
(no model names anywhere on the page), shown as raw text so markup tags (``<emotion>``, ``<img>``)
are visible. They pick A better / B better / tie / both bad, may tick the basic rules each reply
breaks (rule texts in the character's language, :data:`troupe.dialogue.contract.BASIC_RULES`; rule
12 permits rather than forbids and is not listed), may score the four dimensions 1-10 per side
(0 = not scored), and submit: the label is stored as shown and the next item loads.

Element ids (for tests and CSS): ``annotator``, ``start``, ``character``, ``context``, ``reply-a``,
``reply-b``, ``rules-a``, ``rules-b``, ``choice``, ``submit``, ``status``.
"""

from __future__ import annotations

import html
from typing import Any

from troupe.dialogue.contract import BASIC_RULES, DIMENSIONS
from troupe.feedback.store import FeedbackError, ShownItem, Store

CHOICE_LABELS = (("A is better", "a"), ("B is better", "b"), ("Tie", "tie"), ("Both bad", "both_bad"))


def rule_choices(language: str) -> list[tuple[str, str]]:
    """``[(text, rule id)]`` of the judged basic rules, texts in ``language`` (zh, else English)."""
    return [(f"{r.number}. {r.zh if language == 'zh' else r.en}", r.id) for r in BASIC_RULES if r.judged]


def _chat(item: ShownItem) -> list[dict[str, str]]:
    """The context as Chatbot messages; system turns shown as a user-side note; text escaped so
    markup tags stay visible."""
    out = []
    for m in item.context:
        text = html.escape(m.content)
        if m.role == "system":
            out.append({"role": "user", "content": f"[scene] {text}"})
        else:
            out.append({"role": m.role, "content": text})
    return out


def build_app(store: Store, title: str = "Troupe: which reply is better?") -> Any:
    """The labelling page on ``store`` as a ``gradio.Blocks`` (call ``.launch()`` on it)."""
    import gradio as gr

    dims = list(DIMENSIONS.items())
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {title}\nRead the chat, then the two replies of the character. Pick the better one, "
            "tick the rules a reply breaks, optionally score it, and submit. Replies are in random "
            "order; which model wrote them is hidden."
        )
        state = gr.State({})  # {"item_id", "annotator"} of the item on screen
        with gr.Row():
            annotator = gr.Textbox(label="Your name", elem_id="annotator", scale=3)
            start = gr.Button("Start / next item", elem_id="start", scale=1)
        character = gr.Markdown("", elem_id="character")
        context = gr.Chatbot(label="Chat so far", elem_id="context", height=260, feedback_options=None)
        sides: dict[str, dict[str, Any]] = {}
        with gr.Row():
            for s in ("a", "b"):
                with gr.Column():
                    reply = gr.Textbox(
                        label=f"Reply {s.upper()}", interactive=False, lines=3, elem_id=f"reply-{s}"
                    )
                    rules = gr.CheckboxGroup(
                        label=f"Rules Reply {s.upper()} breaks", choices=[], elem_id=f"rules-{s}"
                    )
                    sides[s] = {"reply": reply, "rules": rules}
        choice = gr.Radio(list(CHOICE_LABELS), label="Which reply is better?", elem_id="choice")
        with gr.Accordion("Scores 1-10 (optional; 0 = not scored)", open=False):
            with gr.Row():
                for s in ("a", "b"):
                    with gr.Column():
                        sides[s]["dims"] = [
                            gr.Slider(0, 10, value=0, step=1, label=f"Reply {s.upper()}: {zh} / {en}")
                            for _, (zh, en) in dims
                        ]
        submit = gr.Button("Submit", variant="primary", elem_id="submit")
        status = gr.Markdown("", elem_id="status")

        view = [
            state,
            character,
            context,
            sides["a"]["reply"],
            sides["b"]["reply"],
            sides["a"]["rules"],
            sides["b"]["rules"],
            choice,
            *sides["a"]["dims"],
            *sides["b"]["dims"],
            status,
        ]

        def keep(message: str) -> list[Any]:
            """Leave the page as it is and say ``message``."""
            return [*[gr.update()] * (len(view) - 1), message]

        def show(name: str, note: str = "") -> list[Any]:
            name = (name or "").strip()
            if not name:
                return keep("Enter your name first.")
            item = store.next_item(name)
            zeros = [0] * (2 * len(dims))
            if item is None:
                empty = gr.CheckboxGroup(choices=[], value=[])
                return [
                    {},
                    "",
                    [],
                    "",
                    "",
                    empty,
                    empty,
                    None,
                    *zeros,
                    f"{note} No items left for {name}. Thank you!",
                ]
            rules = rule_choices(item.language)
            left = store.counts()["items"]
            return [
                {"item_id": item.item_id, "annotator": name},
                f"**{html.escape(item.character_name)}** ({item.language}) · {left} items in the store",
                _chat(item),
                item.reply_a,
                item.reply_b,
                gr.CheckboxGroup(choices=rules, value=[]),
                gr.CheckboxGroup(choices=rules, value=[]),
                None,
                *zeros,
                note,
            ]

        def save(
            name: str, st: dict, ch: str | None, ra: list[str], rb: list[str], *scores: float
        ) -> list[Any]:
            if not st.get("item_id"):
                return show(name, "Load an item first.")
            if ch is None:
                return keep("Pick which reply is better first.")
            n = len(dims)
            dim_scores = {
                side: {k: int(v) for (k, _), v in zip(dims, vals, strict=True) if v and int(v) > 0}
                for side, vals in (("a", scores[:n]), ("b", scores[n:]))
            }
            try:
                store.add_label(
                    st["item_id"], st["annotator"], ch, {"a": ra or [], "b": rb or []}, dim_scores
                )
            except FeedbackError as e:
                return keep(f"Not saved: {e}")
            return show(st["annotator"], "Saved.")

        start.click(show, [annotator], view)
        annotator.submit(show, [annotator], view)
        inputs = [annotator, state, choice, sides["a"]["rules"], sides["b"]["rules"]]
        submit.click(save, inputs + sides["a"]["dims"] + sides["b"]["dims"], view)
    return demo
