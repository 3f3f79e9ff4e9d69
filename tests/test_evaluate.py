"""Evaluation metrics on crafted replies (the rubric judge's part of ``troupe evaluate`` is tested in
tests/test_judge.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from troupe.contract import Character
from troupe.evaluate import distinct_n, score_replies

CHARS = {
    "max": Character(id="max", name="Max", language="en"),
    "lin": Character(id="lin", name="林", language="zh"),
}


def _s(cid, did, reply, ref="We fly at dawn, want to come along?"):
    return {"character_id": cid, "dialogue_id": did, "reply": reply, "reference": ref, "context": []}


def test_rule_metrics_count_each_violation():
    samples = [
        _s("max", "d1", "We fly at dawn, want to come along?<emotion>happy</emotion>"),  # perfect copy
        _s("max", "d1", "We fly at dawn, want to come along?"),  # repeats the previous reply of d1
        _s("max", "d2", "As an AI, I do not fly planes."),  # leakage
        _s("max", "d3", "Max: sure thing<emotion>joy</emotion>"),  # name prefix + bad markup
        _s("lin", "d4", "今天的花很好看呢，要不要来看看？", ref="今天的花很好看呢，要不要来看看？"),
    ]
    for turn, s in enumerate(samples):
        s["turn"] = turn
    m = score_replies(samples, CHARS)
    assert m["language_consistency"].n == 5
    assert m["assistant_leakage"].k == 1 and m["name_prefix"].k == 1
    # markup validity is judged on the replies that carry tags only; the tag rate is its own metric
    assert (m["markup_validity"].k, m["markup_validity"].n) == (1, 2)
    assert (m["tag_rate"].k, m["tag_rate"].n) == (2, 5)
    assert m["self_repetition"].k == 1
    assert 0 < m["rouge_l"].value < 1 and m["bleu"].value > 0
    for e in m.values():  # every metric carries its n and an interval around the value
        assert e.n > 0 and e.lo <= e.value <= e.hi, e
    wrong_lang = score_replies([_s("lin", "d5", "Sure, the flowers are lovely today, come see them!")], CHARS)
    assert wrong_lang["language_consistency"].value == 0.0


def test_a_reply_whose_language_cannot_be_identified_is_not_consistent():
    """A zh character answering with a short English phrase py3langid cannot place does not pass."""
    from troupe.checks import detect_language

    assert detect_language("Sure thing buddy") != "zh"
    m = score_replies([_s("lin", "d1", "Sure thing buddy"), _s("lin", "d2", "嗯")], CHARS)
    assert m["language_consistency"].k == 0 and m["language_consistency"].n == 2


def test_an_untagged_model_cannot_pass_on_markup_validity():
    """Replies without tags used to count as valid markup; now they leave markup validity unmeasured
    (n = 0) and show as a zero tag rate."""
    m = score_replies([_s("max", f"d{i}", "We fly at dawn, want to come along?") for i in range(30)], CHARS)
    assert m["markup_validity"].n == 0 and m["tag_rate"].value == 0.0 and m["tag_rate"].n == 30


def test_replies_looping_inside_themselves_are_measured():
    loop = _s("max", "d1", "I love flying. I love flying. I love flying. I love flying. I love flying.")
    fine = _s("max", "d2", "We fly at dawn, want to come along? The plane is fuelled and ready.")
    m = score_replies([loop, fine], CHARS)
    assert (m["in_reply_repetition"].k, m["in_reply_repetition"].n) == (1, 2)


def test_rule_breaks_counts_replies_breaking_any_rule_once():
    """``rule_breaks``: a reply breaking two rules counts once, a clean reply not at all (the rate DPO
    pairs target, from the same check that picks their rejected side)."""
    two = _s("max", "d1", "Max: As an AI, I cannot fly.")  # name prefix + assistant phrase
    one = _s("max", "d2", "*smiles* We fly at dawn.")  # stage direction
    clean = _s("max", "d3", "We fly at dawn, want to come along?")
    m = score_replies([two, one, clean], CHARS)
    assert (m["rule_breaks"].k, m["rule_breaks"].n) == (2, 3)
    assert m["name_prefix"].k == 1 and m["assistant_leakage"].k == 1 and m["stage_direction"].k == 1


def test_intervals_narrow_with_n():
    """Same observed rate, ten times the replies: the Wilson interval is narrower and still covers it."""
    few = score_replies(
        [_s("max", f"d{i}", "As an AI, no." if i < 2 else "Sure, let's go.") for i in range(10)], CHARS
    )
    many = score_replies(
        [_s("max", f"d{i}", "As an AI, no." if i % 10 < 2 else "Sure, let's go.") for i in range(100)], CHARS
    )
    a, b = few["assistant_leakage"], many["assistant_leakage"]
    assert a.value == pytest.approx(b.value) == pytest.approx(0.2)
    assert (b.hi - b.lo) < (a.hi - a.lo) and b.lo <= 0.2 <= b.hi


def test_distinct_n():
    assert distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)
    assert distinct_n([["a"]], 2) == 0.0


def test_truncated_replies_are_not_judged_on_markup():
    cut = _s("max", "d1", "We fly at dawn<emotion>hap")
    cut["finished"] = False
    done = _s("max", "d2", "We fly at dawn.<emotion>happy</emotion>")
    m = score_replies([cut, done], CHARS)
    assert m["truncated"].value == 0.5 and (m["markup_validity"].k, m["markup_validity"].n) == (1, 1)
    broken = _s("max", "d3", "We fly at dawn<emotion>happy")
    assert score_replies([cut, broken], CHARS)["markup_validity"].value == 0.0


def test_echoing_the_users_line_is_counted_and_breaks_the_rules():
    """The CharacterEval failure seen in the real-data run: the reply repeats the other speaker's line."""
    from troupe.checks import check_reply

    line = "（笑道）想是在草里睡着了，说得是梦话？"
    echo = _s("lin", "d1", "想是在草里睡着了，说得是梦话？", ref="爷爷呀！我睡他怎么晓得？")
    echo["context"] = [{"role": "user", "content": line, "name": "孙悟空"}]
    answer = _s("lin", "d2", "爷爷呀！我睡着了怎么晓得？", ref="爷爷呀！我睡他怎么晓得？")
    answer["context"] = echo["context"]
    m = score_replies([echo, answer], CHARS)
    assert m["echo_user"].value == 0.5
    chk = check_reply(echo["reply"], character_name="林", language="zh", user_text=line)
    assert chk.echo_user and "echoes the user's line" in chk.violations
    assert not check_reply(echo["reply"], character_name="林", language="zh").echo_user  # no user line given


