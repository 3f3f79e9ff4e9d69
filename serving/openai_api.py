"""OpenAI chat-completions protocol for the Router: request validation and response bodies built from
the ``openai`` package's own types (no hand-written response dicts).

Requests are validated with pydantic ``TypeAdapter`` over ``openai.types.chat.completion_create_params.
CompletionCreateParamsBase`` (the TypedDict the ``openai`` client sends): wrong types get a 400 naming
the field; fields the TypedDict does not know are ignored, as OpenAI ignores fields it does not
support (SillyTavern sends ``top_k``, Open WebUI its own keys). What Troupe does not implement gets a
clear 400 naming the field (``n`` > 1, tools, non-text content parts), never a silent default.

Responses are ``openai.types.chat.ChatCompletion`` / ``ChatCompletionChunk`` / ``openai.types.Model``
dumped to JSON, with Troupe's extension field ``troupe`` (the types allow extra fields; the
``openai`` client exposes it as ``model_extra["troupe"]``).

Reply markup (``<emotion>``, ``<img>``; :mod:`troupe.markup`) and OpenAI ``content``
(``gateway.openai_content``):

* ``text`` (default; what a SillyTavern or Open WebUI user expects): ``content`` is the spoken text
  only; the markup is parsed into ``troupe.markup`` (``emotion``, ``clauses``, ``images``,
  ``valid``); streams carry text deltas only and emotion/image events in the chunks' ``troupe``
  field once each tag has closed (:class:`troupe.markup.MarkupStream`, never half a tag).
* ``raw``: ``content`` is the reply as generated, tags included (clients that parse Troupe's markup
  themselves); streams send each tag whole (a chunk never ends inside a tag).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from openai.types import Model as OpenAIModel
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.completion_create_params import CompletionCreateParamsBase
from pydantic import TypeAdapter, ValidationError

from serving.gateway import GatewayError

#: OpenAI's limit on ``stop`` sequences.
MAX_STOP = 4
OPENAI_CONTENT_MODES = ("text", "raw")
_REQUEST = TypeAdapter(CompletionCreateParamsBase)
#: Request fields Troupe refuses rather than ignores: ignoring them would change what the client gets.
_UNSUPPORTED = ("tools", "functions", "audio", "prediction")


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not p.startswith(("function-", "json-or-python", "lax-", "str", "list")):
            out += f".{p}" if out else p
    return out


@dataclass
class ChatRequest:
    """What the Router uses of a chat-completions request (validated by :func:`parse_chat_request`).

    ``messages`` stay as the client sent them (checked again by :func:`serving.gateway.parse_messages`
    for roles, content and limits); ``max_tokens`` is ``max_completion_tokens`` or ``max_tokens``.
    """

    model: str
    messages: Any
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_chat_request(data: dict[str, Any]) -> ChatRequest:
    """Validate a chat-completions body against the ``openai`` package's request TypedDict.

    Raises:
        GatewayError: 400 ``invalid_request`` naming the field (``param``) for a wrong type, ``n``
            other than 1, more than :data:`MAX_STOP` stop strings, ``temperature`` outside [0, 2],
            ``top_p`` outside (0, 1], ``stream`` not a boolean, or tools.
    """
    try:
        req = _REQUEST.validate_python(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = _loc(err["loc"]) or "body"
        raise GatewayError(400, "invalid_request", f"{where}: {err['msg']}", where) from None
    for k in _UNSUPPORTED:
        if data.get(k):
            raise GatewayError(400, "invalid_request", f"{k}: not supported by Troupe's role-play models", k)
    n = req.get("n")
    if n is not None and n != 1:
        raise GatewayError(400, "invalid_request", f"n: only 1 choice per request is supported, got {n}", "n")
    stream = data.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise GatewayError(400, "invalid_request", "stream: must be a boolean", "stream")
    stop = req.get("stop")
    stops: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP:
        raise GatewayError(
            400, "invalid_request", f"stop: at most {MAX_STOP} sequences, got {len(stops)}", "stop"
        )
    stops = tuple(s for s in stops if s)
    t = req.get("temperature")
    if t is not None and not 0 <= t <= 2:
        raise GatewayError(400, "invalid_temperature", "temperature: must be in [0, 2]", "temperature")
    top_p = req.get("top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise GatewayError(400, "invalid_request", "top_p: must be in (0, 1]", "top_p")
    opts = req.get("stream_options") or {}
    mt = req.get("max_completion_tokens")
    if mt is None:
        mt = req.get("max_tokens")
    return ChatRequest(
        model=str(req["model"]),
        messages=data.get("messages"),
        max_tokens=mt,
        temperature=t,
        top_p=top_p,
        stop=stops,
        seed=req.get("seed"),
        stream=bool(stream),
        include_usage=bool(opts.get("include_usage")),
        user=req.get("user"),
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI ``usage`` (``openai.types.CompletionUsage`` fields) from a reply's own token counts."""
    return {
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
        "total_tokens": int(prompt_tokens) + int(completion_tokens),
    }


def completion_body(
    rid: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    troupe: dict[str, Any],
) -> dict[str, Any]:
    """A ``chat.completion`` JSON body (validated as ``openai.types.chat.ChatCompletion``).

    ``finish_reason``: ``stop``, ``length`` or ``content_filter`` (moderation block).
    """
    c = ChatCompletion.model_validate(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(prompt_tokens, completion_tokens),
            "troupe": troupe,
        }
    )
    return c.model_dump(mode="json", exclude_unset=True)


def chunk_body(
    rid: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    troupe: dict[str, Any] | None = None,
    usage_counts: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` JSON body (``openai.types.chat.ChatCompletionChunk``).

    ``delta`` None gives the usage chunk of ``stream_options.include_usage``: empty ``choices`` and
    ``usage`` set (OpenAI sends it last, before ``[DONE]``).
    """
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage_counts is not None:
        body["usage"] = usage(*usage_counts)
    if troupe:
        body["troupe"] = troupe
    return ChatCompletionChunk.model_validate(body).model_dump(mode="json", exclude_unset=True)


def model_body(model_id: str, created: int, **extra: Any) -> dict[str, Any]:
    """One ``/v1/models`` entry (``openai.types.Model``: ``id``, ``object``, ``created``,
    ``owned_by``) plus Troupe's fields (``name``, ``language``...)."""
    m = OpenAIModel.model_validate(
        {"id": model_id, "object": "model", "created": int(created), "owned_by": "troupe", **extra}
    )
    return m.model_dump(mode="json", exclude_unset=True)


def now() -> int:
    """Unix seconds (OpenAI's ``created``)."""
    return int(time.time())
