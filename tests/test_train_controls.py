"""Loss and data controls (issue 13 part 4): mask_history, multi-turn DPO contexts, NEFTune,
length-grouped sampling, general instruction data (import, validation, a token-share cap in the
split, no persona card in training) and DeepSpeed Ulysses sequence parallelism (training config and
``troupe plan``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from troupe.config import ConfigError
from troupe.contract import (
    GENERAL_CHARACTER_ID,
    Character,
    ContractError,
    Dialogue,
    Message,
    general_chat,
    is_general,
)

MEI = Character(id="mei", name="小梅", language="zh", profile={"身份": "花店店主"})
KIT = Character(id="kit", name="Kit", language="en", profile={"job": "bike courier"})


def _d(did: str, cid: str, turns: list[str], general: bool = False) -> Dialogue:
    msgs = [Message(role="user" if i % 2 == 0 else "assistant", content=t) for i, t in enumerate(turns)]
    return Dialogue(id=did, character_id=cid, messages=msgs, meta={"general": True} if general else {})


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    out, start = [], None
    for i, v in enumerate([*mask, 0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


# ------------------------------------------------------------------------------------ mask_history


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_mask_history_puts_loss_on_the_last_character_turn_only(tok):
    from troupe.train.encoding import encode_dialogue

    d = _d("m", "kit", ["Hi", "Hey there.", "Where to?", "The docks.", "Fast?", "Always, mate."])
    full = encode_dialogue(tok, d, KIT)
    last = encode_dialogue(tok, d, KIT, mask_history=True)
    assert full.input_ids == last.input_ids  # the same sequence: only the loss moves
    runs = _runs(full.assistant_masks)
    assert len(runs) == 3  # one span per character turn
    assert _runs(last.assistant_masks) == [runs[-1]]
    a, b = runs[-1]
    assert tok.decode(last.input_ids[a:b]).startswith("Always, mate.")
    assert sum(last.assistant_masks) < sum(full.assistant_masks)
    # cut inside the history: the last turn is gone, nothing to learn (build_sft_examples drops it)
    assert encode_dialogue(tok, d, KIT, cutoff_len=runs[1][0], mask_history=True).n_loss_tokens == 0


def test_build_sft_examples_reads_mask_history(tok, tmp_path):
    from troupe.contract import write_jsonl
    from troupe.train.sft import build_sft_examples

    d = _d("m", "kit", ["Hi", "Hey there.", "Where to?", "The docks."])
    write_jsonl(tmp_path / "train.jsonl", [d])
    write_jsonl(tmp_path / "characters.jsonl", [KIT])
    (full,) = build_sft_examples(tmp_path, tok, 512)
    (last,) = build_sft_examples(tmp_path, tok, 512, mask_history=True)
    assert len(_runs(full["assistant_masks"])) == 2 and len(_runs(last["assistant_masks"])) == 1


# ------------------------------------------------------------------------- NEFTune, group_by_length


def _sft_args(tmp_path, **hp):
    from troupe.train.sft import make_trainer_args

    base = {"max_steps": 1, "per_device_batch_size": 1, "learning_rate": 1e-4}
    cfg = {"hp": {**base, **hp}, "scratch": str(tmp_path), "cutoff_len": 64}
    args, _ = make_trainer_args(cfg, {"use_cpu": True, "report_to": []})
    return args


def test_neftune_and_group_by_length_reach_the_trl_config(tmp_path):
    off = _sft_args(tmp_path)
    assert off.neftune_noise_alpha is None and off.train_sampling_strategy == "random"
    on = _sft_args(tmp_path, neftune_noise_alpha=5.0, group_by_length=True, packing=False)
    assert on.neftune_noise_alpha == 5.0
    assert on.train_sampling_strategy == "group_by_length"  # transformers 5's LengthGroupedSampler


def test_neftune_noise_in_train_mode_only(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.neftune import neftune_post_forward_hook

    args = _sft_args(tmp_path, neftune_noise_alpha=5.0)
    emb = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).get_input_embeddings()
    ids = torch.tensor([[1, 2, 3, 4]])
    clean = emb(ids).detach()
    emb.neftune_noise_alpha = args.neftune_noise_alpha  # what Trainer.train does with the config value
    emb.register_forward_hook(neftune_post_forward_hook)
    emb.train()
    noisy = emb(ids).detach()
    assert not torch.allclose(noisy, clean)
    bound = 5.0 / (ids.numel() * clean.shape[-1]) ** 0.5  # alpha / sqrt(L * d), uniform noise
    assert (noisy - clean).abs().max() <= bound + 1e-6
    emb.eval()
    assert torch.equal(emb(ids).detach(), clean)


# ------------------------------------------------------------------------------ multi-turn DPO


def _old_contexts(dialogues, seed):
    """The pairs stage's context order before pairs.turns existed (the default must not move)."""
    from troupe.train.pairs import Context

    out = []
    for n, d in enumerate(dialogues, start=1):
        for i, m in enumerate(d.messages):
            if m.role == "assistant" and i > 0 and d.messages[i - 1].role == "user":
                out.append(Context(d, d.messages[:i], m.content, n))
    random.Random(seed).shuffle(out)
    return out


