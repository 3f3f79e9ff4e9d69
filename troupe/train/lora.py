"""LoRA and QLoRA through PEFT: ``train.method: full | lora | qlora``.

* LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685):
  each target matrix ``W`` (d_out x d_in) stays frozen and learns ``W + (alpha / r) * B @ A`` with
  ``A`` (r x d_in) and ``B`` (d_out x r, zero at start), so ``r * (d_in + d_out)`` trainable
  parameters per matrix. ``train.lora_target_modules: all-linear`` adapts every ``nn.Linear`` except
  the output layer (PEFT's meaning of the word).
* QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314):
  the same adapters on a base whose linear weights are stored as 4-bit NormalFloat with double
  quantisation (bitsandbytes), computed in bf16. bitsandbytes' 4-bit kernels need a CUDA GPU, so
  ``qlora`` is a ConfigError unless ``train.accelerator=nvidia`` and the worker sees a GPU (not run
  in CI here: no GPU).

Both run on the same Ray Train + DeepSpeed path as full training: TRL's trainers get ``peft_config``
(:func:`trainer_kwargs`) and wrap the model themselves (ZeRO-3 aware); DPO with an adapter needs no
reference model (TRL computes reference log-probs with the adapter disabled).

Outputs of a LoRA step (:func:`finish_adapter_step`): the adapter in ``<out>/adapter/``
(``adapter_config.json``, ``adapter_model.safetensors``, ``troupe_adapter.json`` naming the base
model's URI) AND the merged full checkpoint at ``<out>`` itself, so every downstream step (pairs,
DPO after LoRA SFT, evaluate, register, serve) reads a plain HF checkpoint as after full training.
``troupe model merge --adapter DIR_OR_URI --out DIR`` (:func:`merge_adapter`) does the same merge
for any adapter. The registry logs the adapter as its own artefact (:data:`ADAPTER_URI_TAG`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from troupe.config import ConfigError

METHODS = ("full", "lora", "qlora")
#: Subdirectory of a LoRA step's output (and MLflow artefact path) holding the adapter.
ADAPTER_DIR = "adapter"
#: Troupe's note beside PEFT's files: base model URI, method, LoRA settings, training step.
ADAPTER_NOTE = "troupe_adapter.json"
#: Model-version / run tags set by ``troupe registry register`` for a LoRA-trained model.
ADAPTER_URI_TAG = "troupe.adapter_uri"
ADAPTER_BASE_TAG = "troupe.adapter_base_model"
#: LoRA target names per Llama/Qwen2 projection: (input dim, output dim) from (h, kv width, i).
_PROJ = {
    "q_proj": lambda h, kv, i: (h, h),
    "k_proj": lambda h, kv, i: (h, kv),
    "v_proj": lambda h, kv, i: (h, kv),
    "o_proj": lambda h, kv, i: (h, h),
    "gate_proj": lambda h, kv, i: (h, i),
    "up_proj": lambda h, kv, i: (h, i),
    "down_proj": lambda h, kv, i: (i, h),
}
#: Bytes per 4-bit NF4 weight with double quantisation (QLoRA §3: 4 bits + 8/64 + 32/(64*256) bits
#: of block constants = 4.127 bits).
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8


def method(train: dict[str, Any]) -> str:
    """``train.method`` (default ``full``), checked; ConfigError names the setting when unknown."""
    m = str(train.get("method") or "full")
    if m not in METHODS:
        raise ConfigError(f"train.method={m!r}: expected one of {', '.join(METHODS)}")
    return m


def uses_adapter(train: dict[str, Any]) -> bool:
    """True for ``lora`` and ``qlora`` (the step trains a PEFT adapter on a frozen base)."""
    return method(train) != "full"


def check_method(train: dict[str, Any], *, in_worker: bool = False) -> str:
    """Validate ``train.method`` against the accelerator before any compute; returns the method.

    ``qlora`` needs ``train.accelerator=nvidia`` (driver side) and, with ``in_worker``, a visible
    CUDA device and the ``bitsandbytes`` package (inside the Ray worker that loads the model).

    Raises:
        ConfigError: an unknown method, or ``qlora`` where no CUDA GPU is (names ``train.method``).
    """
    m = method(train)
    if m != "qlora":
        return m
    accel = str(train.get("accelerator", "cpu"))
    why = (
        "train.method=qlora needs a CUDA GPU: its 4-bit base comes from bitsandbytes' CUDA kernels "
        "(QLoRA, arXiv:2305.14314); use train.method=lora"
    )
    if accel != "nvidia":
        raise ConfigError(f"{why} on train.accelerator={accel}")
    if in_worker:
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{why}: this worker sees no CUDA device")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{why}: pip install bitsandbytes on the training image")
    return m


def target_modules(train: dict[str, Any]) -> str | list[str]:
    """``train.lora_target_modules``: ``all-linear`` or a list of module names (a comma list is split)."""
    t = train.get("lora_target_modules") or "all-linear"
    if isinstance(t, str):
        return t if t == "all-linear" else [x.strip() for x in t.split(",") if x.strip()]
    return [str(x) for x in t]


def lora_targets_text(train: dict[str, Any]) -> str:
    """:func:`target_modules` as ``troupe plan`` takes it: ``all-linear`` or a comma list."""
    t = target_modules(train)
    return t if isinstance(t, str) else ",".join(t)


def peft_config(train: dict[str, Any]):
    """The ``peft.LoraConfig`` of ``train`` (causal LM, no bias training).

    r = ``train.lora_r``, alpha = ``train.lora_alpha`` (update scaled by alpha / r), dropout =
    ``train.lora_dropout``, targets = :func:`target_modules`.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=int(train.get("lora_r", 16)),
        lora_alpha=float(train.get("lora_alpha", 32)),
        lora_dropout=float(train.get("lora_dropout", 0.05)),
        target_modules=target_modules(train),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_kwargs(train: dict[str, Any]) -> dict[str, Any]:
    """Extra ``from_pretrained`` keyword arguments of the training model: a 4-bit NF4 base with double
    quantisation and bf16 compute for ``qlora`` (bf16 storage type, so ZeRO-3 can partition the
    packed weights like bf16 tensors); nothing for ``full`` / ``lora``.

    Raises:
        ConfigError: ``qlora`` without a CUDA device or bitsandbytes (:func:`check_method`).
    """
    if check_method(train, in_worker=True) != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        ),
        "dtype": torch.bfloat16,
    }


