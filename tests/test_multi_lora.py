"""Multi-LoRA serving: one base model, per-character PEFT adapters chosen per request from the catalogue.

Two LoRA adapters are made on the tiny random model (random non-zero ``lora_B``, so each changes the
greedy reply) and saved as PEFT adapter dirs; one is also copied into a moto S3 bucket. Without Ray:
:class:`troupe.generation.DecodeEngine` decodes rows of both adapters and the base model in one batch
(PEFT mixed-batch ``adapter_names``), each equal to what a local ``PeftModel`` with that adapter
generates; the persona-card KV cache is keyed by (character, adapter); ``max_adapters`` is a hard LRU
bound (rows wait for a slot). Over HTTP (a Ray Serve app, never a Serve handle from this process):
characters of a catalogue answer with their own adapters, ``/v1/engine`` shows the adapters loaded in
LRU order and eviction at ``max_adapters: 1``. The vLLM path is only checked as the config it builds
(no GPU or vLLM here).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.serve_fixtures import make_app, start_cluster, stop_cluster, tiny_model

pytestmark = pytest.mark.timeout(600)

SYSTEM = "You are Bob, a sailor on the northern sea. " * 10
USER = "hello there, sailor"
MAX_NEW = 8


def make_adapter(out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter dir for the tiny model: rank 4 on attention and MLP projections, ``lora_B``
    drawn N(0, 0.5) (PEFT initialises it to zero, which would leave the model unchanged)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from troupe.modeling import load_model

    model, _ = load_model(tiny_model())
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    peft.save_pretrained(str(out))
    return out


def reference(adapter: Path | None, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    """Greedy ids and reply text of plain ``generate`` on a fresh base model (with ``adapter`` through
    ``PeftModel.from_pretrained``): the engine, the batching and the cache are not involved."""
    import torch
    from peft import PeftModel

    from troupe.generation import finish_reply
    from troupe.modeling import load_model

    model, tok = load_model(tiny_model())
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    text, ids, _ = finish_reply(tok, out[0, enc["input_ids"].shape[1] :].tolist(), tok.eos_token_id)
    return ids, text


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(d / "a", 1), "b": make_adapter(d / "b", 2)}


def chat() -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]


# -- engine level, no Ray ---------------------------------------------------------------------------
def test_one_batch_mixes_adapters_and_each_row_equals_its_peft_model(adapters):
    """Base, adapter a and adapter b rows of one character decode in one batch (batch size 3); each
    reply equals the row decoded alone and plain ``generate`` of a PeftModel with that adapter (the
    base row: of the unwrapped base model), and the three replies differ."""
    from troupe.generation import GenRequest, PrefixGenerator
    from troupe.modeling import load_model

    model, tok = load_model(tiny_model())
    pg = PrefixGenerator(model, tok, prefix_cache_bytes=0, prefix_cache_tokens=20480, max_adapters=2)
    uris = [None, str(adapters["a"]), str(adapters["b"])]
    reqs = [GenRequest(chat(), MAX_NEW, 0.0, "bob", adapter=u) for u in uris]
    together = pg.generate(reqs)
    assert [r.batch_size for r in together] == [3, 3, 3]
    refs = [reference(None, chat()), reference(adapters["a"], chat()), reference(adapters["b"], chat())]
    assert [r.token_ids for r in together] == [ids for ids, _ in refs]
    assert [r.text for r in together] == [text for _, text in refs]
    assert len({tuple(r.token_ids) for r in together}) == 3, "the adapters must change the reply"
    alone = [pg.generate([r])[0] for r in reqs]
    assert [r.token_ids for r in alone] == [r.token_ids for r in together]
    assert pg.adapters.stats()["loaded"] == uris[1:] and pg.adapters.loads == 2


def test_prefix_cache_is_keyed_by_character_and_adapter(adapters):
    """One character's card is cached once per adapter (the KV differs per adapter); a repeat of a
    (character, adapter) pair is a hit with the same reply; the base entry keeps its plain key."""
    import torch

    from troupe.generation import GenRequest, PrefixGenerator, prefix_key
    from troupe.modeling import load_model

    a, b = str(adapters["a"]), str(adapters["b"])
    assert prefix_key("bob", None) == "bob" and prefix_key("bob", a) == f"bob|{a}"
    assert prefix_key(None, a) is None
    model, tok = load_model(tiny_model())
    pg = PrefixGenerator(model, tok, prefix_cache_bytes=0, prefix_cache_tokens=20480, max_adapters=2)
    first = pg.generate([GenRequest(chat(), MAX_NEW, 0.0, "bob", adapter=u) for u in (None, a, b)])
    assert not any(r.prefix_cached for r in first)
    assert sorted(pg.cache.keys()) == sorted(["bob", f"bob|{a}", f"bob|{b}"])
    kv = {k: pg.cache._items[k][2] for k in pg.cache.keys()}
    # layer 0 values (v_proj carries LoRA; layer 0 keys do not change: k_proj has none)
    assert not torch.allclose(kv["bob"][0][1], kv[f"bob|{a}"][0][1])
    assert not torch.allclose(kv[f"bob|{a}"][0][1], kv[f"bob|{b}"][0][1])
    assert torch.equal(kv["bob"][0][0], kv[f"bob|{a}"][0][0])
    again = pg.generate([GenRequest(chat(), MAX_NEW, 0.0, "bob", adapter=a)])[0]
    assert again.prefix_cached and again.token_ids == first[1].token_ids
    assert pg.cache.stats()["hits"] == 1


def test_max_adapters_is_a_hard_lru_bound(adapters):
    """``max_adapters: 1`` and two adapters requested at once: the second row waits until the first
    finishes and its adapter is evicted; both replies are right; never two adapters loaded."""
    from serving.backend import GenRequest, TransformersBackend

    a, b = str(adapters["a"]), str(adapters["b"])
    be = TransformersBackend(tiny_model(), prefix_cache_bytes=0, prefix_cache_tokens=20480, max_adapters=1)
    try:
        ra, rb, base = (GenRequest(chat(), MAX_NEW, 0.0, "bob", adapter=u) for u in (a, b, None))
        out = be.generate([ra, rb, base])
        assert [r.token_ids for r in out] == [
            reference(adapters["a"], chat())[0],
            reference(adapters["b"], chat())[0],
            reference(None, chat())[0],
        ]
        st = be.info()["adapters"]
        assert st["peak"] == 1 and st["loads"] == 2 and st["evictions"] == 1 and st["loaded"] == [b]
        assert out[1].batch_size <= 2  # b did not decode beside a
        be.generate([ra])
        assert be.info()["adapters"]["loaded"] == [a] and be.info()["adapters"]["evictions"] == 2
    finally:
        be.engine.close()


def test_adapter_errors_are_per_request(adapters, tmp_path):
    """A missing adapter fails its own request only (a base request beside it still answers); an
    adapter on a model without adapters is a named ValueError."""
    from serving.backend import GenRequest, TransformersBackend
    from troupe.storage import StorageError

    be = TransformersBackend(tiny_model(), prefix_cache_bytes=0, prefix_cache_tokens=20480, max_adapters=2)
    try:
        events: dict[int, list] = {0: [], 1: []}
        done = __import__("threading").Semaphore(0)

        def emit_for(i):
            def emit(kind, value):
                if kind != "delta":
                    events[i].append((kind, value))
                    done.release()

            return emit

        be.submit(GenRequest(chat(), MAX_NEW, 0.0, "bob", adapter=str(tmp_path / "nope")), emit_for(0))
        be.submit(GenRequest(chat(), MAX_NEW, 0.0, "bob"), emit_for(1))
        done.acquire(timeout=120)
        done.acquire(timeout=120)
        assert events[0][0][0] == "error" and isinstance(events[0][0][1], StorageError)
        assert events[1][0][0] == "done" and events[1][0][1].token_ids == reference(None, chat())[0]
    finally:
        be.engine.close()
    plain = TransformersBackend(tiny_model(), prefix_cache_bytes=0)
    with pytest.raises(ValueError, match="max_adapters"):
        plain.generate([GenRequest(chat(), 4, 0.0, "bob", adapter=str(adapters["a"]))])
    assert plain.info()["adapters"] is None


def test_character_adapter_field_keeps_old_records_byte_identical():
    from troupe.contract import Character

    rec = {"id": "bob", "name": "Bob", "language": "en", "profile": {"job": "sailor"}}
    plain = Character(**rec)
    assert "adapter" not in plain.model_dump(mode="json")
    assert plain.model_dump_json() == Character.model_validate_json(plain.model_dump_json()).model_dump_json()
    with_adapter = Character(**rec, adapter="s3://b/adapters/bob")
    d = with_adapter.model_dump(mode="json")
    assert d["adapter"] == "s3://b/adapters/bob" and Character(**d) == with_adapter
    from troupe.persona import render_system_prompt

    assert render_system_prompt(with_adapter) == render_system_prompt(plain)  # never in a prompt


def test_vllm_lora_config_and_model_names():
    """The Ray Serve LLM config with ``vllm.lora_path``: ``lora_config`` Ray's own ``LoraConfig``
    accepts, vLLM's LoRA engine flags, and request models Ray's ``base:lora`` parser splits back.
    Only the config: vLLM does not run here (no GPU)."""
    from ray.llm._internal.common.utils.lora_utils import get_base_model_id, get_lora_id
    from ray.llm._internal.serve.core.configs.llm_config import LoraConfig

    from serving.backend import vllm_engine_config, vllm_lora_model

    cfg = vllm_engine_config(
        "s3://m/base",
        {"served_model_name": "troupe", "lora_path": "s3://m/adapters/", "max_lora_rank": 8},
        {"max_adapters": 3, "num_gpus": 1},
    )
    lc = LoraConfig(**cfg["lora_config"])
    assert lc.dynamic_lora_loading_path == "s3://m/adapters" and lc.max_num_adapters_per_replica == 3
    ek = cfg["engine_kwargs"]
    assert ek["enable_lora"] is True and ek["max_loras"] == 3 and ek["max_lora_rank"] == 8
    off = vllm_engine_config("s3://m/base", {"served_model_name": "troupe"}, {"num_gpus": 1})
    assert "lora_config" not in off and "enable_lora" not in off["engine_kwargs"]

    m = vllm_lora_model("troupe", "s3://m/adapters/bob/v2", "s3://m/adapters")
    assert m == "troupe:bob/v2" and get_base_model_id(m) == "troupe" and get_lora_id(m) == "bob/v2"
    assert vllm_lora_model("troupe", "bob", "s3://m/adapters") == "troupe:bob"
    with pytest.raises(ValueError, match="not under"):
        vllm_lora_model("troupe", "s3://other/bob", "s3://m/adapters")
    with pytest.raises(ValueError, match="lora_path"):
        vllm_lora_model("troupe", "s3://m/adapters/bob", "")


# -- over HTTP: a Ray Serve app with a catalogue of adapter characters ----------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, adapters, moto_s3):
    """Two apps on one cluster, catalogue: anna (adapter a, a local dir), ben (adapter b, in S3), bob
    (no adapter). ``/lora`` keeps 2 adapters, ``/lora1`` 1. The S3 env is set before Ray starts, so
    the replicas inherit it; it is restored afterwards."""
    import boto3

    from troupe.deploy import apply_apps
    from troupe.storage import upload

    d = tmp_path_factory.mktemp("multi-lora")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_s3,
        "TROUPE_SCRATCH": str(d / "scratch"),  # local_copy's cache of s3:// inputs: fresh per run
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bucket = f"lora-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket=bucket)
    b_uri = f"s3://{bucket}/adapters/b"
    upload(adapters["b"], b_uri)
    base = {"language": "en", "profile": {"job": "sailor"}, "style": "gruff", "examples": ["Ahoy!"]}
    chars = [
        {"id": "anna", "name": "Anna", **base, "adapter": str(adapters["a"])},
        {"id": "ben", "name": "Ben", **base, "adapter": b_uri},
        {"id": "bob", "name": "Bob", **base},
    ]
    cat = d / "catalogue.jsonl"
    cat.write_text("".join(json.dumps(c) + "\n" for c in chars), encoding="utf-8")
    port = free_port()
    start_cluster(port)
    try:
        apps = []
        for env_name, prefix, n in (("lora", "/lora", 2), ("lora1", "/lora1", 1)):  # no config file: DEFAULTS
            app = make_app(
                env_name,
                cat,
                tiny_model(),
                prefix,
                gateway={"openai_content": "raw", "moderation": {"mode": "off"}},
            )
            app["args"]["model"].update(max_adapters=n, max_new_tokens=MAX_NEW)
            app["args"]["catalogue_uri"] = str(cat)
            apps.append(app)
        apply_apps(apps, "127.0.0.1", port, timeout_s=400)
        yield {"base": f"http://127.0.0.1:{port}", "chars": chars, "b_uri": b_uri}
    finally:
        stop_cluster()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ask(served, prefix: str, cid: str) -> dict:
    r = httpx.post(
        f"{served['base']}{prefix}/v1/chat/completions",
        json={
            "model": cid,
            "messages": [{"role": "user", "content": USER}],
            "max_tokens": MAX_NEW,
            "temperature": 0,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _engine(served, prefix: str) -> dict:
    from serving import contract

    r = httpx.get(f"{served['base']}{prefix}{contract.ENGINE_ENDPOINT}", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["stable"]


def _expected(served, adapters, cid: str) -> tuple[list[int], str]:
    """What a local PeftModel with the character's adapter (base model for none) generates for the
    prompt the Router builds (:func:`serving.gateway.build_prompt`)."""
    from serving.gateway import Limits, build_prompt, parse_messages
    from troupe.contract import Character

    char = Character(**next(c for c in served["chars"] if c["id"] == cid))
    prompt = build_prompt(char, parse_messages([{"role": "user", "content": USER}], Limits()), Limits())
    adapter = {"anna": adapters["a"], "ben": adapters["b"], "bob": None}[cid]
    return reference(adapter, prompt)


def test_characters_answer_with_their_own_adapters_over_http(served, adapters):
    replies = {cid: _ask(served, "/lora", cid) for cid in ("anna", "ben", "bob")}
    for cid, body in replies.items():
        ids, text = _expected(served, adapters, cid)
        assert body["choices"][0]["message"]["content"] == text, cid
        assert body["usage"]["completion_tokens"] == len(ids), cid
    texts = [b["choices"][0]["message"]["content"] for b in replies.values()]
    assert len(set(texts)) == 3, texts
    eng = _engine(served, "/lora")
    a = str(adapters["a"])
    assert eng["adapters"]["loaded"] == [a, served["b_uri"]] and eng["adapters"]["max_adapters"] == 2
    keys = eng["prefix_cache"]["keys"]
    assert {f"anna|{a}", f"ben|{served['b_uri']}", "bob"} <= set(keys)
    _ask(served, "/lora", "anna")  # LRU order follows use
    assert _engine(served, "/lora")["adapters"]["loaded"] == [served["b_uri"], a]


def test_one_adapter_slot_switches_by_eviction_over_http(served, adapters):
    a, b = str(adapters["a"]), served["b_uri"]
    seen = []
    for cid in ("anna", "ben", "anna"):
        body = _ask(served, "/lora1", cid)
        assert body["choices"][0]["message"]["content"] == _expected(served, adapters, cid)[1], cid
        seen.append(_engine(served, "/lora1")["adapters"])
    assert [s["loaded"] for s in seen] == [[a], [b], [a]]
    assert [s["evictions"] for s in seen] == [0, 1, 2] and all(s["peak"] == 1 for s in seen)
