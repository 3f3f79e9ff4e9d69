"""The params.yaml schema: one typed, documented model; every default lives here.

``troupe.config.load_params`` validates every params file (and its ``--set`` overrides) through
:class:`Params` and hands steps a plain dict with all defaults filled in, so ``dvc repro``, the CLI,
KFP components and the training RayJob's ConfigMap all see the same values. Unknown keys are errors
(``extra="forbid"``): a typo such as ``sft.max_step`` stops the run with the nearest valid key instead
of being silently ignored.

Adding a parameter is one line in its section, e.g.::

    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: PACK fills a node first (NCCL/HCCL within a node)"
    )
    checkpoint_num_to_keep: int = Field(2, ge=1, description="checkpoints kept in storage")

and a new section is a class here plus one field of :class:`Params`. ``troupe params schema`` prints
the JSON schema; ``troupe params show`` the resolved params; ``troupe params check`` also checks that
every ``params:`` entry of ``dvc.yaml`` names a field of this model.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import click
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: Importer kinds (see troupe.data.importers.KINDS; kept literal here so this module imports nothing heavy).
SourceKind = Literal[
    "troupe", "sharegpt", "alpaca", "charactereval", "character100", "memotrace", "synthetic"
]


class _Section(BaseModel):
    """Base of every section: unknown keys are errors; YAML numbers given for strings become strings."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, protected_namespaces=())


# ------------------------------------------------------------------------------------------ sections


class Paths(_Section):
    """Where each step reads and writes (a directory; KFP passes its artifact paths with ``--set``)."""

    imported: str = Field("work/imported", description="contract data from importers (+ import_errors.jsonl)")
    validated: str = Field(
        "work/validated", description="accepted dialogues, quarantine.jsonl, report, Data Docs"
    )
    splits: str = Field("work/splits", description="train / heldout_dialogues / heldout_characters")
    base_model: str = Field("work/models/base", description="materialised base model (HF checkpoint dir)")
    sft_model: str = Field("work/models/sft", description="SFT model (HF checkpoint dir)")
    pairs: str = Field("work/pairs", description="DPO preference pairs")
    dpo_model: str = Field("work/models/dpo", description="DPO model (HF checkpoint dir)")
    quantized_model: str = Field(
        "work/models/quantized",
        description="troupe model quantize: GPTQ compressed-tensors checkpoint + quantize.json (eval.models: quantized)",
    )
    eval: str = Field(
        "work/eval", description="metrics.json, eval_set.json, samples.jsonl, report.html, plots"
    )
    eval_base: str = Field(
        "work/eval_base",
        description="the base model's evaluation (troupe evaluate --base-only), reused while items match",
    )
    catalogue: str = Field(
        "work/catalogue/characters.jsonl",
        description="character catalogue (persona cards served; troupe characters build); path or s3:// URI",
    )
    registry: str = Field("work/registry", description="gate decision")
    synthetic: str = Field(
        "work/synthetic",
        description="troupe data synthesize: conversations.jsonl, failed.jsonl, summary.json (a synthetic source)",
    )
    selfplay: str = Field(
        "work/selfplay",
        description="self-play evaluation: transcripts, judge scores, metrics.json, report.html",
    )
    charactereval: str = Field(
        "work/charactereval", description="CharacterEval protocol: replies, scores, metrics.json, report.html"
    )
    deploy: str = Field(
        "work/deploy",
        description="smoke request/response of the deployed app (rollout state lives in MLflow)",
    )


class Source(_Section):
    """One import source: ``{kind, path, ...options}`` (options per kind: troupe.data.importers)."""

    kind: SourceKind = Field(
        description="importer: troupe | sharegpt | alpaca | charactereval | character100 | memotrace"
    )
    path: str = Field(description="file or directory (relative to the repository root)")
    name: str | None = Field(None, description="source label in reports (default: the kind)")
    character: dict[str, Any] | None = Field(
        None, description="inline persona card (contract Character) for every dialogue"
    )
    character_id: str | None = Field(None, description="persona card defined by another source")
    character_name: str | None = Field(
        None, description="name of the character when cards come from system turns"
    )
    language: str | None = Field(None, description="BCP-47 language of cards built from a system turn")
    parts: list[Literal["train", "dev", "qr_test"]] | None = Field(
        None, description="character100 only: which parts to read (default all)"
    )
    general: bool | None = Field(
        None,
        description="sharegpt/alpaca only: true = general instruction data, trained with no persona card "
        "(split.general_max_share caps its share)",
    )


