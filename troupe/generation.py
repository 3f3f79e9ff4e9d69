"""Batched text generation with a local HF checkpoint (CPU or one device).

Two generators, both used by evaluation, DPO pair building and serving:

* :class:`PrefixGenerator`, the one implementation of persona-card prefix reuse: the rendered card
  (the system turn every turn of a character shares, :func:`troupe.persona.render_system_prompt`)
  is prefilled once per character and its KV cache kept in a byte-bounded LRU (:class:`PrefixCache`);
  each batch of that character's prompts then prefills only the conversation suffixes. Rows are laid
  out ``[card prefix][left padding][suffix]`` so the cached prefix keeps its positions in every row;
  position ids follow the attention mask, so padding in the middle is skipped. The serving backend
  (:class:`serving.backend.TransformersBackend`) wraps it; evaluation calls it directly.
* :func:`generate`, plain ``model.generate`` over left-padded batches of whole prompts (the baseline
  of ``benchmarks/bench_generate.py``).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    """

    messages: list[dict[str, str]]
    max_new_tokens: int = 48
    temperature: float = 0.0
    cache_key: str | None = None
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None
    prefill: str = ""


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


def cache_nbytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers ``Cache`` (its ``layers``)."""
    n = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                n += t.numel() * t.element_size()
    return n


class PrefixGenerator:
    """Batched generation that prefills each persona card once (see the module docstring).

    Args:
        model, tokenizer: a causal LM and its fast tokenizer (with a chat template that renders the
            system turn as a prefix of the whole conversation, as ChatML does).
        device: torch device of ``model``.
        prefix_cache_bytes: bound of the card KV cache; 0 disables reuse (every batch prefills its card).
    """

    def __init__(self, model, tokenizer, device: Any = "cpu", prefix_cache_bytes: int = 256 << 20) -> None:
        import torch

        self.model, self.tok = model, tokenizer
        self.device = torch.device(device)
        self.cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
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

    def prefix(self, key: str | None, prefix_text: str) -> tuple[list[int], Any, bool]:
        """``(prefix ids, a private copy of its KV cache or None, came from the cache)``; a miss
        prefills the prefix and stores it."""
        import torch

        if self.cache is None or key is None or not prefix_text:
            return self.ids(prefix_text), None, False
        hit = self.cache.get(key, prefix_text)
        if hit is not None:
            ids, kv = hit
            return ids, copy.deepcopy(kv), True
        ids = self.ids(prefix_text)
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        kv = out.past_key_values
        self.cache.put(key, prefix_text, ids, copy.deepcopy(kv), cache_nbytes(kv))
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
        """Generate replies for ``requests``; rows sharing a card prefix and settings share ``generate`` calls.

        Args:
            requests: N requests (``messages[0]`` the system card; ``cache_key`` the character id).
            batch_size: rows per ``generate`` call (0 = a whole prefix group at once, as serving does).
                Within a group rows are sorted by suffix length so a batch pads little.
            seed: ``torch.manual_seed`` before generating (sampling reproducible), None = leave as is.
            desc: if given, print progress per batch: ``[desc] done/N replies, new tok/s, ETA``.

        Returns:
            N results in request order. Raises whatever ``model.generate`` raises.
        """
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        groups: dict[tuple, list[int]] = {}
        suffixes = []
        for i, r in enumerate(requests):
            prefix, suffix = self.texts(r.messages, r.prefill)
            suffixes.append(self.ids(suffix))
            if i == len(requests) - 1:
                self.note_prompt(len(r.messages), self.ids(prefix) + suffixes[-1], bool(r.prefill))
            key = (r.cache_key, prefix, r.max_new_tokens, r.temperature, r.top_p, tuple(r.stop), r.seed)
            groups.setdefault(key, []).append(i)
        results: list[GenResult | None] = [None] * len(requests)
        t0, done, new_tokens = time.perf_counter(), 0, 0
        for (key, prefix, max_new, temp, top_p, stop, rseed), idx in groups.items():
            idx = sorted(idx, key=lambda i: len(suffixes[i]))
            step = batch_size or len(idx)
            for j in range(0, len(idx), step):
                rows = idx[j : j + step]
                if rseed is not None:
                    torch.manual_seed(rseed)
                outs = self._generate_batch(
                    key, prefix, [suffixes[i] for i in rows], max_new, temp, top_p, stop
                )
                for i, o in zip(rows, outs, strict=True):
                    results[i] = o
                    new_tokens += o.completion_tokens
                done += len(rows)
                if desc:
                    el = time.perf_counter() - t0
                    print(
                        f"[{desc}] {done}/{len(requests)} replies, {new_tokens / max(el, 1e-9):.0f} new tok/s, "
                        f"ETA {el / done * (len(requests) - done):.0f}s",
                        flush=True,
                    )
        return [r for r in results if r is not None]

    def _generate_batch(
        self,
        key: str | None,
        prefix_text: str,
        s_ids: list[list[int]],
        max_new: int,
        temp: float,
        top_p: float = 0.95,
        stop: Sequence[str] = (),
    ) -> list[GenResult]:
        import torch

        t0 = time.perf_counter()
        p_ids, kv, cached = self.prefix(key, prefix_text)
        width = max(len(s) for s in s_ids)
        pad = self.tok.pad_token_id
        eos = self.tok.eos_token_id
        rows, masks = [], []
        for s in s_ids:
            k = width - len(s)
            rows.append(p_ids + [pad] * k + s)
            masks.append([1] * len(p_ids) + [0] * k + [1] * len(s))
        input_ids = torch.tensor(rows, device=self.device)
        attention_mask = torch.tensor(masks, device=self.device)
        gen_kw: dict[str, Any] = dict(
            max_new_tokens=max_new, do_sample=temp > 0, pad_token_id=pad, eos_token_id=eos
        )
        if temp > 0:
            gen_kw.update(temperature=temp, top_p=top_p)
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
        for row, s in zip(out, s_ids, strict=True):
            new = row[width + len(p_ids) :].tolist()
            while new and new[-1] == pad and pad != eos:
                new.pop()
            text, new, reason = finish_reply(self.tok, new, eos, stop)
            results.append(
                GenResult(
                    text, len(p_ids) + len(s), len(new), ms, cached, reason == "stop", new, reason, len(rows)
                )
            )
        return results


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
