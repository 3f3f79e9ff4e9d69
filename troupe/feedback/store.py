"""The human preference store: side-by-side comparison items, people's labels, production feedback.

Three tables (SQLAlchemy 2, one schema for every database):

* ``items``   two replies to the same context: ``character_id`` (+ the card's name and language, so
  the page shows rule texts in the character's language and the export can run
  :func:`troupe.checks.check_reply` without the catalogue), ``context`` (contract messages, JSON),
  ``reply_a`` / ``reply_b`` with the hidden ``model_a`` / ``model_b``, ``source`` (``eval``,
  ``selfplay``, ``production``) and ``source_ref`` (where in the source it came from).
* ``labels``  one person's verdict on one item (unique per item and annotator): ``choice``
  (``a`` | ``b`` | ``tie`` | ``both_bad``), ``broken_a`` / ``broken_b`` (ids of
  :data:`troupe.dialogue.contract.BASIC_RULES`), ``dims_a`` / ``dims_b`` (optional 1-10 per
  :data:`~troupe.dialogue.contract.DIMENSIONS`), ``swapped`` and a timestamp. Choice, rules and
  scores are stored **as shown** (A = the left reply the person saw); ``swapped`` True means the
  page showed the item's ``reply_b`` as A. :meth:`LabelRow.canonical_choice` maps back.
* ``feedback_events``  production thumbs up/down from ``POST /v1/feedback`` (:mod:`serving.app`):
  conversation id, message id or reply text, character, ``up`` | ``down``, ``regenerated_from``,
  model version, timestamp.

Sides are randomised per (item, annotator): ``swapped`` = the low bit of
sha256(``seed/item_id/annotator``), so a reload shows the same order and different people see
different orders; the order actually shown is stored with the label. Model identities never leave
this module towards the page (:class:`ShownItem` has no model field).

Databases: SQLite locally (``sqlite:///work/feedback/feedback.db``; the parent directory is created;
a relative path resolves like :func:`troupe.config.repo_path`), PostgreSQL in production
(``postgresql+psycopg2://user:password@host:5432/troupe``; the tables are created on first use).

Errors: :class:`FeedbackError` (a ``ValueError``) names the offending field.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from troupe.contract import Message
from troupe.dialogue.contract import DIMENSION_SCALE, DIMENSIONS, RULE_IDS

CHOICES: tuple[str, ...] = ("a", "b", "tie", "both_bad")
RATINGS: tuple[str, ...] = ("up", "down")
SOURCES: tuple[str, ...] = ("eval", "selfplay", "production")
Choice = Literal["a", "b", "tie", "both_bad"]


class FeedbackError(ValueError):
    """Bad input to the store (names the field) or a duplicate label."""


# ------------------------------------------------------------------------------------------ tables


class Base(DeclarativeBase):
    pass


class Item(Base):
    """A comparison item (see module docstring)."""

    __tablename__ = "items"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    character_id: Mapped[str] = mapped_column(String(200), index=True)
    character_name: Mapped[str] = mapped_column(String(200))
    language: Mapped[str] = mapped_column(String(16))
    context: Mapped[list] = mapped_column(JSON)
    reply_a: Mapped[str] = mapped_column(Text)
    reply_b: Mapped[str] = mapped_column(Text)
    model_a: Mapped[str] = mapped_column(String(200))
    model_b: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(32))
    source_ref: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[float] = mapped_column(Float)


class Label(Base):
    """One person's verdict on one item, as shown (see module docstring)."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("item_id", "annotator", name="one_label_per_annotator"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id"), index=True)
    annotator: Mapped[str] = mapped_column(String(200))
    choice: Mapped[str] = mapped_column(String(16))
    swapped: Mapped[bool] = mapped_column(Boolean)
    broken_a: Mapped[list] = mapped_column(JSON, default=list)
    broken_b: Mapped[list] = mapped_column(JSON, default=list)
    dims_a: Mapped[dict] = mapped_column(JSON, default=dict)
    dims_b: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)