def _default_source_sets() -> dict[str, list[Source]]:
    return {"sample": [Source(kind="troupe", path="data/sample")]}


class Data(_Section):
    """Import and validation (``troupe data import|validate``)."""

    source_set: str = Field("sample", description="which entry of source_sets to import")
    source_sets: dict[str, list[Source]] = Field(
        default_factory=_default_source_sets, description="named lists of import sources"
    )
    cutoff_len: int = Field(1024, gt=0, description="max tokens of a rendered dialogue incl. persona card")
    pii: Literal["scrub", "reject"] = Field("scrub", description="what to do with PII in a dialogue")
    stage_directions: Literal["flag", "reject", "strip"] = Field(
        "flag", description="replies narrating actions (*smiles*): count, reject the dialogue, or strip them"
    )
    max_dialogues_per_character: int = Field(200, ge=1, description="per-character cap on accepted dialogues")
    near_duplicate_threshold: float = Field(
        0.9, ge=0, le=1, description="Jaccard over character 5-gram shingles"
    )
    max_rejected_share: float = Field(
        0.5, ge=0, le=1, description="validate fails above this share of rejected dialogues"
    )
    language_min_share: float = Field(
        0.8, ge=0, le=1, description="share of assistant turns that must be in the character's language"
    )

    @model_validator(mode="after")
    def _source_set_exists(self) -> Data:
        if self.source_set not in self.source_sets:
            have = ", ".join(self.source_sets) or "none"
            raise ValueError(f"data.source_set={self.source_set!r} is not a key of data.source_sets ({have})")
        return self


class Split(_Section):
    """Train / held-out split (``troupe data split``)."""

    heldout_characters: int = Field(
        5, ge=0, description="whole characters kept out of training (unseen persona cards)"
    )
    heldout_dialogue_share: float = Field(
        0.35, ge=0, lt=1, description="share of each seen character's dialogues held out"
    )
    seed: int = Field(17, description="random seed of the split")
    max_train_dialogues: int = Field(0, ge=0, description="cap on training dialogues (0 = all)")
    max_eval_dialogues: int = Field(
        0,
        ge=0,
        description="cap on dialogues per held-out split (0 = all; eval.max_replies_per_split caps replies)",
    )
    shared_prefix_turns: int = Field(
        2,
        ge=1,
        description="dialogues sharing their first k turns (or a prefix, or a source dialogue) split together",
    )
    general_max_share: float = Field(
        0.5, ge=0, le=1, description="max share of general-data tokens in the training split (seeds: <= 1/2)"
    )


class Model(_Section):
    """Base model (``troupe model prepare``)."""

    base: str = Field(
        "smollm2-135m", description="smollm2-135m (embedded GGUF) | tiny-random | HF id | local dir"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="torch dtype of the saved weights"
    )


class Train(_Section):
    """Distributed training shared by SFT and DPO (Ray Train + DeepSpeed)."""

    accelerator: Literal["cpu", "nvidia", "ascend"] = Field(
        "cpu", description="cpu (gloo) | nvidia (nccl) | ascend (hccl)"
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per device)")
    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="DeepSpeed ZeRO stage (0 = plain DDP)")
    method: Literal["full", "lora", "qlora"] = Field(
        "full",
        description="full parameters | lora (PEFT adapters on a frozen base) | qlora (LoRA on a 4-bit base; CUDA GPU only)",
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank r (adapter matrices A: r x d_in, B: d_out x r)")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling alpha (update scaled by alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch's input")
    lora_target_modules: str | list[str] = Field(
        "all-linear",
        description="modules given adapters: all-linear (every Linear but the output layer) or module names",
    )
    offload: Literal[False, True, "optimizer", "all"] = Field(
        False, description="ZeRO offload to CPU: false | optimizer (true) | all (optimizer + params, stage 3)"
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        False,
        description="recompute activations in backward to save memory; auto = when the memory plan (troupe plan) needs it",
    )
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="attention kernel; auto = varlen SDPA for packed SFT"
    )
    checkpoint_every: int = Field(
        0, ge=0, description="optimizer steps between checkpoints (0 = off); needed for resume"
    )
    checkpoint_uri: str = Field(
        "",
        description="Ray Train storage, e.g. s3://bucket/checkpoints (empty: .checkpoints beside the output)",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: PACK fills a node first (NCCL/HCCL within a node)"
    )
    checkpoint_num_to_keep: int = Field(
        2, ge=1, description="newest checkpoints kept in storage (older ones are pruned by Ray Train)"
    )
    max_failures: int = Field(
        1, ge=0, description="worker-group restarts after a lost worker (resumes from the checkpoint)"
    )
    fault_injection_step: int = Field(
        0, ge=0, description="drills/tests only: the last rank kills itself once at this step"
    )
    nodes: int | None = Field(
        None, ge=1, description="KFP pipeline: nodes requested (num_workers = nodes x devices_per_node)"
    )
    devices_per_node: int | None = Field(None, ge=1, description="KFP pipeline: devices per node")
    sequence_parallel_size: int = Field(
        1,
        ge=1,
        description="DeepSpeed Ulysses sequence parallelism: devices sharing one sequence (1 = off; GPU/NPU)",
    )


