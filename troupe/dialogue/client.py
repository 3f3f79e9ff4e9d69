"""One agent = one OpenAI-compatible chat endpoint and model: the only place the dialogue engine, the
judge, self-play and the CharacterEval suite call a model.

* transport failures (timeouts, connection errors, 408/409/429/5xx) are retried by the ``openai``
  client's own exponential backoff (``max_retries``; it honours ``Retry-After``);
* answers that do not parse are asked again up to ``parse_retries`` more times (``tenacity``), then
  :class:`Unparseable` carries the last raw answer so the caller records it as such;
* ``requests_per_minute`` is enforced per agent with ``aiolimiter`` (leaky bucket);
* every call's ``usage`` is summed into :attr:`AgentClient.usage` with its cost from the configured
  prices (USD per million input / output tokens).

The endpoint may be a hosted model (production), Troupe's own gateway (``model`` = a character id
of the catalogue; the agent's instructions travel as a ``system`` message, which the gateway keeps
as a note after that character's card) or a local stand-in server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from troupe.config import ConfigError
from troupe.dialogue.contract import Usage

T = TypeVar("T")
_LOOPBACK = ("http://127.0.0.1", "http://localhost", "http://[::1]")


class Unparseable(Exception):
    """The endpoint answered, but no attempt parsed; ``raw`` is the last answer, ``attempts`` the count."""

    def __init__(self, raw: str, attempts: int, why: str) -> None:
        super().__init__(f"unparseable after {attempts} attempt(s): {why}")
        self.raw, self.attempts, self.why = raw, attempts, why


class EndpointFailed(Exception):
    """The endpoint failed beyond the transport retry budget (``reason`` names the error class)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Reply:
    """One chat completion: ``text``, ``finish_reason``, this call's :class:`Usage` and latency (ms)."""

    text: str
    finish_reason: str | None
    usage: Usage
    latency_ms: float