def _multi() -> list[Dialogue]:
    return [
        _d(f"d{k}", "kit", [f"u{k}.{j}" if j % 2 == 0 else f"a{k}.{j}" for j in range(2 * (k + 1))])
        for k in range(5)
    ]


def test_pairs_turns_all_is_the_default_and_keeps_the_old_order():
    from troupe.params import Pairs
    from troupe.train.pairs import contexts

    ds = _multi()
    assert Pairs().turns == "all"
    for seed in (0, 17):
        want = [c.id for c in _old_contexts(ds, seed)]
        assert [c.id for c in contexts(ds, seed)] == want == [c.id for c in contexts(ds, seed, "all")]


def test_pairs_at_any_turn_carry_the_whole_history():
    from troupe.train.pairs import contexts

    ds = _multi()
    ctx = contexts(ds, 3, "all")
    assert len(ctx) == sum(k + 1 for k in range(5))  # every character turn
    for c in ctx:
        i = len(c.messages)
        assert c.messages == c.dialogue.messages[:i] and c.messages[-1].role == "user"
        assert c.reference == c.dialogue.messages[i].content
    assert any(len(c.messages) > 1 for c in ctx)  # mid-dialogue turns, with history
    last = contexts(ds, 3, "last")
    assert sorted(c.id for c in last) == sorted(f"{d.id}#{len(d.messages) - 1}" for d in ds)
    with pytest.raises(ConfigError, match="pairs.turns"):
        contexts(ds, 3, "first")


def test_general_dialogues_give_no_pair_contexts():
    from troupe.train.pairs import contexts

    ds = [*_multi(), _d("g", GENERAL_CHARACTER_ID, ["What is 2+2?", "4."], general=True)]
    assert all(not is_general(c.dialogue) for c in contexts(ds, 0)) and len(contexts(ds, 0)) == 15


# ------------------------------------------------------------------------------ general data


def test_general_source_import(tmp_path):
    from troupe.data.importers import import_sources

    f = tmp_path / "alpaca.jsonl"
    recs = [
        {"instruction": "Sum 2 and 2", "output": "4", "system": "You are terse."},
        {"instruction": "用一句话介绍长城", "output": "长城是中国古代的军事防御工程。"},
    ]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    res = import_sources([{"kind": "alpaca", "path": str(f), "general": True}])
    assert [d.character_id for d in res.dialogues] == [GENERAL_CHARACTER_ID] * 2
    assert all(is_general(d) for d in res.dialogues)
    assert list(res.characters) == [GENERAL_CHARACTER_ID]  # no card built from the system turn
    assert res.dialogues[0].messages[0] == Message(role="system", content="You are terse.")
    plain = import_sources([{"kind": "alpaca", "path": str(f)}])
    assert not any(is_general(d) for d in plain.dialogues)
    with pytest.raises(ContractError, match="general"):
        import_sources([{"kind": "alpaca", "path": str(f), "general": True, "character_id": "kit"}])
    with pytest.raises(ContractError, match="general"):
        import_sources([{"kind": "troupe", "path": str(tmp_path), "general": True}])


