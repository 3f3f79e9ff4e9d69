"""Model backends behind the ``Model`` deployment: transformers on CPU, vLLM (Ray Serve LLM) on GPU.

:class:`TransformersBackend` loads a checkpoint and generates through
:class:`troupe.generation.DecodeEngine` (continuous batching) over
:class:`troupe.generation.PrefixGenerator`, the one implementation of prompt rendering and of the
per-character KV cache of the rendered persona card that evaluation and DPO pair building also use.
Concurrent requests, streamed or not, share the running batch.

vLLM is imported only by :func:`vllm_engine_config` (optional ``gpu`` extra), never otherwise.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from serving.contract import FINISH_LENGTH, FINISH_STOP, ModelReply, ModelRequest, StreamDelta
from troupe.generation import (  # noqa: F401 - re-exported
    DecodeEngine,
    GenRequest,
    GenResult,
    PrefixCache,
    PrefixGenerator,
)


class TransformersBackend:
    """CPU (or single-GPU) generation with Hugging Face transformers: continuous batching and a
    persona-card KV cache (:class:`troupe.generation.DecodeEngine` on a background thread).

    Args:
        model_dir: HF checkpoint directory (model + tokenizer with a chat template).
        dtype: torch dtype name.
        prefix_cache_bytes: byte bound of the prefix cache (0 = none; serving bounds it in tokens).
        device: ``cpu``, ``cuda`` or ``npu`` (Ascend, through ``torch_npu``; the ascend profile's
            backend, since no vllm-ascend release fits Ray Serve 2.60's dependencies).
        prefix_cache_tokens: token bound of the prefix cache, LRU by character (0 = none; with both
            bounds 0 the cache is off).
        max_batch_size: most requests decoded together.
        batch_wait_s: when idle, how long the first request waits for others to prefill with it.
        max_adapters: LoRA adapters loaded at once on the model (LRU; requests name theirs in
            :attr:`troupe.generation.GenRequest.adapter`, rows of different adapters share the batch:
            :mod:`troupe.adapters`); 0 = none.
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        prefix_cache_bytes: int = 64 << 20,
        device: str = "cpu",
        *,
        prefix_cache_tokens: int = 0,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.0,
        max_adapters: int = 0,
    ):
        import torch

        from troupe.modeling import load_model

        if device == "npu":
            import torch_npu  # noqa: F401 - registers the npu device with torch (Ascend image)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.device = torch.device(device)
        self.model, self.tok = load_model(model_dir, dtype)
        self.model.to(self.device)
        self.gen = PrefixGenerator(
            self.model,
            self.tok,
            self.device,
            prefix_cache_bytes,
            prefix_cache_tokens=prefix_cache_tokens,
            max_adapters=max_adapters,
        )
        self.cache = self.gen.cache
        self.engine = DecodeEngine(self.gen, max_batch_size, batch_wait_s=batch_wait_s)

    def submit(self, request: GenRequest, emit: Callable[[str, Any], None]) -> Any:
        """Queue a request on the decode loop; ``emit`` gets ``("delta", text)``, then
        ``("done", GenResult)`` or ``("error", exc)`` on the loop's thread
        (:meth:`troupe.generation.DecodeEngine.submit`); returns a handle for :meth:`cancel`."""
        return self.engine.submit(request, emit)

    def cancel(self, handle: Any) -> None:
        """Stop decoding a submitted request (:meth:`troupe.generation.DecodeEngine.cancel`)."""
        self.engine.cancel(handle)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Generate replies (blocking); they join the running batch; results in request order.

        Raises:
            ValueError: a bad request field; whatever the model's forward raised.
        """
        box: list[Any] = [None] * len(requests)
        left = threading.Semaphore(0)

        def emit_for(i: int) -> Callable[[str, Any], None]:
            def emit(kind: str, value: Any) -> None:
                if kind != "delta":
                    box[i] = value
                    left.release()

            return emit

        for i, r in enumerate(requests):
            self.engine.submit(r, emit_for(i))
        for _ in requests:
            left.acquire()
        for v in box:
            if isinstance(v, BaseException):
                raise v
        return box

    def first_token_ms(self, request: GenRequest) -> tuple[float, bool]:
        """Time to first token (ms) for one request and whether the card prefix came from the cache."""
        r = GenRequest(request.messages, 1, 0.0, request.cache_key, prefill=request.prefill)
        t0 = time.perf_counter()
        res = self.generate([r])[0]
        return (time.perf_counter() - t0) * 1000, res.prefix_cached

    def stream(self, request: GenRequest) -> Iterator[StreamDelta]:
        """Yield :class:`serving.contract.StreamDelta` pieces as tokens are generated (blocking).

        Text deltas never end inside a UTF-8 character or a possible stop string and concatenate to
        the non-streamed reply's text; the last delta has ``finish_reason``, the token counts and
        ``extra`` ``{"prefix_cached", "batch_size"}``. Raises what generation raised.
        """
        q: queue.SimpleQueue = queue.SimpleQueue()
        handle = self.engine.submit(request, lambda kind, value: q.put((kind, value)))
        try:
            while True:
                kind, value = q.get()
                if kind == "delta":
                    yield StreamDelta(text=value)
                elif kind == "done":
                    yield final_delta(value)
                    return
                else:
                    raise value
        finally:  # the consumer stopped early: free the row
            self.engine.cancel(handle)

    def info(self) -> dict[str, Any]:
        """Prefix-cache stats (None when off), decode-loop stats and LoRA adapter stats
        (:meth:`troupe.adapters.AdapterCache.stats`; None when ``max_adapters`` is 0)."""
        return {
            "prefix_cache": self.cache.stats() if self.cache else None,
            "engine": self.engine.stats(),
            "adapters": self.gen.adapters.stats() if self.gen.adapters else None,
        }


def final_delta(r: GenResult, model_version: str = "") -> StreamDelta:
    """The last :class:`StreamDelta` of a stream from its :class:`GenResult`."""
    return StreamDelta(
        finish_reason=FINISH_LENGTH if r.finish_reason == FINISH_LENGTH else FINISH_STOP,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        model_version=model_version,
        extra={"prefix_cached": r.prefix_cached, "batch_size": r.batch_size},
    )


def vllm_engine_config(
    model_source: str, cfg: dict[str, Any], mcfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Ray Serve LLM ``LLMConfig`` keyword arguments for a vLLM replica (prefix caching on).

    Args:
        model_source: where the replicas get the weights: an ``s3://`` prefix (Ray Serve LLM
            downloads it on the replica's node) or a local directory.
        cfg: the ``vllm`` section (+ ``served_model_name``).
        mcfg: the ``model`` section: ``dtype`` (``bfloat16`` on GPU/NPU), ``num_cpus``, ``num_gpus``
            and custom ``resources`` (e.g. ``{"NPU": 1}`` on Ascend, ``accelerator_slot``) per
            engine worker; ``num_replicas`` is the replica count; ``max_adapters`` bounds the LoRA
            adapters of a replica (default 4).

    Multi-LoRA (``cfg["lora_path"]`` set, an ``s3://``/``gs://``/``abfss://``/``azure://`` prefix):
    adds Ray Serve LLM's ``lora_config`` (``dynamic_lora_loading_path`` = that prefix,
    ``max_num_adapters_per_replica`` = ``max_adapters``: Serve's multiplexing loads an adapter on a
    replica on first use and evicts the least recently used) and vLLM's ``enable_lora``,
    ``max_loras`` (= ``max_adapters``, adapters in one batch) and ``max_lora_rank``
    (``cfg["max_lora_rank"]``, default 16). Requests then name ``<served>:<lora id>``
    (:func:`vllm_lora_model`). Untested here (no GPU, no vLLM): only this dict is unit-tested.

    Only builds a dict; :func:`serving.app.build_app` imports ``ray.serve.llm`` (and so vLLM) lazily
    when ``backend: vllm``.
    """
    mcfg = mcfg or {}
    source: Any = {"bucket_uri": model_source} if "://" in model_source else model_source
    bundle: dict[str, float] = {"CPU": float(mcfg.get("num_cpus", 1))}
    if float(mcfg.get("num_gpus") or 0):
        bundle["GPU"] = float(mcfg["num_gpus"])
    bundle.update({k: float(v) for k, v in (mcfg.get("resources") or {}).items()})
    replicas = int(mcfg.get("num_replicas", 1))
    lora_path = str(cfg.get("lora_path") or "").rstrip("/")
    max_adapters = int(mcfg.get("max_adapters", 4))
    lora: dict[str, Any] = {}
    if lora_path:
        if max_adapters < 1:
            raise ValueError(f"model.max_adapters: {max_adapters} (must be >= 1 with vllm.lora_path set)")
        lora = dict(
            lora_config=dict(dynamic_lora_loading_path=lora_path, max_num_adapters_per_replica=max_adapters),
        )
    return dict(
        model_loading_config=dict(model_id=cfg.get("served_model_name", "troupe"), model_source=source),
        engine_kwargs=dict(
            enable_prefix_caching=True,
            max_model_len=int(cfg.get("max_model_len", 8192)),
            dtype=mcfg.get("dtype", cfg.get("dtype", "auto")),
            tensor_parallel_size=int(cfg.get("tensor_parallel_size", 1)),
            gpu_memory_utilization=float(cfg.get("gpu_memory_utilization", 0.9)),
            **(
                dict(
                    enable_lora=True, max_loras=max_adapters, max_lora_rank=int(cfg.get("max_lora_rank", 16))
                )
                if lora_path
                else {}
            ),
        ),
        placement_group_config=dict(bundle_per_worker=bundle),
        deployment_config=dict(
            autoscaling_config=dict(
                min_replicas=replicas if cfg.get("min_replicas") is None else int(cfg["min_replicas"]),
                max_replicas=replicas if cfg.get("max_replicas") is None else int(cfg["max_replicas"]),
            )
        ),
        accelerator_type=cfg.get("accelerator_type"),
        **lora,
    )


