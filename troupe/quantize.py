"""Quantised export for serving: GPTQ into a compressed-tensors checkpoint (``troupe model quantize``).

The parent (an SFT/DPO checkpoint directory, or a registered version ``models:/name/<n>``) is
quantised with llm-compressor's one-shot GPTQ (Frantar et al. 2022, arXiv:2210.17323: per layer,
weights are rounded column by column while the remaining columns absorb the error, weighted by the
inverse Hessian ``H = 2 X X^T`` of that layer's calibration inputs). Schemes are llm-compressor's
presets: ``W8A8`` (default: int8 weights per output channel, dynamic per-token int8 activations; works
for any layer width), ``W8A16`` and ``W4A16`` (int8 / int4 weights in groups of 128 input columns,
activations unquantised; "GPTQ int8" as the seeds served Qwen2.5-32B, whose widths are multiples of
128; SmolLM2-135M's hidden size 576 is not, so only W8A8 applies to the embedded model). ``lm_head``
stays in full precision.

Calibration comes from the character's own data: ``paths.splits`` ``train.jsonl`` rendered with its
persona cards and tokenised exactly as SFT encodes a dialogue (:func:`troupe.train.encoding.encode_dialogue`),
a seeded sample of ``quantize.calibration_samples`` dialogues cut at ``quantize.max_seq_len`` tokens.
They are written to ``calibration.jsonl`` and hashed; the hash goes into ``quantize.json``.

llm-compressor pins an older transformers than the platform's, so it runs in its own venv
(``.venv-quantize``, made by ``bash scripts/install.sh``) as a subprocess running
``scripts/quantize_gptq.py``, which imports nothing from Troupe. Its progress goes to stderr as it is.

Output (``--out``, default ``paths.quantized_model``): ``config.json`` with ``quantization_config``
(``quant_method: compressed-tensors``), ``model.safetensors`` (int weights + scales), the tokenizer,
``calibration.jsonl`` and ``quantize.json`` (scheme, calibration count / sha256 / source, parent model
and, when it came from the registry, its version). vLLM loads the directory natively on GPU; the CPU
backend loads it through :func:`troupe.modeling.load_model` (compressed-tensors decompresses the
weights into float ``Linear`` layers).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from troupe.config import REPO_ROOT, ConfigError, path_of, repo_path, section

#: the subprocess script (runs in .venv-quantize; imports only llm-compressor and its deps)
SCRIPT = REPO_ROOT / "scripts" / "quantize_gptq.py"
SCHEMES = ("W8A8", "W8A16", "W4A16")
#: schemes quantising weights in groups of this many input columns (llm-compressor presets)
GROUPED = {"W8A16": 128, "W4A16": 128}
QUANTIZE_FILE = "quantize.json"
CALIBRATION_FILE = "calibration.jsonl"


def calibration_samples(
    params: dict[str, Any], tokenizer, n: int, max_seq_len: int, seed: int = 0
) -> tuple[list[list[int]], list[str]]:
    """Token ids of ``n`` training dialogues rendered as SFT renders them (persona card + turns).

    Args:
        params: resolved params (``paths.splits``: ``train.jsonl`` and ``characters.jsonl``;
            ``data.cutoff_len``).
        tokenizer: the parent model's tokenizer (chat template).
        n: dialogues sampled (all when fewer exist).
        max_seq_len: tokens kept from the start of each (``min`` with ``data.cutoff_len``).
        seed: sampling seed.

    Returns:
        ``(samples, dialogue_ids)``: one list of token ids per sample (length <= max_seq_len) and the
        ids of the dialogues they came from, in the same order.

    Raises:
        ConfigError: no training split / characters, or no dialogue to calibrate on.
    """
    from troupe.contract import Dialogue, load_characters, read_jsonl
    from troupe.train.encoding import encode_dialogue

    splits = path_of(params, "splits")
    train, chars_file = splits / "train.jsonl", splits / "characters.jsonl"
    for f in (train, chars_file):
        if not f.is_file():
            raise ConfigError(
                f"{f}: calibration data not found (paths.splits; run `troupe data split` first)"
            )
    chars = load_characters(chars_file)
    dialogues = [d for d in read_jsonl(train, Dialogue) if d.character_id in chars]
    if not dialogues:
        raise ConfigError(f"{train}: no dialogue with a persona card to calibrate on")
    random.Random(seed).shuffle(dialogues)
    cutoff = min(int(max_seq_len), int(section(params, "data").get("cutoff_len", max_seq_len)))
    picked = dialogues[:n]
    samples = [encode_dialogue(tokenizer, d, chars[d.character_id], cutoff).input_ids for d in picked]
    return samples, [d.id for d in picked]


def quantize_python(params: dict[str, Any]) -> Path:
    """The interpreter of the quantisation venv (``quantize.python``).

    Raises:
        ConfigError: it does not exist; the message names ``.venv-quantize`` and ``bash scripts/install.sh``.
    """
    py = repo_path(str(section(params, "quantize").get("python", ".venv-quantize/bin/python")))
    if not py.is_file():
        raise ConfigError(
            f"{py}: no llm-compressor interpreter (quantize.python). Quantisation runs in its own venv, "
            "`.venv-quantize` (llm-compressor pins an older transformers than Troupe's): create it with "
            "`bash scripts/install.sh`."
        )
    return py


def _parent(model: str) -> tuple[Path, dict[str, Any]]:
    """Local directory of the parent and its provenance (``path``; ``uri`` and ``version`` when
    ``model`` is a registered version ``models:/name/<n>`` or ``models:/name@alias``)."""
    if model.startswith("models:/"):
        from troupe.registry import model_version, resolve_model_dir

        mv = model_version(model)
        d = resolve_model_dir(model)
        return d, {"uri": model, "name": mv.name, "version": str(mv.version), "path": str(d)}
    d = Path(model)
    if not (d / "config.json").is_file():
        raise ConfigError(f"{model}: not a model checkpoint directory (no config.json)")
    return d, {"path": str(d.resolve())}


def _check_widths(d: Path, scheme: str) -> None:
    """A grouped scheme needs every quantised layer's input width divisible by its group size.

    Raises:
        ConfigError: naming the width, the group size and the scheme that applies instead (W8A8).
    """
    group = GROUPED.get(scheme)
    if group is None:
        return
    cfg = json.loads((d / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    for key in ("hidden_size", "intermediate_size"):
        w = cfg.get(key)
        if isinstance(w, int) and w % group:
            raise ConfigError(
                f"quantize.scheme={scheme} quantises weights in groups of {group} input columns, but "
                f"{d}: {key}={w} is not a multiple of {group}; use W8A8 (per channel) for this model"
            )


def _weights_sha256(d: Path) -> str:
    """sha256 over the parent's ``*.safetensors`` files (sorted by name): which weights were quantised."""
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def quantize(
    params: dict[str, Any],
    model: str,
    out_dir: str | Path,
    scheme: str | None = None,
    calibration: int | None = None,
) -> Path:
    """Quantise ``model`` with GPTQ into a compressed-tensors checkpoint at ``out_dir``.

    Args:
        params: resolved params (section ``quantize``; ``paths.splits`` for calibration data).
        model: parent checkpoint directory or registered version URI (``models:/name/<n>``).
        out_dir: output directory (replaced files: config, weights, tokenizer, quantize.json).
        scheme: ``W8A8`` | ``W8A16`` | ``W4A16`` (default ``quantize.scheme``).
        calibration: calibration dialogues (default ``quantize.calibration_samples``).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: unknown scheme, a grouped scheme on widths not divisible by 128, missing
            ``.venv-quantize``, missing parent or calibration data.
        RuntimeError: the llm-compressor subprocess failed (its exit status; its stderr was shown).
    """
    from transformers import AutoTokenizer

    q = section(params, "quantize")
    scheme = scheme or str(q.get("scheme", "W8A8"))
    if scheme not in SCHEMES:
        raise ConfigError(f"quantize.scheme={scheme!r}: expected one of {list(SCHEMES)}")
    n = int(calibration if calibration is not None else q.get("calibration_samples", 64))
    if n < 1:
        raise ConfigError(f"calibration samples: expected >= 1, got {n}")
    py = quantize_python(params)
    parent_dir, parent = _parent(model)
    _check_widths(parent_dir, scheme)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(parent_dir))
    max_len = int(q.get("max_seq_len", 512))
    samples, ids = calibration_samples(params, tok, n, max_len, int(q.get("seed", 0)))
    text = "".join(
        json.dumps({"dialogue_id": i, "input_ids": s}) + "\n" for i, s in zip(ids, samples, strict=True)
    )
    (out / CALIBRATION_FILE).write_text(text, encoding="utf-8")
    spec = {
        "model": str(parent_dir),
        "out": str(out),
        "calibration": str(out / CALIBRATION_FILE),
        "scheme": scheme,
        "max_seq_len": max_len,
        "dampening": float(q.get("dampening", 0.01)),
        "ignore": ["lm_head"],
    }
    spec_file = out / "quantize_spec.json"
    spec_file.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    click.echo(f"[quantize] {scheme} GPTQ of {model} on {len(samples)} calibration dialogues ({py})")
    rc = subprocess.run([str(py), str(SCRIPT), str(spec_file)], stdout=sys.stderr).returncode
    spec_file.unlink(missing_ok=True)
    if rc != 0:
        raise RuntimeError(f"llm-compressor ({py} {SCRIPT.name}) exited {rc}; see its output above")
    meta = {
        "scheme": scheme,
        "method": "gptq",
        "format": "compressed-tensors",
        "ignore": spec["ignore"],
        "dampening": spec["dampening"],
        "max_seq_len": max_len,
        "calibration": {
            "count": len(samples),
            "tokens": sum(len(s) for s in samples),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "source": str(path_of(params, "splits") / "train.jsonl"),
            "seed": int(q.get("seed", 0)),
            "file": CALIBRATION_FILE,
        },
        "parent": {**parent, "weights_sha256": _weights_sha256(parent_dir)},
        "seconds": round(time.time() - t0, 1),
    }
    (out / QUANTIZE_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    psize = sum(f.stat().st_size for f in parent_dir.glob("*.safetensors")) / 2**20
    click.echo(
        f"[quantize] {scheme} -> {out}: weights {size:.1f} MiB (parent {psize:.1f} MiB), {meta['seconds']}s"
    )
    return out


def read_quantize_meta(model_dir: str | Path) -> dict[str, Any] | None:
    """``quantize.json`` of a quantised checkpoint directory (None when it is not one)."""
    f = Path(model_dir) / QUANTIZE_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
