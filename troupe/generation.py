"""Text generation with a local HF checkpoint (CPU or one device): one implementation for
evaluation, DPO pair building and serving.

* :class:`PrefixGenerator` renders prompts (the one place chat templates are applied and tokenized:
  client text goes through :func:`neutralise_special_tokens` there) and keeps the persona-card prefix
  reuse: the rendered card (the system turn every turn of a character shares,
  :func:`troupe.persona.render_system_prompt`) is prefilled once per character and its KV kept in an
  LRU bounded in tokens and/or bytes (:class:`PrefixCache`); requests then prefill only their
  conversation suffixes.
* :class:`DecodeEngine` decodes with continuous batching: requests join and leave one padded batch
  at token steps (rows ``[pad][card KV][pad][suffix][generated]``, position ids following the
  attention mask, so padding anywhere is skipped), each row with its own sampling settings, seed and
  stop strings. :meth:`PrefixGenerator.generate` runs it on the calling thread (evaluation, pairs);
  the serving backend (:class:`serving.backend.TransformersBackend`) runs it on a background thread
  shared by streamed and whole replies.
* :func:`visible_text` / :func:`finish_reply`: the one rule for what text a reply shows (no half
  UTF-8 character, no stop string), for streams and whole replies alike.
* :func:`generate`, plain ``model.generate`` over left-padded batches of whole prompts (the baseline
  of ``benchmarks/bench_generate.py``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: default token bound of serving's persona-card KV cache: 16 cards of ~1,200 tokens, with room
DEFAULT_PREFIX_CACHE_TOKENS = 20480

#: U+FFFD, what a byte-level BPE decode yields for a UTF-8 sequence the token budget cut in half
REPLACEMENT_CHAR = "\ufffd"


def decode_reply(tokenizer, token_ids) -> str:
    """Decode generated token ids (1-D) to reply text, special tokens dropped, whitespace stripped.

    A reply cut by ``max_new_tokens`` can end inside a multi-byte character (byte-level BPE spreads one
    Chinese character over several tokens); that partial character decodes to U+FFFD and is dropped.
    U+FFFD elsewhere in the text is kept. Streams use the same rule (:func:`visible_text`).
    """
    return visible_text(_decode(tokenizer, token_ids), final=True)


def _decode(tokenizer, token_ids) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def visible_text(text: str, *, final: bool, stop: Sequence[str] = ()) -> str:
    """The part of decoded reply text a client may see now; one rule for streams and whole replies.

    Args:
        text: decoded generated text so far (special tokens dropped), the stop string already cut off.
        final: True when generation has ended. Then trailing whitespace and a trailing run of U+FFFD
            (a multi-byte character cut by the token budget) are dropped. While generating, the same
            tails are held back (they may still become text), and so is a tail that could begin one
            of the ``stop`` strings.
        stop: stop strings of the request (only used while generating).

    Returns:
        The visible text, leading whitespace stripped. While generating it is always a prefix of the
        final reply's text, so streamed deltas concatenate to exactly the non-streamed reply.
    """
    text = text.lstrip()
    if not final:
        hold = 0
        for s in stop:  # longest tail of text that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        if hold:
            text = text[:-hold]
    return text.rstrip().rstrip(REPLACEMENT_CHAR).rstrip()


def finish_reply(tokenizer, ids: Sequence[int], eos: int | None, stop: Sequence[str] = ()):
    """``(reply text, ids up to the stop point, finish_reason)`` of a row's generated ids.

    The reply ends at the first end-of-turn token (kept in the ids), or at the token that completes
    the first stop string (the text is cut before the stop string), whichever comes first; else the
    budget cut it (``"length"``). Text follows :func:`visible_text` (``final=True``).
    """
    ids = list(ids)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos) + 1]
        reason = "stop"
    else:
        reason = "length"
    stop = [x for x in stop if x]
    if stop:
        text, hit = cut_at_stop(_decode(tokenizer, ids), stop)
        if hit:
            k = next(k for k in range(1, len(ids) + 1) if cut_at_stop(_decode(tokenizer, ids[:k]), stop)[1])
            return visible_text(text, final=True), ids[:k], "stop"
    return decode_reply(tokenizer, ids), ids, reason


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``(text before the earliest stop string, whether one matched)`` (OpenAI ``stop`` semantics:
    the matched string is not part of the reply)."""
    at = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def special_token_strings(tokenizer) -> list[str]:
    """The tokenizer's special tokens as text (``all_special_tokens`` plus every added token marked
    special, e.g. ChatML's ``<|im_start|>``), longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(t, "special", False) and t.content:
            found.add(t.content)
    return sorted((t for t in found if t), key=len, reverse=True)


#: inserted after the first character of a special-token string in client text (zero-width space)
NEUTRAL_MARK = "\u200b"


def neutralise_special_tokens(text: str, tokenizer) -> str:
    """Make chat-template special tokens in message text plain text (OWASP LLM01, prompt injection).

    Every occurrence of one of the tokenizer's special tokens (:func:`special_token_strings`, read
    from the tokenizer, not a fixed list) gets a zero-width space after its first character, e.g.
    ``<|im_start|>`` -> ``<\u200b|im_start|>``: it still reads the same, but tokenizes as ordinary
    text, so client text can never open a system turn or close a turn. Text without special tokens is
    returned unchanged.
    """
    import re

    specials = special_token_strings(tokenizer)
    if not specials or not text:
        return text
    pattern = re.compile("|".join(re.escape(t) for t in specials))
    for _ in range(8):  # one pass suffices; repeated as a guard against overlapping spellings
        new = pattern.sub(lambda m: m.group(0)[0] + NEUTRAL_MARK + m.group(0)[1:], text)
        if new == text:
            break
        text = new
    return text


def role_start_ids(tokenizer) -> set[int]:
    """Ids of the chat template's role-start special token(s) (ChatML ``<|im_start|>``, Llama 3
    ``<|start_header_id|>``): the first special token of a rendered turn whose count grows by one with
    each message. Empty when the template has none."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            special.add(int(i))
    one = [{"role": "user", "content": "a"}]
    two = one + [{"role": "assistant", "content": "b"}]
    try:
        ids1 = tokenizer.apply_chat_template(one, tokenize=False)
        ids2 = tokenizer.apply_chat_template(two, tokenize=False)
    except Exception:
        return set()
    ids1 = tokenizer(ids1, add_special_tokens=False)["input_ids"]
    ids2 = tokenizer(ids2, add_special_tokens=False)["input_ids"]
    for t in ids1:
        if t in special and ids2.count(t) == ids1.count(t) + 1:
            return {t}
    return set()


