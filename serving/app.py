"""The Troupe Ray Serve application: ``Router`` (gateway + canary router) in front of model deployments.

Graph (one application per environment, ``troupe-<env>``; names in :mod:`serving.contract`)::

    HTTP -> Router (FastAPI ingress: auth, limits, persona card, sticky stable/canary split,
                    metrics, rollout stats)
              |-> stable  (Model: transformers + @serve.batch + persona-card KV cache | vLLM)
              '-> canary  (same, other model version; only when a canary model is configured)

Endpoints (relative to the route prefix):
    POST /v1/chat/completions   OpenAI-compatible (``stream: true`` -> SSE); ``model`` = character id
                                (:mod:`serving.openai_api`: validation, bodies, markup in ``content``)
    POST /v1/roleplay           {character_id, conversation_id, messages} -> parsed reply; no
                                messages -> a greeting; ``stream: true`` -> SSE text/emotion/image/done
    GET  /v1/models[/{id}]      characters served, as OpenAI models
    GET  /v1/characters[/{id}]  card summaries, greetings, catalogue version
    GET  /v1/rollout/stats      per-variant counters for the rollout controller (``?since=unix_s``)
    POST /v1/feedback           a user's thumbs up/down on a reply -> the preference store
                                (``feedback_db_url``; :mod:`troupe.feedback.store`)
    GET  /healthz               incl. the catalogue (uri, version)

Safety (``gateway`` section): API keys, per-key token-bucket rate limits (429 + ``Retry-After``),
body size enforced while reading, internal errors logged with an error id and returned as a generic
message with that id, a moderation hook on replies (``flag`` | ``block``).

The canary weight lives in the Router's ``user_config`` (``{"canary_weight_percent": pct,
"rolled_back": bool}``): changing it reconfigures the Router in place; model replicas are untouched.
A ``serveConfigV2`` overrides the Router only (the one deployment every build has); model replica
options (replicas, CPUs, GPUs, custom resources) travel in the ``model`` section of the args.

Models are pinned by version number when the app is built (``models:/name@alias`` ->
``models:/name/<n>``), so every replica serves the same version even if an alias moves. Characters
come from the catalogue (``catalogue_uri``, :mod:`troupe.characters.catalogue`) when one is
configured, reloadable through the Router ``user_config``; otherwise they travel with the model
version (:mod:`troupe.registry` stores them) and a ``characters`` path in the config (local runs,
tests) takes precedence.

Import path ``serving.app:build_app`` (Helm RayService chart, ``troupe deploy``).
"""

import copy
import dataclasses
import json
import logging
import math
import os
import time
import traceback
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import ray
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from serving import contract
from serving.backend import vllm_chat
from serving.gateway import (
    CONVERSATION_HEADER,
    GatewayError,
    Limits,
    Moderation,
    RateLimiter,
    StickyRouter,
    aggregate_events,
    build_prompt,
    check_api_key,
    client_key,
    load_key_hashes,
    parse_messages,
    split_prefill,
    split_reply,
    sticky_key,
)
from serving.model import Model
from serving.openai_api import (
    OPENAI_CONTENT_MODES,
    ChatRequest,
    chunk_body,
    completion_body,
    model_body,
    now,
    parse_chat_request,
    usage,
)
from troupe.checks import ASSISTANT_PHRASES
from troupe.config import repo_path
from troupe.markup import MarkupEvent, MarkupStream, _safe_end

log = logging.getLogger("ray.serve")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs" / "serving"

#: Defaults under every serving config (configs/serving/<env>.yaml overrides, then build_app args).
#: These keys (plus :data:`URI_ARGS` and ``config``) are every arg the app knows; others are errors.
DEFAULTS: dict[str, Any] = {
    "env": "test",
    "route_prefix": "/test",
    "backend": "transformers",
    # path or candidate list of a characters.jsonl; "" = the characters stored with the model version
    "characters": "",
    # character catalogue (local path or s3:// URI, troupe.characters.catalogue); when set it is what
    # the Router serves, and the Router user_config key of the same name reloads it in place
    contract.CATALOGUE_URI: "",
    # SQLAlchemy URL of the preference store behind POST /v1/feedback (troupe.feedback.store;
    # params feedback.db_url); "" = the endpoint answers 501 naming this arg
    contract.FEEDBACK_DB_URL: "",
    "mlflow_tracking_uri": "",
    "model_name": "troupe-roleplay",
    "stable_alias": "champion",
    "canary_alias": "",
    contract.CANARY_WEIGHT: 0.0,
    "model": {
        "dtype": "float32",
        "device": "cpu",
        "num_replicas": 1,
        "num_cpus": 1,
        "num_gpus": 0,
        "resources": {},
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.02,
        "prefix_cache_tokens": 20480,  # persona-card KV cache, tokens, LRU by character; 0 = off
        "prefix_cache_mb": 0,  # optional upper bound in MiB; 0 = none
        # LoRA adapters (Character.adapter) loaded at once per replica, LRU; vLLM: max_loras and
        # Ray Serve LLM's max_num_adapters_per_replica; 0 = no adapters (troupe.adapters)
        "max_adapters": 4,
        "max_new_tokens": 48,
        "temperature": 0.7,
        "fault": {},
    },
    "canary_model": {},
    "gateway": {
        "served_model_name": "troupe",
        "require_api_key": False,
        "api_keys_sha256": [],
        "api_keys_env": contract.API_KEYS_ENV,
        "api_keys_file": "",
        "typing_chars_per_sec": 4.0,
        "limits": {},
        # OpenAI `content`: "text" = spoken text, markup parsed into the `troupe` field; "raw" = tags kept
        "openai_content": "text",
        "moderation": {},  # serving.gateway.Moderation: mode off|flag|block, rules, blacklist, refusal
    },
    "router": {"num_cpus": 0, "retry_on_canary_error": True, "stats_window": 50000},
    "vllm": {
        "max_model_len": 8192,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "min_replicas": None,  # None = model.num_replicas (autoscaling bounds of vLLM replicas)
        "max_replicas": None,
        "accelerator_type": None,
        # multi-LoRA: cloud prefix every Character.adapter lies under (Ray Serve LLM's
        # dynamic_lora_loading_path; s3://, gs://, abfss:// or azure://); "" = LoRA off
        "lora_path": "",
        "max_lora_rank": 16,  # vLLM's max_lora_rank: the largest adapter rank served
    },
}
#: Args naming models directly (local dir or ``models:/name/<version>`` / ``models:/name@alias``).
URI_ARGS = ("model_uri", contract.STABLE_MODEL_URI, contract.CANARY_MODEL_URI)
#: Sections whose keys are checked one level down (``canary_model`` takes ``model`` keys).
_SECTIONS = {
    "model": "model",
    "canary_model": "model",
    "gateway": "gateway",
    "router": "router",
    "vllm": "vllm",
}


