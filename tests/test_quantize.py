"""Quantised export (troupe model quantize): llm-compressor GPTQ in .venv-quantize -> compressed-tensors.

The tiny random model is quantised end to end through the CLI, calibrated on the sample characters'
own dialogues; the checkpoint is checked for its quantisation config and int weights, loaded by the
CPU backend's loader, compared with its parent, evaluated as ``eval.models: quantized`` and registered
linked to its parent version. The llm-compressor tests are skipped only where ``.venv-quantize`` is
absent (``bash scripts/install.sh`` creates it; CI runs that first).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv-quantize" / "bin" / "python"
needs_venv = pytest.mark.skipif(
    not VENV_PY.is_file(),
    reason=".venv-quantize absent (llm-compressor's own venv): run `bash scripts/install.sh` (CI does)",
)


def _splits(d: Path) -> Path:
    """train / heldout_dialogues / heldout_characters from data/sample: 16 characters seen, 4 held out."""
    from troupe.contract import Dialogue, read_jsonl, write_jsonl

    d.mkdir(parents=True, exist_ok=True)
    (d / "characters.jsonl").write_text((ROOT / "data/sample/characters.jsonl").read_text(encoding="utf-8"))
    ds = read_jsonl(ROOT / "data/sample/dialogues.jsonl", Dialogue)
    chars = sorted({x.character_id for x in ds})
    held = set(chars[:4])
    seen = [x for x in ds if x.character_id not in held]
    write_jsonl(d / "train.jsonl", seen[::2])
    write_jsonl(d / "heldout_dialogues.jsonl", seen[1::2][:3])
    write_jsonl(d / "heldout_characters.jsonl", [x for x in ds if x.character_id in held][:3])
    return d


def _params_file(tmp: Path, **paths: str) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"].update(paths)
    f = tmp / "params.yaml"
    f.write_text(yaml.safe_dump(params, allow_unicode=True))
    return f


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from troupe.cli import main; main()", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_model_dir):
    """(params file, parent dir, quantised dir, CLI result): W8A8 GPTQ of the tiny model on 6 dialogues."""
    if not VENV_PY.is_file():
        pytest.skip(".venv-quantize absent: run `bash scripts/install.sh` (CI does)")
    tmp = tmp_path_factory.mktemp("quantize")
    pf = _params_file(tmp, splits=str(_splits(tmp / "splits")))
    out = tmp / "q"
    r = _cli("model", "quantize", "--params", str(pf), "--model", str(tiny_model_dir), "--out", str(out),
             "--scheme", "W8A8", "--calibration", "6")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return pf, Path(tiny_model_dir), out, r


@needs_venv
def test_quantize_writes_a_compressed_tensors_checkpoint_calibrated_on_the_characters_data(quantized):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from troupe.config import load_params
    from troupe.contract import Dialogue, load_characters, read_jsonl
    from troupe.train.encoding import encode_dialogue

    pf, parent, out, r = quantized
    assert "GPTQ" in r.stderr  # llm-compressor's progress passed through
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert qc["ignore"] == ["lm_head"]
    group = next(iter(qc["config_groups"].values()))
    assert group["weights"]["num_bits"] == 8 and group["input_activations"]["num_bits"] == 8
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        assert "model.layers.0.mlp.up_proj.weight_scale" in f.keys()
    assert str(w.dtype) == "torch.int8"  # stored as int8, not float
    assert (out / "tokenizer.json").is_file()
    meta = json.loads((out / "quantize.json").read_text())
    assert meta["scheme"] == "W8A8" and meta["parent"]["path"] == str(parent.resolve())
    cal = (out / "calibration.jsonl").read_text(encoding="utf-8")
    assert meta["calibration"]["count"] == 6 == len(cal.splitlines())
    assert meta["calibration"]["sha256"] == hashlib.sha256(cal.encode("utf-8")).hexdigest()
    # each sample is a training dialogue rendered with its persona card exactly as SFT encodes it
    params = load_params(str(pf), ())
    splits = Path(params["paths"]["splits"])
    train = {d.id: d for d in read_jsonl(splits / "train.jsonl", Dialogue)}
    chars = load_characters(splits / "characters.jsonl")
    tok = AutoTokenizer.from_pretrained(str(parent))
    cutoff = min(params["quantize"]["max_seq_len"], params["data"]["cutoff_len"])
    for row in map(json.loads, cal.splitlines()):
        d = train[row["dialogue_id"]]
        assert row["input_ids"] == encode_dialogue(tok, d, chars[d.character_id], cutoff).input_ids
        assert chars[d.character_id].name in tok.decode(row["input_ids"])


@needs_venv
def test_quantized_checkpoint_loads_on_cpu_generates_and_stays_close_to_its_parent(quantized):
    import torch
    from safetensors import safe_open

    from troupe.modeling import load_model

    _, parent, out, _ = quantized
    qm, tok = load_model(out)
    pm, _ = load_model(parent)
    x = tok(["<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with torch.no_grad():
        gen = qm.generate(**x, max_new_tokens=6, do_sample=False)
        a, b = pm(**x).logits, qm(**x).logits
    assert gen.shape[1] == x["input_ids"].shape[1] + 6
    wq = qm.model.layers[0].mlp.up_proj.weight
    wp = pm.model.layers[0].mlp.up_proj.weight
    # the loaded weights are the stored int8 values times their per-channel scales, not the parent's
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w8 = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        scale = f.get_tensor("model.layers.0.mlp.up_proj.weight_scale")
    assert torch.allclose(wq, w8.float() * scale.float(), rtol=1e-5, atol=1e-7)
    assert not torch.equal(wq, wp)
    max_abs = (a - b).abs().max().item()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none")
    kl = kl.sum(-1).mean().item()
    print(
        f"\n[quantize] W8A8 tiny model vs parent: max |logit diff| {max_abs:.4g}, mean KL(parent||q) {kl:.3g}"
    )
    assert 0 < max_abs < 1.0 and kl < 0.05  # loose sanity bound; the measured figures are printed


@needs_venv
def test_quantized_model_is_evaluated_and_registered_linked_to_its_parent(quantized, tmp_path, monkeypatch):
    """eval.models: [dpo, quantized] scores both on the same items (intervals); the parent registered
    as a version, quantised from models:/NAME/1, registers as version 2 tagged with its parent."""
    import mlflow

    from troupe.config import load_params
    from troupe.eval_contract import EvalResult
    from troupe.evaluate import evaluate
    from troupe.registry import register

    pf, parent, _, _ = quantized
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = "troupe-quantize-test"
    params = load_params(str(pf), ())
    params["paths"].update(
        dpo_model=str(parent), eval=str(tmp_path / "eval"), eval_base="", registry=str(tmp_path / "reg"),
        quantized_model=str(tmp_path / "q"),
    )  # fmt: skip
    params["registry"].update(model_name=name, experiment="troupe-quantize-test")
    params["eval"].update(models=["dpo"], max_new_tokens=4, max_replies_per_split=2)
    evaluate(params)
    d1 = register(params)  # the parent: version 1
    pf2 = _params_file(tmp_path, splits=params["paths"]["splits"])
    r = _cli("model", "quantize", "--params", str(pf2), "--model", f"models:/{name}/{d1['version']}",
             "--out", str(tmp_path / "q"), "--calibration", "3")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert meta["parent"]["version"] == str(d1["version"]) and meta["scheme"] == "W8A8"  # the default
    params["eval"]["models"] = ["dpo", "quantized"]
    evaluate(params)
    res = EvalResult.read(tmp_path / "eval")
    for split in ("heldout_characters", "heldout_dialogues"):
        e = res.metrics["quantized"][split]["loss"]
        assert e.n > 0 and e.lo <= e.value <= e.hi  # scored with an interval, like any candidate
    d2 = register(params, candidate="quantized")
    assert d2["candidate"] == "quantized" and d2["version"] != d1["version"]
    tags = mlflow.MlflowClient().get_model_version(name, d2["version"]).tags
    assert tags["troupe.quantization"] == "W8A8"
    assert tags["troupe.parent_version"] == str(d1["version"])
    assert tags["troupe.parent_model"] == f"models:/{name}/{d1['version']}"


def test_missing_quantize_venv_names_it_and_the_install_script(tmp_path, tiny_model_dir):
    """Without llm-compressor's interpreter the command stops before any work, naming the fix."""
    pf = _params_file(tmp_path, splits=str(_splits(tmp_path / "splits")))
    out = tmp_path / "q"
    r = _cli("model", "quantize", "--params", str(pf), "--model", str(tiny_model_dir), "--out", str(out),
             "--set", f"quantize.python={tmp_path / 'no-venv' / 'bin' / 'python'}")  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert ".venv-quantize" in r.stderr and "bash scripts/install.sh" in r.stderr
    assert not (out / "config.json").exists()
    # a grouped scheme (groups of 128 input columns) on the tiny model's width 64: stopped, W8A8 named
    r = _cli("model", "quantize", "--params", str(pf), "--model", str(tiny_model_dir), "--out", str(out),
             "--scheme", "W4A16", "--set", f"quantize.python={sys.executable}")  # fmt: skip
    assert r.returncode == 2 and "hidden_size=64 is not a multiple of 128" in r.stderr and "W8A8" in r.stderr