@dataclass
class GenRequest:
    """One generation request.

    Attributes:
        messages: chat-template messages; ``messages[0]`` is the system prompt (the persona card).
        max_new_tokens: generation budget (tokens).
        temperature: 0 = greedy, else sampling temperature.
        cache_key: key of the card prefix in the prefix cache (the character id), or None for no cache.
        top_p: nucleus sampling mass in (0, 1] when sampling (0.95 was evaluation's and DPO pair
            sampling's setting before the field existed, so it is the default).
        stop: strings that end the reply; the reply is cut before the first one (not included).
        seed: seed of this request's own sampling generator (same request + seed = same reply);
            None = draw from the generator of the :meth:`PrefixGenerator.generate` call.
        prefill: assistant text the reply continues (a final assistant message rendered with
            ``continue_final_message=True``); the reply does not repeat it.
        adapter: path or ``s3://`` URI of the PEFT LoRA adapter this row decodes with (the
            character's :attr:`troupe.contract.Character.adapter`); None = the base model. Needs a
            :class:`PrefixGenerator` with ``max_adapters`` > 0 (:mod:`troupe.adapters`).
    """

    messages: list[dict[str, str]]
    max_new_tokens: int = 48
    temperature: float = 0.0
    cache_key: str | None = None
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None
    prefill: str = ""
    adapter: str | None = None


def prefix_key(cache_key: str | None, adapter: str | None) -> str | None:
    """Prefix-cache key of a request: the character id, plus ``"|" + adapter URI`` when the row
    decodes with an adapter (the card's KV differs per adapter); None = not cached."""
    if cache_key is None or not adapter:
        return cache_key
    return f"{cache_key}|{adapter}"


