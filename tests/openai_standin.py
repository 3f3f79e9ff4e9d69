"""A scripted OpenAI-compatible chat server on loopback: the "local stand-in server" for the dialogue
engine's agents and the judge in tests (the real endpoints are hosted models; Troupe's own gateway
stands in for them in the joint test, tests/test_dialogue_joint.py).

``StandIn(respond)`` serves ``POST /v1/chat/completions`` (plain JSON, no streaming) on a free port in a
background thread with uvicorn. ``respond(messages, model, body) -> str`` writes each answer; it may
raise :class:`Fail` to answer an HTTP error (429 with ``Retry-After``, 500, ...) or sleep past the
client's timeout. Every request body is kept in ``requests`` for assertions.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class Fail(Exception):
    """Raised by a ``respond`` callable: answer ``status`` (with ``Retry-After: retry_after`` on 429)."""

    def __init__(self, status: int, retry_after: float = 0.0) -> None:
        super().__init__(status)
        self.status, self.retry_after = status, retry_after


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandIn:
    """Context manager: ``with StandIn(respond) as s: s.base_url`` (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, respond: Callable[[list[dict[str, Any]], str, dict[str, Any]], str]) -> None:
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            try:
                text = self.respond(body["messages"], body.get("model", ""), body)
            except Fail as f:
                headers = {"retry-after": str(f.retry_after)} if f.status == 429 else {}
                return JSONResponse({"error": {"message": f"stand-in {f.status}"}}, f.status, headers=headers)
            pt = sum(len(str(m.get("content", ""))) for m in body["messages"]) // 4 + 1
            ct = len(text) // 4 + 1
            return {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                ],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
            }

        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> StandIn:
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started:
            if time.time() > deadline:
                raise RuntimeError("stand-in server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