def test_decoding_a_budget_cut_reply_drops_the_partial_character(tiny_model_dir):
    """A Chinese character split over byte-level BPE tokens, cut by max_new_tokens, is not shown as U+FFFD."""
    from transformers import AutoTokenizer

    from troupe.generation import REPLACEMENT_CHAR, decode_reply

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tok("你好，八戒", add_special_tokens=False)["input_ids"]
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith(REPLACEMENT_CHAR))
    assert tok.decode(ids[:cut]).endswith(REPLACEMENT_CHAR)  # what a plain decode shows
    text = decode_reply(tok, ids[:cut])
    assert REPLACEMENT_CHAR not in text and "你好，八戒".startswith(text)
    assert decode_reply(tok, ids) == "你好，八戒"


def test_evaluate_reads_and_writes_uris(tiny_model_dir, tmp_path, monkeypatch):
    """On a cluster every input and output of evaluate is a URI (S3 on a moto server here): the model
    and splits are downloaded, metrics/report published to paths.eval only when the step succeeds."""
    from pathlib import Path

    import yaml
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port
    from troupe import storage
    from troupe.contract import Character, Dialogue, read_jsonl, write_jsonl
    from troupe.evaluate import evaluate

    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                     "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}.items():  # fmt: skip
            monkeypatch.setenv(k, v)
        import boto3

        boto3.client("s3").create_bucket(Bucket="evalbox")
        sample = Path(__file__).resolve().parents[1] / "data" / "sample"
        chars = read_jsonl(sample / "characters.jsonl", Character)
        ds = read_jsonl(sample / "dialogues.jsonl", Dialogue)
        splits = tmp_path / "splits"
        splits.mkdir()
        write_jsonl(splits / "characters.jsonl", chars)
        for name in ("train", "heldout_dialogues", "heldout_characters"):
            write_jsonl(splits / f"{name}.jsonl", ds[:2])
        storage.upload(splits, "s3://evalbox/run/splits")
        storage.upload(tiny_model_dir, "s3://evalbox/run/base_model")
        params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
        params["paths"].update(splits="s3://evalbox/run/splits", base_model="s3://evalbox/run/base_model",
                               eval="s3://evalbox/run/eval")  # fmt: skip
        params["paths"]["eval_base"] = ""  # no base stage result to reuse
        params["eval"].update(models=["base"], max_new_tokens=4, max_replies_per_split=2)
        metrics = evaluate(params)
        published = json.loads(storage.read_text("s3://evalbox/run/eval/metrics.json"))
        as_dicts = {
            m: {sp: {k: e.to_dict() for k, e in ms.items()} for sp, ms in v.items()}
            for m, v in metrics.items()
        }
        assert published == json.loads(json.dumps(as_dicts)) and "base" in published
        assert published["base"]["heldout_dialogues"]["truncated"]["n"] == 2  # the seeded sample of 2 items
        assert storage.exists("s3://evalbox/run/eval/report.html")
        params["eval"]["models"] = ["sft"]
        params["paths"]["sft_model"] = "s3://evalbox/run/missing"
        with pytest.raises(Exception, match=r"paths\.sft_model"):
            evaluate(params)
    finally:
        srv.stop()