@dataclass
class GenResult:
    """Generated reply with token counts and timings.

    Attributes:
        prompt_tokens: tokens of this row's prompt (card prefix + its own suffix; no padding).
        completion_tokens: generated tokens (end-of-turn included, padding excluded).
        latency_ms: wall time of the ``generate`` call that produced the row (shared by its batch).
        prefix_cached: the card prefix's KV cache came from the cache (no prefill of the card).
        finished: the reply ended with the end-of-turn token or a stop string within
            ``max_new_tokens`` (False = cut by the budget).
        token_ids: the generated ids (end-of-turn included, padding excluded; up to the stop point).
        finish_reason: ``"stop"`` (end-of-turn token or stop string) or ``"length"`` (budget cut).
        batch_size: rows decoded together with this one (1 when alone).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    prefix_cached: bool
    finished: bool = True
    token_ids: list[int] | None = None
    finish_reason: str = "stop"
    batch_size: int = 1


class PrefixCache:
    """LRU cache of persona-card KV prefixes, one entry per key (character), bounded in tokens.

    Each entry holds ``(prefix text, prefix token ids, KV tensors)``; the KV tensors are one
    ``(keys, values)`` pair a layer, each ``[1, kv_heads, prefix_tokens, head_dim]``, shared read-only
    by every request that uses them (requests copy them into their batch). The least recently used
    entries are evicted while the cached tokens exceed ``max_tokens`` (or the bytes ``max_bytes``).

    Args:
        max_bytes: optional memory bound (bytes) of all cached KV tensors; 0 = none.
        max_tokens: bound of all cached prefix tokens; 0 = none. One card's bytes are its tokens times
            the model's per-token KV size (:func:`kv_bytes_per_token`), reported in :meth:`stats`.
        bytes_per_token: the model's KV bytes per token (for :meth:`stats`; 0 = unknown).

    An entry larger than a bound on its own is not stored. Raises ValueError when both bounds are 0.
    """

    def __init__(self, max_bytes: int = 0, *, max_tokens: int = 0, bytes_per_token: int = 0) -> None:
        self.max_bytes, self.max_tokens = int(max_bytes), int(max_tokens)
        if self.max_bytes <= 0 and self.max_tokens <= 0:
            raise ValueError("PrefixCache: give max_tokens or max_bytes (> 0); no cache = no PrefixCache")
        self.bytes_per_token = int(bytes_per_token)
        self._items: OrderedDict[str, tuple[str, list[int], Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(v[3] for v in self._items.values())

    @property
    def ntokens(self) -> int:
        return sum(len(v[1]) for v in self._items.values())

    def _over(self) -> bool:
        return (self.max_tokens > 0 and self.ntokens > self.max_tokens) or (
            self.max_bytes > 0 and self.nbytes > self.max_bytes
        )

    def get(self, key: str, prefix_text: str) -> tuple[list[int], Any] | None:
        """Cached ``(ids, kv)`` for ``key`` if its prefix text still matches, else None (a miss)."""
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] != prefix_text:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[1], item[2]

    def put(self, key: str, prefix_text: str, ids: list[int], cache: Any, nbytes: int) -> None:
        """Store an entry (most recently used) and evict least recently used ones above the bounds."""
        if (self.max_bytes > 0 and nbytes > self.max_bytes) or (
            self.max_tokens > 0 and len(ids) > self.max_tokens
        ):
            return
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = (prefix_text, ids, cache, nbytes)
            while self._over():
                self._items.popitem(last=False)
                self.evictions += 1

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._items)

    def stats(self) -> dict[str, Any]:
        """Entries, cached tokens and bytes with their bounds, bytes per token, hits/misses/evictions
        and the keys from least to most recently used (safe to call from another thread)."""
        with self._lock:
            return {
                "entries": len(self._items),
                "tokens": self.ntokens,
                "max_tokens": self.max_tokens,
                "bytes": self.nbytes,
                "max_bytes": self.max_bytes,
                "bytes_per_token": self.bytes_per_token,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "keys": list(self._items),
            }


def cache_nbytes(cache: Any) -> int:
    """Bytes held by KV tensors: a transformers ``Cache`` (its ``layers``) or ``[(keys, values)]``."""
    n = 0
    layers = getattr(cache, "layers", None)
    pairs = (
        [(getattr(x, "keys", None), getattr(x, "values", None)) for x in layers]
        if layers is not None
        else cache
    )
    for pair in pairs or []:
        for t in pair:
            if t is not None and hasattr(t, "numel"):
                n += t.numel() * t.element_size()
    return n


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token takes in ``model``: layers x 2 (keys, values) x KV heads x head dim x
    the dtype's size (e.g. SmolLM2-135M in fp32: 30 x 2 x 3 x 64 x 4 = 46,080 B)."""
    cfg = (
        model.config.get_text_config(decoder=True)
        if hasattr(model.config, "get_text_config")
        else model.config
    )
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return int(cfg.num_hidden_layers) * 2 * heads * head_dim * next(model.parameters()).element_size()