def vllm_lora_model(served_name: str, adapter: str, lora_path: str) -> str:
    """The ``model`` (and Serve multiplexed model id) of a request for ``adapter`` on Ray Serve LLM:
    ``<served_name>:<lora id>``, where Ray Serve LLM downloads the adapter from
    ``<lora_path>/<lora id>`` (its ``base:suffix`` multi-LoRA convention, ``get_lora_id``).

    Args:
        served_name: the base model's ``model_id`` (``gateway.served_model_name``).
        adapter: the character's adapter: a URI under ``lora_path``, or a bare id relative to it.
        lora_path: ``vllm.lora_path`` (the ``dynamic_lora_loading_path``).

    Raises:
        ValueError: LoRA is off (no ``lora_path``) or the adapter URI lies outside ``lora_path``.
    """
    root = lora_path.rstrip("/")
    if not root:
        raise ValueError(
            f"adapter {adapter!r}: the vLLM backend serves adapters only with vllm.lora_path set"
        )
    a = adapter.rstrip("/")
    if "://" in a or a.startswith("/"):
        if not a.startswith(root + "/"):
            raise ValueError(f"adapter {adapter!r} is not under vllm.lora_path {root!r}")
        a = a[len(root) + 1 :]
    if not a:
        raise ValueError(f"adapter {adapter!r}: empty LoRA id")
    return f"{served_name}:{a}"


