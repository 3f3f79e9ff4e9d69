"""Scale plan: per-device memory and step time of full-parameter training before a run is submitted.

``troupe plan --model qwen2.5-32b --nodes 2 --devices-per-node 8 --zero-stage 3`` prints, per device:

- **model states** (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", arXiv:1910.02054, §3.1 and §5): mixed-precision Adam holds 2 bytes of bf16
  parameters, 2 bytes of bf16 gradients and K=12 bytes of fp32 optimizer states (master weights,
  momentum, variance) per parameter. ZeRO stage 1 partitions the optimizer states over the Nd
  data-parallel devices, stage 2 also the gradients, stage 3 also the parameters. DeepSpeed's
  implementation also keeps fp32 gradients for the optimizer step: at stages 0-2 a full fp32 copy
  of each device's gradient partition (4 bytes/param, partitioned; ``deepspeed/runtime/zero/
  stage_1_and_2.py: estimate_zero2_model_states_mem_needs``: "18 = 2_grads_16bit + 4_grads_32bit +
  4_params_32bit + 8_optimizer_states_32bit"); at stage 3 its optimizer converts gradients to fp32
  per sub-group and its estimator (``stage3.py: estimate_zero3_model_states_mem_needs``) counts
  18 bytes/param partitioned, i.e. 2 bytes above the paper's 16. The plan counts these fp32-gradient
  bytes too (``fp32_grads=True``, the default) so its model-state figures equal DeepSpeed's;
  ``--no-fp32-grads`` gives the paper's 2 + 2 + 12. ZeRO-3 also materialises one whole layer at a time (bf16 params and
  grads of the largest module, 4 bytes/param, as DeepSpeed's ``estimate_zero3_model_states_mem_needs``).
- **activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", arXiv:2205.05198, §4): per transformer layer ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit
  (attention block 11sbh + 5as²b, MLP 19sbh, two layer norms 4sbh), plus the output layer
  (``4*s*b*v`` bytes of fp32 logits for the cross entropy, 5sbh around it). The MLP term 19sbh =
  3sbh + 4sbi is written for a general intermediate size ``i`` (i=4h in the paper); a gated (SwiGLU)
  MLP stores gate, up, act(gate) and their product, so 3sbh + 8sbi. FlashAttention never stores the
  s×s score matrices, which removes the ``5as²b`` term exactly as the paper's selective recomputation
  (§4.2) does. With full activation checkpointing only the input of each layer is kept (``2sbhL``,
  §4.1) plus one layer's activations while it is recomputed in the backward pass.
- **sequence parallelism** (DeepSpeed Ulysses, Jacobs et al. 2023, arXiv:2309.14509, §3): with degree
  ``sp`` each device of an SP group holds ``s/sp`` tokens of every activation outside attention and
  ``a/sp`` heads of the full sequence inside it (the all-to-all swaps the two), so every term above,
  ``5as²b`` and the logits included, is divided by ``sp``. Model states are unchanged (ZeRO partitions
  over all ``Nd`` devices); an optimizer step sees ``Nd/sp`` sequences per micro-step. ``sp`` must
  divide ``Nd`` and the attention heads (and the KV heads divide ``sp`` or ``sp`` them).
- **step time** at a stated model-FLOPs utilisation: training costs ``6*N*tokens`` FLOPs (Kaplan et
  al. 2020, arXiv:2001.08361 §2.1; the MFU definition of Chowdhery et al. 2022, PaLM, arXiv:2204.02311
  App. B excludes recomputation), divided by ``devices * peak bf16 FLOP/s * MFU``.
- **LoRA / QLoRA** (``--train-method``; Hu et al. 2021, arXiv:2106.09685; Dettmers et al. 2023,
  arXiv:2305.14314): the base weights are frozen, so they hold no gradients and no optimizer states:
  2 bytes/param in bf16 (QLoRA: the blocks' linear weights in 4-bit NF4 with double quantisation,
  4.127 bits/param, QLoRA §3; embeddings, norms and the output layer stay bf16), partitioned like
  parameters at ZeRO-3. The adapters, ``r*(d_in+d_out)`` parameters per adapted matrix
  (:func:`troupe.train.lora.adapter_params`), are trained like full parameters (bf16 weights,
  gradients, fp32 gradients and 12 bytes of Adam states, partitioned per stage). ZeRO-3 gathers a
  frozen module without gradients (2 bytes/param); DPO needs no reference model (TRL computes the
  reference with the adapter disabled). Activations are counted as for full training (the adapters'
  own r-wide activations are negligible). Training FLOPs per token are ``4N + 6*N_lora`` (forward
  and input gradients through the base, no weight gradients for it).

Everything is in bytes internally and GiB (2**30 bytes) in the printed table.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

GIB = 2**30

#: Dense bf16 peak TFLOP/s (no sparsity) and memory per device.
#: Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOPS BF16 dense, 1979 with sparsity,
#: 80 GB HBM3); NVIDIA A100 datasheet (312 TFLOPS BF16 dense, 80 GB HBM2e); Huawei Ascend 910B:
#: ~313 TFLOPS FP16/BF16 (public Atlas 800T A2 figures; 64 GB HBM2e per NPU).
DEVICES: dict[str, dict[str, Any]] = {
    "h100": {"accelerator": "nvidia", "peak_tflops": 989.0, "memory_gib": 80.0},
    "a100": {"accelerator": "nvidia", "peak_tflops": 312.0, "memory_gib": 80.0},
    "910b": {"accelerator": "ascend", "peak_tflops": 313.0, "memory_gib": 64.0},
}
#: accelerator -> default device type.
ACCELERATORS: dict[str, str] = {"nvidia": "h100", "ascend": "910b"}
OFFLOADS = ("none", "optimizer", "param+optimizer")


@dataclass(frozen=True)
class Arch:
    """Decoder-only transformer shape (Hugging Face ``config.json`` names in comments).

    Attributes:
        layers: ``num_hidden_layers`` (L).
        hidden: ``hidden_size`` (h).
        heads: ``num_attention_heads`` (a).
        kv_heads: ``num_key_value_heads`` (grouped-query attention; = heads for MHA).
        intermediate: ``intermediate_size`` (i) of the MLP.
        vocab: ``vocab_size`` (v).
        tied_embeddings: ``tie_word_embeddings`` (lm_head shares the embedding matrix).
        gated_mlp: SwiGLU MLP (gate, up, down projections) instead of a 2-matrix GeLU MLP.
        qkv_bias: q/k/v projections have biases (Qwen2).
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    gated_mlp: bool = True
    qkv_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        """Parameters of one transformer block (attention, MLP, two norms)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if self.qkv_bias else 0)
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate
        return attn + mlp + 2 * h

    def total_params(self) -> int:
        """All parameters: embeddings, L blocks, final norm, lm_head unless tied."""
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied_embeddings else 2) + self.layers * self.layer_params() + self.hidden

    def largest_module_params(self) -> int:
        """Parameters of the largest single module (what ZeRO-3 gathers at once; DeepSpeed's
        ``model_to_params`` counts each module's own parameters): usually the embedding."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return max(self.vocab * h, h * self.intermediate, h * h + (h if self.qkv_bias else 0), h * kv)


#: Known models (numbers from each model's Hugging Face ``config.json``).
MODELS: dict[str, Arch] = {
    "qwen2.5-72b": Arch(80, 8192, 64, 8, 29568, 152064, qkv_bias=True),
    "qwen2.5-32b": Arch(64, 5120, 40, 8, 27648, 152064, qkv_bias=True),
    "qwen2.5-14b": Arch(48, 5120, 40, 8, 13824, 152064, qkv_bias=True),
    "qwen2.5-7b": Arch(28, 3584, 28, 4, 18944, 152064, qkv_bias=True),
    "smollm2-135m": Arch(30, 576, 9, 3, 1536, 49152, tied_embeddings=True),
}


def resolve_model(name: str) -> Arch:
    """Known architecture for ``name``; accepts HF ids (``Qwen/Qwen2.5-32B-Instruct`` -> qwen2.5-32b).

    Raises:
        ValueError: unknown name (the message lists the known ones and ``--params-billion``).
    """
    key = name.strip().lower().rsplit("/", 1)[-1]
    key = re.sub(r"-(instruct|chat|base)$", "", key)
    if key not in MODELS:
        raise ValueError(
            f"unknown model {name!r}: known {', '.join(sorted(MODELS))}; "
            "or pass --params-billion with --layers/--hidden"
        )
    return MODELS[key]


@dataclass
class PlanInput:
    """What a plan is computed from.

    Attributes:
        arch: model shape; ``params`` overrides its parameter count when set.
        params: total parameter count N (None = from ``arch``).
        seq_len: tokens per sequence (s).
        micro_batch: sequences per device per forward pass (b); DPO doubles it (chosen + rejected).
        nodes, devices_per_node: data-parallel world is ``nodes * devices_per_node`` (Nd).
        device_memory_gib: memory per device, GiB (None = from the device table).
        zero_stage: 0..3.
        offload: none | optimizer | param+optimizer (the latter needs stage 3).
        checkpointing: full activation checkpointing (recompute each layer in backward).
        flash_attention: attention kernels that never store s×s scores (SDPA/FlashAttention).
        accelerator: nvidia | ascend.
        device: h100 | a100 | 910b (None = the accelerator's default).
        method: sft | dpo (DPO: frozen bf16 reference model, 2 sequences per example).
        grad_accum: gradient accumulation steps (tokens per optimizer step).
        mfu: model-FLOPs utilisation assumed for step time (0..1].
        headroom: fraction of device memory kept free (CUDA/CANN context, comm buffers, fragmentation).
        fp32_grads: count DeepSpeed's fp32 gradients (4 bytes/param / Nd; 2 at ZeRO-3, as its estimator).
        host_buffer_factor: DeepSpeed's ``additional_buffer_factor`` for offloaded host memory.
        train_method: full | lora | qlora (``train.method``; qlora on nvidia only).
        lora_r: LoRA rank (``train.lora_r``).
        lora_targets: ``all-linear`` or a comma list of projection names (``train.lora_target_modules``).
        sequence_parallel: DeepSpeed Ulysses degree (``train.sequence_parallel_size``; 1 = off): devices
            sharing one sequence; divides activations by it.
    """

    arch: Arch
    params: int | None = None
    seq_len: int = 4096
    micro_batch: int = 1
    nodes: int = 1
    devices_per_node: int = 8
    device_memory_gib: float | None = None
    zero_stage: int = 3
    offload: str = "none"
    checkpointing: bool = True
    flash_attention: bool = True
    accelerator: str = "nvidia"
    device: str | None = None
    method: str = "sft"
    grad_accum: int = 1
    mfu: float = 0.4
    headroom: float = 0.1
    fp32_grads: bool = True
    host_buffer_factor: float = 1.5
    train_method: str = "full"
    lora_r: int = 16
    lora_targets: str = "all-linear"
    sequence_parallel: int = 1


@dataclass
class Plan:
    """Result of :func:`make_plan`; byte figures are per device unless named ``host_*`` (per node)."""

    inp: PlanInput
    n_params: int
    world: int
    device: str
    device_memory_bytes: float
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    gathered_bytes: float
    reference_bytes: float
    activation_bytes: float
    host_bytes_per_node: float
    tokens_per_step: int
    flops_per_step: float
    step_seconds: float
    tokens_per_second: float
    notes: list[str] = field(default_factory=list)
    trainable_params: int = 0

    @property
    def model_states_bytes(self) -> float:
        """Parameters + gradients + optimizer states + ZeRO-3 gathered layer on the device."""
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.gathered_bytes

    @property
    def total_bytes(self) -> float:
        return self.model_states_bytes + self.reference_bytes + self.activation_bytes

    @property
    def usable_bytes(self) -> float:
        return self.device_memory_bytes * (1.0 - self.inp.headroom)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (GiB figures rounded to 0.01, inputs included)."""
        g = lambda b: round(b / GIB, 2)  # noqa: E731
        inp = dataclasses.asdict(self.inp)
        inp["arch"] = dataclasses.asdict(self.inp.arch)
        return {
            "input": inp,
            "params": self.n_params,
            "trainable_params": self.trainable_params,
            "world_size": self.world,
            "device": self.device,
            "per_device_gib": {
                "parameters": g(self.params_bytes),
                "gradients": g(self.grads_bytes),
                "optimizer_states": g(self.optimizer_bytes),
                "zero3_gathered_layer": g(self.gathered_bytes),
                "reference_model": g(self.reference_bytes),
                "activations": g(self.activation_bytes),
                "model_states": g(self.model_states_bytes),
                "total": g(self.total_bytes),
                "usable": g(self.usable_bytes),
                "device": g(self.device_memory_bytes),
            },
            "host_offload_gib_per_node": g(self.host_bytes_per_node),
            "fits": self.fits,
            "tokens_per_step": self.tokens_per_step,
            "step_seconds": round(self.step_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "notes": self.notes,
        }


def arch_from_config(config: dict[str, Any]) -> Arch:
    """An :class:`Arch` from a Hugging Face ``config.json`` dict (Llama/Qwen2/Mistral-style names).

    Raises:
        KeyError: a shape field is missing.
    """
    heads = int(config["num_attention_heads"])
    return Arch(
        layers=int(config["num_hidden_layers"]),
        hidden=int(config["hidden_size"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
    )


def plan_deepspeed_config(inp: PlanInput) -> dict[str, Any]:
    """The DeepSpeed config a run with the plan's settings uses: the one generator,
    :func:`troupe.train.distributed.deepspeed_config`, fed from the plan's inputs."""
    from troupe.train.distributed import deepspeed_config

    offload = TRAIN_OFFLOAD[inp.offload]
    return deepspeed_config(
        {"zero_stage": inp.zero_stage, "offload": offload, "accelerator": inp.accelerator}
    )


#: The plan's offload name (:data:`OFFLOADS`) -> params ``train.offload``.
TRAIN_OFFLOAD: dict[str, Any] = {"none": False, "optimizer": "optimizer", "param+optimizer": "all"}


def plan_offload(train_offload: Any) -> str:
    """The plan's offload name for a ``train.offload`` value (false | true = optimizer | optimizer | all).

    Raises:
        ValueError: an unknown value.
    """
    value = "optimizer" if train_offload is True else (train_offload or False)
    for name, t in TRAIN_OFFLOAD.items():
        if t == value and type(t) is type(value):
            return name
    raise ValueError(f"train.offload={train_offload!r}: expected false, optimizer or all")


def needs_checkpointing(inp: PlanInput) -> bool:
    """True when the plan does not fit without activation checkpointing but fits (or fits better) with it.

    What ``train.gradient_checkpointing: auto`` asks: off when activations fit as they are (recompute
    costs ~1/3 more compute), on otherwise.
    """
    return not make_plan(dataclasses.replace(inp, checkpointing=False)).fits


def activation_bytes(
    arch: Arch, seq_len: int, micro_batch: int, checkpointing: bool, flash_attention: bool
) -> float:
    """Activation memory of one device's micro-batch, bytes (Korthikanti et al. 2022 §4, 16-bit).

    Per layer: ``sbh*(3+11+4) + 2sb·i·(2 or 4) + 5as²b`` (attention 11sbh + 5as²b, MLP 3sbh + 4sbi
    or 8sbi gated, norms 4sbh; = ``sbh(34 + 5as/h)`` for the paper's GPT with i=4h); ``5as²b`` is
    dropped with FlashAttention. Output layer: ``5sbh + 4sbv``. Checkpointing keeps ``2sbhL`` plus
    one recomputed layer.
    """
    s, b, h, a, i = seq_len, micro_batch, arch.hidden, arch.heads, arch.intermediate
    mlp = 3 * s * b * h + (8 if arch.gated_mlp else 4) * s * b * i
    layer = 11 * s * b * h + mlp + 4 * s * b * h + (0 if flash_attention else 5 * a * s * s * b)
    output = 5 * s * b * h + 4 * s * b * arch.vocab
    if checkpointing:
        return 2 * s * b * h * arch.layers + layer + output
    return layer * arch.layers + output


def make_plan(inp: PlanInput) -> Plan:
    """Compute the memory and throughput plan for ``inp``.

    Raises:
        ValueError: unknown accelerator/device/offload/method, a stage outside 0..3, an offload the
            stage cannot do (param offload needs ZeRO-3; no offload at stage 0), non-positive sizes.
    """
    if inp.accelerator not in ACCELERATORS:
        raise ValueError(
            f"unknown accelerator {inp.accelerator!r}: plan covers {' | '.join(ACCELERATORS)} "
            "(cpu runs are the embedded default and need no plan)"
        )
    device = inp.device or ACCELERATORS[inp.accelerator]
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: known {', '.join(DEVICES)}")
    if DEVICES[device]["accelerator"] != inp.accelerator:
        raise ValueError(f"device {device} is not an {inp.accelerator} device")
    if inp.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage {inp.zero_stage}: expected 0, 1, 2 or 3")
    if inp.offload not in OFFLOADS:
        raise ValueError(f"offload {inp.offload!r}: expected one of {', '.join(OFFLOADS)}")
    if inp.offload == "param+optimizer" and inp.zero_stage != 3:
        raise ValueError("offload param+optimizer needs --zero-stage 3 (parameter offload is ZeRO-3 only)")
    if inp.offload != "none" and inp.zero_stage == 0:
        raise ValueError("offload needs ZeRO stage 1, 2 or 3")
    if inp.method not in ("sft", "dpo"):
        raise ValueError(f"method {inp.method!r}: expected sft or dpo")
    if inp.train_method not in ("full", "lora", "qlora"):
        raise ValueError(f"train method {inp.train_method!r}: expected full, lora or qlora")
    if inp.train_method == "qlora" and inp.accelerator != "nvidia":
        raise ValueError("train method qlora needs a CUDA GPU (--accelerator nvidia): bitsandbytes 4-bit")
    for name in ("seq_len", "micro_batch", "nodes", "devices_per_node", "grad_accum"):
        if getattr(inp, name) < 1:
            raise ValueError(f"{name} must be >= 1")
    if not 0 < inp.mfu <= 1 or not 0 <= inp.headroom < 1:
        raise ValueError("mfu must be in (0, 1] and headroom in [0, 1)")
    sp, world = inp.sequence_parallel, inp.nodes * inp.devices_per_node
    key = "sequence parallel size (--sequence-parallel-size, train.sequence_parallel_size)"
    if sp < 1 or world % sp:
        raise ValueError(f"{key} {sp} must be >= 1 and divide the world size {world} (GPUs per SP group)")
    kv = inp.arch.kv_heads
    if inp.arch.heads % sp or (kv % sp and sp % kv):
        raise ValueError(
            f"{key} {sp} must divide the attention heads ({inp.arch.heads}) and divide or be divided by "
            f"the KV heads ({kv}) (DeepSpeed Ulysses shards heads)"
        )

    n = inp.params if inp.params is not None else inp.arch.total_params()
    nd = inp.nodes * inp.devices_per_node
    stage, off = inp.zero_stage, inp.offload
    g32 = (2 if stage == 3 else 4) if inp.fp32_grads else 0
    notes: list[str] = []

    # Model states per device (ZeRO paper §5.1 / DeepSpeed estimators). LoRA/QLoRA: a frozen base
    # (stored only) plus nt adapter parameters trained as full ones are; full: nt = n, nothing frozen.
    from troupe.train.lora import adapter_params, frozen_base_bytes

    lora = inp.train_method != "full"
    nt = adapter_params(inp.arch, inp.lora_r, inp.lora_targets) if lora else n
    stored = frozen_base_bytes(inp.arch, n, inp.train_method) + 2 * nt
    params = stored / nd if stage == 3 else stored
    grads16 = 2 * nt / nd if stage >= 2 else 2 * nt
    grads32 = g32 * nt / nd if stage >= 1 else g32 * nt
    optim = 12 * nt / nd if stage >= 1 else 12 * nt
    gathered = (2 if lora else 4) * inp.arch.largest_module_params() if stage == 3 else 0.0
    if lora:
        notes.append(f"{inp.train_method}: {nt:,} trainable adapter params (r={inp.lora_r}), frozen base")
    host_per_device = 0.0
    if off in ("optimizer", "param+optimizer"):
        # ZeRO-Offload: fp32 master/m/v and fp32 grads live on the host; bf16 grads stream out in buckets.
        host_per_device += (16 if inp.fp32_grads else 12) * nt / nd  # fp32 grads whole on the host
        optim = grads32 = grads16 = 0.0
    if off == "param+optimizer":
        host_per_device += params
        params = 0.0
    host_per_node = host_per_device * inp.devices_per_node * inp.host_buffer_factor

    # DPO: frozen bf16 reference model (partitioned like the policy's parameters under ZeRO-3).
    ref = 0.0
    seqs = inp.micro_batch
    if inp.method == "dpo":
        ref = 2 * n / nd if stage == 3 else 2 * n
        if lora:  # TRL: the reference is the same model with the adapter disabled
            ref = 0.0
        if off == "param+optimizer":
            host_per_node += ref * inp.devices_per_node
            ref = 0.0
        seqs = 2 * inp.micro_batch
        notes.append("dpo: chosen+rejected double the sequences per micro-batch; reference model in bf16")

    act = activation_bytes(inp.arch, inp.seq_len, seqs, inp.checkpointing, inp.flash_attention) / sp
    if sp > 1:
        notes.append(f"sequence parallel (Ulysses) x{sp}: activations / {sp}, {nd // sp} sequences per step")

    dev = DEVICES[device]
    mem = (inp.device_memory_gib if inp.device_memory_gib is not None else dev["memory_gib"]) * GIB
    tokens = inp.micro_batch * inp.seq_len * (nd // sp) * inp.grad_accum
    train_flops = 4 * n + 6 * nt if lora else 6 * n  # LoRA: no weight gradients for the frozen base
    per_token = train_flops if inp.method == "sft" else 2 * (train_flops + 2 * n)  # dpo: 2 seqs, + ref fwd
    flops = per_token * tokens
    step = flops / (nd * dev["peak_tflops"] * 1e12 * inp.mfu)
    if inp.params is not None:
        notes.append("params given: layer shape (activations, gathered layer) from the architecture options")
    return Plan(
        inp=inp, n_params=n, world=nd, device=device, device_memory_bytes=mem,
        params_bytes=params, grads_bytes=grads16 + grads32, optimizer_bytes=optim, gathered_bytes=gathered,
        reference_bytes=ref, activation_bytes=act, host_bytes_per_node=host_per_node,
        tokens_per_step=tokens, flops_per_step=flops, step_seconds=step, tokens_per_second=tokens / step,
        notes=notes, trainable_params=nt,
    )  # fmt: skip


def suggestions(inp: PlanInput, limit: int = 4) -> list[str]:
    """Single changes (as CLI flags) that make a non-fitting plan fit, cheapest first.

    Tries: activation checkpointing, a higher ZeRO stage, micro-batch 1, optimizer offload, parameter
    offload, then more nodes (smallest count up to 64 that fits, also with ZeRO-3).
    """
    cands: list[tuple[str, dict[str, Any]]] = []
    if not inp.checkpointing:
        cands.append(("--checkpointing", {"checkpointing": True}))
    for st in range(inp.zero_stage + 1, 4):
        cands.append((f"--zero-stage {st}", {"zero_stage": st}))
    if inp.micro_batch > 1:
        cands.append(("--micro-batch 1", {"micro_batch": 1}))
    if inp.train_method == "full":
        cands.append(("--train-method lora", {"train_method": "lora"}))
    if inp.offload == "none":
        flag = "--offload optimizer" if inp.zero_stage else "--zero-stage 1 --offload optimizer"
        cands.append((flag, {"offload": "optimizer", "zero_stage": max(inp.zero_stage, 1)}))
    if inp.offload != "param+optimizer":
        flag = (
            "--offload param+optimizer" if inp.zero_stage == 3 else "--zero-stage 3 --offload param+optimizer"
        )
        cands.append((flag, {"offload": "param+optimizer", "zero_stage": 3}))
    out = []
    for flag, change in cands:
        if make_plan(dataclasses.replace(inp, **change)).fits:
            out.append(flag)
    for prefix, change in [("", {}), ("--zero-stage 3 ", {"zero_stage": 3})]:
        if prefix and inp.zero_stage == 3:
            continue
        for nodes in range(inp.nodes + 1, 65):
            if make_plan(dataclasses.replace(inp, nodes=nodes, **change)).fits:
                out.append(f"{prefix}--nodes {nodes}")
                break
    return out[:limit]


def render(plan: Plan) -> None:
    """Print ``plan`` as a rich table (stdout)."""
    from rich.console import Console
    from rich.table import Table

    inp = plan.inp
    g = lambda b: f"{b / GIB:,.2f}"  # noqa: E731
    t = Table(
        title=(
            f"{plan.n_params / 1e9:.2f}B params, {inp.method.upper()}"
            + (f" {inp.train_method} r={inp.lora_r}" if inp.train_method != "full" else "")
            + f", seq {inp.seq_len} x micro-batch "
            f"{inp.micro_batch}, {inp.nodes}x{inp.devices_per_node} {plan.device.upper()} "
            f"({plan.device_memory_bytes / GIB:.0f} GiB), ZeRO-{inp.zero_stage}, offload {inp.offload}, "
            f"checkpointing {'on' if inp.checkpointing else 'off'}"
        )
    )
    t.add_column("per device")
    t.add_column("GiB", justify="right")
    t.add_column("basis")
    st, off, g32 = (
        inp.zero_stage,
        inp.offload,
        f" + {2 if inp.zero_stage == 3 else 4} B fp32" if inp.fp32_grads else "",
    )
    per = lambda cond: " / Nd" if cond else ""  # noqa: E731
    host = "on host (offload)"
    rows = [
        (
            "parameters (bf16)",
            plan.params_bytes,
            host
            if off == "param+optimizer"
            else (
                f"frozen base {'NF4 4.127 bit' if inp.train_method == 'qlora' else '2 B'} + adapter 2 B{per(st == 3)}"
                if inp.train_method != "full"
                else f"2 B/param{per(st == 3)}"
            ),
        ),
        (
            "gradients",
            plan.grads_bytes,
            host if off != "none" else f"(2 B bf16{per(st >= 2)}){g32}{per(st >= 1)}",
        ),
        (
            "optimizer states (fp32 Adam)",
            plan.optimizer_bytes,
            host if off != "none" else f"12 B/param{per(st >= 1)}",
        ),
        (
            "ZeRO-3 gathered layer",
            plan.gathered_bytes,
            (f"{2 if inp.train_method != 'full' else 4} B x largest module" if st == 3 else "-"),
        ),
    ]
    if inp.method == "dpo":
        rows.append(("reference model (bf16)", plan.reference_bytes, "2 B/param"))
    rows.append(
        (
            "activations",
            plan.activation_bytes,
            "Korthikanti 2022"
            + (", ckpt" if inp.checkpointing else "")
            + (f", / SP {inp.sequence_parallel}" if inp.sequence_parallel > 1 else ""),
        )
    )
    for name, b, basis in rows:
        t.add_row(name, g(b), basis)
    t.add_section()
    t.add_row("total", g(plan.total_bytes), f"Nd = {plan.world}")
    t.add_row("usable", g(plan.usable_bytes), f"{(1 - inp.headroom):.0%} of device memory")
    t.add_row("fits", "[green]yes[/]" if plan.fits else "[red]NO[/]", "")
    if plan.host_bytes_per_node:
        t.add_row(
            "host memory / node (offload)", g(plan.host_bytes_per_node), f"x{inp.host_buffer_factor} buffer"
        )
    t.add_section()
    t.add_row("tokens / step", f"{plan.tokens_per_step:,}", f"grad accum {inp.grad_accum}")
    t.add_row(
        "step time (s)",
        f"{plan.step_seconds:,.2f}",
        f"{'6' if inp.method == 'sft' else '16'}·N·tokens"
        if inp.train_method == "full"
        else ("(4N+6N_lora)·tokens" if inp.method == "sft" else "2·(6N+6N_lora)·tokens"),
    )
    t.add_row(
        "tokens / s",
        f"{plan.tokens_per_second:,.0f}",
        f"MFU {inp.mfu:.0%} of {DEVICES[plan.device]['peak_tflops']:.0f} TFLOPs",
    )
    Console(width=120).print(t)
    for n in plan.notes:
        click.echo(f"note: {n}")


class DoesNotFit(click.ClickException):
    """The plan exceeds usable device memory; exit code 3."""

    exit_code = 3


@click.command("plan")
@click.option(
    "--model", "model", default=None, help="known model (qwen2.5-32b, qwen2.5-7b, smollm2-135m, ...) or HF id"
)
@click.option(
    "--params-billion", type=float, default=None, help="parameter count in billions (instead of --model)"
)
@click.option("--layers", type=int, default=None, help="override / give number of layers")
@click.option("--hidden", type=int, default=None, help="override / give hidden size")
@click.option("--heads", type=int, default=None, help="attention heads (default hidden/128)")
@click.option("--kv-heads", type=int, default=None, help="key/value heads (default = heads)")
@click.option("--intermediate", type=int, default=None, help="MLP intermediate size")
@click.option("--vocab", type=int, default=None, help="vocabulary size")
@click.option("--seq-len", type=int, default=4096, show_default=True)
@click.option("--micro-batch", type=int, default=1, show_default=True, help="sequences per device per step")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--devices-per-node", type=int, default=8, show_default=True)
@click.option("--device-memory-gib", type=float, default=None, help="per device; default from --device")
@click.option("--zero-stage", type=click.IntRange(0, 3), default=3, show_default=True)
@click.option("--offload", type=click.Choice(OFFLOADS), default="none", show_default=True)
@click.option(
    "--checkpointing/--no-checkpointing", default=True, show_default=True, help="activation checkpointing"
)
@click.option("--flash-attention/--no-flash-attention", default=True, show_default=True)
@click.option(
    "--sequence-parallel-size",
    "sequence_parallel",
    type=int,
    default=1,
    show_default=True,
    help="DeepSpeed Ulysses degree: devices sharing one sequence (train.sequence_parallel_size)",
)
@click.option("--accelerator", default="nvidia", show_default=True, help="nvidia | ascend")
@click.option("--device", default=None, help="h100 | a100 | 910b (default: h100 for nvidia, 910b for ascend)")
@click.option("--method", type=click.Choice(["sft", "dpo"]), default="sft", show_default=True)
@click.option(
    "--train-method",
    type=click.Choice(["full", "lora", "qlora"]),
    default="full",
    show_default=True,
    help="full parameters, or LoRA adapters on a frozen bf16 (lora) / 4-bit (qlora) base (train.method)",
)
@click.option("--lora-r", type=int, default=16, show_default=True, help="LoRA rank (train.lora_r)")
@click.option(
    "--lora-targets",
    default="all-linear",
    show_default=True,
    help="all-linear or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
)
@click.option(
    "--mfu", type=float, default=0.4, show_default=True, help="model FLOPs utilisation for step time"
)
@click.option(
    "--headroom", type=float, default=0.1, show_default=True, help="fraction of device memory kept free"
)
@click.option(
    "--fp32-grads/--no-fp32-grads",
    default=True,
    show_default=True,
    help="count DeepSpeed's fp32 gradient partition (off = ZeRO paper's 2+2+12)",
)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of the table")
@click.option(
    "--deepspeed-config",
    "ds_out",
    default=None,
    metavar="FILE",
    help="also write the DeepSpeed config a run with these settings uses (troupe.train.distributed.deepspeed_config; - = stdout)",
)
def plan_cmd(
    model: str | None,
    params_billion: float | None,
    layers: int | None,
    hidden: int | None,
    heads: int | None,
    kv_heads: int | None,
    intermediate: int | None,
    vocab: int | None,
    as_json: bool,
    ds_out: str | None,
    **kw: Any,
) -> None:
    """Per-device memory (params, grads, optimizer, activations) and step time of a training run.

    Exits 3, naming changes that would fit, when the plan exceeds usable device memory.
    """  # fmt: skip
    try:
        if model:
            arch = resolve_model(model)
        elif params_billion is not None:
            if not (layers and hidden):
                raise ValueError("--params-billion needs --layers and --hidden (activations depend on them)")
            h = hidden
            arch = Arch(layers, h, heads or max(1, h // 128), kv_heads or heads or max(1, h // 128),
                        intermediate or 4 * h, vocab or 32000, gated_mlp=intermediate is not None)  # fmt: skip
        else:
            raise ValueError("give --model NAME or --params-billion N")
        shape = {k: v for k, v in dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                                       intermediate=intermediate, vocab=vocab).items() if v}  # fmt: skip
        arch = dataclasses.replace(arch, **shape)
        inp = PlanInput(arch=arch, params=round(params_billion * 1e9) if params_billion else None, **kw)
        plan = make_plan(inp)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        render(plan)
    if ds_out:
        text = json.dumps(plan_deepspeed_config(inp), indent=2)
        if ds_out == "-":
            click.echo(text)
        else:
            Path(ds_out).write_text(text + "\n", encoding="utf-8")
    if not plan.fits:
        fixes = suggestions(inp)
        over = (plan.total_bytes - plan.usable_bytes) / GIB
        msg = (
            f"does not fit: needs {plan.total_bytes / GIB:.1f} GiB per device, {plan.usable_bytes / GIB:.1f} GiB "
            f"usable ({over:.1f} GiB over). "
        )
        msg += (
            ("Changes that fit: " + "; ".join(fixes))
            if fixes
            else (
                "No single change fits: raise --zero-stage/--offload and --nodes together, or shorten --seq-len."
            )
        )
        raise DoesNotFit(msg)