def known_args() -> frozenset[str]:
    """Every top-level key ``build_app`` accepts."""
    return frozenset(DEFAULTS) | frozenset(URI_ARGS) | {"config"}


def check_args(args: dict[str, Any], where: str = "args") -> None:
    """Reject keys the app does not know (top level and inside the config sections).

    Raises:
        ValueError: naming each unknown key and the known ones, e.g. a chart that still passes
            ``canary_weight`` (a unit-less fraction) instead of ``canary_weight_percent``.
    """
    unknown = sorted(set(args) - known_args())
    if unknown:
        raise ValueError(f"serving {where}: unknown keys {unknown} (known: {sorted(known_args())})")
    for sec, like in _SECTIONS.items():
        val = args.get(sec)
        if val is None:
            continue
        if not isinstance(val, dict):
            raise ValueError(f"serving {where}.{sec}: expected a mapping, got {type(val).__name__}")
        bad = sorted(set(val) - set(DEFAULTS[like]))
        if bad:
            raise ValueError(f"serving {where}.{sec}: unknown keys {bad} (known: {sorted(DEFAULTS[like])})")
    if contract.CANARY_WEIGHT in args:
        contract.check_weight(args[contract.CANARY_WEIGHT], f"serving {where}.{contract.CANARY_WEIGHT}")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``base`` with ``over`` merged in (dicts recursively, other values replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_serving_config(args: dict[str, Any]) -> dict[str, Any]:
    """Serving config: :data:`DEFAULTS` <- ``configs/serving/{env}.yaml`` (or ``args['config']``) <- args.

    Raises:
        FileNotFoundError: an explicit ``config`` path does not exist.
        ValueError: an unknown key in the args or the config file (:func:`check_args`).
    """
    check_args(args)
    env = str(args.get("env") or DEFAULTS["env"])
    path = args.get("config")
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        p = repo_path(path)
        if not p.is_file():
            raise FileNotFoundError(f"serving config {path}: not found")
    else:
        p = CONFIG_DIR / f"{env}.yaml"
    if p.is_file():
        file_cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        check_args(file_cfg, str(p))
        cfg = deep_merge(cfg, file_cfg)
    return deep_merge(cfg, {k: v for k, v in args.items() if k != "config" and v is not None})


def model_uris(cfg: dict[str, Any]) -> tuple[str, str | None]:
    """(stable URI, canary URI or None) from explicit ``*_model_uri`` args or registry aliases.

    ``model_uri`` serves one model as stable; ``models:/{model_name}@{alias}`` is used otherwise. No
    canary when ``canary_alias`` is empty or it resolves to the same URI as stable.

    Raises:
        ValueError: no stable model can be named (no URI and no model_name/stable_alias).
    """
    name = cfg.get("model_name")
    stable = cfg.get(contract.STABLE_MODEL_URI) or cfg.get("model_uri")
    if not stable:
        if not (name and cfg.get("stable_alias")):
            raise ValueError("serving: give model_uri / stable_model_uri, or model_name + stable_alias")
        stable = f"models:/{name}@{cfg['stable_alias']}"
    canary = cfg.get(contract.CANARY_MODEL_URI)
    if not canary and name and cfg.get("canary_alias"):
        canary = f"models:/{name}@{cfg['canary_alias']}"
    return str(stable), (str(canary) if canary and str(canary) != str(stable) else None)


def pin_uri(uri: str, tracking_uri: str | None) -> str:
    """``models:/name@alias`` -> ``models:/name/<version>`` (other URIs unchanged).

    Raises:
        troupe.config.ConfigError: the alias names no version.
    """
    if not (uri.startswith("models:/") and "@" in uri):
        return uri
    from troupe.registry import model_version

    mv = model_version(uri, tracking_uri or None)
    return contract.model_version_uri(mv.name, mv.version)


def pinned_models(cfg: dict[str, Any]) -> tuple[str, str | None]:
    """:func:`model_uris` with aliases pinned to version numbers; a canary alias that names no
    version, or the stable version, means no canary (logged)."""
    stable, canary = model_uris(cfg)
    tracking = cfg.get("mlflow_tracking_uri") or None
    stable = pin_uri(stable, tracking)
    if canary:
        try:
            canary = pin_uri(canary, tracking)
        except Exception as e:  # e.g. no challenger yet: serve stable alone
            log.warning("canary %s not served: %s", canary, e)
            canary = None
    if canary == stable:
        canary = None
    return stable, canary


def version_label(uri: str) -> str:
    """``name/<version>`` for ``models:/name/<version>``, the directory name for a local path."""
    if uri.startswith("models:/"):
        return uri[len("models:/") :]
    return Path(uri).name if uri else ""


def load_character_file(spec: str | list[str]) -> dict[str, Any]:
    """``{id: Character}`` from the first existing path of ``spec`` (a path or candidate list).

    Raises:
        FileNotFoundError: none of the candidates exists.
    """
    from troupe.contract import load_characters

    cands = [spec] if isinstance(spec, str) else list(spec)
    for c in cands:
        p = repo_path(c)
        if p.is_file():
            return load_characters(p)
    raise FileNotFoundError(f"characters: none of {cands} exists (set 'characters' in the serving config)")


def model_characters(uri: str, tracking_uri: str | None) -> dict[str, Any]:
    """``{id: Character}`` stored with a model: the registered version's characters artifact
    (:func:`troupe.registry.characters_file`; only that small file is downloaded), or
    ``characters.jsonl`` inside a local model directory.

    Raises:
        FileNotFoundError / ConfigError: the model carries no characters.
    """
    from troupe.contract import load_characters

    if uri.startswith("models:/"):
        from troupe.registry import characters_file

        return load_characters(characters_file(uri, tracking_uri or None))
    p = Path(uri) / contract.CHARACTERS_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"characters: {uri} holds no {contract.CHARACTERS_FILE} and no 'characters' path is configured"
        )
    return load_characters(p)


def serving_characters(cfg: dict[str, Any], stable: str, canary: str | None) -> dict[str, Any]:
    """The characters the Router serves: the configured ``characters`` file when set, else those of
    the stable version plus characters only the canary version carries."""
    if cfg.get("characters"):
        return load_character_file(cfg["characters"])
    tracking = cfg.get("mlflow_tracking_uri") or None
    chars = dict(model_characters(canary, tracking)) if canary else {}
    chars.update(model_characters(stable, tracking))
    return chars


