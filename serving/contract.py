"""The serving contract: every name, key and unit that crosses a process boundary, in one place.

The Serve application (:mod:`serving.app`), ``troupe deploy`` / ``troupe rollout`` (which write
Serve configs or patch a RayService's ``serveConfigV2``), ``troupe registry register`` (which stores
the characters with a model version) and the Helm chart ``charts/troupe-serving`` (checked by
``tests/test_charts.py``, which renders it and compares it with this module and the built app) all
take these names from here. Helm cannot import Python, so the chart spells them out; the tests fail
when the two drift.

Units are part of the key: the canary share is ``canary_weight_percent`` (0-100) everywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: Application builder of every Serve application (``serveConfigV2`` ``import_path``).
IMPORT_PATH = "serving.app:build_app"

#: Serve deployment names of the built application. Only :data:`ROUTER` exists in every build
#: (``canary`` only when a canary model is configured), so a ``serveConfigV2`` may override the
#: Router alone; model replica options travel in the application ``args`` (``model`` section).
ROUTER = "Router"
STABLE = "stable"
CANARY = "canary"
VARIANTS = (STABLE, CANARY)
ALWAYS_DEPLOYED = (ROUTER,)

#: Router ``user_config`` keys. The canary weight is a percent of conversations in [0, 100].
CANARY_WEIGHT = "canary_weight_percent"
CANARY_WEIGHT_UNIT = "percent"
ROLLED_BACK = "rolled_back"
ROLLBACK_REASON = "reason"
#: Router ``user_config`` key and application arg: the character catalogue the Router serves (a
#: local path or ``s3://`` URI of a catalogue file, :mod:`troupe.characters.catalogue`). Changing it
#: in ``user_config`` reloads the characters in the Router replicas; model replicas keep running.
CATALOGUE_URI = "catalogue_uri"
#: Router ``user_config`` key: the content version (:func:`troupe.characters.catalogue.catalogue_version`)
#: of the catalogue the deployer read. Serve calls ``reconfigure`` only when ``user_config`` changes,
#: so re-applying the same URI with new content changes this key and the Router reloads.
CATALOGUE_VERSION = "catalogue_version"
USER_CONFIG_KEYS = frozenset({CANARY_WEIGHT, ROLLED_BACK, ROLLBACK_REASON, CATALOGUE_URI, CATALOGUE_VERSION})

#: Application args naming the models; ``models:/<name>/<version>`` pins a version by number.
STABLE_MODEL_URI = "stable_model_uri"
CANARY_MODEL_URI = "canary_model_uri"

#: API keys: SHA-256 hex hashes (one a line) in a file mounted from a Secret, or comma-separated
#: in an environment variable. The chart mounts ``apiKeys.existingSecret`` read-only at
#: :data:`API_KEYS_DIR`; the app reads :data:`API_KEYS_FILE` (arg ``gateway.api_keys_file``).
API_KEYS_ENV = "TROUPE_API_KEYS_SHA256"
API_KEYS_DIR = "/etc/troupe/api-keys"
API_KEYS_SECRET_KEY = "api_keys_sha256"
API_KEYS_FILE = f"{API_KEYS_DIR}/{API_KEYS_SECRET_KEY}"

#: Characters travel with the model version: ``troupe registry register`` logs the catalogue as
#: this artifact of its run and tags the version with the artifact's URI and SHA-256.
CHARACTERS_FILE = "characters.jsonl"
CHARACTERS_URI_TAG = "troupe.characters_uri"
CHARACTERS_SHA256_TAG = "troupe.characters_sha256"
#: Model-version tags naming the character catalogue a version was trained and evaluated with
#: (version = the catalogue's content hash, :func:`troupe.characters.catalogue.catalogue_version`).
CATALOGUE_VERSION_TAG = "troupe.catalogue_version"
CATALOGUE_URI_TAG = "troupe.catalogue_uri"

#: Ray namespace of Troupe's named actors: the rollout stats actor of each application (one named,
#: detached actor aggregates the events of all Router replicas, ``serving.app.RolloutStats``;
#: ``GET <prefix>/v1/rollout/stats?since=<unix s>`` serves them with the Router settings) and the
#: lock that serialises Serve config writes (``troupe.deploy.serve_config_lock``).
RAY_NAMESPACE = "troupe"
SERVE_CONFIG_LOCK = "troupe-serve-config-lock"
STATS_ENDPOINT = "/v1/rollout/stats"
#: ``GET <prefix>/v1/engine`` (API key): each model variant's replica state as the Router's handle
#: reaches it (``serving.model.Model.info``: replica id, version, prefix cache, decode engine, the
#: last prompt's message and role-marker counts; for vLLM only the version label).
ENGINE_ENDPOINT = "/v1/engine"

#: Serving environments (``configs/serving/<env>.yaml``, chart value ``environment``).
ENVS = ("test", "production")


def app_name(env: str) -> str:
    """Serve application name of an environment: ``troupe-test``, ``troupe-production``."""
    return f"troupe-{env}"


def stats_actor_name(app: str) -> str:
    """Name of an application's rollout stats actor (namespace :data:`RAY_NAMESPACE`)."""
    return f"troupe-stats-{app}"


