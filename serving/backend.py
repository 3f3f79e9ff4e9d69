"""Model backends behind the ``Model`` deployment: transformers on CPU, vLLM (Ray Serve LLM) on GPU.

:class:`TransformersBackend` loads a checkpoint and generates through
:class:`troupe.generation.PrefixGenerator`, the one implementation of the per-character KV cache of
the rendered persona card that evaluation and DPO pair building also use; it adds a lock (one
``generate`` per replica at a time) and token streaming.

vLLM is imported only by :func:`vllm_engine_config` (optional ``gpu`` extra), never otherwise.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from troupe.generation import GenRequest, GenResult, PrefixCache, PrefixGenerator  # noqa: F401 - re-exported


class TransformersBackend:
    """CPU (or single-GPU) generation with Hugging Face transformers and a persona-card KV cache.

    Args:
        model_dir: HF checkpoint directory (model + tokenizer with a chat template).
        dtype: torch dtype name.
        prefix_cache_bytes: memory bound of the prefix cache; 0 disables it.
        device: ``cpu``, ``cuda`` or ``npu`` (Ascend, through ``torch_npu``; the ascend profile's
            backend, since no vllm-ascend release fits Ray Serve 2.60's dependencies).
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        prefix_cache_bytes: int = 64 << 20,
        device: str = "cpu",
    ):
        import torch

        from troupe.modeling import load_model

        if device == "npu":
            import torch_npu  # noqa: F401 - registers the npu device with torch (Ascend image)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.device = torch.device(device)
        self.model, self.tok = load_model(model_dir, dtype)
        self.model.to(self.device)
        self.gen = PrefixGenerator(self.model, self.tok, self.device, prefix_cache_bytes)
        self.cache = self.gen.cache
        self._lock = threading.Lock()  # one generate at a time per replica (torch uses all threads)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Generate replies for a batch (:meth:`troupe.generation.PrefixGenerator.generate`, one
        ``generate`` call per card prefix and settings); results in request order."""
        with self._lock:
            return self.gen.generate(requests)

    def first_token_ms(self, request: GenRequest) -> tuple[float, bool]:
        """Time to first token (ms) for one request and whether the card prefix came from the cache."""
        r = GenRequest(request.messages, 1, 0.0, request.cache_key)
        t0 = time.perf_counter()
        res = self.generate([r])[0]
        return (time.perf_counter() - t0) * 1000, res.prefix_cached

    def stream(self, request: GenRequest):
        """Yield reply text pieces as they are generated (one thread runs ``generate``)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        prefix, suffix = self.gen.texts(request.messages)
        err: list[BaseException] = []

        def run() -> None:
            import torch

            try:
                with self._lock:
                    p_ids, kv, _ = self.gen.prefix(request.cache_key, prefix)
                    ids = torch.tensor([p_ids + self.gen.ids(suffix)], device=self.device)
                    kw: dict[str, Any] = dict(
                        max_new_tokens=request.max_new_tokens,
                        do_sample=request.temperature > 0,
                        pad_token_id=self.tok.pad_token_id,
                        streamer=streamer,
                    )
                    if request.temperature > 0:
                        kw["temperature"] = request.temperature
                    else:
                        kw.update(temperature=None, top_p=None, top_k=None)
                    with torch.no_grad():
                        self.model.generate(
                            input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=kv, **kw
                        )
            except BaseException as e:  # surfaced to the consumer below
                err.append(e)
                streamer.end()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        for piece in streamer:
            if piece:
                yield piece
        t.join()
        if err:
            raise err[0]


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
            engine worker; ``num_replicas`` is the replica count.

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
    return dict(
        model_loading_config=dict(model_id=cfg.get("served_model_name", "troupe"), model_source=source),
        engine_kwargs=dict(
            enable_prefix_caching=True,
            max_model_len=int(cfg.get("max_model_len", 8192)),
            dtype=mcfg.get("dtype", cfg.get("dtype", "auto")),
            tensor_parallel_size=int(cfg.get("tensor_parallel_size", 1)),
            gpu_memory_utilization=float(cfg.get("gpu_memory_utilization", 0.9)),
        ),
        placement_group_config=dict(bundle_per_worker=bundle),
        deployment_config=dict(
            autoscaling_config=dict(
                min_replicas=replicas if cfg.get("min_replicas") is None else int(cfg["min_replicas"]),
                max_replicas=replicas if cfg.get("max_replicas") is None else int(cfg["max_replicas"]),
            )
        ),
        accelerator_type=cfg.get("accelerator_type"),
    )


async def vllm_chat(handle: Any, payload: dict[str, Any], served_name: str) -> dict[str, Any]:
    """Call a Ray Serve LLM (vLLM) deployment's ``chat`` and return the Model-shaped result."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    req = ChatCompletionRequest(
        model=served_name,
        messages=payload["messages"],
        max_tokens=payload.get("max_new_tokens") or 256,
        temperature=payload.get("temperature", 0.7),
        stream=False,
    )
    async for resp in handle.options(stream=True).chat.remote(req):
        r = resp[0] if isinstance(resp, list) else resp
        if hasattr(r, "choices"):
            return {
                "text": r.choices[0].message.content or "",
                "prompt_tokens": r.usage.prompt_tokens,
                "completion_tokens": r.usage.completion_tokens,
                "model_version": served_name,
            }
        raise RuntimeError(f"vLLM error: {r}")
    raise RuntimeError("vLLM returned no response")