class SFT(_Section):
    """Supervised fine-tuning (``troupe train sft``; TRL SFTConfig)."""

    max_steps: int = Field(10, ge=1, description="optimizer steps")
    per_device_batch_size: int = Field(
        2, ge=1, description="sequences (packed rows) per device per micro-step"
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-steps per optimizer step")
    learning_rate: float = Field(1.0e-4, gt=0, description="peak learning rate")
    warmup_ratio: float = Field(
        0.0, ge=0, description="warmup: a value < 1 is a share of max_steps, >= 1 a step count"
    )
    lr_scheduler_type: str = Field(
        "cosine", description="transformers scheduler name (cosine, linear, constant, ...)"
    )
    packing: bool = Field(True, description="pack dialogues into full rows (padding-free, varlen attention)")
    seed: int = Field(17, description="training seed (also samples DPO pair contexts)")
    mask_history: bool = Field(False, description="loss on the last character turn of each dialogue only")
    neftune_noise_alpha: float = Field(
        0.0, ge=0, description="NEFTune: uniform noise on input embeddings, alpha/sqrt(L*d) (0 = off)"
    )
    group_by_length: bool = Field(
        False, description="batch rows of similar length (less padding; moot with packing)"
    )


class Pairs(_Section):
    """Preference pair generation (``troupe train pairs``)."""

    samples_per_prompt: int = Field(
        4,
        ge=1,
        description="replies sampled per prompt and model; the one breaking the most rules is rejected",
    )
    max_new_tokens: int = Field(48, ge=1, description="max tokens of a sampled reply")
    temperature: float = Field(0.9, ge=0, description="sampling temperature")
    max_pairs: int = Field(32, ge=1, description="max preference pairs built")
    turns: Literal["all", "last"] = Field(
        "all", description="pairs at every character turn (full history before it) | the last turn only"
    )


class DPO(_Section):
    """Direct preference optimisation (``troupe train dpo``; TRL DPOConfig)."""

    max_steps: int = Field(4, ge=1, description="optimizer steps")
    per_device_batch_size: int = Field(
        1, ge=1, description="pairs per device per micro-step (chosen + rejected = 2 rows)"
    )
    gradient_accumulation_steps: int = Field(2, ge=1, description="micro-steps per optimizer step")
    precompute_ref_log_probs: bool = Field(
        True, description="reference log-probs once up front; no reference model in training"
    )
    learning_rate: float = Field(5.0e-6, gt=0, description="peak learning rate")
    lr_scheduler_type: str = Field(
        "cosine", description="transformers scheduler name (cosine, linear, constant, ...)"
    )
    beta: float = Field(0.1, gt=0, description="DPO temperature: strength of the KL penalty to the reference")
    seed: int = Field(17, description="training seed")


class Agent(_Section):
    """One agent of the dialogue engine, or the judge: any OpenAI-compatible chat endpoint and model
    (a hosted model, Troupe's own gateway with ``model`` = a character id, or a local server)."""

    base_url: str = Field("", description="OpenAI-compatible base URL ending in /v1; empty = not configured")
    model: str = Field("", description="model name sent with each request (Troupe's gateway: a character id)")
    api_key_env: str = Field(
        "TROUPE_AGENT_API_KEY", description="environment variable holding the key (may be unset on loopback)"
    )
    temperature: float = Field(0.8, ge=0, le=2, description="sampling temperature of every call")
    max_tokens: int = Field(160, ge=1, description="max completion tokens per call")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout in seconds")
    max_retries: int = Field(
        3, ge=0, description="transport retries with the openai client's backoff (timeouts, 429, 5xx)"
    )
    parse_retries: int = Field(2, ge=0, description="extra asks when an answer does not parse (judge, host)")
    requests_per_minute: int = Field(0, ge=0, description="client-side rate limit; 0 = none")
    price_input_per_mtok: float = Field(
        0.0, ge=0, description="USD per million prompt tokens (cost accounting)"
    )
    price_output_per_mtok: float = Field(
        0.0, ge=0, description="USD per million completion tokens (cost accounting)"
    )


def _judge_agent() -> Agent:
    return Agent(api_key_env="TROUPE_JUDGE_API_KEY", temperature=0.0, max_tokens=400)


class Agents(_Section):
    """Endpoints of the dialogue engine's agents and of the judge (README "Agents and the judge")."""

    user: Agent = Field(default_factory=Agent, description="plays the user from the scenario's user persona")
    character: Agent = Field(
        default_factory=Agent, description="plays the character in synthesis (self-play uses the gateways)"
    )
    host: Agent = Field(
        default_factory=lambda: Agent(temperature=0.0, max_tokens=40),
        description="decides after each exchange whether the scene has ended",
    )
    judge: Agent = Field(
        default_factory=_judge_agent, description="rubric judge; empty base_url = not measured"
    )


class Synthesis(_Section):
    """Synthesised dialogues (``troupe data synthesize``): a ``synthetic`` import source."""

    enabled: bool = Field(
        False, description="run synthesis in the pipeline (needs agents.user/character/host)"
    )
    scenarios: str = Field("configs/scenarios.yaml", description="seed variables and probes (scenario file)")
    characters: str = Field(
        "", description="characters to synthesise for (characters.jsonl); empty = paths.catalogue"
    )
    conversations: int = Field(24, ge=1, description="scenarios sampled (one conversation each)")
    max_turns: int = Field(6, ge=1, description="character turns per conversation at most")
    probe_share: float = Field(
        0.5, ge=0, le=1, description="share of scenarios that get one scripted probe at a random user turn"
    )
    seed: int = Field(0, description="scenario sampling seed")
    concurrency: int = Field(4, ge=1, description="conversations played at once")
    mix_ratio: float = Field(
        0.25,
        ge=0,
        le=1,
        description="max share of synthetic dialogues in the training split (the rest real); 0 = none",
    )


class SelfPlay(_Section):
    """Self-play evaluation: candidate and champion play the same scenarios through their gateways."""

    candidate_url: str = Field("", description="candidate gateway base URL (.../v1); empty = not run")
    champion_url: str = Field("", description="champion gateway base URL (.../v1)")
    api_key_env: str = Field("TROUPE_API_KEY", description="environment variable of the gateways' API key")
    conversations: int = Field(16, ge=1, description="scenarios played by each model")
    max_turns: int = Field(6, ge=1, description="character turns per conversation at most")
    seed: int = Field(1, description="scenario seed (the same set for both models)")
    concurrency: int = Field(4, ge=1, description="conversations played at once")
    bootstrap_resamples: int = Field(2000, ge=100, description="paired bootstrap replicates")


class CharacterEvalSuite(_Section):
    """The CharacterEval protocol (``troupe evaluate --suite charactereval``; Tu et al. 2024, arXiv:2401.01275)."""

    path: str = Field("../shared/data/charactereval", description="directory with test_data.jsonl, "
                      "character_profiles.json and id2metric.jsonl")  # fmt: skip
    max_items: int = Field(0, ge=0, description="0 = every test item; else a seeded sample of this many")
    seed: int = Field(0, description="item sampling seed")
    model: Literal["base", "sft", "dpo"] = Field("dpo", description="model that generates the next lines")
    max_new_tokens: int = Field(64, ge=1, description="max tokens of each generated line")
    concurrency: int = Field(8, ge=1, description="judge calls in flight at once")


class Feedback(_Section):
    """Human side-by-side preferences and production feedback (``troupe feedback ...``, ``/v1/feedback``)."""

    db_url: str = Field(
        "sqlite:///work/feedback/feedback.db",
        description="SQLAlchemy URL of the store: SQLite locally, postgresql+psycopg2://... in production",
    )
    min_labels_per_item: int = Field(1, ge=1, description="labels an item needs before it is exported")
    seed: int = Field(0, description="seed of the per-(item, annotator) random order of the two replies")
    export_dir: str = Field(
        "work/feedback/export",
        description="troupe feedback export: pairs.jsonl, quarantine.jsonl, labels.jsonl, agreement.json",
    )
    pairs: str = Field(
        "",
        description="human preference pairs (path or URI of a pairs.jsonl, e.g. work/feedback/export/pairs.jsonl) "
        "troupe train dpo adds to paths.pairs; empty = none",
    )


class Eval(_Section):
    """Evaluation (``troupe evaluate``)."""

    max_new_tokens: int = Field(64, ge=1, description="max tokens generated per held-out reply")
    models: list[Literal["base", "sft", "dpo", "quantized", "champion"]] = Field(
        default_factory=lambda: ["base", "dpo"],
        description="models evaluated (names of paths.*_model; quantized = paths.quantized_model; champion = the registry's champion version)",
    )
    max_replies_per_split: int = Field(
        0,
        ge=0,
        description="0 = every character turn of each held-out split; else a seeded sample of this many",
    )
    seed: int = Field(0, description="seed of the item sample")
    batch_size: int = Field(
        8, ge=1, description="replies per generate call (rows share one persona-card prefix)"
    )
    prefix_cache_mb: int = Field(256, ge=0, description="persona-card KV cache bound in MiB (0 = no reuse)")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of every metric's interval")
    suites: list[Literal["heldout", "charactereval"]] = Field(
        default_factory=lambda: ["heldout"],
        description="evaluation suites; charactereval also keeps CharacterEval's characters out of training",
    )
    judge: bool = Field(False, description="score held-out replies with the rubric judge (agents.judge)")


class Quantize(_Section):
    """Quantised export for serving (``troupe model quantize``: llm-compressor GPTQ, compressed-tensors)."""

    scheme: Literal["W8A8", "W8A16", "W4A16"] = Field(
        "W8A8",
        description="W8A8 int8 weights per channel + dynamic int8 activations | W8A16 / W4A16 int8 / int4 weights in groups of 128 input columns (widths divisible by 128)",
    )
    calibration_samples: int = Field(
        64,
        ge=1,
        description="training dialogues (persona card + turns, as SFT renders them) GPTQ calibrates on",
    )
    max_seq_len: int = Field(
        512, ge=8, description="tokens kept per calibration dialogue (also <= data.cutoff_len)"
    )
    dampening: float = Field(
        0.01, gt=0, lt=1, description="GPTQ dampening_frac: share of the Hessian's mean diagonal added to it"
    )
    seed: int = Field(0, description="seed of the calibration sample")
    python: str = Field(
        ".venv-quantize/bin/python",
        description="interpreter with llm-compressor (its own venv: bash scripts/install.sh)",
    )


class Registry(_Section):
    """MLflow tracking and registry (``troupe registry ...``, ``troupe rollout``)."""

    model_name: str = Field("troupe-roleplay", description="registered model name")
    experiment: str = Field("troupe", description="MLflow experiment of pipeline runs")
    gate_policy: str = Field("configs/gate_policy.yaml", description="gate policy file")
    rollout_policy: str = Field("configs/rollout_policy.yaml", description="canary rollout policy file")
    tracking_uri: str = Field(
        "", description="empty = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the repo root"
    )


class Serve(_Section):
    """Local Ray Serve deployment (``troupe deploy``, ``troupe chat``)."""

    env: Literal["test", "production"] = Field(
        "test", description="serving environment (configs/serving/<env>.yaml)"
    )
    host: str = Field("127.0.0.1", description="Serve HTTP host")
    port: int = Field(8000, ge=1, le=65535, description="Serve HTTP port")


class Params(_Section):
    """params.yaml: every section optional; a missing key takes the default documented here."""

    model_config = ConfigDict(
        extra="forbid", coerce_numbers_to_str=True, protected_namespaces=(), title="Troupe params.yaml"
    )

    paths: Paths = Field(default_factory=Paths, description="step inputs and outputs")
    data: Data = Field(default_factory=Data, description="import and validation")
    split: Split = Field(default_factory=Split, description="train / held-out split")
    model: Model = Field(default_factory=Model, description="base model")
    train: Train = Field(default_factory=Train, description="distributed training (SFT and DPO)")
    sft: SFT = Field(default_factory=SFT, description="supervised fine-tuning")
    pairs: Pairs = Field(default_factory=Pairs, description="DPO preference pair generation")
    dpo: DPO = Field(default_factory=DPO, description="direct preference optimisation")
    eval: Eval = Field(default_factory=Eval, description="evaluation")
    agents: Agents = Field(default_factory=Agents, description="dialogue-engine agents and the judge")
    synthesis: Synthesis = Field(default_factory=Synthesis, description="synthesised dialogues")
    selfplay: SelfPlay = Field(default_factory=SelfPlay, description="self-play evaluation")
    charactereval: CharacterEvalSuite = Field(
        default_factory=CharacterEvalSuite, description="the CharacterEval protocol suite"
    )
    feedback: Feedback = Field(default_factory=Feedback, description="human preferences and user feedback")
    quantize: Quantize = Field(default_factory=Quantize, description="quantised export for serving")
    registry: Registry = Field(default_factory=Registry, description="MLflow tracking and registry")
    serve: Serve = Field(default_factory=Serve, description="local Ray Serve deployment")


# ------------------------------------------------------------------------------------------ validation


def resolve(
    raw: dict[str, Any], source: str = "params", overridden: dict[str, str] | None = None
) -> dict[str, Any]:
    """Validate ``raw`` params and return them as a plain dict with every default filled in.

    Args:
        raw: the params mapping (YAML-loaded, overrides applied).
        source: what to name in errors (the params file).
        overridden: dotted key -> the ``--set`` item that set it, to name the override in errors.

    Raises:
        troupe.config.ConfigError: one line per problem, each naming ``source`` (or the ``--set``
            item), the dotted key and, for an unknown key, the nearest valid one.
    """
    from troupe.config import ConfigError

    try:
        model = Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(err, source, overridden or {}) for err in e.errors())) from None
    return model.model_dump(exclude_none=True)


