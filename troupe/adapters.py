"""Multi-LoRA serving on one base model (CPU backend): PEFT adapters loaded on first use, an LRU bound,
and mixed-adapter batches.

A character (or a group of characters) names its adapter in the catalogue
(:attr:`troupe.contract.Character.adapter`: a local path or ``s3://`` URI of a PEFT adapter
directory, ``adapter_config.json`` + ``adapter_model.safetensors``). The Router copies it into
:attr:`serving.contract.ModelRequest.adapter`; the replica's :class:`AdapterCache` loads it onto the
one base model the first time a request names it (``s3://`` through :func:`troupe.storage.local_copy`)
and keeps at most ``max_adapters`` loaded, evicting the least recently used one that no running row
uses (PEFT ``delete_adapter``).

Rows of different adapters share one forward pass: PEFT's mixed-batch inference (the
``adapter_names=[...]`` forward argument, one name a row, ``"__base__"`` = no adapter) splits every
LoRA layer's input by adapter and adds each sub-batch's own low-rank update to the shared base
output, so :class:`troupe.generation.DecodeEngine` keeps one running batch whatever adapters its rows
use. The persona-card KV prefix cache is keyed by (character, adapter)
(:func:`troupe.generation.prefix_key`), since the card's KV differs per adapter.

Adapter ids are the URIs themselves (one URI = one adapter version; write a new version to a new
URI): PEFT's internal names (``a0``, ``a1``, ...) never leave this module.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from typing import Any

#: PEFT's adapter name for "no adapter" in a mixed batch
BASE = "__base__"


class AdapterCache:
    """LoRA adapters on one base model, loaded on first use, at most ``max_adapters`` at once (LRU).

    Args:
        model: the base causal LM (eval mode). The first load wraps it in a ``peft.PeftModel``, which
            injects LoRA layers into it in place: from then on every forward must go through
            :meth:`forward` (with ``adapter_names``), never ``model(...)`` directly.
        max_adapters: most adapters loaded at once (>= 1).

    Thread use: :meth:`acquire` and :meth:`forward` run on the decode loop's thread only; :meth:`stats`
    may be called from any thread.

    Raises:
        ValueError: ``max_adapters`` < 1.
    """

    def __init__(self, model: Any, max_adapters: int) -> None:
        if int(max_adapters) < 1:
            raise ValueError(f"model.max_adapters: {max_adapters} (must be >= 1 to serve adapters)")
        self.base = model
        self.max_adapters = int(max_adapters)
        self.peft: Any = None  # peft.PeftModel after the first load
        self._names: OrderedDict[str, str] = OrderedDict()  # uri -> PEFT adapter name, LRU first
        self._next = 0
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.peak = 0  # most adapters loaded at once

    @property
    def active(self) -> bool:
        """Whether the base model is PEFT-wrapped (then forwards must name their adapters)."""
        return self.peft is not None

    def loaded(self) -> list[str]:
        """Adapter URIs loaded now, least recently used first."""
        with self._lock:
            return list(self._names)

    def acquire(self, uri: str, in_use: set[str]) -> str | None:
        """The PEFT adapter name of ``uri``, loading it when absent; None when it cannot be loaded now.

        A load evicts least recently used adapters outside ``in_use`` (URIs of rows decoding now or
        being admitted with it) down to ``max_adapters`` (right after the new one is read: memory
        holds one more adapter for that moment). When every loaded adapter is in use and the bound
        is reached, nothing is loaded and None is returned: the caller retries once rows finish (no
        row ever decodes beside more than ``max_adapters`` adapters).

        Raises:
            troupe.storage.StorageError: the URI is missing or unreadable.
            ValueError / OSError: the directory is not a PEFT adapter of this base model.
        """
        with self._lock:
            if uri in self._names:
                self._names.move_to_end(uri)
                return self._names[uri]
            free = [u for u in self._names if u not in in_use]
            if len(self._names) >= self.max_adapters and not free:
                return None
        name = self._load(uri)  # first: PEFT cannot load into a model whose adapters were all deleted
        while len(self._names) >= self.max_adapters:
            self._evict(free.pop(0))
        with self._lock:
            self._names[uri] = name
            self.peak = max(self.peak, len(self._names))
        return name

    def _load(self, uri: str) -> str:
        from peft import PeftModel

        from troupe.storage import local_copy

        path = local_copy(uri, what="LoRA adapter")
        name = f"a{self._next}"
        self._next += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    self.base, str(path), adapter_name=name, is_trainable=False
                )
            else:
                self.peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
        self.peft.eval()
        self.loads += 1
        return name

    def _evict(self, uri: str) -> None:
        with self._lock:
            name = self._names.pop(uri)
        with warnings.catch_warnings():  # "adapter was active, setting another active": irrelevant here
            warnings.simplefilter("ignore")
            self.peft.delete_adapter(name)
        self.evictions += 1

    def names(self, uris: list[str | None]) -> list[str]:
        """PEFT ``adapter_names`` of a batch: each row's loaded adapter name, :data:`BASE` for None.

        Raises:
            KeyError: a URI that is not loaded (acquire it first).
        """
        with self._lock:
            return [BASE if u is None else self._names[u] for u in uris]

    def forward(self, uris: list[str | None], **kwargs: Any) -> Any:
        """One forward pass of the batch (rows ``uris[i]``'s adapter, None = base model), the model's
        output unchanged. Before the first load it is the plain base model's forward."""
        if self.peft is None:
            if any(u is not None for u in uris):
                raise KeyError(f"adapters not loaded: {sorted({u for u in uris if u})}")
            return self.base(**kwargs)
        return self.peft(adapter_names=self.names(uris), **kwargs)

    def stats(self) -> dict[str, Any]:
        """``loaded`` (URIs, least recently used first), ``max_adapters``, ``loads``, ``evictions`` and
        ``peak`` (most loaded at once)."""
        with self._lock:
            return {
                "loaded": list(self._names),
                "max_adapters": self.max_adapters,
                "loads": self.loads,
                "evictions": self.evictions,
                "peak": self.peak,
            }