class PrefixGenerator:
    """Generation with persona-card prefix reuse and continuous batching (see the module docstring).

    Args:
        model, tokenizer: a causal LM and its fast tokenizer (with a chat template that renders the
            system turn as a prefix of the whole conversation, as ChatML does).
        device: torch device of ``model``.
        prefix_cache_bytes: byte bound of the card KV cache (0 = no byte bound).
        prefix_cache_tokens: token bound of the card KV cache (0 = no token bound). With both 0 there
            is no reuse: every request prefills its card.
        max_adapters: most LoRA adapters loaded at once on this model (LRU,
            :class:`troupe.adapters.AdapterCache`); 0 = no adapters (requests naming one fail).
    """

    def __init__(
        self,
        model,
        tokenizer,
        device: Any = "cpu",
        prefix_cache_bytes: int = 256 << 20,
        *,
        prefix_cache_tokens: int = 0,
        max_adapters: int = 0,
    ) -> None:
        import torch

        from troupe.adapters import AdapterCache

        self.model, self.tok = model, tokenizer
        self.device = torch.device(device)
        self.bytes_per_token = kv_bytes_per_token(model)
        self.cache = (
            PrefixCache(
                prefix_cache_bytes, max_tokens=prefix_cache_tokens, bytes_per_token=self.bytes_per_token
            )
            if prefix_cache_bytes > 0 or prefix_cache_tokens > 0
            else None
        )
        self.adapters = AdapterCache(model, max_adapters) if max_adapters > 0 else None
        self._role_ids: set[int] | None = None
        #: shape of the last tokenized prompt (:meth:`note_prompt`); None before the first
        self.last_prompt: dict[str, int] | None = None

    # -- prompt layout -------------------------------------------------------------------------
    def texts(self, messages: list[dict[str, str]], prefill: str = "") -> tuple[str, str]:
        """(prefix text = rendered system turn, suffix text = the rest + generation prompt).

        This is the one place prompts are rendered for tokenization: every message's content (and the
        prefill) goes through :func:`neutralise_special_tokens` first. With ``prefill`` the prompt
        ends inside an assistant turn holding it (``continue_final_message=True``), so the reply
        continues that text.
        """
        msgs = [
            {**m, "content": neutralise_special_tokens(m.get("content") or "", self.tok)} for m in messages
        ]
        if prefill:
            msgs.append({"role": "assistant", "content": neutralise_special_tokens(prefill, self.tok)})
            full = self.tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
        else:
            full = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        prefix = ""
        if msgs and msgs[0]["role"] == "system":
            prefix = self.tok.apply_chat_template(msgs[:1], tokenize=False)
            if not full.startswith(prefix):  # template does not render the system turn separately
                prefix = ""
        return prefix, full[len(prefix) :]

    def note_prompt(self, n_messages: int, ids: Sequence[int], prefill: bool) -> None:
        """Record the shape of the last tokenized prompt (:attr:`last_prompt`, for ``info()`` and the
        injection test): messages, role-start special tokens found, and how many the real turns
        account for (one a message, plus the generation prompt's assistant header unless prefilled)."""
        if self._role_ids is None:
            self._role_ids = role_start_ids(self.tok)
        self.last_prompt = {
            "messages": n_messages + (1 if prefill else 0),
            "role_markers": sum(1 for t in ids if t in self._role_ids),
            "expected_role_markers": n_messages + 1,
            "tokens": len(ids),
        }

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def forward(self, adapters: Sequence[str | None], **kwargs: Any) -> Any:
        """The model's forward over a batch whose row ``i`` decodes with adapter ``adapters[i]``
        (None = base model; adapters loaded through :attr:`adapters`); the model's output as is."""
        if self.adapters is None:
            return self.model(**kwargs)
        return self.adapters.forward(list(adapters), **kwargs)

    def prefix(
        self, key: str | None, prefix_text: str, adapter: str | None = None
    ) -> tuple[list[int], Any, bool]:
        """``(prefix ids, its KV as [(keys, values)] a layer or None, came from the cache)``.

        A miss prefills the prefix alone (with ``adapter``, already loaded; None = base model) and
        stores it under :func:`prefix_key` ``(key, adapter)``; without a cache (or key) the KV is None
        and the caller prefills the prefix with the rest of the prompt. The returned tensors are
        shared: read them, never write them.
        """
        import torch

        ids = self.ids(prefix_text)
        key = prefix_key(key, adapter)
        if self.cache is None or key is None or not prefix_text:
            return ids, None, False
        hit = self.cache.get(key, prefix_text)
        if hit is not None:
            return hit[0], hit[1], True
        with torch.no_grad():
            out = self.forward(
                [adapter], input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1
            )
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.cache.put(key, prefix_text, ids, kv, cache_nbytes(kv))
        return ids, kv, False

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenRequest],
        *,
        batch_size: int = 0,
        seed: int | None = None,
        desc: str | None = None,
    ) -> list[GenResult]:
        """Generate replies for ``requests`` with the continuous-batching loop (:class:`DecodeEngine`)
        on the calling thread.

        Args:
            requests: N requests (``messages[0]`` the system card; ``cache_key`` the character id).
            batch_size: most rows decoded together (0 = all N). Rows are admitted in order of
                (card, prompt length), a finished row's place taken by the next at the next step.
            seed: seed of the generator shared by sampled requests without their own ``seed``
                (None = torch's global generator, as before).
            desc: if given, print progress every 8 replies: ``[desc] done/N replies, new tok/s, ETA``.

        Returns:
            N results in request order. Raises ValueError for a bad request field and whatever the
            model's forward raises.
        """
        engine = DecodeEngine(self, max_batch_size=batch_size or max(1, len(requests)), seed=seed)
        return engine.run(requests, desc=desc)


@dataclass
class _Row:
    """One request inside :class:`DecodeEngine` (its prompt, sampling state and output so far)."""

    req: GenRequest
    index: int
    p_ids: list[int]
    s_ids: list[int]
    kv: Any
    cached: bool
    gen: Any
    emit: Callable[[str, Any], None] | None
    t0: float
    prefix_text: str = ""
    ids: list[int] = field(default_factory=list)
    shown: str = ""
    batch_size: int = 1
    result: GenResult | None = None
    cancelled: bool = False

    @property
    def stop(self) -> list[str]:
        return [s for s in self.req.stop if s]


