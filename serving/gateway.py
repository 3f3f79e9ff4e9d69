"""Gateway and routing rules as pure functions (no Ray): what the ``Router`` deployment applies.

Everything here is deterministic and unit-testable: API-key checks, request limits, turn merging,
history windowing under a token budget, sticky weighted routing, reply splitting into chat messages.
Rejections raise :class:`GatewayError` carrying the HTTP status and a JSON body; nothing rejected
ever reaches a model.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.contract import CANARY, STABLE, VARIANTS
from troupe.contract import Character, Message, to_chat
from troupe.persona import render_system_prompt


class GatewayError(Exception):
    """A request rejected before any model sees it.

    Attributes:
        status: HTTP status (400, 401, 404, 413...).
        code: short machine-readable code (``invalid_request``, ``unauthorized``...).
        message: human-readable reason.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        """OpenAI-style error body: ``{"error": {"code", "message", "type"}}``."""
        return {"error": {"code": self.code, "message": self.message, "type": "invalid_request_error"}}


# -- API keys -------------------------------------------------------------------------------------
def sha256_hex(key: str) -> str:
    """Hex SHA-256 of an API key (what configs and ``TROUPE_API_KEYS_SHA256`` store)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_key_hashes(
    hashes: list[str] | None = None, env: str = "TROUPE_API_KEYS_SHA256", file: str | None = None
) -> frozenset[str]:
    """Accepted key hashes from a list, a comma-separated env var and/or a file (one hash a line).

    Raises:
        ValueError: an entry is not 64 hex characters.
    """
    out = [h for h in (hashes or [])]
    out += [h for h in os.environ.get(env, "").split(",")] if env else []
    if file:
        out += Path(file).read_text(encoding="utf-8").split()
    clean = {h.strip().lower() for h in out if h and h.strip()}
    for h in clean:
        if not re.fullmatch(r"[0-9a-f]{64}", h):
            raise ValueError(f"API key hash {h[:12]}...: not a hex SHA-256 (64 hex characters)")
    return frozenset(clean)


def check_api_key(headers: dict[str, str], accepted: frozenset[str], required: bool) -> None:
    """Raise 401 unless the ``Authorization: Bearer KEY`` / ``x-api-key`` key's hash is accepted.

    No check when ``accepted`` is empty and ``required`` is false (open local/test deployments);
    ``required`` with no accepted hashes rejects everything (fail closed).
    """
    if not accepted and not required:
        return
    h = {k.lower(): v for k, v in headers.items()}
    key = h.get("x-api-key", "")
    auth = h.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    if not key:
        raise GatewayError(401, "unauthorized", "missing API key (Authorization: Bearer KEY or x-api-key)")
    digest = sha256_hex(key)
    if not any(hmac.compare_digest(digest, a) for a in accepted):
        raise GatewayError(401, "unauthorized", "invalid API key")


# -- limits and turn handling ---------------------------------------------------------------------
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def estimate_tokens(text: str) -> int:
    """Cheap token estimate (no tokenizer): one per CJK character plus one per 4 other characters."""
    cjk = len(_CJK.findall(text))
    return cjk + math.ceil((len(text) - cjk) / 4)


@dataclass
class Limits:
    """Request limits applied by the gateway (all counts inclusive)."""

    max_body_bytes: int = 65536
    max_messages: int = 64
    max_message_chars: int = 4000
    max_input_tokens: int = 2048
    history_token_budget: int = 1024
    max_new_tokens: int = 256

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Limits:
        known = {k: int(v) for k, v in (d or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


def parse_messages(raw: Any, limits: Limits) -> list[Message]:
    """Validate client messages (list of ``{role, content}``) against the contract and limits.

    Raises:
        GatewayError: 400 for a non-list, too many messages, a bad role/content, a too-long message,
            a ``system`` message other than the first, or no user message at the end.
    """
    if not isinstance(raw, list) or not raw:
        raise GatewayError(400, "invalid_request", "messages must be a non-empty list")
    if len(raw) > limits.max_messages:
        raise GatewayError(400, "too_many_messages", f"{len(raw)} messages > limit {limits.max_messages}")
    msgs: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise GatewayError(400, "invalid_request", f"messages[{i}]: role must be system|user|assistant")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise GatewayError(400, "invalid_request", f"messages[{i}]: content must be a string")
        if len(content) > limits.max_message_chars:
            raise GatewayError(
                400, "message_too_long", f"messages[{i}]: {len(content)} chars > {limits.max_message_chars}"
            )
        if m["role"] == "system" and i != 0:
            raise GatewayError(400, "invalid_request", f"messages[{i}]: system only allowed first")
        msgs.append(Message(role=m["role"], content=content))
    if msgs[-1].role != "user":
        raise GatewayError(400, "invalid_request", "the last message must be a user turn")
    return msgs


def merge_user_turns(messages: list[Message]) -> list[Message]:
    """Merge consecutive user messages into one turn (newline-joined): quick inputs are one turn."""
    out: list[Message] = []
    for m in messages:
        if out and m.role == "user" and out[-1].role == "user":
            out[-1] = Message(role="user", content=f"{out[-1].content}\n{m.content}")
        else:
            out.append(m)
    return out


def build_prompt(character: Character, messages: list[Message], limits: Limits) -> list[dict[str, str]]:
    """Chat-template messages: the rendered persona card + the newest turns under the token budget.

    The card (and a leading client ``system`` scene instruction) is always kept; the oldest turns
    are dropped first, in whole user/assistant pairs, and the history never starts with an
    assistant turn. The card itself counts towards ``max_input_tokens``, not the history budget.

    Raises:
        GatewayError: 400 when the newest user turn alone exceeds the history budget or the prompt
            exceeds ``max_input_tokens``.
    """
    chat = to_chat(merge_user_turns(messages), render_system_prompt(character))
    system, turns = chat[0], chat[1:]
    last = estimate_tokens(turns[-1]["content"])
    if last > limits.history_token_budget:
        raise GatewayError(
            400, "too_many_tokens", f"last user turn ~{last} tokens > budget {limits.history_token_budget}"
        )
    kept: list[dict[str, str]] = []
    used = 0
    for t in reversed(turns):
        n = estimate_tokens(t["content"])
        if used + n > limits.history_token_budget:
            break
        kept.insert(0, t)
        used += n
    while kept and kept[0]["role"] != "user":
        kept.pop(0)
    total = estimate_tokens(system["content"]) + used
    if total > limits.max_input_tokens:
        raise GatewayError(400, "too_many_tokens", f"prompt ~{total} tokens > {limits.max_input_tokens}")
    return [system, *kept]


# -- routing --------------------------------------------------------------------------------------
def bucket(conversation_id: str) -> float:
    """Stable bucket of a conversation id in ``[0, 100)`` (SHA-256, 1/100 of a percent resolution)."""
    h = int.from_bytes(hashlib.sha256(conversation_id.encode("utf-8")).digest()[:8], "big")
    return (h % 10000) / 100.0


def choose_variant(conversation_id: str, canary_weight_percent: float) -> str:
    """``"canary"`` if the conversation's bucket is below ``canary_weight_percent`` (percent), else ``"stable"``.

    Monotone in the weight: raising it only moves conversations from stable to canary.
    """
    return CANARY if bucket(conversation_id) < canary_weight_percent else STABLE


#: Request headers that name a conversation or a client session (stickiness keys), and the
#: response header that returns the key the Router used.
CONVERSATION_HEADER = "x-conversation-id"
SESSION_HEADER = "x-session-id"


def sticky_key(
    conversation_id: Any = None, user: Any = None, headers: dict[str, str] | None = None
) -> tuple[str, str]:
    """The key a request is routed by, and where it came from.

    Order: the body's ``conversation_id``, the ``x-conversation-id`` header, the OpenAI ``user``
    field, the ``x-session-id`` header; with none of them a random id (``uuid4``) that the Router
    returns to the client (``x-conversation-id`` response header and the body's
    ``conversation_id``) so its next turn can send it back. Never the message text: keying on it
    sent every conversation that opens with the same "你好" to the same variant.

    Returns:
        ``(key, source)`` with source ``conversation_id`` | ``user`` | ``session`` | ``generated``;
        user and session keys are prefixed (``user:``, ``session:``) so they cannot collide with
        conversation ids.
    """
    import uuid

    h = {k.lower(): v for k, v in (headers or {}).items()}
    for value, source, prefix in (
        (conversation_id, "conversation_id", ""),
        (h.get(CONVERSATION_HEADER), "conversation_id", ""),
        (user, "user", "user:"),
        (h.get(SESSION_HEADER), "session", "session:"),
    ):
        if value is not None and str(value).strip():
            return f"{prefix}{str(value).strip()}", source
    return uuid.uuid4().hex, "generated"


class StickyRouter:
    """Weighted stable/canary split, sticky per conversation.

    A conversation served by the canary is pinned there (bounded LRU of ``max_pins`` ids) until a
    rollback, so lowering the weight does not move it back; raising the weight only adds
    conversations to the canary (:func:`choose_variant` is monotone). ``rollback()`` unpins all.
    """

    def __init__(self, canary_weight_percent: float = 0.0, max_pins: int = 100_000) -> None:
        self.canary_weight_percent = float(canary_weight_percent)
        self.max_pins = max_pins
        self._pins: OrderedDict[str, None] = OrderedDict()

    def set_weight(self, weight: float) -> None:
        """Set the canary share in percent (clamped to [0, 100])."""
        self.canary_weight_percent = min(100.0, max(0.0, float(weight)))

    def rollback(self) -> None:
        """Weight 0 and every pinned conversation back to stable."""
        self.canary_weight_percent = 0.0
        self._pins.clear()

    def route(self, conversation_id: str, canary_available: bool = True) -> str:
        """Variant for this conversation (``stable`` whenever no canary is deployed)."""
        if not canary_available:
            return STABLE
        if conversation_id in self._pins:
            self._pins.move_to_end(conversation_id)
            return CANARY
        v = choose_variant(conversation_id, self.canary_weight_percent)
        if v == CANARY:
            self._pins[conversation_id] = None
            if len(self._pins) > self.max_pins:
                self._pins.popitem(last=False)
        return v

    @property
    def pinned(self) -> int:
        return len(self._pins)


# -- reply splitting ------------------------------------------------------------------------------
_SENT = re.compile(r"[^。！？!?…~～\n]+[。！？!?…~～]*|[。！？!?…~～]+", re.S)


def split_reply(text: str, chars_per_sec: float = 4.0, min_chars: int = 2) -> list[dict[str, Any]]:
    """Split a reply's plain text into chat messages with a typing delay each.

    Args:
        text: reply text without markup.
        chars_per_sec: typing speed; ``delay_ms = 1000 * len(message) / chars_per_sec``.
        min_chars: fragments shorter than this are glued to the previous message.

    Returns:
        ``[{"text": str, "delay_ms": int}]`` (empty list for an empty reply).
    """
    parts: list[str] = []
    for m in _SENT.finditer(text):
        s = m.group(0).strip()
        if not s:
            continue
        if parts and (len(s) < min_chars or not any(ch.isalnum() for ch in s)):
            parts[-1] += s
        else:
            parts.append(s)
    cps = max(float(chars_per_sec), 0.1)
    return [{"text": p, "delay_ms": int(round(1000 * len(p) / cps))} for p in parts]


# -- rollout statistics ---------------------------------------------------------------------------
#: Live reply-rule checks the Router counts per variant (:func:`troupe.checks.check_reply`), in the
#: order of the three flags of a router event; ``<check>_rate`` is the share of ok replies breaking it.
RULE_CHECKS = ("markup_invalid", "language_mismatch", "assistant_phrase")


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank ``q``-th percentile (0-100) of ``xs``; None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def variant_summary(
    requests: int, errors: int, rule_counts: dict[str, int], sorted_latencies_ms: Any
) -> dict[str, Any]:
    """One variant's entry of ``GET /v1/rollout/stats`` ``variants`` (what the rollout reads).

    Args:
        requests: model calls in the window (ok + failed).
        errors: failed model calls.
        rule_counts: ok replies breaking each of :data:`RULE_CHECKS`.
        sorted_latencies_ms: latencies of the ok replies in ms, ascending (list or numpy array).

    Returns:
        ``{requests, ok, errors, error_rate, p50_ms, p95_ms, p95, counts, <check>_rate...}``: counts
        are raw (the controller builds its Wilson / Newcombe intervals from them); ``p95`` is the
        p95 latency with its distribution-free 95 % interval (:func:`troupe.stats.quantile_interval`,
        an :class:`~troupe.stats.Estimate` dict); rates are over ok replies, errors over requests.
    """
    from troupe.stats import quantile_interval

    ok = requests - errors
    lat = sorted_latencies_ms
    out: dict[str, Any] = {
        "requests": int(requests),
        "ok": int(ok),
        "errors": int(errors),
        "error_rate": errors / requests if requests else 0.0,
        "p50_ms": float(lat[max(0, -(-len(lat) // 2) - 1)]) if len(lat) else None,
        "p95_ms": None,
        "p95": _estimate_dict(quantile_interval(lat, 0.95)),
        "counts": {c: int(rule_counts.get(c, 0)) for c in RULE_CHECKS},
    }
    out["p95_ms"] = out["p95"]["value"]
    for c in RULE_CHECKS:
        out[f"{c}_rate"] = out["counts"][c] / ok if ok else 0.0
    return out


def _estimate_dict(e: Any) -> dict[str, Any]:
    """``Estimate.to_dict()`` without ``dataclasses.asdict`` (called on every stats read)."""
    return {
        "value": None if math.isnan(e.value) else e.value,
        "n": e.n,
        "lo": None if math.isnan(e.lo) else e.lo,
        "hi": None if math.isnan(e.hi) else e.hi,
        "confidence": e.confidence,
        "method": e.method,
    }


def aggregate_events(events: Any, since: float = 0.0) -> dict[str, dict[str, Any]]:
    """Per-variant :func:`variant_summary` of router events ``(ts, variant, ok, ms, markup_bad,
    lang_bad, phrase)`` with ``ts >= since`` (unix seconds)."""
    out: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        rows = [e for e in events if e[1] == v and e[0] >= since]
        ok = [e for e in rows if e[2]]
        counts = {c: sum(bool(e[4 + i]) for e in ok) for i, c in enumerate(RULE_CHECKS)}
        out[v] = variant_summary(len(rows), len(rows) - len(ok), counts, sorted(e[3] for e in ok))
    return out
