"""Shared helpers for the serving tests: a tiny model, a characters file, a small local Ray + Serve."""

from __future__ import annotations

import json
import os
from pathlib import Path

from serving import contract

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHARACTERS = [
    {
        "id": "bob",
        "name": "Bob",
        "language": "en",
        "profile": {"job": "sailor"},
        "style": "gruff",
        "examples": ["Ahoy, matey!"],
    },
    {
        "id": "daiyu",
        "name": "林黛玉",
        "language": "zh",
        "profile": {"出身": "姑苏林家"},
        "style": "多愁善感",
        "examples": ["你又来了。"],
    },
]
TINY_CACHE = Path(os.environ.get("TROUPE_TEST_TINY", "/tmp/troupe-test-tiny"))


def tiny_model() -> Path:
    """The tiny random test model dir (built once per machine, reused across test modules)."""
    if not (TINY_CACHE / "model.safetensors").is_file():
        from troupe.modeling import prepare_base

        prepare_base("tiny-random", TINY_CACHE)
    return TINY_CACHE


def characters_file(d: Path) -> Path:
    p = d / "characters.jsonl"
    p.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in CHARACTERS), encoding="utf-8")
    return p


def start_cluster(port: int) -> None:
    """A 2-CPU local Ray cluster with Serve HTTP on 127.0.0.1:port (no dashboard)."""
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def stop_cluster() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def make_app(
    env: str, chars: Path, model: Path, prefix: str, canary: Path | None = None, weight: float = 0.0, **extra
) -> dict:
    """A declarative app entry like troupe.deploy.app_config, for local dirs and small resources."""
    extra.setdefault("gateway", {}).setdefault("require_api_key", False)
    args = {
        "env": env,
        contract.STABLE_MODEL_URI: str(model),
        "characters": str(chars),
        contract.CANARY_WEIGHT: weight,
        "model": {"num_cpus": 0.25, "max_new_tokens": 8, "temperature": 0},
        **extra,
    }
    if canary is not None:
        args[contract.CANARY_MODEL_URI] = str(canary)
    return {
        "name": contract.app_name(env),
        "route_prefix": prefix,
        "import_path": contract.IMPORT_PATH,
        "args": args,
        "deployments": [{"name": contract.ROUTER, "user_config": contract.router_user_config(weight)}],
    }