@dataclass
class AgentClient:
    """An async client for one agent's endpoint (``params.agents.<role>``; see :class:`troupe.params.Agent`).

    Args:
        base_url: OpenAI-compatible base URL ending in ``/v1`` (e.g. ``http://127.0.0.1:8000/test/v1``).
        model: model name sent in each request (on Troupe's gateway: a character id).
        api_key_env: env var holding the key; unset is allowed only for loopback endpoints.
        temperature, max_tokens, top_p: sampling defaults of every call (a call may override).
        timeout_s: per-request timeout (s); max_retries: transport retries (the client's backoff).
        parse_retries: extra asks when the answer does not parse.
        requests_per_minute: 0 = unlimited.
        price_input_per_mtok, price_output_per_mtok: USD per million prompt / completion tokens.
        extra_body: sent with every request (e.g. ``{"conversation_id": ...}`` for sticky routing).

    Raises:
        ConfigError: no ``base_url`` or ``model``, or a non-loopback endpoint without its key.
    """

    base_url: str
    model: str
    api_key_env: str = "TROUPE_AGENT_API_KEY"
    temperature: float = 0.8
    max_tokens: int = 160
    top_p: float = 1.0
    timeout_s: float = 60.0
    max_retries: int = 3
    parse_retries: int = 2
    requests_per_minute: int = 0
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    role: str = ""
    usage: Usage = field(default_factory=Usage)

    def __post_init__(self) -> None:
        where = f"agents.{self.role}" if self.role else "agent"
        if not self.base_url or not self.model:
            raise ConfigError(
                f"{where}: base_url and model must both be set (got {self.base_url!r}, {self.model!r})"
            )
        key = os.environ.get(self.api_key_env, "")
        if not key and not self.base_url.startswith(_LOOPBACK):
            raise ConfigError(f"{where}: env {self.api_key_env} (the API key of {self.base_url}) is empty")
        from aiolimiter import AsyncLimiter
        from openai import AsyncOpenAI

        self._client = AsyncOpenAI(
            base_url=self.base_url,
            api_key=key or "EMPTY",
            timeout=self.timeout_s,
            max_retries=self.max_retries,
        )
        self._limiter = AsyncLimiter(self.requests_per_minute, 60) if self.requests_per_minute > 0 else None

    @classmethod
    def from_params(cls, agent: dict[str, Any], role: str = "") -> AgentClient:
        """From one resolved ``params.agents.<role>`` dict (unknown keys are a :class:`ConfigError`)."""
        known = {f for f in cls.__dataclass_fields__ if f not in ("usage",)}
        bad = sorted(set(agent) - known)
        if bad:
            raise ConfigError(f"agents.{role}: unknown key(s) {bad}")
        return cls(**{**agent, "role": role})

    def describe(self) -> dict[str, str]:
        """Provenance entry: ``{base_url, model}`` (never the key)."""
        return {"base_url": self.base_url, "model": self.model}

    async def chat(self, messages: list[dict[str, str]], **overrides: Any) -> Reply:
        """One chat completion.

        Args:
            messages: OpenAI chat messages (``role``/``content``).
            overrides: per-call ``temperature``, ``max_tokens``, ``top_p``, ``seed``, ``stop``, ``extra_body``,
                ``model`` (e.g. one character id of a gateway agent whose ``model`` is a template).

        Raises:
            EndpointFailed: the call failed after the transport retries (timeout, 429, 5xx, refused).
        """
        import openai

        body = {**self.extra_body, **overrides.pop("extra_body", {})}
        model = overrides.pop("model", self.model)
        kw = {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            **overrides,
        }
        if self._limiter is not None:
            await self._limiter.acquire()
        t0 = time.perf_counter()
        try:
            raw = await self._client.chat.completions.with_raw_response.create(
                model=model, messages=messages, extra_body=body or None, **kw
            )
        except openai.APIStatusError as e:
            self.usage.calls += 1
            raise EndpointFailed(f"{type(e).__name__}: HTTP {e.status_code} from {self.base_url}") from e
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            self.usage.calls += 1
            raise EndpointFailed(f"{type(e).__name__} from {self.base_url}") from e
        r = raw.parse()
        retries = int(getattr(raw, "retries_taken", 0) or 0)
        choice = r.choices[0] if r.choices else None
        text = (choice.message.content or "") if choice else ""
        u = r.usage
        pt, ct = (u.prompt_tokens, u.completion_tokens) if u else (0, 0)
        usage = Usage(
            calls=1,
            retries=retries,
            prompt_tokens=pt,
            completion_tokens=ct,
            cost_usd=(pt * self.price_input_per_mtok + ct * self.price_output_per_mtok) / 1e6,
        )
        self.usage.add(usage)
        return Reply(text, choice.finish_reason if choice else None, usage, (time.perf_counter() - t0) * 1e3)

    async def ask(
        self, messages: list[dict[str, str]], parse: Callable[[str], T], **overrides: Any
    ) -> tuple[T, Reply, int]:
        """Chat and parse, asking again (same messages) while ``parse`` raises ``ValueError``.

        Returns:
            ``(parsed, last reply, attempts)``.

        Raises:
            Unparseable: no answer parsed within ``1 + parse_retries`` attempts.
            EndpointFailed: as :meth:`chat`.
        """
        from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt

        last: dict[str, Any] = {"raw": "", "why": "", "n": 0}

        async def once() -> tuple[T, Reply]:
            reply = await self.chat(messages, **overrides)
            last["raw"], last["n"] = reply.text, last["n"] + 1
            try:
                return parse(reply.text), reply
            except ValueError as e:
                last["why"] = str(e)
                raise

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(1 + max(0, self.parse_retries)),
                retry=retry_if_exception_type(ValueError),
            ):
                with attempt:
                    parsed, reply = await once()
        except RetryError:
            raise Unparseable(last["raw"], last["n"], last["why"]) from None
        return parsed, reply, last["n"]

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.close()


def agent_clients(params: dict[str, Any], roles: tuple[str, ...]) -> dict[str, AgentClient]:
    """``{role: AgentClient}`` from ``params['agents']`` for the given roles.

    Raises:
        ConfigError: a role is not configured (empty ``base_url``), naming ``agents.<role>``.
    """
    agents = params.get("agents") or {}
    out = {}
    for role in roles:
        cfg = dict(agents.get(role) or {})
        if not cfg.get("base_url"):
            raise ConfigError(
                f"agents.{role}.base_url is empty: point it at an OpenAI-compatible endpoint (README)"
            )
        out[role] = AgentClient.from_params(cfg, role)
    return out