def model_version_uri(model_name: str, version: str | int) -> str:
    """``models:/<name>/<version>``: a registered version pinned by number."""
    return f"models:/{model_name}/{version}"


def check_weight(value: Any, where: str = CANARY_WEIGHT) -> float:
    """A canary weight in percent as a float.

    Raises:
        ValueError: not a number or outside [0, 100] (the message names ``where`` and the unit).
    """
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number (percent of conversations, 0-100)") from None
    if math.isnan(w) or not 0.0 <= w <= 100.0:
        raise ValueError(f"{where}: {w} is outside 0-100 (the unit is percent of conversations)")
    return w


def check_user_config(user_config: dict[str, Any]) -> dict[str, Any]:
    """Validate a Router ``user_config``; returns it.

    Raises:
        ValueError: an unknown key (e.g. a unit-less ``canary_weight``) or a weight outside 0-100.
    """
    unknown = set(user_config) - USER_CONFIG_KEYS
    if unknown:
        raise ValueError(
            f"Router user_config: unknown keys {sorted(unknown)} (known: {sorted(USER_CONFIG_KEYS)}; "
            f"the canary weight is {CANARY_WEIGHT!r}, in {CANARY_WEIGHT_UNIT})"
        )
    if CANARY_WEIGHT in user_config:
        check_weight(user_config[CANARY_WEIGHT], f"Router user_config.{CANARY_WEIGHT}")
    return user_config


def merged_user_config(current: dict[str, Any] | None, update: dict[str, Any]) -> dict[str, Any]:
    """The Router ``user_config`` after ``update``: a rollout writes the canary keys only, so the
    catalogue keys (:data:`CATALOGUE_URI`, :data:`CATALOGUE_VERSION`) of ``current`` stay unless
    ``update`` sets them (a weight change must not revert the Router to the app args' catalogue)."""
    keep = {
        k: v
        for k, v in (current or {}).items()
        if k in (CATALOGUE_URI, CATALOGUE_VERSION) and k not in update
    }
    return {**keep, **update}


def router_user_config(weight_percent: float, rolled_back: bool = False, reason: str = "") -> dict[str, Any]:
    """The Router ``user_config`` for a canary weight (percent), optionally marking a rollback."""
    out: dict[str, Any] = {CANARY_WEIGHT: check_weight(weight_percent)}
    if rolled_back:
        out.update({ROLLED_BACK: True, ROLLBACK_REASON: reason[:500]})
    return out


# -- Router -> model replica (a Ray actor call: both sides import these types) ------------------------
FinishReason = Literal["stop", "length"]
#: ``stop``: the model ended the reply (EOS) or a stop string matched; ``length``: ``max_new_tokens``
#: cut it (OpenAI's ``finish_reason`` values).
FINISH_STOP: FinishReason = "stop"
FINISH_LENGTH: FinishReason = "length"