class FeedbackEventRow(Base):
    """A production thumbs up/down (``POST /v1/feedback``)."""

    __tablename__ = "feedback_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(String(200), index=True)
    message_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    character_id: Mapped[str] = mapped_column(String(200))
    reply: Mapped[str] = mapped_column(Text, default="")
    rating: Mapped[str] = mapped_column(String(8))
    regenerated_from: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_version: Mapped[str] = mapped_column(String(200), default="")
    context: Mapped[list | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class NewItem:
    """An item to queue; ``id`` is derived from its content (:func:`item_id`) when empty."""

    character_id: str
    character_name: str
    language: str
    context: list[Message]
    reply_a: str
    reply_b: str
    model_a: str
    model_b: str
    source: str
    source_ref: str = ""
    id: str = ""


@dataclass(frozen=True)
class ShownItem:
    """What the labelling page may see of an item: replies in the order shown, no model names."""

    item_id: str
    character_id: str
    character_name: str
    language: str
    context: list[Message]
    reply_a: str
    reply_b: str
    swapped: bool


@dataclass(frozen=True)
class LabelRow:
    """A label joined with its item (the export's input). Fields ending ``_shown`` are as shown."""

    item: NewItem
    annotator: str
    choice_shown: str
    swapped: bool
    broken_shown: dict[str, list[str]]
    dims_shown: dict[str, dict[str, int]]
    created_at: float

    def canonical_choice(self) -> str:
        """The choice in the item's own sides (``a`` = ``item.reply_a``)."""
        if self.swapped and self.choice_shown in ("a", "b"):
            return "b" if self.choice_shown == "a" else "a"
        return self.choice_shown

    def canonical_broken(self) -> dict[str, list[str]]:
        """Rule ids ticked per side of the item (``a`` = ``item.reply_a``)."""
        a, b = self.broken_shown.get("a", []), self.broken_shown.get("b", [])
        return {"a": b, "b": a} if self.swapped else {"a": a, "b": b}


def item_id(source: str, source_ref: str, context: list[Message], replies: tuple[str, str]) -> str:
    """Stable id of an item: sha256 over source, ref, context and the two replies (hex, 16 chars);
    re-queuing the same comparison finds the existing item."""
    payload = json.dumps(
        [source, source_ref, [m.model_dump(exclude_none=True) for m in context], list(replies)],
        ensure_ascii=False,
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def shown_swapped(item: str, annotator: str, seed: int) -> bool:
    """Whether ``annotator`` sees ``item`` with its sides swapped: low bit of sha256(seed/item/annotator)."""
    return bool(hashlib.sha256(f"{seed}/{item}/{annotator}".encode()).digest()[0] & 1)


def check_label(
    choice: str, broken: dict[str, list[str]], dims: dict[str, dict[str, int]]
) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """Validate a label's fields; returns ``(broken, dims)`` normalised to sides ``a`` and ``b``.

    Raises:
        FeedbackError: ``choice`` not in :data:`CHOICES`; a side other than a/b; an unknown rule id
            (not in :data:`troupe.dialogue.contract.RULE_IDS`); an unknown dimension or a score
            outside 1-10 (:data:`~troupe.dialogue.contract.DIMENSION_SCALE`). The message names the field.
    """
    if choice not in CHOICES:
        raise FeedbackError(f"choice: {choice!r} is not one of {CHOICES}")
    lo, hi = DIMENSION_SCALE
    out_b: dict[str, list[str]] = {"a": [], "b": []}
    out_d: dict[str, dict[str, int]] = {"a": {}, "b": {}}
    for side, rules in (broken or {}).items():
        if side not in ("a", "b"):
            raise FeedbackError(f"broken_rules.{side}: side must be 'a' or 'b'")
        for r in rules:
            if r not in RULE_IDS:
                raise FeedbackError(f"broken_rules.{side}: unknown rule id {r!r} (known: {RULE_IDS})")
        out_b[side] = sorted(set(rules), key=RULE_IDS.index)
    for side, scores in (dims or {}).items():
        if side not in ("a", "b"):
            raise FeedbackError(f"dimensions.{side}: side must be 'a' or 'b'")
        for k, v in scores.items():
            if k not in DIMENSIONS:
                raise FeedbackError(f"dimensions.{side}.{k}: unknown dimension (known: {list(DIMENSIONS)})")
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise FeedbackError(f"dimensions.{side}.{k}: {v!r} is not an integer in {lo}-{hi}")
        out_d[side] = dict(scores)
    return out_b, out_d


# ------------------------------------------------------------------------------------------ the store


def engine_url(db_url: str) -> str:
    """``db_url`` with a relative SQLite path resolved (:func:`troupe.config.repo_path`) and its
    parent directory created; other URLs unchanged.

    Raises:
        FeedbackError: ``db_url`` is not a SQLAlchemy URL (names ``feedback.db_url``).
    """
    from troupe.config import repo_path

    try:
        url = make_url(db_url)
    except Exception as e:
        raise FeedbackError(f"feedback.db_url: {db_url!r} is not a SQLAlchemy URL ({e})") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        p = Path(url.database)
        p = p if p.is_absolute() else repo_path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        url = url.set(database=str(p))
    return url.render_as_string(hide_password=False)


class Store:
    """The preference store on one database (module docstring: tables, sides, databases).

    Args:
        db_url: SQLAlchemy URL, e.g. ``sqlite:///work/feedback/feedback.db`` or
            ``postgresql+psycopg2://user:pw@host/troupe``. Tables are created if missing.
        seed: side-randomisation seed (:func:`shown_swapped`).
    """

    def __init__(self, db_url: str, seed: int = 0) -> None:
        self.db_url = db_url
        self.seed = int(seed)
        self.engine = create_engine(engine_url(db_url))
        Base.metadata.create_all(self.engine)

    def safe_url(self) -> str:
        """The URL without its password (for reports and quarantine records)."""
        return make_url(self.db_url).render_as_string(hide_password=True)

    # -- items -----------------------------------------------------------------------------------
    def add_items(self, items: list[NewItem]) -> tuple[int, int]:
        """Insert items not already stored (by id); returns ``(added, already_there)``.

        Raises:
            FeedbackError: an unknown ``source`` or equal replies (names the item).
        """
        added = existing = 0
        with Session(self.engine) as s, s.begin():
            for it in items:
                if it.source not in SOURCES:
                    raise FeedbackError(f"item source: {it.source!r} is not one of {SOURCES}")
                if it.reply_a.strip() == it.reply_b.strip():
                    raise FeedbackError(f"item {it.source_ref or it.id}: reply_a equals reply_b")
                iid = it.id or item_id(it.source, it.source_ref, it.context, (it.reply_a, it.reply_b))
                if s.get(Item, iid) is not None:
                    existing += 1
                    continue
                s.add(
                    Item(
                        id=iid,
                        character_id=it.character_id,
                        character_name=it.character_name,
                        language=it.language,
                        context=[m.model_dump(exclude_none=True) for m in it.context],
                        reply_a=it.reply_a,
                        reply_b=it.reply_b,
                        model_a=it.model_a,
                        model_b=it.model_b,
                        source=it.source,
                        source_ref=it.source_ref,
                        created_at=time.time(),
                    )
                )
                added += 1
        return added, existing

    def counts(self) -> dict[str, int]:
        """``{"items", "labels", "events"}`` row counts."""
        with Session(self.engine) as s:
            return {
                "items": s.scalar(select(func.count()).select_from(Item)) or 0,
                "labels": s.scalar(select(func.count()).select_from(Label)) or 0,
                "events": s.scalar(select(func.count()).select_from(FeedbackEventRow)) or 0,
            }

    def show(self, iid: str, annotator: str) -> ShownItem:
        """Item ``iid`` as ``annotator`` sees it (sides per :func:`shown_swapped`; no model names).

        Raises:
            FeedbackError: no such item (names ``item_id``).
        """
        with Session(self.engine) as s:
            it = s.get(Item, iid)
            if it is None:
                raise FeedbackError(f"item_id: no item {iid!r}")
            sw = shown_swapped(iid, annotator, self.seed)
            a, b = (it.reply_b, it.reply_a) if sw else (it.reply_a, it.reply_b)
            return ShownItem(
                iid,
                it.character_id,
                it.character_name,
                it.language,
                [Message.model_validate(m) for m in it.context],
                a,
                b,
                sw,
            )

    def next_item(self, annotator: str) -> ShownItem | None:
        """The next item for ``annotator``: one they have not labelled, fewest labels first (then the
        oldest, then by id), so a team covers every item before doubling up; None when done."""
        with Session(self.engine) as s:
            mine = select(Label.item_id).where(Label.annotator == annotator)
            n = func.count(Label.id)
            row = s.execute(
                select(Item.id)
                .outerjoin(Label, Label.item_id == Item.id)
                .where(Item.id.not_in(mine))
                .group_by(Item.id, Item.created_at)
                .order_by(n, Item.created_at, Item.id)
                .limit(1)
            ).first()
        return self.show(row[0], annotator) if row else None

    # -- labels ----------------------------------------------------------------------------------
    def add_label(
        self,
        iid: str,
        annotator: str,
        choice: str,
        broken: dict[str, list[str]] | None = None,
        dims: dict[str, dict[str, int]] | None = None,
    ) -> int:
        """Store ``annotator``'s verdict on item ``iid``, **as shown** to them (the side order is
        recomputed with :func:`shown_swapped` and stored); returns the label's row id.

        Raises:
            FeedbackError: empty ``annotator``, unknown item, a bad field (:func:`check_label`), or
                a second label by the same annotator on the same item.
        """
        annotator = (annotator or "").strip()
        if not annotator:
            raise FeedbackError("annotator: a name is required")
        b, d = check_label(choice, broken or {}, dims or {})
        with Session(self.engine) as s:
            if s.get(Item, iid) is None:
                raise FeedbackError(f"item_id: no item {iid!r}")
            row = Label(
                item_id=iid,
                annotator=annotator,
                choice=choice,
                swapped=shown_swapped(iid, annotator, self.seed),
                broken_a=b["a"],
                broken_b=b["b"],
                dims_a=d["a"],
                dims_b=d["b"],
                created_at=time.time(),
            )
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise FeedbackError(f"annotator: {annotator!r} already labelled item {iid!r}") from None
            return int(row.id)

    def labels(self) -> list[LabelRow]:
        """Every label joined with its item, ordered by item then time."""
        with Session(self.engine) as s:
            rows = s.execute(select(Label, Item).join(Item).order_by(Item.id, Label.created_at)).all()
            return [
                LabelRow(
                    item=NewItem(
                        id=it.id,
                        character_id=it.character_id,
                        character_name=it.character_name,
                        language=it.language,
                        context=[Message.model_validate(m) for m in it.context],
                        reply_a=it.reply_a,
                        reply_b=it.reply_b,
                        model_a=it.model_a,
                        model_b=it.model_b,
                        source=it.source,
                        source_ref=it.source_ref,
                    ),
                    annotator=lb.annotator,
                    choice_shown=lb.choice,
                    swapped=lb.swapped,
                    broken_shown={"a": list(lb.broken_a or []), "b": list(lb.broken_b or [])},
                    dims_shown={"a": dict(lb.dims_a or {}), "b": dict(lb.dims_b or {})},
                    created_at=lb.created_at,
                )
                for lb, it in rows
            ]

    # -- production feedback ---------------------------------------------------------------------
    def add_event(self, event: dict[str, Any]) -> int:
        """Store one production feedback event (the ``POST /v1/feedback`` body, already validated by
        :func:`serving.contract.parse_feedback`); returns its row id.

        Keys: ``conversation_id``, ``character_id``, ``rating`` (up|down) required; ``message_id``,
        ``reply``, ``regenerated_from``, ``model_version``, ``messages`` (the context) optional.

        Raises:
            FeedbackError: a required key missing or a bad ``rating`` (names the field).
        """
        for k in ("conversation_id", "character_id", "rating"):
            if not event.get(k):
                raise FeedbackError(f"{k}: required")
        if event["rating"] not in RATINGS:
            raise FeedbackError(f"rating: {event['rating']!r} is not one of {RATINGS}")
        with Session(self.engine) as s, s.begin():
            row = FeedbackEventRow(
                conversation_id=str(event["conversation_id"]),
                message_id=event.get("message_id"),
                character_id=str(event["character_id"]),
                reply=str(event.get("reply") or ""),
                rating=event["rating"],
                regenerated_from=event.get("regenerated_from"),
                model_version=str(event.get("model_version") or ""),
                context=event.get("messages"),
                created_at=float(event.get("created_at") or time.time()),
            )
            s.add(row)
            s.flush()
            return int(row.id)

    def events(self) -> list[dict[str, Any]]:
        """Every production feedback event as a dict (column -> value), oldest first."""
        with Session(self.engine) as s:
            rows = s.scalars(select(FeedbackEventRow).order_by(FeedbackEventRow.id)).all()
            cols = [c.name for c in FeedbackEventRow.__table__.columns]
            return [{c: getattr(r, c) for c in cols} for r in rows]