async def vllm_chat(
    handle: Any, req: ModelRequest, served_name: str, default_max_tokens: int = 256, lora_path: str = ""
) -> ModelReply:
    """Call a Ray Serve LLM (vLLM) deployment's ``chat`` with a :class:`ModelRequest`.

    Maps ``max_new_tokens`` -> ``max_tokens`` (None = ``default_max_tokens``), ``temperature``
    (None = 0.7), ``top_p``, ``stop``, ``seed``; ``prefill`` becomes a final assistant message
    continued by vLLM (``continue_final_message``, no generation prompt). A request with an
    ``adapter`` asks for :func:`vllm_lora_model` (``<served>:<lora id>``, ``lora_path`` =
    ``vllm.lora_path``) and sets it as the call's Serve multiplexed model id, which is how Ray Serve
    LLM's server picks and loads the adapter. Only runs on GPU nodes: ``ray.serve.llm`` (and so
    vLLM) is imported here, lazily; untested here (no GPU).

    Returns:
        A :class:`ModelReply` with vLLM's finish reason (``stop``/``length``) and usage;
        ``model_version`` is ``served_name`` (the Router knows the replica's label).

    Raises:
        RuntimeError: vLLM answered with an error or nothing. ValueError: an adapter without
        ``lora_path`` or outside it (:func:`vllm_lora_model`).
    """
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    model = served_name
    opts: dict[str, Any] = dict(stream=True)
    if req.adapter:
        model = vllm_lora_model(served_name, req.adapter, lora_path)
        opts["multiplexed_model_id"] = model

    messages = list(req.messages)
    extra: dict[str, Any] = {}
    if req.prefill:
        messages.append({"role": "assistant", "content": req.prefill})
        extra = dict(continue_final_message=True, add_generation_prompt=False)
    kw: dict[str, Any] = dict(
        model=model,
        messages=messages,
        max_tokens=req.max_new_tokens or default_max_tokens,
        temperature=0.7 if req.temperature is None else req.temperature,
        stream=False,
        **extra,
    )
    if req.top_p is not None:
        kw["top_p"] = req.top_p
    if req.stop:
        kw["stop"] = list(req.stop)
    if req.seed is not None:
        kw["seed"] = req.seed
    async for resp in handle.options(**opts).chat.remote(ChatCompletionRequest(**kw)):
        r = resp[0] if isinstance(resp, list) else resp
        if hasattr(r, "choices"):
            fr = r.choices[0].finish_reason
            return ModelReply(
                text=r.choices[0].message.content or "",
                finish_reason=FINISH_LENGTH if fr == "length" else FINISH_STOP,
                prompt_tokens=r.usage.prompt_tokens,
                completion_tokens=r.usage.completion_tokens,
                prefix_cached=False,
                model_version=served_name,
            )
        raise RuntimeError(f"vLLM error: {r}")
    raise RuntimeError("vLLM returned no response")
