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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serving.contract import FINISH_LENGTH, FINISH_STOP, ModelReply, ModelRequest, StreamDelta
from troupe.generation import (  # noqa: F401 - re-exported
    GenRequest,
    GenResult,
    PrefixCache,
    PrefixGenerator,
    _decode,
    cut_at_stop,
    finish_reply,
    visible_text,
)


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
        r = GenRequest(request.messages, 1, 0.0, request.cache_key, prefill=request.prefill)
        t0 = time.perf_counter()
        res = self.generate([r])[0]
        return (time.perf_counter() - t0) * 1000, res.prefix_cached

    def stream(self, request: GenRequest) -> Iterator[StreamDelta]:
        """Yield :class:`serving.contract.StreamDelta` pieces as tokens are generated.

        Text deltas follow :func:`troupe.generation.visible_text` (never inside a UTF-8 character,
        never a piece of a stop string), so they concatenate to the non-streamed reply's text. The last
        delta has ``finish_reason`` and the token counts. Raises what generation raises.
        """
        import queue

        from transformers.generation.streamers import BaseStreamer

        q: queue.Queue = queue.Queue()
        stop_now = threading.Event()
        prefix, suffix = self.gen.texts(request.messages, request.prefill)
        eos = self.tok.eos_token_id

        class _Ids(BaseStreamer):
            first = True

            def put(self, value) -> None:
                if self.first:  # generate() passes the prompt first
                    self.first = False
                    return
                q.put([int(t) for t in value.reshape(-1).tolist()])

            def end(self) -> None:
                q.put(None)

        def run() -> None:
            import torch
            from transformers import StoppingCriteria, StoppingCriteriaList

            class _Stop(StoppingCriteria):
                def __call__(self, input_ids, scores, **kw):
                    return torch.full((input_ids.shape[0],), stop_now.is_set(), dtype=torch.bool)

            try:
                with self._lock:
                    p_ids, kv, cached = self.gen.prefix(request.cache_key, prefix)
                    s_ids = self.gen.ids(suffix)
                    self.gen.note_prompt(len(request.messages), p_ids + s_ids, bool(request.prefill))
                    q.put(("prompt", len(p_ids) + len(s_ids), cached))
                    ids = torch.tensor([p_ids + s_ids], device=self.device)
                    kw: dict[str, Any] = dict(
                        max_new_tokens=request.max_new_tokens,
                        do_sample=request.temperature > 0,
                        pad_token_id=self.tok.pad_token_id,
                        streamer=_Ids(),
                        stopping_criteria=StoppingCriteriaList([_Stop()]),
                    )
                    if request.temperature > 0:
                        kw.update(temperature=request.temperature, top_p=request.top_p)
                        if request.seed is not None:
                            torch.manual_seed(request.seed)
                    else:
                        kw.update(temperature=None, top_p=None, top_k=None)
                    with torch.no_grad():
                        self.model.generate(
                            input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=kv, **kw
                        )
            except BaseException as e:  # surfaced to the consumer below
                q.put(e)
                q.put(None)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        new: list[int] = []
        shown, prompt_tokens, stop = "", 0, [x for x in request.stop if x]
        err: BaseException | None = None
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                err = item
                continue
            if isinstance(item, tuple):
                prompt_tokens = item[1]
                continue
            if stop_now.is_set():
                continue
            new.extend(item)
            text, hit = cut_at_stop(_decode(self.tok, new), stop)
            if hit or (eos is not None and eos in new):
                stop_now.set()
                continue
            vis = visible_text(text, final=False, stop=stop)
            if len(vis) > len(shown) and vis.startswith(shown):
                yield StreamDelta(text=vis[len(shown) :])
                shown = vis
        t.join()
        if err is not None:
            raise err
        text, ids, reason = finish_reply(self.tok, new, eos, stop)
        if text.startswith(shown) and len(text) > len(shown):
            yield StreamDelta(text=text[len(shown) :])
        yield StreamDelta(finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=len(ids))


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


async def vllm_chat(
    handle: Any, req: ModelRequest, served_name: str, default_max_tokens: int = 256
) -> ModelReply:
    """Call a Ray Serve LLM (vLLM) deployment's ``chat`` with a :class:`ModelRequest`.

    Maps ``max_new_tokens`` -> ``max_tokens`` (None = ``default_max_tokens``), ``temperature``
    (None = 0.7), ``top_p``, ``stop``, ``seed``; ``prefill`` becomes a final assistant message
    continued by vLLM (``continue_final_message``, no generation prompt). Only runs on GPU nodes:
    ``ray.serve.llm`` (and so vLLM) is imported here, lazily.

    Returns:
        A :class:`ModelReply` with vLLM's finish reason (``stop``/``length``) and usage;
        ``model_version`` is ``served_name`` (the Router knows the replica's label).

    Raises:
        RuntimeError: vLLM answered with an error or nothing.
    """
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    messages = list(req.messages)
    extra: dict[str, Any] = {}
    if req.prefill:
        messages.append({"role": "assistant", "content": req.prefill})
        extra = dict(continue_final_message=True, add_generation_prompt=False)
    kw: dict[str, Any] = dict(
        model=served_name,
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
    async for resp in handle.options(stream=True).chat.remote(ChatCompletionRequest(**kw)):
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
