"""Model backends behind the ``Model`` deployment: transformers on CPU, vLLM (Ray Serve LLM) on GPU.

:class:`TransformersBackend` generates for a batch of chat requests with one ``model.generate`` per
persona card, re-using a per-character KV cache of the rendered card (the prompt prefix every turn
of a character shares, see :func:`troupe.persona.render_system_prompt`). Sequences are laid out as
``[card prefix][left padding][conversation suffix]`` so the cached prefix keeps its positions for
every row; position ids follow the attention mask, so padding in the middle is skipped.

vLLM is imported only by :func:`vllm_engine_config` (optional ``gpu`` extra), never otherwise.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from troupe.generation import decode_reply


@dataclass
class GenRequest:
    """One generation request.

    Attributes:
        messages: chat-template messages; ``messages[0]`` is the system prompt (the persona card).
        max_new_tokens: generation budget (tokens).
        temperature: 0 = greedy, else sampling temperature.
        cache_key: key of the card prefix in the prefix cache (the character id), or None for no cache.
    """

    messages: list[dict[str, str]]
    max_new_tokens: int = 48
    temperature: float = 0.0
    cache_key: str | None = None


@dataclass
class GenResult:
    """Generated reply with token counts and timings (ms)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    prefix_cached: bool


class PrefixCache:
    """LRU cache of ``(prefix token ids, past_key_values)`` per key, bounded in bytes.

    Args:
        max_bytes: memory bound of all cached KV tensors; the least recently used entries are evicted
            to stay under it (an entry larger than the bound is not stored).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[str, list[int], Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(v[3] for v in self._items.values())

    def get(self, key: str, prefix_text: str) -> tuple[list[int], Any] | None:
        """Cached ``(ids, cache)`` for ``key`` if its prefix text still matches, else None (a miss)."""
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] != prefix_text:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[1], item[2]

    def put(self, key: str, prefix_text: str, ids: list[int], cache: Any, nbytes: int) -> None:
        """Store an entry and evict least recently used ones above ``max_bytes``."""
        if nbytes > self.max_bytes:
            return
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = (prefix_text, ids, cache, nbytes)
            while self.nbytes > self.max_bytes:
                self._items.popitem(last=False)
                self.evictions += 1

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._items)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._items),
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }


def _cache_nbytes(cache: Any) -> int:
    n = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                n += t.numel() * t.element_size()
    return n


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
        self.cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._lock = threading.Lock()  # one generate at a time per replica (torch uses all threads)

    # -- prompt layout -------------------------------------------------------------------------
    def _texts(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        """(prefix text = rendered system turn, suffix text = the rest + generation prompt)."""
        full = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix = ""
        if messages and messages[0]["role"] == "system":
            prefix = self.tok.apply_chat_template(messages[:1], tokenize=False)
            if not full.startswith(prefix):  # template does not render the system turn separately
                prefix = ""
        return prefix, full[len(prefix) :]

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _prefix(self, key: str | None, prefix_text: str) -> tuple[list[int], Any, bool]:
        """Prefix ids and a private copy of its KV cache (built and stored on a miss), cached flag."""
        import torch

        if self.cache is None or key is None or not prefix_text:
            return self._ids(prefix_text), None, False
        hit = self.cache.get(key, prefix_text)
        if hit is not None:
            ids, kv = hit
            return ids, copy.deepcopy(kv), True
        ids = self._ids(prefix_text)
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        kv = out.past_key_values
        self.cache.put(key, prefix_text, ids, copy.deepcopy(kv), _cache_nbytes(kv))
        return ids, kv, False

    # -- generation ----------------------------------------------------------------------------
    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Generate replies for a batch; rows sharing a card prefix run as one ``generate`` call.

        Returns results in request order. Raises whatever ``model.generate`` raises (the caller
        turns it into a 5xx for the whole batch).
        """
        groups: dict[tuple[str | None, str], list[int]] = {}
        layouts = []
        for i, r in enumerate(requests):
            prefix, suffix = self._texts(r.messages)
            layouts.append((prefix, suffix))
            groups.setdefault((r.cache_key, prefix), []).append(i)
        results: list[GenResult | None] = [None] * len(requests)
        for (key, prefix), idx in groups.items():
            # sub-group by generation settings so one generate() call serves them all
            by_cfg: dict[tuple[int, float], list[int]] = {}
            for i in idx:
                by_cfg.setdefault((requests[i].max_new_tokens, requests[i].temperature), []).append(i)
            for (max_new, temp), rows in by_cfg.items():
                outs = self._generate_group(key, prefix, [layouts[i][1] for i in rows], max_new, temp)
                for i, o in zip(rows, outs, strict=True):
                    results[i] = o
        return [r for r in results if r is not None]

    def _generate_group(
        self, key: str | None, prefix_text: str, suffixes: list[str], max_new: int, temp: float
    ) -> list[GenResult]:
        import torch

        t0 = time.perf_counter()
        with self._lock:
            p_ids, kv, cached = self._prefix(key, prefix_text)
            s_ids = [self._ids(s) for s in suffixes]
            width = max(len(s) for s in s_ids)
            pad = self.tok.pad_token_id
            rows, masks = [], []
            for s in s_ids:
                k = width - len(s)
                rows.append(p_ids + [pad] * k + s)
                masks.append([1] * len(p_ids) + [0] * k + [1] * len(s))
            input_ids = torch.tensor(rows, device=self.device)
            attention_mask = torch.tensor(masks, device=self.device)
            gen_kw: dict[str, Any] = dict(
                max_new_tokens=max_new,
                do_sample=temp > 0,
                pad_token_id=pad,
                eos_token_id=self.tok.eos_token_id,
            )
            if temp > 0:
                gen_kw["temperature"] = temp
            else:
                gen_kw.update(temperature=None, top_p=None, top_k=None)
            if kv is not None and len(rows) > 1:
                kv.batch_repeat_interleave(len(rows))
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, past_key_values=kv, **gen_kw
                )
        ms = (time.perf_counter() - t0) * 1000
        results = []
        for row, ids in zip(out, rows, strict=True):
            new = row[len(ids) :].tolist()
            while new and new[-1] == pad:
                new.pop()
            text = decode_reply(self.tok, new)
            results.append(GenResult(text, len(ids), len(new), ms, cached))
        return results

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
        prefix, suffix = self._texts(request.messages)
        err: list[BaseException] = []

        def run() -> None:
            import torch

            try:
                with self._lock:
                    p_ids, kv, _ = self._prefix(request.cache_key, prefix)
                    ids = torch.tensor([p_ids + self._ids(suffix)], device=self.device)
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
