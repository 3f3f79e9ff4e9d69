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
from typing import Any

from ray import serve


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

    def _gen_request(self, payload: dict[str, Any]):
        from serving.backend import GenRequest

        return GenRequest(
            messages=payload["messages"],
            max_new_tokens=int(payload.get("max_new_tokens") or self.cfg.get("max_new_tokens", 48)),
            temperature=float(payload.get("temperature", self.cfg.get("temperature", 0.0)) or 0.0),
            cache_key=payload.get("cache_key"),
        )

    def _maybe_fail(self) -> None:
        if self._rng.random() < float(self.fault.get("error_rate", 0.0)):
            raise RuntimeError("injected fault (model.fault.error_rate)")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batch(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        reqs = [self._gen_request(p) for p in payloads]
        results = await asyncio.to_thread(self.backend.generate, reqs)
        return [
            {
                "text": self.fault.get("reply", r.text),
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "prefix_cached": r.prefix_cached,
                "model_version": self.version,
                "batch_size": len(reqs),
            }
            for r in results
        ]

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Generate one reply: ``{messages, max_new_tokens?, temperature?, cache_key?}`` -> dict."""
        self.calls += 1
        self._maybe_fail()
        return await self._batch(payload)

    async def stream(self, payload: dict[str, Any]):
        """Yield reply text pieces (not batched); ``fault.reply`` is yielded as one piece."""
        self.calls += 1
        self._maybe_fail()
        if "reply" in self.fault:
            yield self.fault["reply"]
            return
        it = self.backend.stream(self._gen_request(payload))
        done = object()
        while True:
            piece = await asyncio.to_thread(next, it, done)
            if piece is done:
                break
            yield piece

    async def ttft_ms(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Time to first token (ms) and whether the persona-card prefix came from the KV cache."""
        ms, cached = await asyncio.to_thread(self.backend.first_token_ms, self._gen_request(payload))
        return {"ttft_ms": ms, "prefix_cached": cached}

    def info(self) -> dict[str, Any]:
        """Model dir, version label and prefix-cache stats."""
        cache = self.backend.cache.stats() if self.backend.cache else None
        return {
            "model_dir": str(self.dir),
            "model_version": self.version,
            "calls": self.calls,
            "prefix_cache": cache,
        }