def test_general_dialogue_is_rendered_without_a_persona_card(tok):
    from troupe.persona import render_system_prompt
    from troupe.train.encoding import encode_dialogue

    g = _d("g", GENERAL_CHARACTER_ID, ["Explain *bold* in Markdown.", "Wrap text in **two** stars."], True)
    card = Character(id=GENERAL_CHARACTER_ID, name="Assistant", language="en")
    e = encode_dialogue(tok, g, None)
    text = tok.decode(e.input_ids)
    assert render_system_prompt(card) not in text and "Assistant" not in text
    assert e.input_ids == encode_dialogue(tok, g, card).input_ids  # the card is never rendered
    assert text == tok.apply_chat_template(general_chat(g.messages), tokenize=False)
    assert len(_runs(e.assistant_masks)) == 1
    with pytest.raises(ValueError, match="persona card"):
        encode_dialogue(tok, _d("c", "kit", ["Hi", "Hey."]), None)


def test_validation_does_not_hold_general_data_to_character_rules(tiny_model_dir):
    from troupe.data.importers import general_card
    from troupe.data.validate import Rules, load_tokenizer, validate_records

    tok = load_tokenizer(tiny_model_dir)
    # Chinese and English replies under one card, Markdown emphasis (a "stage direction"), an angle
    # bracket (reply markup) and three dialogues over a per-character cap of 1
    turns = [
        ["Explain emphasis", "Use *italics* or **bold** in Markdown when you write the notes for your team."],
        ["长城有多长？", "长城全长约两万一千公里，是中国古代的军事防御工程。"],
        ["Tags?", "Write the tag as <emotion>joyful</emotion> in your template and the parser reads it."],
    ]
    general = [_d(f"g{i}", GENERAL_CHARACTER_ID, t, general=True) for i, t in enumerate(turns)]
    character = [_d(f"c{i}", "kit", t) for i, t in enumerate(turns)]
    rules = Rules(cutoff_len=1024, max_dialogues_per_character=1, stage_directions="reject")
    chars = {"kit": KIT, GENERAL_CHARACTER_ID: general_card()}
    res = validate_records(general + character, chars, tok, rules)
    accepted = {d.id for d in res.accepted}
    assert {"g0", "g1", "g2"} <= accepted
    # the same turns under a character break its rules
    assert not {"c0", "c1", "c2"} & accepted
    why = {q.record_id: q.reason.split(":")[0] for q in res.quarantined}
    assert why == {"c0": "stage_direction", "c1": "wrong_language", "c2": "markup"}
    # the length rule still applies, counted without a card
    tight = Rules(cutoff_len=5, max_dialogues_per_character=10)
    assert not validate_records(general, chars, tok, tight).accepted


def _split_set(n_char: int = 12, n_gen: int = 10, gen_len: int = 40) -> list[Dialogue]:
    ds = [_d(f"c{k}", ["mei", "kit"][k % 2], ["hi", "x" * 20]) for k in range(n_char)]
    gs = [_d(f"g{k}", GENERAL_CHARACTER_ID, ["q", "y" * gen_len], general=True) for k in range(n_gen)]
    mixed = []
    for i in range(max(len(ds), len(gs))):  # interleaved: the split keeps input order
        mixed += ds[i : i + 1] + gs[i : i + 1]
    return mixed


SPLIT = {"heldout_characters": 0, "heldout_dialogue_share": 0.25, "seed": 3}


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_general_share_of_tokens_is_capped_and_reported(share):
    from troupe.data.split import split_dialogues, text_tokens

    chars = {"mei": MEI, "kit": KIT}
    res = split_dialogues(_split_set(), chars, {**SPLIT, "general_max_share": share})
    rep = res.report["general"]
    gen = [d for d in res.train if is_general(d)]
    g_tok = sum(text_tokens(d) for d in gen)
    c_tok = sum(text_tokens(d) for d in res.train if not is_general(d))
    assert rep["general"] == len(gen) and rep["general_tokens"] == g_tok and rep["character_tokens"] == c_tok
    assert rep["unit"] == "chars" and rep["general_before_cap"] == 10
    assert rep["dropped_by_max_share"] == 10 - len(gen)
    assert g_tok / (g_tok + c_tok) <= share + 1e-9 and rep["share"] <= share + 1e-9
    if share == 1.0:
        assert len(gen) == 10
    elif share == 0.0:
        assert not gen
    else:
        # the cap binds and is filled up to one dialogue's worth
        assert 0 < len(gen) < 10 and (g_tok + 41) / (g_tok + 41 + c_tok) > share
    # never held out; the split keeps input order; counts are conserved
    assert not any(is_general(d) for d in res.heldout_dialogues + res.heldout_characters)
    order = {d.id: i for i, d in enumerate(_split_set())}
    assert [order[d.id] for d in res.train] == sorted(order[d.id] for d in res.train)
    assert res.report["in"] == sum(res.report["before_caps"].values()) == 22


