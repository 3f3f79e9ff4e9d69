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
from troupe.contract import Character, Message
from troupe.persona import render_system_prompt


class GatewayError(Exception):
    """A request rejected before any model sees it.

    Attributes:
        status: HTTP status (400, 401, 404, 413...).
        code: short machine-readable code (``invalid_request``, ``unauthorized``...).
        message: human-readable reason.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """OpenAI-style error body: ``{"error": {"code", "message", "type", "param"}}`` (the shape of
        ``openai.types.shared.ErrorObject``; ``param`` names the offending request field)."""
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error"
        )
        return {"error": {"code": self.code, "message": self.message, "type": kind, "param": self.param}}


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
    #: tokens of lorebook entries inserted after the persona card (0 = no lorebook insertion)
    lore_token_budget: int = 256
    #: per API key (or client IP when keys are off) token bucket: sustained rate and burst; 0 = off
    requests_per_minute: int = 0
    burst: int = 10

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Limits:
        """Limits from a ``gateway.limits`` mapping.

        Raises:
            ValueError: an unknown key or a value that is not a non-negative integer (names the key).
        """
        d = d or {}
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"gateway.limits: unknown keys {unknown} (known: {sorted(cls.__dataclass_fields__)})"
            )
        out: dict[str, int] = {}
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0 or int(v) != v:
                raise ValueError(f"gateway.limits.{k}: {v!r} is not a non-negative integer")
            out[k] = int(v)
        return cls(**out)


#: Client roles and the role each takes in the context: OpenAI's ``developer`` is a system turn.
CLIENT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def message_text(content: Any, where: str) -> str:
    """Text of an OpenAI message ``content``: a string, or a list of content parts whose ``text``
    parts are joined (the shape ``openai.types.chat.ChatCompletionContentPartTextParam``).

    Raises:
        GatewayError: 400 naming ``where`` for any other type or a non-text part (images, audio).
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise GatewayError(
                    400,
                    "invalid_request",
                    f"{where}[{j}]: only text content parts are supported",
                    f"{where}[{j}]",
                )
            out.append(part["text"])
        return "".join(out)
    raise GatewayError(
        400, "invalid_request", f"{where}: content must be a string or a list of text parts", where
    )


def parse_messages(raw: Any, limits: Limits) -> list[Message]:
    """Validate client messages (list of ``{role, content}``) against the contract and limits.

    ``system`` and ``developer`` messages may stand anywhere (SillyTavern sends author's notes and
    world info as later system messages); both become ``system`` turns kept in place. A last
    ``assistant`` message is a prefill to continue (:func:`split_prefill`).

    Raises:
        GatewayError: 400 for a non-list, too many messages, a bad role/content, a too-long message,
            or no user turn (the last non-system turn must be a user turn or a prefill after one).
    """
    if not isinstance(raw, list) or not raw:
        raise GatewayError(400, "invalid_request", "messages must be a non-empty list", "messages")
    if len(raw) > limits.max_messages:
        raise GatewayError(
            400, "too_many_messages", f"{len(raw)} messages > limit {limits.max_messages}", "messages"
        )
    msgs: list[Message] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in CLIENT_ROLES:
            raise GatewayError(
                400, "invalid_request", f"{where}.role must be one of {sorted(CLIENT_ROLES)}", f"{where}.role"
            )
        content = message_text(m.get("content"), f"{where}.content")
        if len(content) > limits.max_message_chars:
            raise GatewayError(
                400,
                "message_too_long",
                f"{where}.content: {len(content)} chars > {limits.max_message_chars}",
                f"{where}.content",
            )
        msgs.append(Message(role=CLIENT_ROLES[m["role"]], content=content))
    turns = [m for m in msgs if m.role != "system"]
    if not turns or not any(m.role == "user" for m in turns):
        raise GatewayError(400, "invalid_request", "messages: no user turn", "messages")
    if turns[-1].role == "assistant" and turns[-2].role != "user":
        raise GatewayError(
            400,
            "invalid_request",
            "the last message must be a user turn (or one prefill after it)",
            "messages",
        )
    return msgs