def trainer_kwargs(train: dict[str, Any]) -> dict[str, Any]:
    """Extra TRL trainer arguments: ``peft_config`` for lora/qlora (TRL wraps the model, ZeRO-3
    aware, and for DPO uses the adapter-disabled model as reference); nothing for ``full``."""
    return {"peft_config": peft_config(train)} if uses_adapter(train) else {}


def write_note(adapter_dir: str | Path, base_model: str, train: dict[str, Any], step: str) -> Path:
    """Record the adapter's base: ``troupe_adapter.json`` and PEFT's ``base_model_name_or_path``.

    Args:
        adapter_dir: the saved adapter (``adapter_config.json`` inside).
        base_model: the base's path or URI as every node names it (not a worker's scratch copy).
        train: the ``train`` params (method and LoRA settings recorded).
        step: ``sft`` or ``dpo``.

    Returns:
        The note's path.
    """
    d = Path(adapter_dir)
    conf_path = d / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf["base_model_name_or_path"] = base_model
    conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True))
    note = {
        "base_model": base_model,
        "method": method(train),
        "step": step,
        "r": int(conf.get("r", train.get("lora_r", 16))),
        "lora_alpha": conf.get("lora_alpha"),
        "lora_dropout": conf.get("lora_dropout"),
        "target_modules": conf.get("target_modules"),
    }
    (d / ADAPTER_NOTE).write_text(json.dumps(note, indent=2))
    return d / ADAPTER_NOTE


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on: its note's ``base_model``, else PEFT's
    ``base_model_name_or_path``.

    Raises:
        ConfigError: neither names a base.
    """
    d = Path(adapter_dir)
    if (d / ADAPTER_NOTE).is_file():
        base = json.loads((d / ADAPTER_NOTE).read_text()).get("base_model")
        if base:
            return str(base)
    conf = d / "adapter_config.json"
    base = json.loads(conf.read_text()).get("base_model_name_or_path") if conf.is_file() else None
    if not base:
        raise ConfigError(f"{d}: the adapter names no base model (pass --base)")
    return str(base)


def resolve_adapter(uri: str) -> Path:
    """A local directory holding the adapter named by ``uri``.

    ``uri``: a local directory; a storage URI (``s3://...``, :mod:`troupe.storage`); a model output
    holding ``adapter/`` (either form); or ``models:/<name>/<version>`` / ``models:/<name>@<alias>``
    of a version registered with an adapter (its :data:`ADAPTER_URI_TAG`, downloaded with MLflow).

    Raises:
        ConfigError: no ``adapter_config.json`` there, or a registered version without an adapter.
        troupe.storage.StorageError: the location cannot be read.
    """
    from troupe import storage

    if uri.startswith("models:/"):
        import tempfile

        import mlflow

        from troupe.registry import model_version

        mv = model_version(uri)
        src = mv.tags.get(ADAPTER_URI_TAG)
        if not src:
            raise ConfigError(
                f"{uri} (version {mv.version}): no {ADAPTER_URI_TAG} tag (not trained with LoRA)"
            )
        if src.startswith("s3://"):  # a remote model's adapter, named where it is
            d = storage.local_copy(src, what=f"{uri} adapter")
        else:  # an MLflow artifact URI (mlflow-artifacts:/, runs:/, a local artifact store)
            from troupe.tracking import tracking_uri

            mlflow.set_tracking_uri(tracking_uri())
            d = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=src, dst_path=tempfile.mkdtemp(prefix="troupe-adapter-")
                )
            )
    else:
        d = storage.local_copy(uri, what="--adapter")
    if not (d / "adapter_config.json").is_file() and (d / ADAPTER_DIR / "adapter_config.json").is_file():
        d = d / ADAPTER_DIR
    if not (d / "adapter_config.json").is_file():
        raise ConfigError(f"{uri}: no adapter_config.json (not a PEFT adapter directory)")
    return d


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None) -> Path:
    """Merge a LoRA adapter into its base: a full HF checkpoint in ``out`` (``AutoModelForCausalLM``).

    Every adapted matrix becomes ``W + (alpha / r) * B @ A`` (PEFT ``merge_and_unload``); other
    weights are the base's. The base loads unquantised in its saved dtype (a QLoRA adapter merges
    into the 16/32-bit base, not the 4-bit one). The base's tokenizer is copied, and
    ``troupe_merge.json`` names adapter and base.

    Args:
        adapter: adapter directory or URI (:func:`resolve_adapter`).
        out: destination directory (created; files of the same name replaced).
        base: base model path or URI; default: the adapter's note (:func:`adapter_base`).

    Returns:
        ``out`` as a Path.

    Raises:
        ConfigError: not an adapter, or no base known.
        troupe.storage.StorageError: base or adapter unreadable.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from troupe import storage

    a = Path(adapter) if (Path(adapter) / "adapter_config.json").is_file() else resolve_adapter(str(adapter))
    base_loc = base or adapter_base(a)
    base_dir = storage.local_copy(base_loc, what="adapter base model")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    merged = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(o))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(o))
    (o / "troupe_merge.json").write_text(
        json.dumps({"adapter": str(adapter), "base_model": str(base_loc)}, indent=2)
    )
    return o


