"""The model deployment behind the Router: one model version on the transformers backend.

The Router (:mod:`serving.app`) calls :meth:`Model.generate` with a
:class:`serving.contract.ModelRequest` and gets a :class:`serving.contract.ModelReply`;
:meth:`Model.stream` yields :class:`serving.contract.StreamDelta` pieces. Both types are owned by
:mod:`serving.contract`, which both sides import. On GPU nodes the vLLM backend replaces this class
(``backend: vllm``, :func:`serving.backend.vllm_engine_config`).
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve

from serving.contract import FINISH_LENGTH, FINISH_STOP, ModelReply, ModelRequest, StreamDelta
from troupe.generation import DEFAULT_PREFIX_CACHE_TOKENS

#: LoRA adapters loaded at once per replica when the ``model`` section does not say (``max_adapters``)
DEFAULT_MAX_ADAPTERS = 4

if TYPE_CHECKING:
    from troupe.generation import GenRequest, GenResult


def resolve_model(uri: str, tracking_uri: str | None) -> tuple[Path, str]:
    """(local checkpoint dir, version label) for a local dir or a ``models:/`` URI.

    The label of a registered version is ``<name>/<version>``.

    Raises:
        FileNotFoundError / ConfigError / mlflow errors: the URI cannot be resolved.
    """
    p = Path(uri)
    if not uri.startswith("models:/") and p.is_dir():
        meta = p / "troupe_model.json"
        label = json.loads(meta.read_text()).get("version", p.name) if meta.is_file() else p.name
        return p, str(label)
    from troupe.registry import model_version, resolve_model_dir

    d = resolve_model_dir(uri, tracking_uri=tracking_uri or None)
    label = uri
    if uri.startswith("models:/"):
        mv = model_version(uri, tracking_uri or None)
        label = f"{mv.name}/{mv.version}"
    return Path(d), label


# -- model deployment -----------------------------------------------------------------------------
@serve.deployment(name="Model", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Model:
    """One model version behind the router (transformers backend with continuous batching).

    Concurrent requests, streamed or not, are decoded in one running batch
    (:class:`troupe.generation.DecodeEngine`): they join and leave it at token steps.

    Args:
        uri: local checkpoint dir or ``models:/name@alias`` (resolved on the replica's node).
        tracking_uri: MLflow tracking URI for ``models:/`` URIs.
        cfg: the ``model`` section: ``dtype``, ``device``, ``max_batch_size`` (rows decoded together),
            ``batch_wait_timeout_s`` (when idle, how long a first request waits for others to prefill
            with it), ``prefix_cache_tokens`` (persona-card KV cache bound in tokens, LRU by character;
            0 with ``prefix_cache_mb`` 0 = off), ``prefix_cache_mb`` (optional upper bound in MiB;
            0 = none), ``max_adapters`` (LoRA adapters loaded at once, LRU, :mod:`troupe.adapters`;
            0 = requests naming an adapter fail), ``max_new_tokens``/``temperature`` defaults and
            ``fault``.

    ``fault`` (drills and tests): ``error_rate`` in [0, 1] fails that share of requests,
    ``reply`` replaces every generated reply with a fixed string.
    """

    def __init__(self, uri: str, tracking_uri: str | None, cfg: dict[str, Any]) -> None:
        from serving.backend import TransformersBackend

        self.dir, self.version = resolve_model(uri, tracking_uri)
        self.cfg = cfg
        self.backend = TransformersBackend(
            self.dir,
            cfg.get("dtype", "float32"),
            int(float(cfg.get("prefix_cache_mb") or 0) * (1 << 20)),
            device=str(cfg.get("device", "cpu")),
            prefix_cache_tokens=int(cfg.get("prefix_cache_tokens", DEFAULT_PREFIX_CACHE_TOKENS)),
            max_batch_size=int(cfg.get("max_batch_size", 8)),
            batch_wait_s=float(cfg.get("batch_wait_timeout_s", 0.02)),
            max_adapters=int(cfg.get("max_adapters", DEFAULT_MAX_ADAPTERS)),
        )
        self.fault = dict(cfg.get("fault") or {})
        self._rng = random.Random(0)
        self.calls = 0  # requests that reached this replica

    def _gen_request(self, req: ModelRequest | dict[str, Any]) -> GenRequest:
        """The backend request of a :class:`ModelRequest` (a dict of its fields is accepted too); None
        fields take the replica's ``model`` config defaults (``max_new_tokens``, ``temperature``;
        ``top_p`` None = 1).

        Raises:
            ValueError: a field out of range, naming it.
        """
        from serving.backend import GenRequest

        if isinstance(req, dict):
            req = ModelRequest(**{**req, "stop": tuple(req.get("stop") or ())})
        if not isinstance(req.messages, list) or not req.messages:
            raise ValueError("ModelRequest.messages: a non-empty list of {role, content} is required")
        max_new = int(req.max_new_tokens or self.cfg.get("max_new_tokens", 48))
        temp = float(self.cfg.get("temperature", 0.0) if req.temperature is None else req.temperature)
        top_p = 1.0 if req.top_p is None else float(req.top_p)
        if max_new < 1:
            raise ValueError(f"ModelRequest.max_new_tokens: {max_new} (must be >= 1)")
        if temp < 0:
            raise ValueError(f"ModelRequest.temperature: {temp} (must be >= 0)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"ModelRequest.top_p: {top_p} (must be in (0, 1])")
        return GenRequest(
            messages=req.messages,
            max_new_tokens=max_new,
            temperature=temp,
            cache_key=req.cache_key,
            top_p=top_p,
            stop=tuple(req.stop or ()),
            seed=req.seed,
            prefill=req.prefill or "",
            adapter=req.adapter or None,
        )

    def _maybe_fail(self) -> None:
        if self._rng.random() < float(self.fault.get("error_rate", 0.0)):
            raise RuntimeError("injected fault (model.fault.error_rate)")

    def _reply(self, r: GenResult) -> ModelReply:
        return ModelReply(
            text=self.fault.get("reply", r.text),
            finish_reason=FINISH_LENGTH if r.finish_reason == FINISH_LENGTH else FINISH_STOP,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            prefix_cached=r.prefix_cached,
            model_version=self.version,
            batch_size=r.batch_size,
        )

    async def generate(self, req: ModelRequest) -> ModelReply:
        """Generate one reply; it joins the replica's running batch.

        Args:
            req: the :class:`serving.contract.ModelRequest` (a dict of its fields is accepted too).

        Returns:
            :class:`serving.contract.ModelReply`: text without the stop string, ``finish_reason``
            ``stop``/``length``, this request's own prompt/completion token counts (no padding),
            whether the card prefix was cached, this replica's version label and the largest batch
            it was decoded in.

        Raises:
            ValueError: a request field out of range (named); RuntimeError: an injected fault;
            whatever the model's forward raised.
        """
        self.calls += 1
        self._maybe_fail()
        g = self._gen_request(req)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def settle(kind: str, value: Any) -> None:
            if fut.done():
                return
            if kind == "done":
                fut.set_result(value)
            elif kind == "error":
                fut.set_exception(value)

        handle = self.backend.submit(g, lambda kind, value: loop.call_soon_threadsafe(settle, kind, value))
        try:
            return self._reply(await fut)
        finally:  # cancelled (the caller went away): free the row
            self.backend.cancel(handle)

    async def stream(self, req: ModelRequest):
        """Yield :class:`serving.contract.StreamDelta` pieces of one reply as it is decoded.

        Text deltas never end inside a UTF-8 character and concatenate to the text :meth:`generate`
        returns for the same greedy request; the last delta carries ``finish_reason``, the token
        counts, ``model_version`` and ``extra`` ``{"prefix_cached", "batch_size"}``
        (``fault.reply`` is yielded as one piece before it).

        Raises:
            ValueError: a request field out of range (named); RuntimeError: an injected fault;
            whatever the model's forward raised.
        """
        self.calls += 1
        self._maybe_fail()
        g = self._gen_request(req)
        if "reply" in self.fault:
            yield StreamDelta(text=self.fault["reply"], model_version=self.version)
            yield StreamDelta(finish_reason=FINISH_STOP, model_version=self.version)
            return
        from serving.backend import final_delta

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        handle = self.backend.submit(
            g, lambda kind, value: loop.call_soon_threadsafe(q.put_nowait, (kind, value))
        )
        try:
            while True:
                kind, value = await q.get()
                if kind == "delta":
                    yield StreamDelta(text=value, model_version=self.version)
                elif kind == "done":
                    yield final_delta(value, self.version)
                    return
                else:
                    raise value
        finally:  # the client went away mid-stream: free the row
            self.backend.cancel(handle)

    async def ttft_ms(self, req: ModelRequest) -> dict[str, Any]:
        """Time to first token (ms) and whether the persona-card prefix came from the KV cache."""
        ms, cached = await asyncio.to_thread(self.backend.first_token_ms, self._gen_request(req))
        return {"ttft_ms": ms, "prefix_cached": cached}

    def info(self) -> dict[str, Any]:
        """Replica id, model dir, version label, requests served, ``prefix_cache`` (entries, tokens, bytes, their
        bounds, bytes per token, hits/misses/evictions, keys LRU first; None when off), ``engine``
        (decode steps, running/waiting rows, largest batch, recent batch sizes), ``adapters``
        (``loaded`` LoRA adapter URIs least recently used first, ``max_adapters``, ``loads``,
        ``evictions``, ``peak``; None when ``max_adapters`` is 0) and ``last_prompt``.

        ``last_prompt`` describes the last tokenized prompt (None before the first): ``messages``,
        ``role_markers`` (chat-template role-start special tokens in its ids, e.g. ChatML
        ``<|im_start|>``), ``expected_role_markers`` (the real turns: one a message plus the assistant
        turn the reply goes into) and ``tokens``. Client text cannot add role markers
        (:func:`troupe.generation.neutralise_special_tokens`), so the two counts are equal.
        """
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,  # changes when restarted
            "model_dir": str(self.dir),
            "model_version": self.version,
            "calls": self.calls,
            **self.backend.info(),
            "last_prompt": self.backend.gen.last_prompt,
        }