def parse(params: dict[str, Any]) -> Params:
    """Typed view of a params dict (e.g. one from ``load_params``): ``parse(p).train.max_failures``."""
    return Params.model_validate(params)


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``; a union of several non-None types -> None (not walked further)."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else None
    return tp


def _child(tp: Any, key: Any) -> tuple[bool, Any]:
    """(is ``key`` a step into ``tp``, the type under it)."""
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        f = tp.model_fields.get(key)
        return (f is not None, f.annotation if f is not None else None)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict:
        return True, args[1] if args else Any
    if origin is list:
        return isinstance(key, int), args[0] if args else Any
    return False, None


def _walk(loc: tuple[Any, ...]) -> tuple[list[Any], Any]:
    """Clean ``loc`` (drop pydantic's union-member tags) and return (path, type of the parent of the last)."""
    path: list[Any] = []
    tp: Any = Params
    parent: Any = Params
    for key in loc:
        ok, sub = _child(tp, key)
        if not ok and isinstance(tp, type) and issubclass(tp, BaseModel):
            path.append(key)  # an unknown field: keep it, it is the key to report
            parent = tp
            break
        if not ok:
            continue  # union tag such as 'bool' or "literal['optimizer','all']"
        path.append(key)
        parent, tp = tp, sub
    return path, _unwrap(parent)