def _check_request(r: GenRequest) -> None:
    """Raise ValueError naming the first bad field of a request."""
    if not isinstance(r.messages, list) or not r.messages:
        raise ValueError("GenRequest.messages: a non-empty list of {role, content} is required")
    if int(r.max_new_tokens) < 1:
        raise ValueError(f"GenRequest.max_new_tokens: {r.max_new_tokens} (must be >= 1)")
    if r.temperature < 0:
        raise ValueError(f"GenRequest.temperature: {r.temperature} (must be >= 0)")
    if not 0.0 < r.top_p <= 1.0:
        raise ValueError(f"GenRequest.top_p: {r.top_p} (must be in (0, 1])")


class DecodeEngine:
    """Continuous batching: one decode loop over a padded batch in which requests join and leave at
    token steps.

    Why not ``transformers.generation.continuous_batching`` (``ContinuousBatchingManager``): in
    transformers 5.23 sampling (``do_sample``) and its seed are set once per manager, not per request,
    it has no stop strings, and its paged cache replaces the per-character card KV cache that
    evaluation and serving share. This loop keeps the card cache and samples each row on its own.

    Layout: the batch's KV is one ``[rows, kv_heads, T, head_dim]`` tensor pair a layer with a
    ``[rows, T]`` attention mask. A row is ``[pad][card prefix][pad][suffix][generated]``; position ids
    count only its real tokens (the mask's cumulative sum), so padding anywhere is skipped. Admitting
    rows prefills their suffixes together on top of their card KVs (from :class:`PrefixCache`) and
    left-pads the shorter of the new rows and the running batch to merge them; a finished row's
    entries are dropped and columns that are padding in every row are trimmed.

    Each step a row gets one token: greedy (temperature 0) is the argmax; sampling applies temperature
    and top-p (Hugging Face's order) and draws from the row's own generator when it has a ``seed``.
    Text is decoded from all of a row's ids each step; :func:`visible_text` decides what may be shown,
    so stream deltas never end inside a UTF-8 character or a possible stop string, and concatenate to
    the final reply (:func:`finish_reply`).

    Args:
        pg: the :class:`PrefixGenerator` (model, tokenizer, prompt rendering, card cache).
        max_batch_size: most rows decoded together.
        seed: seed of the generator of sampled rows without their own seed (None = torch's global).
        batch_wait_s: when the engine is idle, how long the background loop waits for more requests to
            prefill together with the first one (seconds).

    Used two ways: :meth:`run` decodes a list of requests on the calling thread (evaluation, DPO
    pairs); :meth:`start` runs the loop on a background thread that :meth:`submit` feeds (serving).
    """

    def __init__(
        self,
        pg: PrefixGenerator,
        max_batch_size: int = 8,
        *,
        seed: int | None = None,
        batch_wait_s: float = 0.0,
    ) -> None:
        import torch

        self.pg, self.model, self.tok = pg, pg.model, pg.tok
        self.device = pg.device
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait_s = float(batch_wait_s)
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.eos or 0)
        self.shared_gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        self.rows: list[_Row] = []
        self.kv: list[tuple[Any, Any]] | None = None
        self.mask = None  # [rows, T] long
        self.pos = None  # [rows] long: next position of each row
        self._waiting: deque[_Row] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run
        self.prefills = 0  # admission (prefill) passes run
        self.largest_batch = 0
        self.batch_log: deque[tuple[int, int]] = deque(maxlen=256)  # (step, rows) of recent steps

    # -- background loop (serving) ---------------------------------------------------------------
    def start(self) -> DecodeEngine:
        """Start the decode loop on a daemon thread (idempotent); returns self."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="troupe-decode", daemon=True)
                self._thread.start()
        return self

    def close(self) -> None:
        """Stop the background loop (requests still queued get an error event)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def submit(self, request: GenRequest, emit: Callable[[str, Any], None]) -> _Row:
        """Queue one request for the background loop; returns its handle for :meth:`cancel`.

        ``emit(kind, value)`` is called on the loop's thread: ``("delta", text)`` for each new piece of
        visible text, then ``("done", GenResult)``, or ``("error", exception)``. It must not block.

        Raises:
            ValueError: a bad request field (named). RuntimeError: the engine is closed.
        """
        _check_request(request)
        row = self._new_row(request, 0, emit)
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode engine is closed")
            self._waiting.append(row)
            self._cond.notify_all()
        self.start()
        return row

    def cancel(self, row: _Row) -> None:
        """Stop decoding a submitted request (its client went away): it leaves the batch at the next
        step and emits nothing more."""
        row.cancelled = True
        row.emit = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self.rows and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for r in list(self._waiting) + self.rows:
                        self._emit(r, "error", RuntimeError("the decode engine was closed"))
                    return
                if not self.rows and self.batch_wait_s > 0 and len(self._waiting) < self.max_batch_size:
                    deadline = time.monotonic() + self.batch_wait_s
                    while (
                        len(self._waiting) < self.max_batch_size and (left := deadline - time.monotonic()) > 0
                    ):
                        self._cond.wait(left)
                new = []
                while self._waiting and len(self.rows) + len(new) < self.max_batch_size:
                    r = self._waiting.popleft()
                    if not r.cancelled:
                        new.append(r)
            try:
                later = self.step(new)
                if later:  # their adapters wait for a free slot (model.max_adapters): first in line
                    with self._cond:
                        self._waiting.extendleft(reversed(later))
            except BaseException as e:  # every row of this batch fails; the loop goes on
                for r in new + self.rows:
                    self._emit(r, "error", e)
                self.rows, self.kv, self.mask, self.pos = [], None, None, None

    # -- synchronous use (evaluation) ------------------------------------------------------------
    def run(self, requests: Sequence[GenRequest], desc: str | None = None) -> list[GenResult]:
        """Decode ``requests`` on this thread; results in request order (see :class:`DecodeEngine`)."""
        for r in requests:
            _check_request(r)
        rows = [self._new_row(r, i, None) for i, r in enumerate(requests)]
        order = sorted(
            rows,
            key=lambda r: (
                str(r.req.cache_key),
                str(r.req.adapter),
                r.prefix_text,
                len(r.p_ids) + len(r.s_ids),
            ),
        )
        waiting = deque(order)
        t0, done = time.perf_counter(), 0
        while waiting or self.rows:
            new = []
            while waiting and len(self.rows) + len(new) < self.max_batch_size:
                new.append(waiting.popleft())
            waiting.extendleft(reversed(self.step(new)))
            now = sum(1 for r in rows if r.result is not None)
            if desc and now > done and (now // 8 > done // 8 or now == len(rows)):
                el = time.perf_counter() - t0
                toks = sum(r.result.completion_tokens for r in rows if r.result is not None)
                print(
                    f"[{desc}] {now}/{len(rows)} replies, {toks / max(el, 1e-9):.0f} new tok/s, "
                    f"ETA {el / now * (len(rows) - now):.0f}s",
                    flush=True,
                )
            done = now
        return [r.result for r in rows if r.result is not None]

    # -- one step ----------------------------------------------------------------------------------
    def _new_row(self, req: GenRequest, index: int, emit) -> _Row:
        import torch

        if req.adapter and self.pg.adapters is None:
            raise ValueError(
                f"GenRequest.adapter: {req.adapter!r}, but this model serves no adapters (model.max_adapters: 0)"
            )

        prefix, suffix = self.pg.texts(req.messages, req.prefill)
        p_ids, s_ids = self.pg.ids(prefix), self.pg.ids(suffix)
        self.pg.note_prompt(len(req.messages), p_ids + s_ids, bool(req.prefill))
        gen = None
        if req.temperature > 0:
            gen = (
                torch.Generator(device="cpu").manual_seed(int(req.seed))
                if req.seed is not None
                else self.shared_gen
            )
        return _Row(req, index, p_ids, s_ids, None, False, gen, emit, time.perf_counter(), prefix)

    def step(self, new: Sequence[_Row] = ()) -> list[_Row]:
        """Admit ``new`` rows (prefill, first token) and run one decode step over the running batch.

        Returns the rows not admitted because their LoRA adapter cannot be loaded before running rows
        free a slot (``max_adapters``, :meth:`troupe.adapters.AdapterCache.acquire`): the caller
        queues them again, first."""
        later: list[_Row] = []
        if new:
            later = self._admit(list(new))
        if self.rows:
            self._decode()
        return later

    def _with_adapters(self, new: list[_Row]) -> tuple[list[_Row], list[_Row]]:
        """``(rows whose adapter is loaded now, rows to retry later)``; a row whose adapter fails to
        load gets an error event (raised when it has no ``emit``: :meth:`run`)."""
        ad = self.pg.adapters
        if ad is None or not any(r.req.adapter for r in new):
            return new, []
        in_use = {r.req.adapter for r in self.rows + new if r.req.adapter}
        ok, later = [], []
        for r in new:
            if not r.req.adapter:
                ok.append(r)
                continue
            try:
                name = ad.acquire(r.req.adapter, in_use)
            except Exception as e:
                if r.emit is None:
                    raise
                self._emit(r, "error", e)
                continue
            (ok if name is not None else later).append(r)
        return ok, later

    def _admit(self, new: list[_Row]) -> list[_Row]:
        import torch

        new, later = self._with_adapters(new)
        if not new:
            return later
        for r in new:
            p_ids, kv, cached = self.pg.prefix(r.req.cache_key, r.prefix_text, r.req.adapter)
            if kv is None:  # no cache: the card is prefilled with the rest of the prompt
                r.p_ids, r.s_ids, r.kv, r.cached = [], p_ids + r.s_ids, None, False
            else:
                r.p_ids, r.kv, r.cached = p_ids, kv, cached
        lp = max(len(r.p_ids) for r in new)
        ls = max(len(r.s_ids) for r in new)
        n = len(new)
        mask = torch.zeros((n, lp + ls), dtype=torch.long)
        inp = torch.full((n, ls), self.pad, dtype=torch.long)
        for i, r in enumerate(new):
            mask[i, lp - len(r.p_ids) : lp] = 1
            mask[i, lp + ls - len(r.s_ids) :] = 1
            inp[i, ls - len(r.s_ids) :] = torch.tensor(r.s_ids, dtype=torch.long)
        past = None
        if lp:
            layers = []
            for li in range(len(new[0].kv)):
                ks, vs = [], []
                for r in new:
                    k, v = r.kv[li]
                    ks.append(_left_pad(k, lp))
                    vs.append(_left_pad(v, lp))
                layers.append((torch.cat(ks), torch.cat(vs)))
            past = _dynamic_cache(layers)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = self.pg.forward(
                [r.req.adapter for r in new],
                input_ids=inp.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=pos[:, lp:].to(self.device),
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
        self.prefills += 1
        for r in new:
            r.kv = None  # the batch holds it now
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._merge(new, kv, mask, mask.sum(-1))
        size = len(self.rows)
        for r in new:
            r.batch_size = max(r.batch_size, size)
        tokens = self._sample(out.logits[:, -1, :], new)
        self._advance(new, tokens)
        return later

    def _decode(self) -> None:
        import torch

        tok = torch.tensor([[r.ids[-1]] for r in self.rows], dtype=torch.long)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        past = _dynamic_cache(self.kv)
        with torch.no_grad():
            out = self.pg.forward(
                [r.req.adapter for r in self.rows],
                input_ids=tok.to(self.device),
                attention_mask=self.mask.to(self.device),
                position_ids=self.pos[:, None].to(self.device),
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
        self.kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.pos = self.pos + 1
        self.steps += 1
        size = len(self.rows)
        self.largest_batch = max(self.largest_batch, size)
        self.batch_log.append((self.steps, size))
        rows = list(self.rows)
        for r in rows:
            r.batch_size = max(r.batch_size, size)
        self._advance(rows, self._sample(out.logits[:, -1, :], rows))

    def _merge(self, new: list[_Row], kv, mask, pos) -> None:
        import torch

        if not self.rows:
            self.rows, self.kv, self.mask, self.pos = list(new), kv, mask, pos
            return
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        t = max(t_old, t_new)
        self.kv = [
            (torch.cat([_left_pad(k0, t), _left_pad(k1, t)]), torch.cat([_left_pad(v0, t), _left_pad(v1, t)]))
            for (k0, v0), (k1, v1) in zip(self.kv, kv, strict=True)
        ]
        self.mask = torch.cat([_left_pad_2d(self.mask, t), _left_pad_2d(mask, t)])
        self.pos = torch.cat([self.pos, pos])
        self.rows = self.rows + list(new)
        self.largest_batch = max(self.largest_batch, len(self.rows))

    def _sample(self, logits, rows: list[_Row]) -> list[int]:
        """One token a row from its last logits ``[rows, vocab]``: argmax for greedy rows; for sampled
        rows temperature, then top-p (Hugging Face's ``TopPLogitsWarper``: the lowest-probability
        tokens whose mass is at most ``1 - top_p`` are dropped, the top token always kept), then a
        draw from the row's generator."""
        import torch

        logits = logits.float()
        out = logits.argmax(-1).tolist()
        idx = [i for i, r in enumerate(rows) if r.req.temperature > 0]
        if not idx:
            return out
        temps = torch.tensor([rows[i].req.temperature for i in idx], dtype=logits.dtype)
        scores = logits[idx] / temps[:, None]
        top_p = torch.tensor([rows[i].req.top_p for i in idx], dtype=logits.dtype)
        if bool((top_p < 1.0).any()):
            srt, order = torch.sort(scores, dim=-1, descending=False)
            cum = srt.softmax(-1).cumsum(-1)
            drop = cum <= (1 - top_p)[:, None]
            drop[:, -1] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = scores.softmax(-1)
        for j, i in enumerate(idx):
            out[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].gen).item())
        return out

    def _advance(self, rows: list[_Row], tokens: list[int]) -> None:
        """Append each row's token; emit text; finish rows at end-of-turn, a stop string or the budget."""
        finished = []
        for r, t in zip(rows, tokens, strict=True):
            r.ids.append(int(t))
            stop = r.stop
            text, hit = cut_at_stop(_decode(self.tok, r.ids), stop) if stop else (None, False)
            end = hit or (self.eos is not None and t == self.eos) or len(r.ids) >= r.req.max_new_tokens
            if end or r.cancelled:
                self._finish(r)
                finished.append(r)
            elif r.emit is not None:
                if text is None:
                    text = _decode(self.tok, r.ids)
                vis = visible_text(text, final=False, stop=stop)
                if len(vis) > len(r.shown) and vis.startswith(r.shown):
                    self._emit(r, "delta", vis[len(r.shown) :])
                    r.shown = vis
        if finished:
            self._drop(finished)

    def _finish(self, r: _Row) -> None:
        text, ids, reason = finish_reply(self.tok, r.ids, self.eos, r.stop)
        ms = (time.perf_counter() - r.t0) * 1000
        prompt = len(r.p_ids) + len(r.s_ids)
        r.result = GenResult(
            text, prompt, len(ids), ms, r.cached, reason == "stop", ids, reason, r.batch_size
        )
        if r.emit is not None:
            if len(text) > len(r.shown) and text.startswith(r.shown):
                self._emit(r, "delta", text[len(r.shown) :])
                r.shown = text
            self._emit(r, "done", r.result)

    def _drop(self, finished: list[_Row]) -> None:
        import torch

        gone = {id(r) for r in finished}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.kv, self.mask, self.pos = [], None, None, None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        mask = self.mask.index_select(0, idx)
        first = int((mask.sum(0) > 0).nonzero()[0].item())  # columns before it are padding in every row
        self.mask = mask[:, first:]
        self.kv = [
            (
                k.index_select(0, idx.to(k.device))[:, :, first:],
                v.index_select(0, idx.to(v.device))[:, :, first:],
            )
            for k, v in self.kv
        ]
        self.pos = self.pos.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]

    @staticmethod
    def _emit(r: _Row, kind: str, value: Any) -> None:
        if r.emit is not None:
            try:
                r.emit(kind, value)
            except Exception:  # a consumer that went away must not stop the loop
                pass

    def stats(self) -> dict[str, Any]:
        """Decode steps and prefill passes run, rows running/waiting now, the batch bound, the largest
        batch seen and the batch sizes of the last steps (``[[step, rows], ...]``)."""
        return {
            "steps": self.steps,
            "prefills": self.prefills,
            "running": len(self.rows),
            "waiting": len(self._waiting),
            "max_batch_size": self.max_batch_size,
            "largest_batch": self.largest_batch,
            "batch_log": [list(x) for x in list(self.batch_log)[-32:]],
        }