def finish_adapter_step(local_out: Path, cfg: dict[str, Any]) -> None:
    """Rank 0 of a LoRA step, after ``trainer.save_model(local_out / "adapter")``: note the base
    model's URI in the adapter and write the merged full checkpoint at ``local_out``.

    ZeRO-3's ``HfDeepSpeedConfig`` is unset first so the base loads whole in this one process
    (with it set, ``from_pretrained`` would partition the weights and wait for the other ranks).
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    adapter_dir = local_out / ADAPTER_DIR
    write_note(adapter_dir, cfg["base_model"], cfg["train"], cfg["method"])
    unset_hf_deepspeed_config()
    merge_adapter(adapter_dir, local_out, base=cfg["base_model_dir"])
    note = json.loads((local_out / "troupe_merge.json").read_text())
    note.update(adapter=ADAPTER_DIR, base_model=cfg["base_model"])  # names every node understands
    (local_out / "troupe_merge.json").write_text(json.dumps(note, indent=2))


def clear_adapter(out: str) -> None:
    """Remove a previous run's ``<out>/adapter`` (path or URI) so a full run's output never carries a
    stale adapter the registry would log; a LoRA run writes a fresh one."""
    from troupe import storage

    loc = storage.join(out, ADAPTER_DIR)
    if not storage.is_remote(loc):
        shutil.rmtree(loc, ignore_errors=True)
        return
    fs, path = storage.filesystem(loc)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def adapter_params(arch, r: int, targets: str | list[str] = "all-linear") -> int:
    """Trainable LoRA parameters of the whole model: ``r * (d_in + d_out)`` per adapted matrix.

    Args:
        arch: a :class:`troupe.plan.Arch` (Llama/Qwen2 projection names).
        r: LoRA rank.
        targets: ``all-linear`` (q, k, v, o and the MLP projections of every layer; never the output
            layer) or a list / comma list of ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
            ``gate_proj``, ``up_proj``, ``down_proj``.

    Raises:
        ValueError: an unknown target name or a rank below 1.
    """
    if r < 1:
        raise ValueError(f"lora rank {r}: must be >= 1")
    mlp = ["gate_proj", "up_proj", "down_proj"] if arch.gated_mlp else ["up_proj", "down_proj"]
    if targets == "all-linear":
        names = ["q_proj", "k_proj", "v_proj", "o_proj", *mlp]
    else:
        names = [x.strip() for x in targets.split(",")] if isinstance(targets, str) else list(targets)
        bad = [x for x in names if x not in _PROJ]
        if bad:
            raise ValueError(f"lora targets {bad}: the plan knows all-linear or {', '.join(_PROJ)}")
    kv = arch.kv_heads * arch.head_dim
    per_layer = sum(r * sum(_PROJ[x](arch.hidden, kv, arch.intermediate)) for x in names)
    return per_layer * arch.layers


def frozen_base_bytes(arch, n_params: int, train_method: str) -> float:
    """Bytes of the frozen base weights (whole model, before ZeRO partitioning).

    ``lora``: bf16, 2 bytes/param. ``qlora``: the transformer blocks' linear weights in NF4 with
    double quantisation (:data:`NF4_BYTES`, QLoRA §3), embeddings, norms and output layer in bf16
    (bitsandbytes quantises ``nn.Linear`` layers only and keeps the output layer). ``full``: 0 (its
    weights are trainable, counted as parameters).
    """
    if train_method == "full":
        return 0.0
    if train_method == "lora":
        return 2.0 * n_params
    h, kv, i = arch.hidden, arch.kv_heads * arch.head_dim, arch.intermediate
    linear = (2 * h * h + 2 * h * kv + (3 if arch.gated_mlp else 2) * h * i) * arch.layers
    linear = min(linear, n_params)
    return NF4_BYTES * linear + 2.0 * (n_params - linear)


def log_adapter(model_loc: str, artifact_uri: str) -> dict[str, str]:
    """Inside an active MLflow run: log a LoRA-trained model's adapter as its own artefact.

    When ``model_loc`` (the candidate's output, path or URI) holds ``adapter/``, a local adapter is
    logged as the run's ``adapter`` artefact (a remote one is named where it is, as the registry
    does with remote models). Returns the tags for the model version and run:
    :data:`ADAPTER_URI_TAG` (the adapter's URI) and :data:`ADAPTER_BASE_TAG` (its base model's URI,
    from the adapter's note); an empty dict for a fully trained model.
    """
    import mlflow

    from troupe import storage

    loc = storage.join(model_loc, ADAPTER_DIR)
    if not storage.exists(storage.join(loc, "adapter_config.json")):
        return {}
    if storage.is_remote(loc):
        uri, local = loc.rstrip("/"), storage.local_copy(loc, what="candidate adapter")
    else:
        mlflow.log_artifacts(loc, artifact_path=ADAPTER_DIR)
        uri, local = f"{artifact_uri}/{ADAPTER_DIR}", Path(loc)
    return {ADAPTER_URI_TAG: uri, ADAPTER_BASE_TAG: adapter_base(local)}
