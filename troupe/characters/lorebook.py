"""Lorebooks (a card's ``character_book``): which entries go into the context for the next reply.

Semantics, from the Character Card V2 spec (``spec_v2.md``, ``CharacterBook``), the V3 spec
(``SPEC_V3.md``, "Lorebook Fields") and SillyTavern's World Info docs (docs.sillytavern.app
"World Info": Key, Optional Filter, Scan Depth, Budget; ``public/scripts/world-info.js``):

* an entry with ``enabled: false`` never activates; an entry with empty ``content`` adds nothing;
* ``constant: true`` entries activate always;
* other entries activate when one of ``keys`` occurs in the last ``scan_depth`` chat messages
  (book ``scan_depth``, default 4 as SillyTavern's ``DEFAULT_DEPTH``; an entry's
  ``extensions.scan_depth`` overrides it; 0 scans nothing). Matching is a substring test,
  case-insensitive unless ``case_sensitive`` (or ``extensions.case_sensitive``) is true; a key is a
  regular expression when ``use_regex`` (V3) is true or it is written ``/pattern/flags``
  (SillyTavern); an invalid pattern never matches (V3). ``extensions.match_whole_words`` makes a key
  match whole words only;
* ``selective: true`` with non-empty ``secondary_keys`` also needs the optional filter: any
  secondary key (SillyTavern's default ``AND ANY``; ``extensions.selectiveLogic`` 1 = NOT ALL,
  2 = NOT ANY, 3 = AND ALL as in ``world_info_logic``);
* budget: ``min(budget_tokens, book token_budget)``. Constant entries are taken first (SillyTavern:
  "Constant entries will be inserted first"), then higher ``priority`` (V2: "lower priority value =
  discarded first"), then higher ``insertion_order`` (V3: the lowest ``insertion_order`` is removed
  first when no ``priority`` is given; SillyTavern: "then entries with higher order numbers"); once
  the next entry does not fit, no more are activated (SillyTavern "Budget");
* the activated entries are returned in prompt order: ``insertion_order`` ascending (V2: "lower
  insertion order = inserted higher"), then their order in the book.

Not implemented: recursive scanning, probability, inclusion groups, positions beyond prompt order
(``position`` is left to the caller), V3 decorators other than being stripped from the content.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

#: Messages scanned for keys when the book sets no ``scan_depth`` (SillyTavern's DEFAULT_DEPTH).
DEFAULT_SCAN_DEPTH = 4
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]")
#: tokens per CJK character, characters per token otherwise (upper estimates; see estimate_tokens)
CJK_TOKENS_PER_CHAR, CHARS_PER_TOKEN = 2.5, 3.5


def estimate_tokens(text: str) -> int:
    """Token count estimate without a tokenizer: 2.5 per CJK character + 1 per 3.5 other characters.

    Calibrated as an upper estimate on the base model's tokenizer (SmolLM2: ~2.3 tokens per CJK
    character, ~3.7 characters per token for English, measured on the sample's rendered persona
    cards); tokenizers with a large CJK vocabulary (Qwen) need fewer. Pass a real counter where one is
    at hand.
    """
    cjk = len(_CJK.findall(text))
    return math.ceil(cjk * CJK_TOKENS_PER_CHAR + (len(text) - cjk) / CHARS_PER_TOKEN)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num(v: Any, default: float = 0.0) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else default


_SLASH_REGEX = re.compile(r"^/(.+)/([a-z]*)$", re.S)


def _matcher(key: str, *, case_sensitive: bool, regex: bool, whole_words: bool) -> Callable[[str], bool]:
    flags = 0 if case_sensitive else re.I
    m = _SLASH_REGEX.match(key)
    if regex or m:
        pattern = m.group(1) if m else key
        if m and "i" in m.group(2):
            flags |= re.I
        try:
            rx = re.compile(pattern, flags)
        except re.error:
            return lambda text: False
        return lambda text: rx.search(text) is not None
    if whole_words:
        rx = re.compile(rf"(?<!\w){re.escape(key)}(?!\w)", flags)
        return lambda text: rx.search(text) is not None
    if case_sensitive:
        return lambda text: key in text
    low = key.casefold()
    return lambda text: low in text.casefold()


def _hits(entry: dict[str, Any], keys: Any, text: str) -> list[bool]:
    ext = entry.get("extensions") if isinstance(entry.get("extensions"), dict) else {}
    case = entry.get("case_sensitive")
    if case is None:
        case = ext.get("case_sensitive")
    opts = {
        "case_sensitive": bool(case),
        "regex": bool(entry.get("use_regex")),
        "whole_words": bool(ext.get("match_whole_words")),
    }
    return [_matcher(k, **opts)(text) for k in keys or [] if isinstance(k, str) and k]


def _active(entry: dict[str, Any], recent: list[str], book_depth: int) -> bool:
    if not isinstance(entry, dict) or entry.get("enabled", True) is False:
        return False
    if not str(entry.get("content") or "").strip():
        return False
    if entry.get("constant"):
        return True
    ext = entry.get("extensions") if isinstance(entry.get("extensions"), dict) else {}
    depth = _int(ext.get("scan_depth"))
    depth = book_depth if depth is None else depth
    text = "\n".join(recent[-depth:]) if depth > 0 else ""
    if not text or not any(_hits(entry, entry.get("keys"), text)):
        return False
    secondary = entry.get("secondary_keys") or []
    if not entry.get("selective") or not secondary:
        return True
    hits = _hits(entry, secondary, text)
    logic = _int(ext.get("selectiveLogic")) or 0
    if logic == 1:  # NOT ALL
        return not all(hits)
    if logic == 2:  # NOT ANY
        return not any(hits)
    if logic == 3:  # AND ALL
        return all(hits)
    return any(hits)  # AND ANY


def select_lore(
    lorebook: dict[str, Any] | None,
    messages: list[dict[str, Any]],
    *,
    budget_tokens: int,
    count_tokens: Callable[[str], int] = estimate_tokens,
) -> list[dict[str, Any]]:
    """The lorebook entries to insert for the next reply (rules in the module docstring).

    Args:
        lorebook: a card's ``character_book`` (``Character.lorebook``); None gives ``[]``.
        messages: the chat so far, ``[{"role", "content"}]``; ``system`` turns are not scanned.
        budget_tokens: most tokens the inserted entries may take (the book's ``token_budget`` applies
            when smaller).
        count_tokens: token counter for an entry's content (default :func:`estimate_tokens`).

    Returns:
        The selected entry dicts (the book's own objects), in prompt order.
    """
    if not lorebook:
        return []
    entries = [e for e in lorebook.get("entries") or [] if isinstance(e, dict)]
    depth = _int(lorebook.get("scan_depth"))
    depth = DEFAULT_SCAN_DEPTH if depth is None else depth
    recent = [str(m.get("content") or "") for m in messages if m.get("role") != "system"]
    budget = budget_tokens
    book_budget = _int(lorebook.get("token_budget"))
    if book_budget is not None and book_budget > 0:
        budget = min(budget, book_budget)
    active = [(i, e) for i, e in enumerate(entries) if _active(e, recent, depth)]
    by_priority = sorted(
        active,
        key=lambda ie: (
            not ie[1].get("constant"),
            -_num(ie[1].get("priority")),
            -_num(ie[1].get("insertion_order")),
            ie[0],
        ),
    )
    chosen: list[tuple[int, dict[str, Any]]] = []
    used = 0
    for i, e in by_priority:
        cost = count_tokens(lore_text(e))
        if used + cost > budget:
            break
        used += cost
        chosen.append((i, e))
    chosen.sort(key=lambda ie: (_num(ie[1].get("insertion_order")), ie[0]))
    return [e for _, e in chosen]


_DECORATOR = re.compile(r"^@@.*$\n?", re.M)


def lore_text(entry: dict[str, Any]) -> str:
    """An entry's content as inserted: V3 decorator lines (``@@name value``) removed, stripped."""
    return _DECORATOR.sub("", str(entry.get("content") or "")).strip()


def render_lore(entries: list[dict[str, Any]]) -> str:
    """The text inserted into the context for ``entries`` (from :func:`select_lore`): their contents,
    in the given order, separated by blank lines; ``""`` for none."""
    return "\n\n".join(t for t in (lore_text(e) for e in entries) if t)
