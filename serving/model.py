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
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve

from serving.contract import FINISH_LENGTH, FINISH_STOP, ModelReply, ModelRequest, StreamDelta

if TYPE_CHECKING:
    from troupe.generation import GenRequest


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
    """One model version behind the router (transformers backend, batched with ``@serve.batch``).

    Args:
        uri: local checkpoint dir or ``models:/name@alias`` (resolved on the replica's node).
        tracking_uri: MLflow tracking URI for ``models:/`` URIs.
        cfg: the ``model`` section (dtype, batching, prefix cache, generation defaults, ``fault``).

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
            int(float(cfg.get("prefix_cache_mb", 64)) * (1 << 20)),
            device=str(cfg.get("device", "cpu")),
        )
        self._batch.set_max_batch_size(int(cfg.get("max_batch_size", 8)))
        self._batch.set_batch_wait_timeout_s(float(cfg.get("batch_wait_timeout_s", 0.02)))
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
        )

    def _maybe_fail(self) -> None:
        if self._rng.random() < float(self.fault.get("error_rate", 0.0)):
            raise RuntimeError("injected fault (model.fault.error_rate)")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batch(self, reqs: list[GenRequest]) -> list[ModelReply]:
        results = await asyncio.to_thread(self.backend.generate, reqs)
        return [
            ModelReply(
                text=self.fault.get("reply", r.text),
                finish_reason=FINISH_LENGTH if r.finish_reason == FINISH_LENGTH else FINISH_STOP,
                prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens,
                prefix_cached=r.prefix_cached,
                model_version=self.version,
                batch_size=r.batch_size,
            )
            for r in results
        ]

    async def generate(self, req: ModelRequest) -> ModelReply:
        """Generate one reply.

        Args:
            req: the :class:`serving.contract.ModelRequest` (a dict of its fields is accepted too).

        Returns:
            :class:`serving.contract.ModelReply`: text without the stop string, ``finish_reason``
            ``stop``/``length``, this request's own prompt/completion token counts, whether the card
            prefix was cached, this replica's version label and the batch size it was decoded in.

        Raises:
            ValueError: a request field out of range; RuntimeError: an injected fault.
        """
        self.calls += 1
        self._maybe_fail()
        return await self._batch(self._gen_request(req))

    async def stream(self, req: ModelRequest):
        """Yield :class:`serving.contract.StreamDelta` pieces of one reply.

        Text deltas never end inside a UTF-8 character and concatenate to the text :meth:`generate`
        returns for the same greedy request; the last delta carries ``finish_reason``, the token
        counts and ``model_version`` (``fault.reply`` is yielded as one piece before it).
        """
        self.calls += 1
        self._maybe_fail()
        g = self._gen_request(req)
        if "reply" in self.fault:
            yield StreamDelta(text=self.fault["reply"], model_version=self.version)
            yield StreamDelta(finish_reason=FINISH_STOP, model_version=self.version)
            return
        it = self.backend.stream(g)
        done = object()
        while True:
            piece = await asyncio.to_thread(next, it, done)
            if piece is done:
                break
            yield replace(piece, model_version=self.version)

    async def ttft_ms(self, req: ModelRequest) -> dict[str, Any]:
        """Time to first token (ms) and whether the persona-card prefix came from the KV cache."""
        ms, cached = await asyncio.to_thread(self.backend.first_token_ms, self._gen_request(req))
        return {"ttft_ms": ms, "prefix_cached": cached}

    def info(self) -> dict[str, Any]:
        """Model dir, version label, requests served, prefix-cache stats and ``last_prompt``.

        ``last_prompt`` describes the last tokenized prompt (None before the first): ``messages``,
        ``role_markers`` (chat-template role-start special tokens in its ids, e.g. ChatML
        ``<|im_start|>``), ``expected_role_markers`` (the real turns: one a message plus the assistant
        turn the reply goes into) and ``tokens``. Client text cannot add role markers
        (:func:`troupe.generation.neutralise_special_tokens`), so the two counts are equal.
        """
        cache = self.backend.cache.stats() if self.backend.cache else None
        return {
            "model_dir": str(self.dir),
            "model_version": self.version,
            "calls": self.calls,
            "prefix_cache": cache,
            "last_prompt": self.backend.gen.last_prompt,
        }