@dataclass(frozen=True)
class ModelRequest:
    """One reply to generate, as the Router sends it to a model replica.

    Fields:
        messages: the chat to continue, ``[{"role", "content"}]``, the rendered persona card first
            (system). Client text in it is already neutralised (no chat-template special tokens).
        max_new_tokens: cap on generated tokens; None = the replica's configured default.
        temperature: sampling temperature (0 = greedy); None = the replica's default.
        top_p: nucleus sampling mass in (0, 1]; None = 1.
        stop: strings that end the reply; the reply excludes the matched stop string
            (OpenAI semantics) and ``finish_reason`` is ``"stop"``.
        seed: sampling seed; the same request with the same seed gives the same reply on one replica.
        cache_key: key of the persona-card KV prefix cache (the character id).
        prefill: assistant text the reply continues (SillyTavern's "continue"); not repeated in the
            reply.
        adapter: the LoRA adapter the Router resolved from the character
            (:attr:`troupe.contract.Character.adapter`: a local path or ``s3://`` URI of a PEFT
            adapter dir); None = the base model. The transformers replica loads it on first use
            (:mod:`troupe.adapters`); the vLLM backend asks Ray Serve LLM for ``<served>:<lora id>``
            (:func:`serving.backend.vllm_lora_model`).
    """

    messages: list[dict[str, str]]
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    cache_key: str | None = None
    prefill: str = ""
    adapter: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelReply:
    """A finished reply from a model replica.

    Fields:
        text: the generated reply (raw, with markup tags; without the stop string).
        finish_reason: :data:`FINISH_STOP` or :data:`FINISH_LENGTH`.
        prompt_tokens: tokens of this request's prompt (no batch padding), incl. a cached prefix.
        completion_tokens: tokens generated for this request (up to the stop point).
        prefix_cached: whether the persona-card prefix came from the KV cache.
        model_version: version label of the replica's model (``models:/name/3`` -> ``3``).
        batch_size: requests decoded together with this one (1 when alone).
    """

    text: str
    finish_reason: FinishReason = FINISH_STOP
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefix_cached: bool = False
    model_version: str = ""
    batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StreamDelta:
    """One piece of a streamed reply. ``text`` never ends inside a UTF-8 character. The last delta
    of a stream has ``finish_reason`` set and the token counts of the whole reply."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- production feedback (``POST <prefix>/v1/feedback``; :mod:`troupe.feedback.store` keeps it) -------
FEEDBACK_ENDPOINT = "/v1/feedback"
#: Application arg: SQLAlchemy URL of the preference store (``params.feedback.db_url``; SQLite
#: locally, PostgreSQL in production). Empty = the URL in env :data:`FEEDBACK_DB_URL_ENV` (the serving
#: chart sets it from a Secret, so database credentials never appear in serveConfigV2); neither = the
#: endpoint answers 501 naming this arg.
FEEDBACK_DB_URL = "feedback_db_url"
FEEDBACK_DB_URL_ENV = "TROUPE_FEEDBACK_DB_URL"
FEEDBACK_RATINGS = ("up", "down")
FEEDBACK_MAX_CONTEXT_MESSAGES = 200


@dataclass(frozen=True)
class FeedbackEvent:
    """A user's thumbs up/down on one reply, as ``POST /v1/feedback`` takes it.

    Fields:
        conversation_id: the conversation (``X-Conversation-Id`` of the reply).
        character_id: the character that replied (a served character id).
        rating: ``up`` or ``down``.
        message_id: the client's id of the rated message, when it has one.
        reply: the rated reply's text (one of ``message_id`` / ``reply`` is required).
        regenerated_from: message id of the reply this one regenerated (the user asked again).
        model_version: ``model_version`` of the reply (``/v1/roleplay`` returns it).
        messages: optional context, ``[{"role", "content"}]`` ending before the rated reply.
    """

    conversation_id: str
    character_id: str
    rating: str
    message_id: str | None = None
    reply: str = ""
    regenerated_from: str | None = None
    model_version: str = ""
    messages: list[dict[str, str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FeedbackFieldError(ValueError):
    """A bad ``/v1/feedback`` body; ``field`` names the offending key."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def parse_feedback(data: dict[str, Any]) -> FeedbackEvent:
    """Validate a ``/v1/feedback`` JSON body into a :class:`FeedbackEvent`.

    Raises:
        FeedbackFieldError: a missing or ill-typed field, a rating other than up/down, neither
            ``message_id`` nor ``reply``, unknown keys, or a malformed ``messages`` list.
    """

    def text(key: str, required: bool = False, limit: int = 200) -> str | None:
        v = data.get(key)
        if v is None or v == "":
            if required:
                raise FeedbackFieldError(key, "required")
            return None
        if not isinstance(v, str):
            raise FeedbackFieldError(key, f"must be a string, got {type(v).__name__}")
        if len(v) > limit:
            raise FeedbackFieldError(key, f"longer than {limit} characters")
        return v

    known = {f for f in FeedbackEvent.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FeedbackFieldError(unknown[0], f"unknown key (known: {sorted(known)})")
    rating = text("rating", True)
    if rating not in FEEDBACK_RATINGS:
        raise FeedbackFieldError("rating", f"{rating!r} is not one of {FEEDBACK_RATINGS}")
    message_id, reply = text("message_id"), text("reply", limit=20000)
    if message_id is None and reply is None:
        raise FeedbackFieldError("message_id", "give message_id or reply (the rated message)")
    msgs = data.get("messages")
    if msgs is not None:
        if not isinstance(msgs, list) or len(msgs) > FEEDBACK_MAX_CONTEXT_MESSAGES:
            raise FeedbackFieldError("messages", f"must be a list of <= {FEEDBACK_MAX_CONTEXT_MESSAGES}")
        for i, m in enumerate(msgs):
            ok = isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            if not ok or not isinstance(m.get("content"), str):
                raise FeedbackFieldError(
                    f"messages.{i}", "must be {role: system|user|assistant, content: str}"
                )
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    return FeedbackEvent(
        conversation_id=text("conversation_id", True) or "",
        character_id=text("character_id", True) or "",
        rating=rating,
        message_id=message_id,
        reply=reply or "",
        regenerated_from=text("regenerated_from"),
        model_version=text("model_version") or "",
        messages=msgs,
    )