def _left_pad(t, length: int):
    """Zero-pad a ``[B, H, T, D]`` KV tensor on the left of its sequence axis to ``length``."""
    import torch

    k = length - t.shape[2]
    if k <= 0:
        return t
    return torch.cat([t.new_zeros((t.shape[0], t.shape[1], k, t.shape[3])), t], dim=2)


def _left_pad_2d(m, length: int):
    import torch

    k = length - m.shape[1]
    return m if k <= 0 else torch.cat([m.new_zeros((m.shape[0], k)), m], dim=1)


def _dynamic_cache(layers: list[tuple[Any, Any]]):
    """A transformers ``DynamicCache`` holding these ``(keys, values)`` tensors (no copy)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.layers = []
    for k, v in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    batch_size: int = 8,
    seed: int = 0,
    desc: str = "generate",
    finished: list[bool] | None = None,
) -> list[str]:
    """Continue each prompt (already chat-templated text) and return the decoded new text.

    Args:
        prompts: N prompt strings ending with the assistant header.
        temperature: 0 = greedy; > 0 samples (top_p 0.95).
        batch_size: prompts per forward batch (left padding).

        finished: if given, one flag per prompt is appended: True when the reply ended with the
            end-of-turn token within ``max_new_tokens`` (False = cut by the budget).

    Returns:
        N replies, special tokens stripped. Prints progress (done/N, tokens/s, ETA) per batch.
    """
    import torch

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    out: list[str] = []
    t0 = time.time()
    new_tokens = 0
    for i in range(0, len(prompts), batch_size):
        batch = list(prompts[i : i + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=0.95)
        else:
            kw.update(do_sample=False)
        with torch.no_grad():
            gen = model.generate(**enc, **kw)
        new = gen[:, enc["input_ids"].shape[1] :]
        new_tokens += int((new != tokenizer.pad_token_id).sum())
        if finished is not None:
            finished.extend(bool((row == tokenizer.eos_token_id).any()) for row in new)
        out.extend(decode_reply(tokenizer, row) for row in new)
        el = time.time() - t0
        done = len(out)
        eta = el / done * (len(prompts) - done)
        print(
            f"[{desc}] {done}/{len(prompts)} replies, {new_tokens / max(el, 1e-9):.0f} tok/s, ETA {eta:.0f}s",
            flush=True,
        )
    return out