def test_general_data_leaves_the_character_split_unchanged():
    from troupe.data.split import split_dialogues

    chars = {"mei": MEI, "kit": KIT}
    p = {**SPLIT, "max_train_dialogues": 6}
    with_g = split_dialogues(_split_set(), chars, p)
    without = split_dialogues([d for d in _split_set() if not is_general(d)], chars, p)
    assert [d.id for d in with_g.train if not is_general(d)] == [d.id for d in without.train]
    assert [d.id for d in with_g.heldout_dialogues] == [d.id for d in without.heldout_dialogues]
    assert without.report["general"]["general_before_cap"] == 0
    assert without.report["general"]["share"] == 0.0


def test_cap_general_counts_tokens_given():
    from troupe.data.split import cap_general

    train = [*_split_set(n_char=2, n_gen=0), *[_d(f"g{k}", "x", ["q", "a"], True) for k in range(6)]]
    size = lambda d: 100 if is_general(d) else 50  # noqa: E731  (character tokens 100 in all)
    out, rep = cap_general(train, 0.75, random.Random(0), size, "tokens")
    assert rep["general"] == 3 and rep["general_tokens"] == 300 and rep["unit"] == "tokens"
    assert rep["share"] == pytest.approx(0.75)


def test_split_dir_caps_by_validated_tokens(tmp_path):
    from troupe.contract import read_jsonl, write_jsonl
    from troupe.data.importers import general_card
    from troupe.data.split import split_dir

    v = tmp_path / "validated"
    v.mkdir()
    ds = _split_set()
    write_jsonl(v / "dialogues.jsonl", ds)
    write_jsonl(v / "characters.jsonl", [MEI, KIT, general_card()])
    rows = ["dialogue_id,n_tokens"] + [f"{d.id},{1000 if is_general(d) else 10}" for d in ds]
    (v / "features.csv").write_text("\n".join(rows) + "\n")
    params = {
        "paths": {"validated": str(v), "splits": str(tmp_path / "splits")},
        "split": {**SPLIT, "general_max_share": 0.5},
    }
    split_dir(params)
    rep = json.loads((tmp_path / "splits" / "split_report.json").read_text())["general"]
    assert rep["unit"] == "tokens"
    assert rep["general"] == 0  # one 1,000-token general dialogue outweighs every character token
    train = read_jsonl(tmp_path / "splits" / "train.jsonl", Dialogue)
    assert not any(is_general(d) for d in train)


# ------------------------------------------------------------------------------ sequence parallel


def test_sequence_parallel_config_and_its_errors():
    from troupe.train.distributed import sequence_parallel_config

    gpu = {"accelerator": "nvidia", "num_workers": 8, "zero_stage": 3}
    assert sequence_parallel_config({**gpu, "sequence_parallel_size": 1}, "sft") is None
    pc = sequence_parallel_config({**gpu, "sequence_parallel_size": 4}, "sft")
    assert pc.sp_size == 4 and pc.sp_backend == "deepspeed"
    bad = [
        ({"accelerator": "cpu", "num_workers": 2, "sequence_parallel_size": 2}, "sft", "CPU/gloo"),
        ({**gpu, "sequence_parallel_size": 2}, "dpo", "DPOTrainer"),
        ({**gpu, "sequence_parallel_size": 3}, "sft", "divide train.num_workers"),
        ({**gpu, "zero_stage": 0, "sequence_parallel_size": 2}, "sft", "zero_stage"),
    ]
    for train, method, why in bad:
        with pytest.raises(ConfigError, match=f"train.sequence_parallel_size=.*{why}"):
            sequence_parallel_config(train, method)