def split_prefill(messages: list[Message]) -> tuple[list[Message], str]:
    """``(messages up to the last user turn and the system notes after it, prefill text)``: a last
    ``assistant`` message is a prefill the reply continues (SillyTavern's "continue"); ``""`` when
    the chat ends with a user turn."""
    msgs = list(messages)
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i].role == "assistant":
            if any(m.role == "user" for m in msgs[i + 1 :]):
                break
            return msgs[:i] + msgs[i + 1 :], msgs[i].content
        if msgs[i].role == "user":
            break
    return msgs, ""


def merge_user_turns(messages: list[Message]) -> list[Message]:
    """Merge consecutive user messages into one turn (newline-joined): quick inputs are one turn."""
    out: list[Message] = []
    for m in messages:
        if out and m.role == "user" and out[-1].role == "user":
            out[-1] = Message(role="user", content=f"{out[-1].content}\n{m.content}")
        else:
            out.append(m)
    return out


def build_prompt(
    character: Character,
    messages: list[Message],
    limits: Limits,
    *,
    lore: str = "",
    post_history: str = "",
) -> list[dict[str, str]]:
    """Chat-template messages: the rendered persona card, lorebook text, the newest turns under the
    token budget, and the card's post-history instructions.

    Layout: ``[card (system), lore (system, if any), turns..., post_history (system, if any)]``. The
    card is the first system message, rendered alone and so byte-identical for every request of a
    character (the KV prefix cache is keyed on it); client ``system``/``developer`` messages are
    never merged into it: they stay system turns in their place in the history, after the card and
    its rules. The oldest user/assistant turns are dropped first, in whole pairs, and the kept
    history starts with a user turn. System notes before the client's first user turn (its scene
    setup) are always kept; later notes are windowed with the turns around them. The card, lore,
    leading notes and post-history count towards ``max_input_tokens``, not the history budget.

    Raises:
        GatewayError: 400 when the newest user turn alone exceeds the history budget or the prompt
            exceeds ``max_input_tokens``.
    """
    msgs = merge_user_turns(messages)
    system = {"role": "system", "content": render_system_prompt(character)}
    first_user = next(i for i, m in enumerate(msgs) if m.role == "user")
    # the client's scene setup before its first user turn: system notes kept, an opening assistant
    # greeting dropped (the history starts with a user turn, as in training)
    lead = [{"role": "system", "content": m.content} for m in msgs[:first_user] if m.role == "system"]
    turns = [{"role": m.role, "content": m.content} for m in msgs[first_user:]]
    last_user = max(i for i, t in enumerate(turns) if t["role"] == "user")
    last = estimate_tokens(turns[last_user]["content"])
    if last > limits.history_token_budget:
        raise GatewayError(
            400,
            "too_many_tokens",
            f"last user turn ~{last} tokens > budget {limits.history_token_budget}",
            "messages",
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
        used -= estimate_tokens(kept.pop(0)["content"])
    head = [system]
    if lore.strip():
        head.append({"role": "system", "content": lore.strip()})
    tail = [{"role": "system", "content": post_history}] if post_history.strip() else []
    fixed = sum(estimate_tokens(m["content"]) for m in head + lead + tail)
    total = fixed + used
    if total > limits.max_input_tokens:
        raise GatewayError(
            400, "too_many_tokens", f"prompt ~{total} tokens > {limits.max_input_tokens}", "messages"
        )
    return [*head, *lead, *kept, *tail]


# -- rate limits ----------------------------------------------------------------------------------
class RateLimiter:
    """Token buckets per client key (Turner's token bucket, as in RFC 2697's single-rate meter):
    ``rate_per_min / 60`` tokens a second refill each bucket up to ``burst``; a request takes one.

    Buckets live in one Router replica; with R Router replicas a client gets up to R times the
    rate (the chart runs one Router per environment by default). Idle buckets are dropped LRU
    beyond ``max_keys``.
    """

    def __init__(self, rate_per_min: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = float(rate_per_min) / 60.0
        self.burst = max(1, int(burst))
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key: str, now: float) -> float:
        """Take one token from ``key``'s bucket at time ``now`` (seconds, monotonic).

        Returns:
            0.0 when allowed, else the seconds until a token is available (the ``Retry-After``).
        """
        if not self.enabled:
            return 0.0
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def client_key(headers: dict[str, str], client_host: str | None) -> str:
    """Rate-limit key: the API key's SHA-256 (``Authorization: Bearer`` / ``x-api-key``), else the
    client IP (``ip:<host>``). Never the raw key (keys are not kept in memory tables)."""
    h = {k.lower(): v for k, v in headers.items()}
    key = h.get("x-api-key", "")
    auth = h.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return f"key:{sha256_hex(key)}" if key else f"ip:{client_host or 'unknown'}"


# -- moderation -----------------------------------------------------------------------------------
#: Refusal sent instead of a blocked reply, in the character's language (``en`` for other languages
#: unless the config names one).
REFUSALS = {"zh": "这个我们换个话题聊吧。", "en": "Let's talk about something else."}
#: Moderation rules by name, each a test on :class:`troupe.checks.ReplyCheck` (blacklist = the
#: assistant phrases of :data:`troupe.checks.ASSISTANT_PHRASES` plus ``moderation.blacklist``).
MODERATION_RULES = ("blacklist", "language", "markup", "name_prefix", "stage_direction", "length", "empty")


@dataclass
class Moderation:
    """The moderation hook on replies (``gateway.moderation``): ``mode`` ``off``, ``flag`` (the reply
    goes out, marked in ``troupe.moderation`` and counted in metrics) or ``block`` (the reply is
    replaced by a refusal in the character's language and ``finish_reason`` is
    ``content_filter``); ``rules`` that count (:data:`MODERATION_RULES`); extra ``blacklist``
    phrases (case-insensitive); ``refusal`` texts by language."""

    mode: str = "off"
    rules: tuple[str, ...] = ("blacklist", "name_prefix")
    blacklist: tuple[str, ...] = ()
    refusal: dict[str, str] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Moderation:
        """Raises: ValueError naming the field for an unknown mode, rule or key."""
        d = dict(d or {})
        unknown = sorted(set(d) - {"mode", "rules", "blacklist", "refusal"})
        if unknown:
            raise ValueError(f"gateway.moderation: unknown keys {unknown}")
        mode = str(d.get("mode", "off"))
        if mode not in ("off", "flag", "block"):
            raise ValueError(f"gateway.moderation.mode: {mode!r} is not off|flag|block")
        rules = tuple(d.get("rules", cls.rules))
        bad = sorted(set(rules) - set(MODERATION_RULES))
        if bad:
            raise ValueError(f"gateway.moderation.rules: unknown {bad} (known: {list(MODERATION_RULES)})")
        return cls(mode, rules, tuple(str(p).lower() for p in d.get("blacklist") or ()), d.get("refusal"))

    def blacklisted(self, text: str) -> str | None:
        """The first blacklisted phrase in ``text`` (assistant phrases + configured ones), or None."""
        from troupe.checks import has_assistant_phrase

        hit = has_assistant_phrase(text)
        if hit:
            return hit
        low = text.lower()
        return next((p for p in self.blacklist if p and p in low), None)

    def check(self, reply: str, character: Character) -> list[str]:
        """Rules ``reply`` breaks (empty = clean; always empty with mode ``off``)."""
        if self.mode == "off":
            return []
        from troupe.checks import check_reply

        c = check_reply(reply, character_name=character.name, language=character.language)
        from troupe.markup import strip_markup

        found = {
            "blacklist": bool(self.blacklisted(strip_markup(reply))),
            "language": not c.language_ok,
            "markup": not c.markup_valid,
            "name_prefix": c.name_prefix,
            "stage_direction": c.stage_direction,
            "length": not c.length_ok,
            "empty": not strip_markup(reply).strip(),
        }
        return [r for r in self.rules if found[r]]

    def refusal_text(self, language: str) -> str:
        """The refusal in ``language`` (configured texts first, then :data:`REFUSALS`, then English)."""
        texts = {**REFUSALS, **(self.refusal or {})}
        return texts.get(language, texts["en"])


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