# -- rollout statistics, shared by every Router replica ------------------------------------------
@ray.remote(num_cpus=0)
class RolloutStats:
    """Router events of one application from all its Router replicas: the controller reads every
    request, not the share one replica saw. One named, detached actor per application
    (:func:`serving.contract.stats_actor_name` in namespace :data:`serving.contract.RAY_NAMESPACE`),
    created by the first Router replica and found by the others (``get_if_exists``); it outlives
    app redeploys, and stats are always read for a window (``since``), so old events do not leak
    into a new step.

    Args:
        window: events kept (the oldest are dropped first).
    """

    def __init__(self, window: int = 50000) -> None:
        self.events: deque[tuple] = deque(maxlen=int(window))

    def record(self, event: tuple) -> None:
        """Add one event ``(unix_s, variant, ok, latency_ms, markup_bad, language_bad, phrase)``."""
        self.events.append(tuple(event))

    def summary(self, since: float = 0.0) -> dict[str, Any]:
        """:func:`serving.gateway.aggregate_events` of the events since ``since`` (unix seconds)."""
        return aggregate_events(self.events, since)

    def count(self) -> int:
        return len(self.events)


def stats_actor(app: str, window: int = 50000):
    """The application's :class:`RolloutStats` actor (created on first use)."""
    return RolloutStats.options(
        name=contract.stats_actor_name(app),
        namespace=contract.RAY_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(window)


# -- router / gateway -----------------------------------------------------------------------------
api = FastAPI(title="Troupe role-play gateway")


def _sse_event(event: str, data: dict[str, Any]) -> str:
    """One server-sent event (``event:`` + one JSON ``data:`` line)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _sse_data(data: dict[str, Any] | str) -> str:
    """One OpenAI-style SSE message (``data:`` only)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


@serve.deployment(name=contract.ROUTER, max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Router:
    """Gateway + sticky weighted router (see module docstring).

    ``user_config``: canary weight, rollback, and the character catalogue (``catalogue_uri`` +
    ``catalogue_version``; a change reloads the characters here, model replicas keep running).

    Args:
        stable, canary: handles of the model deployments (``canary`` None without a canary).
        cfg: the serving config; characters come from ``catalogue_uri`` when set, else from the
            ``characters`` file, else from the pinned model versions.
    """

    def __init__(self, stable: Any, canary: Any | None, cfg: dict[str, Any]) -> None:
        from ray.serve.metrics import Counter, Histogram

        from troupe.checks import check_reply

        self._check_reply = check_reply
        self.handles = {contract.STABLE: stable, contract.CANARY: canary}
        self.labels = {  # version labels of the vLLM replicas (the transformers Model reports its own)
            v: version_label(cfg.get(k) or "")
            for v, k in (
                (contract.STABLE, contract.STABLE_MODEL_URI),
                (contract.CANARY, contract.CANARY_MODEL_URI),
            )
        }
        self.cfg = cfg
        self.env = str(cfg.get("env", "test"))
        gw = cfg.get("gateway", {})
        self.limits = Limits.from_dict(gw.get("limits"))
        self.ratelimiter = RateLimiter(self.limits.requests_per_minute, self.limits.burst)
        self.moderation = Moderation.from_dict(gw.get("moderation"))
        self.openai_content = str(gw.get("openai_content", "text"))
        if self.openai_content not in OPENAI_CONTENT_MODES:
            raise ValueError(
                f"gateway.openai_content: {self.openai_content!r} is not one of {OPENAI_CONTENT_MODES}"
            )
        self.served_name = gw.get("served_model_name", "troupe")
        self.keys = load_key_hashes(
            gw.get("api_keys_sha256"),
            gw.get("api_keys_env", contract.API_KEYS_ENV),
            gw.get("api_keys_file") or None,
        )
        self.require_key = bool(gw.get("require_api_key", False))
        self.cps = float(gw.get("typing_chars_per_sec", 4.0))
        self.feedback_db_url = str(
            cfg.get(contract.FEEDBACK_DB_URL) or os.environ.get(contract.FEEDBACK_DB_URL_ENV, "")
        )
        self._feedback_store: Any = None  # troupe.feedback.store.Store, opened on first use
        self.catalogue: dict[str, Any] = {}
        self._load_characters(str(cfg.get(contract.CATALOGUE_URI) or ""))
        self.router = StickyRouter(contract.check_weight(cfg.get(contract.CANARY_WEIGHT, 0.0)))
        self.rolled_back = False
        self.rollback_reason = ""
        self.retry = bool(cfg.get("router", {}).get("retry_on_canary_error", True))
        self.vllm = cfg.get("backend") == "vllm"
        self.lora_path = str((cfg.get("vllm") or {}).get("lora_path") or "")
        self.stats_window = int(cfg.get("router", {}).get("stats_window", 50000))
        self._stats = stats_actor(contract.app_name(self.env), self.stats_window)
        self.versions: dict[str, str] = {}
        self.model_calls = 0  # requests forwarded to a model (rejections never count)
        tags = ("variant", "env")
        self.m_requests = Counter("troupe_requests", description="Replies served, by variant.", tag_keys=tags)
        self.m_errors = Counter(
            "troupe_errors", description="Model call failures, by variant.", tag_keys=tags
        )
        self.m_rejected = Counter(
            "troupe_rejected", description="Gateway rejections by code.", tag_keys=("code", "env")
        )
        self.m_latency = Histogram(
            "troupe_latency_ms",
            description="Model call latency (ms), by variant.",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
            tag_keys=tags,
        )
        self.m_quality = Counter(
            "troupe_reply_violations",
            description="Live reply rule violations.",
            tag_keys=("variant", "env", "check"),
        )
        self.m_moderated = Counter(
            "troupe_moderated",
            description="Replies the moderation hook flagged or blocked, by rule and action.",
            tag_keys=("env", "rule", "action"),
        )

    # -- characters ------------------------------------------------------------------------------
    def _load_characters(self, uri: str, expect_version: str | None = None) -> None:
        """Load the characters: the catalogue at ``uri`` (:func:`troupe.characters.catalogue.
        load_catalogue`), or with ``uri`` empty the build-time source (``characters`` file or the
        models' characters). Swaps them in one assignment, so a request sees the old or the new set.

        Raises:
            CatalogueError / StorageError: the catalogue cannot be read (the old characters stay).
        """
        if uri:
            from troupe.characters.catalogue import load_catalogue

            local = "://" not in uri
            cat = load_catalogue(str(repo_path(uri)) if local else uri)
            if expect_version and cat.version != expect_version:
                log.warning(
                    "catalogue %s: read version %s, the deployer named %s (changed since); serving %s",
                    uri,
                    cat.version,
                    expect_version,
                    cat.version,
                )
            chars, info = dict(cat.characters), {"uri": uri, "version": cat.version, "source": "catalogue"}
        else:
            chars = serving_characters(
                self.cfg, self.cfg[contract.STABLE_MODEL_URI], self.cfg.get(contract.CANARY_MODEL_URI)
            )
            source = "file" if self.cfg.get("characters") else "model"
            info = {"uri": str(self.cfg.get("characters") or ""), "version": "", "source": source}
        info.update(loaded_at=int(time.time()), characters=len(chars))
        self.characters, self.catalogue = chars, info
        log.info("characters: %d from %s %s %s", len(chars), info["source"], info["uri"], info["version"])

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply the Router ``user_config`` without restarting anything.

        Keys: ``canary_weight_percent`` (percent), ``rolled_back`` + ``reason``, ``catalogue_uri`` +
        ``catalogue_version`` (reload the characters when either differs from what is loaded; ``""``
        goes back to the build-time characters; absent keeps the current ones, so a weight-only
        update from the rollout controller does not unload a catalogue).

        Raises:
            ValueError: an unknown key (e.g. ``canary_weight``) or a weight outside 0-100; Serve
                then reports the deployment unhealthy instead of routing with a wrong unit.
            CatalogueError / StorageError: the catalogue cannot be read (the old characters stay).
        """
        contract.check_user_config(user_config)
        if contract.CATALOGUE_URI in user_config:
            uri = str(user_config.get(contract.CATALOGUE_URI) or "")
            want = user_config.get(contract.CATALOGUE_VERSION)
            have_uri = self.catalogue.get("uri") if self.catalogue.get("source") == "catalogue" else ""
            if uri != have_uri or (uri and want and want != self.catalogue.get("version")):
                self._load_characters(uri, want)
        if user_config.get(contract.ROLLED_BACK):
            self.router.rollback()
            self.rolled_back = True
            self.rollback_reason = str(user_config.get(contract.ROLLBACK_REASON, ""))
        else:
            self.rolled_back = False
            self.rollback_reason = ""
            self.router.set_weight(
                float(user_config.get(contract.CANARY_WEIGHT, self.router.canary_weight_percent))
            )

    # -- helpers ---------------------------------------------------------------------------------
    async def _read_json(self, request: Request) -> dict[str, Any]:
        """Authenticate, rate-limit and read a JSON body, enforcing ``max_body_bytes`` while
        reading: a declared ``Content-Length`` over the limit is refused unread, a chunked body is
        read chunk by chunk and refused as soon as it passes the limit (never read whole).

        Raises:
            GatewayError: 401, 429 (with ``Retry-After``), 413, 400 (not a JSON object).
        """
        headers = dict(request.headers)
        check_api_key(headers, self.keys, self.require_key)
        wait = self.ratelimiter.acquire(
            client_key(headers, request.client.host if request.client else None), time.monotonic()
        )
        if wait > 0:
            secs = max(1, math.ceil(wait))
            raise GatewayError(
                429,
                "rate_limit_exceeded",
                f"rate limit {self.limits.requests_per_minute}/min (burst {self.limits.burst}) "
                f"exceeded; retry after {secs} s",
                headers={"Retry-After": str(secs)},
            )
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise GatewayError(413, "request_too_large", f"body {length} bytes > {limit}")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise GatewayError(
                    413, "request_too_large", f"body > {limit} bytes (stopped reading at {len(buf)} bytes)"
                )
        try:
            data = json.loads(bytes(buf) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GatewayError(400, "invalid_json", f"body is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise GatewayError(400, "invalid_request", "body must be a JSON object")
        return data

    def _error(self, e: GatewayError) -> JSONResponse:
        self.m_rejected.inc(tags={"code": e.code, "env": self.env})
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)

    def _internal_error(self, e: BaseException, where: str, status: int = 500) -> dict[str, Any]:
        """Log ``e`` with a new error id and return the generic OpenAI-shaped error body carrying
        that id (never the exception text: it can hold prompts, paths or model internals)."""
        eid = uuid.uuid4().hex[:16]
        log.error("error_id=%s in %s: %s", eid, where, "".join(traceback.format_exception(e))[-4000:])
        code = "model_unavailable" if status == 503 else "internal_error"
        msg = "the model could not reply" if status == 503 else "internal error"
        return {
            "error": {
                "code": code,
                "message": f"{msg}; error id {eid} (quote it when reporting)",
                "type": "server_error",
                "param": None,
                "error_id": eid,
            }
        }

    def _character(self, cid: Any):
        if not isinstance(cid, str) or cid not in self.characters:
            raise GatewayError(
                404,
                "unknown_character",
                f"unknown character {cid!r} (GET /v1/characters or /v1/models lists them)",
                "model",
            )
        return self.characters[cid]

    def _prepare(
        self, chat: ChatRequest, cid: Any, data: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any]:
        """Character, :class:`serving.contract.ModelRequest` and routing key of a request.

        Context (:func:`serving.gateway.build_prompt`): persona card, lorebook entries selected on
        the recent turns (:func:`troupe.characters.lorebook.select_lore`, ``lore_token_budget``),
        the history with client system notes in place, the card's post-history instructions; a
        last assistant message is the prefill. Routing key: :func:`serving.gateway.sticky_key`.

        Raises:
            GatewayError: 404 unknown character, 400 bad messages or generation settings.
        """
        char = self._character(cid)
        msgs = parse_messages(chat.messages, self.limits)
        msgs, prefill = split_prefill(msgs)
        lore = ""
        if char.lorebook and self.limits.lore_token_budget > 0:
            from troupe.characters.lorebook import render_lore, select_lore

            recent = [{"role": m.role, "content": m.content} for m in msgs]
            lore = render_lore(
                select_lore(char.lorebook, recent, budget_tokens=self.limits.lore_token_budget)
            )
        from troupe.persona import render_post_history

        prompt = build_prompt(char, msgs, self.limits, lore=lore, post_history=render_post_history(char))
        conv, _ = sticky_key(data.get("conversation_id"), chat.user, headers)
        mt = chat.max_tokens
        if mt is not None and not 1 <= mt <= self.limits.max_new_tokens:
            raise GatewayError(
                400, "invalid_max_tokens", f"max_tokens must be 1..{self.limits.max_new_tokens}", "max_tokens"
            )
        req = contract.ModelRequest(
            messages=prompt,
            max_new_tokens=mt,
            temperature=chat.temperature,
            top_p=chat.top_p,
            stop=chat.stop,
            seed=chat.seed,
            cache_key=char.id,
            prefill=prefill,
            adapter=char.adapter or None,
        )
        return {"character": char, "conversation_id": str(conv), "request": req}

    async def _record(self, variant: str, ok: bool, ms: float, reply: str | None, char) -> None:
        tags = {"variant": variant, "env": self.env}
        q = (False, False, False)
        if ok:
            self.m_requests.inc(tags=tags)
            self.m_latency.observe(ms, tags=tags)
            if reply is not None:
                c = self._check_reply(reply, character_name=char.name, language=char.language)
                q = (not c.markup_valid, not c.language_ok, bool(c.assistant_phrase))
                for name, bad in zip(
                    ("markup_invalid", "language_mismatch", "assistant_phrase"), q, strict=True
                ):
                    if bad:
                        self.m_quality.inc(tags={**tags, "check": name})
        else:
            self.m_errors.inc(tags=tags)
        event = (time.time(), variant, ok, ms, *q)
        try:  # awaited, so a stats read after the reply sees this request
            await self._stats.record.remote(event)
        except Exception as e:  # the stats actor died: a new one, the reply still goes out
            log.warning("rollout stats actor unavailable (%s); recreating it", e)
            self._stats = stats_actor(contract.app_name(self.env), self.stats_window)
            self.m_errors.inc(tags={"variant": "stats", "env": self.env})

    async def _call_model(self, variant: str, req: contract.ModelRequest) -> contract.ModelReply:
        h = self.handles[variant]
        if self.vllm:
            out = await vllm_chat(h, req, self.served_name, lora_path=self.lora_path)
            return dataclasses.replace(out, model_version=self.labels[variant])
        return await h.generate.remote(req)

    async def _generate(self, prep: dict[str, Any]) -> tuple[contract.ModelReply, str]:
        """Route, call, retry a failed canary call on stable; returns (model reply, variant)."""
        variant = self.router.route(prep["conversation_id"], self.handles[contract.CANARY] is not None)
        self.model_calls += 1
        t0 = time.perf_counter()
        try:
            out = await self._call_model(variant, prep["request"])
        except Exception as e:
            await self._record(variant, False, (time.perf_counter() - t0) * 1000, None, prep["character"])
            if variant != contract.CANARY or not self.retry:
                raise
            log.warning("canary call failed (%s); retrying on stable", type(e).__name__)
            variant = contract.STABLE
            t0 = time.perf_counter()
            try:
                out = await self._call_model(variant, prep["request"])
            except Exception:
                await self._record(variant, False, (time.perf_counter() - t0) * 1000, None, prep["character"])
                raise
        await self._record(variant, True, (time.perf_counter() - t0) * 1000, out.text, prep["character"])
        self.versions[variant] = out.model_version
        return out, variant

    def _moderate(self, text: str, char) -> tuple[str, str | None, dict[str, Any]]:
        """``(text to send, finish_reason override or None, troupe.moderation)`` for a finished reply."""
        rules = self.moderation.check(text, char)
        action = "none" if not rules else ("block" if self.moderation.mode == "block" else "flag")
        for r in rules:
            self.m_moderated.inc(tags={"env": self.env, "rule": r, "action": action})
        info = {"mode": self.moderation.mode, "flagged": bool(rules), "rules": rules, "action": action}
        if action == "block":
            return self.moderation.refusal_text(char.language), "content_filter", info
        return text, None, info

    async def _deltas(self, prep: dict[str, Any], variant: str):
        """Stream :class:`serving.contract.StreamDelta` pieces from one variant (vLLM: one piece)."""
        req = prep["request"]
        if self.vllm:
            out = await self._call_model(variant, req)
            yield contract.StreamDelta(
                text=out.text,
                finish_reason=out.finish_reason,
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                model_version=out.model_version,
            )
            return
        async for d in self.handles[variant].options(stream=True).stream.remote(req):
            yield d

    async def _stream_reply(self, prep: dict[str, Any]):
        """The reply as parsed stream events, with canary->stable retry before any output and the
        moderation hook. Yields ``("event", MarkupEvent)``, ``("raw", text)`` (raw text that ends
        outside any tag) and finally ``("done", info)`` with usage, finish_reason, variant, model
        version, the parsed reply and moderation; ``("error", body)`` on a model failure.

        Moderation ``block`` on a stream: the spoken text is held back by the longest blacklist
        phrase and checked before it goes out; a hit ends the stream with the refusal and
        ``finish_reason`` ``content_filter``. Rules that need the whole reply (language, length)
        are checked at the end: ``block`` then ends with ``content_filter`` after the text sent.
        """
        char = prep["character"]
        variant = self.router.route(prep["conversation_id"], self.handles[contract.CANARY] is not None)
        self.model_calls += 1
        block = self.moderation.mode == "block"
        hold = (
            max([len(p) for p in ASSISTANT_PHRASES] + [len(p) for p in self.moderation.blacklist])
            if block
            else 0
        )
        ms = MarkupStream()
        raw_sent = 0
        pending: list[MarkupEvent] = []
        last: contract.StreamDelta | None = None
        started = False
        for attempt in (variant, contract.STABLE):
            t0 = time.perf_counter()
            try:
                async for d in self._deltas(prep, attempt):
                    last = d
                    if not d.text:
                        continue
                    started = True
                    evs = ms.feed(d.text)
                    safe = _safe_end(ms.raw)
                    if safe > raw_sent:
                        yield ("raw", ms.raw[raw_sent:safe])
                        raw_sent = safe
                    if not block:
                        for ev in evs:
                            yield ("event", ev)
                        continue
                    pending += evs
                    held = "".join(e.text for e in pending if e.kind == "text")
                    sent_text = ms.sent_text[: len(ms.sent_text) - len(held)]
                    if self.moderation.blacklisted(ms.sent_text):
                        hit = self.moderation.check(ms.raw, char) or ["blacklist"]
                        for r in hit:
                            self.m_moderated.inc(tags={"env": self.env, "rule": r, "action": "block"})
                        await self._record(attempt, True, (time.perf_counter() - t0) * 1000, ms.raw, char)
                        refusal = self.moderation.refusal_text(char.language)
                        yield ("event", MarkupEvent("text", text=("" if sent_text else refusal)))
                        yield (
                            "done",
                            self._done_info(
                                last,
                                attempt,
                                ms.finish()[1],
                                "content_filter",
                                {"mode": "block", "flagged": True, "rules": hit, "action": "block"},
                            ),
                        )
                        return
                    while pending and len(held) > hold:  # release what is beyond the holdback
                        ev = pending.pop(0)
                        if ev.kind == "text":
                            held = held[len(ev.text) :]
                        yield ("event", ev)
                variant = attempt
                await self._record(attempt, True, (time.perf_counter() - t0) * 1000, ms.raw, char)
                break
            except Exception as e:
                await self._record(attempt, False, (time.perf_counter() - t0) * 1000, None, char)
                if attempt == contract.STABLE or started or not self.retry:  # no retry after output began
                    yield ("error", self._internal_error(e, "stream", 503))
                    return
        evs, parsed = ms.finish()
        for ev in pending + evs:
            yield ("event", ev)
        if raw_sent < len(ms.raw):
            yield ("raw", ms.raw[raw_sent:])
        _, finish, mod = self._moderate(ms.raw, char)
        yield ("done", self._done_info(last, variant, parsed, finish, mod))

    def _done_info(
        self, last, variant: str, parsed, finish: str | None, moderation: dict[str, Any]
    ) -> dict[str, Any]:
        d = last or contract.StreamDelta()
        self.versions[variant] = d.model_version
        return {
            "finish_reason": finish or d.finish_reason or contract.FINISH_STOP,
            "usage": usage(d.prompt_tokens, d.completion_tokens),
            "variant": variant,
            "model_version": d.model_version,
            "parsed": parsed,
            "moderation": moderation,
        }

    def _troupe_markup(self, parsed) -> dict[str, Any]:
        return {
            "emotion": parsed.emotion,
            "clauses": [c.__dict__ for c in parsed.clauses],
            "images": [i.__dict__ for i in parsed.images],
            "valid": parsed.valid,
        }

    def _catalogue_info(self) -> dict[str, Any]:
        return {k: self.catalogue.get(k) for k in ("uri", "version", "source")}

    # -- endpoints -------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness, the number of characters and the catalogue they come from (uri, version)."""
        return {
            "ok": True,
            "env": self.env,
            "characters": len(self.characters),
            "catalogue": self._catalogue_info(),
        }

    def _model_entry(self, c) -> dict[str, Any]:
        return model_body(c.id, self.catalogue.get("loaded_at", 0), name=c.name, language=c.language)

    @api.get("/v1/models")
    async def models(self, request: Request):
        """OpenAI model list: one entry per character (``id`` = character id)."""
        try:
            check_api_key(dict(request.headers), self.keys, self.require_key)
        except GatewayError as e:
            return self._error(e)
        return {"object": "list", "data": [self._model_entry(c) for c in self.characters.values()]}

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request):
        """One OpenAI model entry; 404 naming ``/v1/models`` for an unknown id."""
        try:
            check_api_key(dict(request.headers), self.keys, self.require_key)
            return self._model_entry(self._character(model_id))
        except GatewayError as e:
            return self._error(e)

    def _character_summary(self, c, full: bool = False) -> dict[str, Any]:
        from troupe.persona import render_greeting

        out: dict[str, Any] = {
            "id": c.id,
            "name": c.name,
            "language": c.language,
            "tags": list(c.tags),
            "creator": c.creator,
            "character_version": c.character_version,
            "greetings": len(c.greetings),
            "lorebook_entries": len((c.lorebook or {}).get("entries") or []),
            "catalogue_version": self.catalogue.get("version"),
        }
        if full:
            out.update(
                profile=dict(c.profile),
                style=c.style,
                scene=c.scene,
                examples=list(c.examples),
                greetings=[render_greeting(c, i) for i in range(len(c.greetings))],
            )
        return out

    @api.get("/v1/characters")
    async def list_characters(self, request: Request):
        """Card summaries of the characters served and the catalogue they come from."""
        try:
            check_api_key(dict(request.headers), self.keys, self.require_key)
        except GatewayError as e:
            return self._error(e)
        return {
            "object": "list",
            "catalogue": self._catalogue_info(),
            "data": [self._character_summary(c) for c in self.characters.values()],
        }

    @api.get("/v1/characters/{character_id}")
    async def get_character(self, character_id: str, request: Request):
        """One character's card summary with its greetings (macros filled) and the catalogue version."""
        try:
            check_api_key(dict(request.headers), self.keys, self.require_key)
            return self._character_summary(self._character(character_id), full=True)
        except GatewayError as e:
            return self._error(e)

    def _greeting(self, data: dict[str, Any], headers: dict[str, str]) -> JSONResponse:
        """``/v1/roleplay`` without messages: the character's greeting ``greeting_index`` (0 = the
        card's ``first_mes``); no model call."""
        from troupe.markup import parse_reply
        from troupe.persona import render_greeting

        char = self._character(data.get("character_id"))
        idx = data.get("greeting_index", 0)
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise GatewayError(400, "invalid_request", "greeting_index: must be an integer", "greeting_index")
        if not char.greetings:
            raise GatewayError(
                400, "no_greeting", f"character {char.id!r} has no greetings; send messages", "messages"
            )
        if not 0 <= idx < len(char.greetings):
            raise GatewayError(
                400,
                "invalid_request",
                f"greeting_index: {idx} is outside 0..{len(char.greetings) - 1}",
                "greeting_index",
            )
        raw = render_greeting(char, idx)
        parsed = parse_reply(raw)
        conv, _ = sticky_key(data.get("conversation_id"), data.get("user"), headers)
        body = {
            "text": parsed.text,
            "raw": raw,
            **{k: v for k, v in self._troupe_markup(parsed).items() if k != "valid"},
            "markup_valid": parsed.valid,
            "messages": split_reply(parsed.text, self.cps),
            "greeting_index": idx,
            "greetings": len(char.greetings),
            "variant": None,
            "model_version": "",
            "finish_reason": contract.FINISH_STOP,
            "character_id": char.id,
            "conversation_id": conv,
            "catalogue_version": self.catalogue.get("version"),
            "usage": usage(0, 0),
        }
        return JSONResponse(body, headers={CONVERSATION_HEADER: conv})

    @api.post("/v1/roleplay")
    async def roleplay(self, request: Request):
        """``{character_id, conversation_id?, messages?, max_tokens?, temperature?, top_p?, stop?,
        seed?, stream?, greeting_index?}`` -> parsed reply; no messages -> a greeting;
        ``stream: true`` -> SSE events ``text``, ``emotion``, ``image``, ``done`` (``error``)."""
        from troupe.markup import parse_reply

        try:
            data = await self._read_json(request)
            if not data.get("messages"):
                return self._greeting(data, dict(request.headers))
            chat = parse_chat_request({**data, "model": str(data.get("character_id") or "")})
            prep = self._prepare(chat, data.get("character_id"), data, dict(request.headers))
        except GatewayError as e:
            return self._error(e)
        except Exception as e:
            return JSONResponse(self._internal_error(e, "roleplay"), status_code=500)
        if chat.stream:
            return StreamingResponse(
                self._roleplay_sse(prep),
                media_type="text/event-stream",
                headers={CONVERSATION_HEADER: prep["conversation_id"]},
            )
        try:
            out, variant = await self._generate(prep)
        except Exception as e:
            return JSONResponse(self._internal_error(e, "roleplay model call", 503), status_code=503)
        text, finish, mod = self._moderate(out.text, prep["character"])
        parsed = parse_reply(text)
        msgs = split_reply(parsed.text, self.cps)
        if msgs and parsed.images:
            msgs[-1]["images"] = [i.__dict__ for i in parsed.images]
        body = {
            "text": parsed.text,
            "raw": text,
            "emotion": parsed.emotion,
            "clauses": [c.__dict__ for c in parsed.clauses],
            "images": [i.__dict__ for i in parsed.images],
            "markup_valid": parsed.valid,
            "messages": msgs,
            "variant": variant,
            "model_version": out.model_version,
            "finish_reason": finish or out.finish_reason,
            "moderation": mod,
            "character_id": prep["character"].id,
            "conversation_id": prep["conversation_id"],
            "catalogue_version": self.catalogue.get("version"),
            "usage": usage(out.prompt_tokens, out.completion_tokens),
        }
        return JSONResponse(body, headers={CONVERSATION_HEADER: prep["conversation_id"]})

    async def _roleplay_sse(self, prep: dict[str, Any]):
        """SSE of ``/v1/roleplay``: ``text`` ``{text}`` deltas of the spoken text, ``emotion``
        ``{emotion}``, ``image`` ``{prompt, includePerson}``, then ``done`` ``{usage,
        finish_reason, variant, model_version, emotion, markup_valid, moderation,
        conversation_id}``; ``error`` ``{error}`` on a model failure."""
        try:
            async for kind, item in self._stream_reply(prep):
                if kind == "event":
                    if item.kind == "text" and item.text:
                        yield _sse_event("text", {"text": item.text})
                    elif item.kind == "emotion":
                        yield _sse_event("emotion", {"emotion": item.emotion})
                    elif item.kind == "image":
                        yield _sse_event(
                            "image", {"prompt": item.image.prompt, "includePerson": item.image.include_person}
                        )
                elif kind == "error":
                    yield _sse_event("error", item)
                elif kind == "done":
                    parsed = item.pop("parsed")
                    yield _sse_event(
                        "done",
                        {
                            **item,
                            "emotion": parsed.emotion,
                            "markup_valid": parsed.valid,
                            "character_id": prep["character"].id,
                            "conversation_id": prep["conversation_id"],
                        },
                    )
        except Exception as e:
            yield _sse_event("error", self._internal_error(e, "roleplay stream"))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI chat completions; ``model`` is a character id (or ``served_model_name`` +
        ``character_id``). Routing key (:func:`serving.gateway.sticky_key`): ``conversation_id`` /
        ``x-conversation-id``, else the OpenAI ``user`` field / ``x-session-id``, else a random id;
        the key used comes back in ``troupe.conversation_id`` and the ``x-conversation-id`` header.
        Content and markup: :mod:`serving.openai_api` (``gateway.openai_content``)."""
        try:
            data = await self._read_json(request)
            chat = parse_chat_request(data)
            cid = chat.model
            if cid == self.served_name or cid not in self.characters:
                cid = data.get("character_id", cid)
            prep = self._prepare(chat, cid, data, dict(request.headers))
        except GatewayError as e:
            return self._error(e)
        except Exception as e:
            return JSONResponse(self._internal_error(e, "chat completions"), status_code=500)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = now()
        model_id = prep["character"].id
        if chat.stream:
            return StreamingResponse(
                self._sse(prep, rid, created, model_id, chat.include_usage),
                media_type="text/event-stream",
                headers={CONVERSATION_HEADER: prep["conversation_id"]},
            )
        try:
            out, variant = await self._generate(prep)
        except Exception as e:
            return JSONResponse(self._internal_error(e, "chat model call", 503), status_code=503)
        from troupe.markup import parse_reply

        text, finish, mod = self._moderate(out.text, prep["character"])
        parsed = parse_reply(text)
        ext = {
            "variant": variant,
            "model_version": out.model_version,
            "conversation_id": prep["conversation_id"],
            "catalogue_version": self.catalogue.get("version"),
            "markup": self._troupe_markup(parsed),
            "moderation": mod,
        }
        content = parsed.text if self.openai_content == "text" else text
        body = completion_body(
            rid,
            created,
            model_id,
            content,
            finish or out.finish_reason,
            out.prompt_tokens,
            out.completion_tokens,
            ext,
        )
        return JSONResponse(body, headers={CONVERSATION_HEADER: prep["conversation_id"]})

    async def _sse(self, prep: dict[str, Any], rid: str, created: int, model_id: str, include_usage: bool):
        """OpenAI chunks: the role, content deltas (spoken text, or whole tags in ``raw`` mode),
        emotion/image events in the chunks' ``troupe`` field, a last chunk with ``finish_reason``,
        the usage chunk when ``stream_options.include_usage``, ``[DONE]``."""

        def chunk(delta, finish=None, troupe=None, usage_counts=None) -> str:
            return _sse_data(chunk_body(rid, created, model_id, delta, finish, troupe, usage_counts))

        yield chunk({"role": "assistant", "content": ""})
        raw_mode = self.openai_content == "raw"
        try:
            async for kind, item in self._stream_reply(prep):
                if kind == "raw" and raw_mode:
                    yield chunk({"content": item})
                elif kind == "event" and item.kind == "text" and item.text and not raw_mode:
                    yield chunk({"content": item.text})
                elif kind == "event" and item.kind == "emotion":
                    yield chunk({}, None, {"emotion": item.emotion})
                elif kind == "event" and item.kind == "image":
                    yield chunk({}, None, {"image": item.image.__dict__})
                elif kind == "error":
                    yield _sse_data(item)
                    yield _sse_data("[DONE]")
                    return
                elif kind == "done":
                    parsed = item["parsed"]
                    ext = {
                        "variant": item["variant"],
                        "model_version": item["model_version"],
                        "conversation_id": prep["conversation_id"],
                        "catalogue_version": self.catalogue.get("version"),
                        "markup": self._troupe_markup(parsed),
                        "moderation": item["moderation"],
                    }
                    yield chunk({}, item["finish_reason"], ext)
                    if include_usage:
                        u = item["usage"]
                        yield chunk(None, usage_counts=(u["prompt_tokens"], u["completion_tokens"]))
        except Exception as e:
            yield _sse_data(self._internal_error(e, "chat stream"))
        yield _sse_data("[DONE]")

    @api.post(contract.FEEDBACK_ENDPOINT)
    async def feedback(self, request: Request):
        """``{conversation_id, character_id, rating: up|down, message_id? | reply?, regenerated_from?,
        model_version?, messages?}`` (:func:`serving.contract.parse_feedback`) -> 201 ``{"id"}``,
        stored in the preference store (the write runs in a worker thread, off the event loop).
        Errors: 401/429/413 as every POST, 400 naming the field, 404 unknown character, 501 when
        ``feedback_db_url`` is not set."""
        import asyncio

        try:
            data = await self._read_json(request)
            if not self.feedback_db_url:
                raise GatewayError(
                    501,
                    "feedback_disabled",
                    f"no preference store configured: set the serving arg {contract.FEEDBACK_DB_URL!r} "
                    "(params feedback.db_url)",
                )
            try:
                event = contract.parse_feedback(data)
            except contract.FeedbackFieldError as e:
                raise GatewayError(400, "invalid_request", str(e), e.field) from None
            self._character(event.character_id)
        except GatewayError as e:
            return self._error(e)
        try:
            if self._feedback_store is None:
                from troupe.feedback.store import Store

                self._feedback_store = await asyncio.to_thread(Store, self.feedback_db_url)
            row = await asyncio.to_thread(self._feedback_store.add_event, event.to_dict())
        except Exception as e:
            return JSONResponse(self._internal_error(e, "feedback store"), status_code=500)
        return JSONResponse({"id": row, "stored": True}, status_code=201)

    @api.get(contract.ENGINE_ENDPOINT)
    async def engine(self, request: Request):
        """``{variant: replica state}`` of the stable (and canary) model: ``Model.info()`` of the
        replica the handle picks (one of ``num_replicas``); vLLM variants report their version label."""
        try:
            check_api_key(dict(request.headers), self.keys, self.require_key)
        except GatewayError as e:
            return self._error(e)
        out: dict[str, Any] = {}
        for variant, handle in self.handles.items():
            if handle is None:
                continue
            if self.vllm:
                out[variant] = {"backend": "vllm", "model_version": self.labels[variant]}
            else:
                out[variant] = await handle.info.remote()
        return out

    @api.get("/v1/rollout/stats")
    async def rollout_stats(self, request: Request, since: float = 0.0):
        """Per-variant counters since ``since`` (unix seconds): requests, errors, rates, latency p50/p95."""
        try:
            check_api_key(dict(request.headers), self.keys, self.require_key)
        except GatewayError as e:
            return self._error(e)
        return await self.stats(since)

    async def stats(self, since: float = 0.0) -> dict[str, Any]:
        """The JSON served by ``GET /v1/rollout/stats``: the Router settings of this replica and the
        variants' counters over ALL Router replicas since ``since`` (the :class:`RolloutStats`
        actor; :func:`serving.gateway.variant_summary`)."""
        variants = await self._stats.summary.remote(since)
        return {
            "env": self.env,
            "now": time.time(),
            "since": since,
            contract.CANARY_WEIGHT: self.router.canary_weight_percent,
            "canary_available": self.handles[contract.CANARY] is not None,
            "rolled_back": self.rolled_back,
            "rollback_reason": self.rollback_reason,
            "pinned_conversations": self.router.pinned,
            "model_calls": self.model_calls,
            "model_versions": dict(self.versions),
            "catalogue": self._catalogue_info(),
            "router_replica": serve.get_replica_context().replica_id.unique_id,
            "variants": variants,
        }


def _actor_options(mcfg: dict[str, Any]) -> dict[str, Any]:
    """``ray_actor_options`` of a model replica from the ``model`` section (CPUs, GPUs, resources)."""
    opts: dict[str, Any] = {"num_cpus": float(mcfg.get("num_cpus", 1))}
    if float(mcfg.get("num_gpus") or 0):
        opts["num_gpus"] = float(mcfg["num_gpus"])
    if mcfg.get("resources"):
        opts["resources"] = {k: float(v) for k, v in mcfg["resources"].items()}
    return opts


def _model_app(variant: str, uri: str, cfg: dict[str, Any], mcfg: dict[str, Any]):
    if cfg.get("backend") == "vllm":  # optional `gpu` extra; imported only here
        from ray.serve.llm import LLMConfig, build_llm_deployment

        from serving.backend import vllm_engine_config
        from troupe.registry import model_source

        source = model_source(uri, cfg.get("mlflow_tracking_uri") or None)  # replicas download it
        vcfg = {"served_model_name": cfg["gateway"].get("served_model_name", "troupe"), **cfg.get("vllm", {})}
        return build_llm_deployment(
            LLMConfig(**vllm_engine_config(source, vcfg, mcfg)), name_prefix=f"{variant}-"
        )
    return Model.options(
        name=variant, num_replicas=int(mcfg.get("num_replicas", 1)), ray_actor_options=_actor_options(mcfg)
    ).bind(uri, cfg.get("mlflow_tracking_uri") or None, mcfg)


def build_app(args: dict[str, Any]):
    """Application builder (``serving.app:build_app``) for ``serve run``/``serve deploy``/RayService.

    Args:
        args: ``env`` (test|production; selects ``configs/serving/<env>.yaml``), optional ``config``
            path, ``mlflow_tracking_uri``, ``model_name``, ``stable_alias``, ``canary_alias``,
            ``canary_weight_percent`` (initial Router weight, percent), ``route_prefix``
            (informational; the route prefix is set by the deploy config),
            ``model_uri``/``stable_model_uri``/``canary_model_uri`` (local dir or
            ``models:/name/<version>`` / ``models:/name@alias``), and any serving-config section to
            override (``model`` incl. ``num_replicas``/``num_cpus``/``num_gpus``/``resources``,
            ``canary_model``, ``gateway``, ``router``, ``vllm``, ``characters``, ``backend``).
            Unknown keys are errors (:func:`check_args`).

    Returns:
        A bound Ray Serve application whose ingress is the ``Router`` deployment.

    Raises:
        ValueError: unknown args or no stable model named; FileNotFoundError / ConfigError: config,
            model version or characters missing.
    """
    cfg = load_serving_config(args)
    stable_uri, canary_uri = pinned_models(cfg)
    cfg[contract.STABLE_MODEL_URI], cfg[contract.CANARY_MODEL_URI] = stable_uri, canary_uri
    catalogue = str(cfg.get(contract.CATALOGUE_URI) or "")
    gw = cfg.get("gateway") or {}
    Limits.from_dict(gw.get("limits"))  # bad gateway settings fail at build time, naming the key
    Moderation.from_dict(gw.get("moderation"))
    if gw.get("openai_content", "text") not in OPENAI_CONTENT_MODES:
        raise ValueError(
            f"gateway.openai_content: {gw.get('openai_content')!r} is not one of {OPENAI_CONTENT_MODES}"
        )
    user_config = contract.router_user_config(cfg.get(contract.CANARY_WEIGHT, 0.0) if canary_uri else 0.0)
    if catalogue:  # fail at build time, not on the first request
        from troupe.characters.catalogue import load_catalogue

        cat = load_catalogue(catalogue if "://" in catalogue else str(repo_path(catalogue)))
        user_config.update({contract.CATALOGUE_URI: catalogue, contract.CATALOGUE_VERSION: cat.version})
    else:
        serving_characters(cfg, stable_uri, canary_uri)
    stable = _model_app(contract.STABLE, stable_uri, cfg, cfg["model"])
    canary = None
    if canary_uri:
        canary = _model_app(
            contract.CANARY, canary_uri, cfg, deep_merge(cfg["model"], cfg.get("canary_model") or {})
        )
    else:
        cfg[contract.CANARY_WEIGHT] = 0.0
    rcfg = cfg.get("router", {})
    return Router.options(
        ray_actor_options={"num_cpus": float(rcfg.get("num_cpus", 0))},
        user_config=user_config,
    ).bind(stable, canary, cfg)