def dotted(path: list[Any]) -> str:
    """``['data', 'source_sets', 'real', 0, 'kind']`` -> ``data.source_sets.real[0].kind``."""
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def _describe(err: dict[str, Any], source: str, overridden: dict[str, str]) -> str:
    path, parent = _walk(tuple(err["loc"]))
    key = dotted(path)
    where = source
    for k, item in overridden.items():
        inside = key == k or key.startswith(k + ".") or key.startswith(k + "[")
        created = err["type"] == "extra_forbidden" and k.startswith(key + ".")  # --set typo.sub=1
        if inside or created:
            where = f"{source} (--set {item})"
    if err["type"] == "extra_forbidden":
        valid = (
            list(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        )
        prefix = dotted(path[:-1])
        name = lambda k: f"{prefix}.{k}" if prefix else k  # noqa: E731
        near = difflib.get_close_matches(str(path[-1]), valid, n=1, cutoff=0.6)
        hint = f"did you mean {name(near[0])}?" if near else f"valid keys: {', '.join(valid)}"
        return f"{where}: unknown key {key} ({hint})"
    msg = err["msg"]
    if err["type"] == "missing":
        return f"{where}: {key}: required key missing"
    if err["type"].startswith("value_error"):
        msg = msg.removeprefix("Value error, ")
        return f"{where}: {msg}" if not key or msg.startswith(key + ".") else f"{where}: {key}: {msg}"
    given = err.get("input")
    shown = json.dumps(given, default=str) if not isinstance(given, dict | list) else type(given).__name__
    return f"{where}: {key}={shown}: {msg}"


# ------------------------------------------------------------------------------------------ dvc.yaml


def unknown_part(key: str) -> tuple[int, list[str]] | None:
    """None when the dotted ``key`` (e.g. ``data.cutoff_len``, ``data.source_sets.real``) is in the
    model, else (index of the first unknown part, the valid keys at that level)."""
    tp: Any = Params
    parts = key.split(".")
    for i, part in enumerate(parts):
        ok, sub = _child(tp, part)
        if not ok:
            parent = _unwrap(tp)
            is_model = isinstance(parent, type) and issubclass(parent, BaseModel)
            return i, list(parent.model_fields) if is_model else []
        tp = sub
    return None


def check_dvc(dvc_yaml: str | Path = "dvc.yaml", params_file: str = "params.yaml") -> list[str]:
    """Problems with the ``params:`` lists of ``dvc_yaml``'s stages: keys of ``params_file`` that the
    model does not define (``dvc repro`` would track a key no step reads). Entries naming another
    params file are skipped. Returns one line per problem (empty: all good)."""
    doc = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8")) or {}
    problems = []
    for stage, spec in (doc.get("stages") or {}).items():
        for entry in (spec or {}).get("params") or []:
            keys = [entry] if isinstance(entry, str) else (entry or {}).get(params_file, [])
            for k in keys if isinstance(keys, list) else []:
                bad = unknown_part(str(k))
                if bad is None:
                    continue
                i, valid = bad
                parts = str(k).split(".")
                near = difflib.get_close_matches(parts[i], valid, n=1, cutoff=0.6)
                hint = (
                    f"did you mean {'.'.join([*parts[:i], near[0]])}?"
                    if near
                    else f"valid keys: {', '.join(valid)}"
                )
                problems.append(f"{dvc_yaml}: stage {stage}: params {k}: not a params key ({hint})")
    return problems


# ------------------------------------------------------------------------------------------ CLI


@click.group("params")
def params_cli() -> None:
    """The params.yaml schema: print it, show resolved params, check params.yaml and dvc.yaml."""


@params_cli.command("schema")
def schema_cmd() -> None:
    """Print the JSON schema of params.yaml (every key, type, default and description)."""
    click.echo(json.dumps(Params.model_json_schema(), indent=2))


def _step_options(f: Any) -> Any:
    from troupe.cli import step_options

    return step_options(f)


@params_cli.command("show")
@_step_options
def show_cmd(params: dict[str, Any]) -> None:
    """Print the resolved params (file + --set overrides + defaults) as YAML."""
    click.echo(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), nl=False)


@params_cli.command("check")
@click.option(
    "--dvc", "dvc_yaml", default="dvc.yaml", show_default=True, help="dvc.yaml whose params lists to check"
)
@_step_options
def check_cmd(params: dict[str, Any], dvc_yaml: str) -> None:
    """Validate params.yaml (done by loading it) and the ``params:`` keys of dvc.yaml; exit 2 on a problem."""
    from troupe.config import ConfigError

    problems = check_dvc(dvc_yaml) if Path(dvc_yaml).is_file() else []
    if problems:
        raise ConfigError("\n".join(problems))
    click.echo("params OK" + (f"; {dvc_yaml} params keys OK" if Path(dvc_yaml).is_file() else ""))
