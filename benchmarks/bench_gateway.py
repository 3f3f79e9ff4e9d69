"""Gateway + router overhead vs a direct path to the same model deployment (loopback HTTP, CPU).

    python benchmarks/bench_gateway.py [--requests 200] [--concurrency 8]

Two apps on one local Serve instance share nothing but the model code:
  * gateway: HTTP -> Router (API key, limits, persona card, sticky routing, live checks, metrics) -> Model
  * direct:  HTTP -> thin forwarder (pre-rendered prompt, no checks) -> Model
Both generate 1 token with the tiny random model, so the difference is the gateway's own cost.
Prints p50/p99 latency (ms) and throughput (req/s) per path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402

from serving.contract import ModelRequest  # noqa: E402

CHAR = {"id": "bob", "name": "Bob", "language": "en", "profile": {"job": "sailor"}, "examples": ["Ahoy!"]}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Direct:
    """Forwards the posted ModelRequest fields to the Model deployment, nothing else."""

    def __init__(self, model) -> None:
        self.model = model

    async def __call__(self, request: Request) -> dict:
        body = json.loads(await request.body())
        req = ModelRequest(**{**body, "stop": tuple(body.get("stop") or ())})
        return (await self.model.generate.remote(req)).to_dict()


async def _load(url: str, body: dict, n: int, conc: int, headers: dict) -> tuple[list[float], float]:
    import httpx

    lat: list[float] = []
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(timeout=120) as c:

        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await c.post(url, json={**body, "conversation_id": f"b{i}"}, headers=headers)
                r.raise_for_status()
                lat.append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return lat, time.perf_counter() - t0


def _report(name: str, lat: list[float], wall: float) -> None:
    s = sorted(lat)
    p99 = s[min(len(s) - 1, int(0.99 * len(s)))]
    print(
        f"{name:8s} n={len(s)} p50={statistics.median(s):7.1f} ms  p99={p99:7.1f} ms  "
        f"throughput={len(s) / wall:6.1f} req/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()

    import hashlib

    import ray

    from serving.model import Model
    from troupe.contract import Character
    from troupe.deploy import apply_apps
    from troupe.persona import render_system_prompt

    tmp = Path(tempfile.mkdtemp())
    model = a.model
    if model is None:
        from troupe.modeling import prepare_base

        model = str(tmp / "tiny")
        prepare_base("tiny-random", model)
    (tmp / "characters.jsonl").write_text(json.dumps(CHAR) + "\n")
    key = "bench-key"
    mcfg = {"num_cpus": 0.5, "max_new_tokens": 1, "temperature": 0, "max_batch_size": 8}
    port = 8411
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        apply_apps(
            [
                {
                    "name": "bench-gw",
                    "route_prefix": "/gw",
                    "import_path": "serving.app:build_app",
                    "args": {
                        "env": "test",
                        "stable_model_uri": model,
                        "characters": str(tmp / "characters.jsonl"),
                        "model": mcfg,
                        "gateway": {"api_keys_sha256": [hashlib.sha256(key.encode()).hexdigest()]},
                    },
                }
            ],
            "127.0.0.1",
            port,
        )
        serve.run(
            Direct.bind(
                Model.options(name="direct-model", ray_actor_options={"num_cpus": 0.5}).bind(
                    model, None, mcfg
                )
            ),
            name="bench-direct",
            route_prefix="/direct",
        )
        msgs = [{"role": "user", "content": "hello, how are you today?"}]
        gw_body = {"character_id": "bob", "messages": msgs, "max_tokens": 1}
        system = render_system_prompt(Character(**CHAR))
        direct_body = {
            "messages": [{"role": "system", "content": system}, *msgs],
            "cache_key": "bob",
            "max_new_tokens": 1,
        }
        auth = {"Authorization": f"Bearer {key}"}
        base = f"http://127.0.0.1:{port}"
        asyncio.run(_load(f"{base}/gw/v1/roleplay", gw_body, 20, 4, auth))  # warm-up
        asyncio.run(_load(f"{base}/direct", direct_body, 20, 4, {}))
        print(f"requests={a.requests} concurrency={a.concurrency} (2 CPU cores, tiny model, 1 new token)")
        for _ in range(2):
            _report(
                "direct", *asyncio.run(_load(f"{base}/direct", direct_body, a.requests, a.concurrency, {}))
            )
            _report(
                "gateway",
                *asyncio.run(_load(f"{base}/gw/v1/roleplay", gw_body, a.requests, a.concurrency, auth)),
            )
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