def test_prefix_generator_matches_plain_generate(tiny_model_dir):
    """Reusing each persona card's KV prefix (rows laid out [card][padding][suffix]) gives the same
    greedy tokens as plain ``model.generate`` on each whole prompt alone, for batched mixed-length rows
    and two characters; the second round comes from the cache."""
    from troupe.generation import GenRequest, PrefixGenerator
    from troupe.modeling import load_model

    model, tok = load_model(tiny_model_dir)
    cards = {"a": "You are Ada, a pilot. " * 30, "b": "你是林小满，一个茶馆老板。" * 20}
    reqs = [
        GenRequest(
            [
                {"role": "system", "content": cards[c]},
                {"role": "user", "content": f"question {i} " * (1 + i % 4)},
            ],
            12,
            0.0,
            c,
        )
        for i in range(7)
        for c in cards
    ]
    gen = PrefixGenerator(model, tok)
    first = gen.generate(reqs, batch_size=3)
    again = gen.generate(reqs, batch_size=5)
    assert all(r.prefix_cached for r in again) and gen.cache.stats()["hits"] >= 2
    for req, a, b in zip(reqs, first, again, strict=True):
        ids = tok.apply_chat_template(
            req.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        plain = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        expect = plain[0, ids["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id in expect:
            expect = expect[: expect.index(tok.eos_token_id) + 1]
        assert a.token_ids == expect == b.token_ids
        assert a.prompt_tokens == ids["input_ids"].shape[1]  # padding not counted


def test_base_evaluation_is_reused_while_items_and_settings_match(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """`troupe evaluate --base-only` (its own dvc stage) scores base once; `troupe evaluate` reuses it
    while the eval set's hash and the settings match, and scores base again when they do not."""
    import yaml

    from troupe.contract import Character as Ch
    from troupe.contract import Dialogue, Message, write_jsonl
    from troupe.eval_contract import EvalResult
    from troupe.evaluate import evaluate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    splits = tmp_path / "splits"
    splits.mkdir()
    write_jsonl(splits / "characters.jsonl", [Ch(id="max", name="Max", language="en")])
    ds = [
        Dialogue(id=f"d{i}", character_id="max", messages=[
            Message(role="user", content=f"Where do we fly {i}?"), Message(role="assistant", content="North."),
            Message(role="user", content="When?"), Message(role="assistant", content="At dawn."),
        ])
        for i in range(3)
    ]  # fmt: skip
    for name in ("train", "heldout_dialogues", "heldout_characters"):
        write_jsonl(splits / f"{name}.jsonl", ds)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["paths"].update(
        splits=str(splits), base_model=str(tiny_model_dir), sft_model=str(tiny_model_dir),
        eval=str(tmp_path / "eval"), eval_base=str(tmp_path / "eval_base"),
    )  # fmt: skip
    params["eval"].update(models=["base", "sft"], max_new_tokens=3)
    evaluate(params, base_only=True)
    base = EvalResult.read(tmp_path / "eval_base")
    assert base.eval_set["heldout_dialogues"]["items"] == 6 and list(base.metrics) == ["base"]
    capsys.readouterr()
    evaluate(params)
    assert "base: reusing" in capsys.readouterr().out
    both = EvalResult.read(tmp_path / "eval")
    assert both.scores("base", "truncated") == base.scores("base", "truncated")
    assert both.scores("sft", "truncated").keys() == base.scores("base", "truncated").keys()  # paired items
    params["eval"]["max_new_tokens"] = 4
    evaluate(params)
    assert "evaluating base again" in capsys.readouterr().out


def test_a_bad_model_does_not_pass_the_shipped_gate(tiny_model_dir, tmp_path, monkeypatch):
    """The joint of data, evaluation and gate: the default data path (import, validate, split of
    data/sample with the shipped params) evaluated on a model that cannot role-play (the tiny random
    model as candidate) and gated with the shipped policy. Every held-out turn is scored (>= 200 per
    split, the policy's min_n), so the verdict rests on enough evidence, and it must be fail, never
    pass; at 20 replies per split the same model is at most "insufficient evidence"."""
    import yaml

    from troupe.data.importers import import_sources, selected_sources, write_import
    from troupe.data.split import split_dir
    from troupe.data.validate import validate_dir
    from troupe.eval_contract import EvalResult
    from troupe.evaluate import evaluate
    from troupe.registry import gate, load_policy
    from troupe.stats import FAIL, PASS, combine

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["paths"].update(
        imported=str(tmp_path / "imported"), validated=str(tmp_path / "validated"), splits=str(tmp_path / "splits"),
        base_model=str(tiny_model_dir), dpo_model=str(tiny_model_dir), eval=str(tmp_path / "eval"), eval_base="",
    )  # fmt: skip
    write_import(import_sources(selected_sources(params), root), tmp_path / "imported")
    validate_dir(params)
    split_dir(params)
    params["eval"].update(models=["dpo"], max_new_tokens=8)
    evaluate(params)
    result = EvalResult.read(tmp_path / "eval")
    policy = load_policy(root / params["registry"]["gate_policy"])
    assert all(
        result.eval_set[s]["items"] >= policy["min_n"] for s in ("heldout_characters", "heldout_dialogues")
    )
    verdicts = gate(result, policy, None)
    assert combine(verdicts) == FAIL, [v.to_dict() for v in verdicts]
    params["eval"]["max_replies_per_split"] = 20
    evaluate(params)
    assert combine(gate(EvalResult.read(tmp_path / "eval"), policy, None)) != PASS


def test_corpus_statistic_intervals_cover_their_value():
    """distinct-2 and BLEU are corpus statistics; their interval (jackknife over dialogues) must hold
    the value. A bootstrap over dialogues does not: a replicate repeats dialogues, and repeated
    n-grams pull distinct-2 down (the default run read 0.299 with a bootstrap interval [0.176, 0.234])."""
    import random

    rng = random.Random(3)
    words = "we fly at dawn the plane is ready come along north wind sea storm coffee map engine".split()
    samples = []
    for d in range(40):
        for t in range(3):
            reply = " ".join(rng.choice(words) for _ in range(8))
            samples.append(
                {**_s("max", f"d{d}", reply, ref=" ".join(rng.choice(words) for _ in range(8))), "turn": t}
            )
    m = score_replies(samples, CHARS)
    for name in ("distinct_2", "bleu"):
        e = m[name]
        assert e.method == "jackknife" and e.clusters == 40 and e.lo <= e.value <= e.hi, e
    from troupe import stats

    boot = stats.cluster_bootstrap(
        {d: [s for s in samples if s["dialogue_id"] == d] for d in {s["dialogue_id"] for s in samples}},
        lambda xs: distinct_n([s["reply"].split() for s in xs], 2),
    )
    assert boot.hi < m["distinct_2"].value  # the bias the jackknife avoids