def test_plan_divides_activations_by_the_sequence_parallel_degree():
    import dataclasses

    from troupe.plan import PlanInput, make_plan, resolve_model

    inp = PlanInput(arch=resolve_model("qwen2.5-32b"), seq_len=8192, nodes=1, devices_per_node=8)
    one, four = make_plan(inp), make_plan(dataclasses.replace(inp, sequence_parallel=4))
    assert four.activation_bytes / one.activation_bytes == pytest.approx(0.25, rel=1e-3)
    assert four.params_bytes == one.params_bytes and four.optimizer_bytes == one.optimizer_bytes
    assert four.tokens_per_step * 4 == one.tokens_per_step  # 8 devices, 2 sequences per step
    dpo = dataclasses.replace(inp, method="dpo", checkpointing=False)
    assert make_plan(dataclasses.replace(dpo, sequence_parallel=8)).activation_bytes == pytest.approx(
        make_plan(dpo).activation_bytes / 8
    )
    with pytest.raises(ValueError, match="sequence-parallel-size.*divide the world size 8"):
        make_plan(dataclasses.replace(inp, sequence_parallel=3))
    with pytest.raises(ValueError, match="train.sequence_parallel_size.*heads"):
        make_plan(dataclasses.replace(inp, nodes=3, sequence_parallel=3))  # 40 heads


def test_plan_cli_sequence_parallel(tmp_path):
    from click.testing import CliRunner

    from troupe.plan import plan_cmd

    r = CliRunner().invoke(
        plan_cmd, ["--model", "qwen2.5-32b", "--seq-len", "8192", "--sequence-parallel-size", "4", "--json"]
    )
    assert r.exit_code in (0, 3), r.output
    assert json.loads(r.output[: r.output.rindex("}") + 1])["input"]["sequence_parallel"] == 4
    bad = CliRunner().invoke(plan_cmd, ["--model", "qwen2.5-32b", "--sequence-parallel-size", "3"])
    assert bad.exit_code == 2 and "--sequence-parallel-size" in bad.output


def test_params_defaults_keep_every_control_off():
    from troupe.params import SFT, Pairs, Source, Split, Train

    assert (SFT().mask_history, SFT().neftune_noise_alpha, SFT().group_by_length) == (False, 0.0, False)
    assert Pairs().turns == "all" and Train().sequence_parallel_size == 1
    assert Split().general_max_share == 0.5 and not Source(kind="alpaca", path="x").general
    root = Path(__file__).resolve().parents[1]
    import yaml

    y = yaml.safe_load((root / "params.yaml").read_text())
    assert y["sft"]["mask_history"] is False and y["pairs"]["turns"] == "all"
    assert y["split"]["general_max_share"] == 0.5 and y["train"]["sequence_parallel_size"] == 1


_COLLECTIVES = """
import os, sys, warnings
import torch, torch.distributed as dist
warnings.simplefilter("always")
if sys.argv[1] == "quiet":
    from troupe.train.distributed import quiet_known_warnings
    quiet_known_warnings()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
with warnings.catch_warnings(record=True) as caught:
    dist.all_gather_into_tensor(torch.zeros(4), torch.ones(4))
    dist.reduce_scatter_tensor(torch.zeros(4), torch.ones(4))
    warnings.warn("an unrelated deprecation", FutureWarning)
dist.destroy_process_group()
print("\\n".join(str(w.message) for w in caught))
"""


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_train_workers_drop_the_collective_deprecations_and_nothing_else(mode):
    """The ZeRO-3 collectives' per-call deprecation warnings (thousands of lines per run in the Ray
    log) are what ``train_loop`` silences; other warnings still show. Real torch collectives on a
    one-rank gloo group, in a subprocess (its own process group)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-c", _COLLECTIVES, mode, str(port)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "an unrelated deprecation" in lines
    deprecated = [x for x in lines if "torch.distributed." in x and "is deprecated" in x]
    assert len(deprecated) == (2 if mode == "loud" else 0), lines
