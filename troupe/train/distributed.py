"""Ray Train + DeepSpeed ZeRO plumbing shared by SFT and DPO.

* :func:`deepspeed_config` - the ZeRO config handed to HF ``TrainingArguments(deepspeed=...)``
  ("auto" values are filled by the HF integration, see transformers' DeepSpeed docs).
* :func:`run_on_ray` - runs a per-worker training loop with Ray Train's ``TorchTrainer``
  (``num_workers`` workers; gloo on CPU, nccl on NVIDIA, hccl on Ascend). Ray sets up the process
  group and RANK/LOCAL_RANK/WORLD_SIZE; HF Trainer + DeepSpeed join it.
* :class:`ProgressCallback` - rank-0 console progress (step, loss, lr, real tokens/s, ETA) and live
  MLflow metrics on the step's child run.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from troupe.config import ConfigError

#: accelerator -> (torch.distributed backend, DeepSpeed accelerator name, Ray resource per worker)
ACCELERATORS: dict[str, tuple[str, str, dict[str, float]]] = {
    "cpu": ("gloo", "cpu", {"CPU": 1}),
    "nvidia": ("nccl", "cuda", {"CPU": 4, "GPU": 1}),
    "ascend": ("hccl", "npu", {"CPU": 4, "NPU": 1}),
}


def accelerator_spec(name: str) -> tuple[str, str, dict[str, float]]:
    """(backend, DS accelerator, resources) for ``train.accelerator``; ConfigError if unknown."""
    if name not in ACCELERATORS:
        raise ConfigError(f"train.accelerator={name!r}: expected one of {sorted(ACCELERATORS)}")
    return ACCELERATORS[name]


def deepspeed_config(train: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of a run: the one generator (``troupe plan --deepspeed-config`` prints it too).

    Keys read from ``train``: ``zero_stage`` (0-3), ``offload`` (false | optimizer | all) and
    ``accelerator`` (cpu | nvidia | ascend). ZeRO stages per Rajbhandari et al. 2020
    (arXiv:1910.02054): 1 partitions optimizer states, 2 also gradients, 3 also parameters.

    * ``overlap_comm`` on GPU/NPU (reduce-scatter overlapped with backward, DeepSpeed's recommended
      ZeRO-3 setting); off on CPU/gloo, where there is no separate comm stream to overlap with.
    * Offload pins host memory on GPU/NPU (faster H2D/D2H copies) and declares the optimizer, so
      DeepSpeed builds its own ``DeepSpeedCPUAdam`` for the offloaded states (the HF Trainer's torch
      AdamW on offloaded states is what ``zero_force_ds_cpu_optimizer`` guards against; the guard
      stays on).
    * Mixed precision (bf16) is "auto" (on for GPU/NPU TrainingArguments, off on CPU); other "auto"
      values are filled by the HF integration from TrainingArguments (transformers' DeepSpeed docs).

    Raises:
        ConfigError: a stage outside 0-3, an unknown offload or accelerator, param offload below stage 3.
    """
    stage = int(train.get("zero_stage", 3))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={stage}: expected 0, 1, 2 or 3")
    offload = train.get("offload", False)
    if offload not in (False, None, True, "none", "optimizer", "all"):
        raise ConfigError(f"train.offload={offload!r}: expected false, optimizer or all")
    if offload == "all" and stage != 3:
        raise ConfigError("train.offload=all (parameters too) needs train.zero_stage=3")
    accel = str(train.get("accelerator", "cpu"))
    accelerator_spec(accel)
    on_device = accel != "cpu"
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": on_device, "contiguous_gradients": True}
    cfg: dict[str, Any] = {}
    if offload in (True, "optimizer", "all") and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_device}
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_device}
    if stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            reduce_bucket_size="auto",
        )
    return {
        **cfg,
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        # HF's torch AdamW without offload is fine; DeepSpeed only tests its own optimizers
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }


def checkpoint_every(train: dict[str, Any]) -> int:
    """Optimizer steps between checkpoints: ``train.checkpoint_every``, else ``$TROUPE_CHECKPOINT_EVERY``
    (the training chart's ``checkpoints.everySteps``, so cluster runs checkpoint by default), else 0 (off)."""
    return int(train.get("checkpoint_every") or 0) or int(os.environ.get("TROUPE_CHECKPOINT_EVERY") or 0)


def training_args_common(train: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and DPOConfig for the configured accelerator."""
    backend, _, _ = accelerator_spec(train.get("accelerator", "cpu"))
    cpu = train.get("accelerator", "cpu") == "cpu"
    kw: dict[str, Any] = dict(
        use_cpu=cpu,
        ddp_backend=backend,
        bf16=not cpu,
        logging_steps=1,
        save_strategy="steps" if checkpoint_every(train) > 0 else "no",
        save_steps=max(checkpoint_every(train), 1),
        save_total_limit=1,  # local copies; storage keeps train.checkpoint_num_to_keep (Ray Train)
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        gradient_checkpointing=train.get("gradient_checkpointing") is True,
    )
    if int(train.get("zero_stage", 3)) > 0 and int(train.get("num_workers", 1)) >= 1:
        kw["deepspeed"] = deepspeed_config(train)
    return kw


def sequence_parallel_config(train: dict[str, Any], method: str) -> Any | None:
    """Accelerate's ``ParallelismConfig`` for ``train.sequence_parallel_size`` > 1, else None.

    DeepSpeed Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses", arXiv:2309.14509; ALST in DeepSpeed
    0.18+): each of ``sp`` ranks holds ``1/sp`` of every sequence and all-to-alls swap sequence shards
    for head shards around attention, so activations per device shrink ~``sp`` times. transformers 5
    takes it as ``TrainingArguments(parallelism_config=ParallelismConfig(sp_size=sp,
    sp_backend="deepspeed"))``; accelerate wraps the attention (``UlyssesSPAttentionHF``, over sdpa or
    flash_attention_2) and the data loader, and TRL's SFTTrainer reduces the loss across the group.

    Raises:
        ConfigError (naming ``train.sequence_parallel_size``): ``train.accelerator`` cpu (Troupe does not
            run Ulysses on CPU/gloo: accelerate's Ulysses path is built for GPU/NPU kernels and is not
            tested here), ``method`` dpo (TRL's DPOTrainer computes its own loss and does not gather it
            over sequence shards), ``train.zero_stage`` 0 (Ulysses runs inside the DeepSpeed engine), or
            ``train.num_workers`` not a multiple of the degree.
    """
    sp = int(train.get("sequence_parallel_size", 1) or 1)
    if sp == 1:
        return None
    key = f"train.sequence_parallel_size={sp}"
    if sp < 1:
        raise ConfigError(f"{key}: must be >= 1")
    if train.get("accelerator", "cpu") == "cpu":
        raise ConfigError(
            f"{key}: DeepSpeed Ulysses is not run on CPU/gloo here (accelerate's Ulysses attention is for "
            "GPU/NPU kernels); set it to 1, or train.accelerator to nvidia or ascend"
        )
    if method != "sft":
        raise ConfigError(f"{key}: only SFT supports sequence parallelism (TRL's DPOTrainer does not); use 1")
    if int(train.get("zero_stage", 3)) == 0:
        raise ConfigError(f"{key}: Ulysses runs inside DeepSpeed; needs train.zero_stage 1, 2 or 3")
    workers = int(train.get("num_workers", 1))
    if workers % sp:
        raise ConfigError(f"{key}: must divide train.num_workers={workers} (ranks per sequence group)")
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    attn = "flash_attention_2" if train.get("attn_implementation") == "flash_attention_2" else "sdpa"
    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation=attn)
    return ParallelismConfig(sp_size=sp, sp_backend="deepspeed", sp_handler=handler)


def gradient_checkpointing(cfg: dict[str, Any]) -> bool:
    """Whether to recompute activations: ``train.gradient_checkpointing`` true/false as given; ``auto``
    asks the memory plan (:func:`troupe.plan.needs_checkpointing`) for this model (its ``config.json``),
    sequence length, micro-batch, world size, ZeRO stage and offload on the run's accelerator.
    ``auto`` on CPU is off (no device memory to plan)."""
    train = cfg["train"]
    setting = train.get("gradient_checkpointing", False)
    if setting != "auto":
        return bool(setting)
    if train.get("accelerator", "cpu") == "cpu":
        return False
    from troupe.plan import PlanInput, arch_from_config, needs_checkpointing, plan_offload
    from troupe.train.lora import lora_targets_text

    conf = json.loads(Path(cfg["base_model_dir"], "config.json").read_text())
    inp = PlanInput(
        arch=arch_from_config(conf),
        seq_len=int(cfg["cutoff_len"]),
        micro_batch=int(cfg["hp"]["per_device_batch_size"]),
        nodes=1,
        devices_per_node=int(train.get("num_workers", 1)),
        zero_stage=int(train.get("zero_stage", 3)),
        offload=plan_offload(train.get("offload", False)),
        accelerator=str(train["accelerator"]),
        method=cfg["method"],
        checkpointing=False,
        train_method=str(train.get("method") or "full"),
        lora_r=int(train.get("lora_r", 16)),
        lora_targets=lora_targets_text(train),
        sequence_parallel=int(train.get("sequence_parallel_size", 1) or 1),
    )
    return needs_checkpointing(inp)


def join_deepspeed(train: dict[str, Any]) -> None:
    """Inside a Ray Train worker: make DeepSpeed's comm layer adopt the process group Ray created.

    Without it DeepSpeed sees world size 1 while computing batch sizes for ``zero.Init``.
    """
    if int(train.get("zero_stage", 3)) == 0:
        return
    import deepspeed

    backend, _, _ = accelerator_spec(train.get("accelerator", "cpu"))
    deepspeed.init_distributed(dist_backend=backend)


def make_progress_callback(
    step_name: str, max_steps: int, mlflow_run_id: str | None, tracking_uri: str | None
):
    """A transformers ``TrainerCallback`` printing and logging progress on rank 0.

    Console line per optimizer step: ``[sft] step 3/6 loss 2.314 lr 5.0e-05 tok/s 412 ETA 0:00:41``.
    MLflow metrics (step-indexed): ``loss``, ``learning_rate``, ``tokens_per_s`` (real, non-padding
    tokens summed over workers per wall second), ``tokens_seen``.
    """
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.time()
            self.last_t = self.t0
            self.last_tokens = 0
            self.client = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_t = time.time()
            if state.is_world_process_zero and mlflow_run_id and tracking_uri:
                import mlflow

                self.client = mlflow.MlflowClient(tracking_uri)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now = time.time()
            tokens = int(state.num_input_tokens_seen or 0)
            dt = max(now - self.last_t, 1e-9)
            tps = (tokens - self.last_tokens) / dt
            self.last_t, self.last_tokens = now, tokens
            step = state.global_step
            elapsed = now - self.t0
            eta = elapsed / max(step, 1) * max(max_steps - step, 0)
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, int | float) and k != "step"}
            metrics["tokens_per_s"] = tps
            metrics["tokens_seen"] = float(tokens)
            loss = metrics.get("loss", float("nan"))
            lr = metrics.get("learning_rate", float("nan"))
            if "loss" in metrics:
                print(
                    f"[{step_name}] step {step}/{max_steps} loss {loss:.4f} lr {lr:.1e} "
                    f"tok/s {tps:.0f} ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                    flush=True,
                )
            if self.client is not None:
                from mlflow.entities import Metric

                ts = int(now * 1000)
                self.client.log_batch(
                    mlflow_run_id,
                    metrics=[Metric(k.replace("/", "_"), v, ts, step) for k, v in metrics.items()],
                )

    return ProgressCallback()


def _quiet_worker_logs() -> None:
    """Ray worker setup hook: silence the placement-group cleaner's state-API warning.

    Ray Train's ``PlacementGroupCleaner`` polls the state API every second; that API lives in the
    dashboard, which the local cluster does not start (memory on a 2-core node), so each poll logs
    "Failed to query Ray Train Controller actor state" for the whole run. The cleaner only matters
    when the controller dies ungracefully; the local cluster is torn down with the job anyway.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )


def _ray_init(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        # Ray Train's print patch re-logs every print of a worker, including what libraries print
        # into a captured sys.stdout (HF datasets' fingerprinting makes dill dis.dis() each map
        # function): pages of bytecode and every progress line twice in the console
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    address = os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env, "worker_process_setup_hook": _quiet_worker_logs}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local": a fresh cluster for this job, never the long-lived serving cluster that
        # `troupe deploy` leaves running (its CPUs are taken by model replicas)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            runtime_env=runtime_env,
            include_dashboard=False,
            log_to_driver=True,
        )


def checkpoint_storage(train: dict[str, Any], out: str) -> str:
    """Where Ray Train keeps a run's checkpoints: ``$TROUPE_CHECKPOINT_URI``, else
    ``train.checkpoint_uri``, else ``.checkpoints`` beside the step's output location ``out``."""
    from troupe import storage

    explicit = os.environ.get("TROUPE_CHECKPOINT_URI") or train.get("checkpoint_uri")
    if explicit:
        return str(explicit)
    if storage.is_remote(out):
        return out.rstrip("/").rsplit("/", 1)[0] + "/.checkpoints"
    return str(Path(out).resolve().parent / ".checkpoints")


def run_on_ray(loop, config: dict[str, Any], train: dict[str, Any], name: str, storage_uri: str):
    """Run ``loop(config)`` on ``train.num_workers`` Ray Train workers and return the ``ray.train.Result``.

    Connects to ``RAY_ADDRESS`` when set (KubeRay / ``ray start`` cluster), else starts a local cluster
    sized to the workers. Checkpoints go to ``storage_uri/name`` (a path or ``s3://`` URI, through
    :mod:`troupe.storage`'s filesystem); ``train.checkpoint_num_to_keep`` newest are kept. ``name`` is
    the run's stable identity: a resubmitted job (a KubeRay retry, a re-run of the same pipeline run)
    with the same name finds Ray Train's checkpoint-manager snapshot there and resumes from the last
    checkpoint instead of step 0. A lost worker restarts the worker group up to ``train.max_failures``
    times, also from the last checkpoint.

    Raises:
        ConfigError: unknown accelerator.
        ray.train.TrainingFailedError: a worker failed beyond ``max_failures``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from troupe import storage

    backend, ds_acc, resources = accelerator_spec(train.get("accelerator", "cpu"))
    os.environ.setdefault("DS_ACCELERATOR", ds_acc)
    n = int(train.get("num_workers", 2))
    _ray_init(num_cpus=max(n, os.cpu_count() or 1) if backend == "gloo" else None)
    fs, path = storage.filesystem(storage_uri)
    keep = int(train.get("checkpoint_num_to_keep", 2))
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend=backend, timeout_s=1800),
        scaling_config=ScalingConfig(
            num_workers=n,
            use_gpu=backend == "nccl",
            resources_per_worker=resources,
            placement_strategy=str(train.get("placement_strategy", "PACK")),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=keep if keep > 0 else None),
            failure_config=FailureConfig(max_failures=int(train.get("max_failures", 0))),
        ),
    )
    return trainer.fit()


def node_scratch(cfg: dict[str, Any]) -> Path:
    """This node's scratch directory for the run (``$TROUPE_SCRATCH/runs/<run name>``).

    Node-local by design: nothing written here is read by a process on another node. Inputs are
    downloaded here (:func:`troupe.storage.local_copy`) and outputs uploaded from here.
    """
    from troupe import storage

    d = storage.scratch_root() / "runs" / cfg["run_name"]
    d.mkdir(parents=True, exist_ok=True)
    return d


#: True in the rank that wrote its node's dataset copy (:func:`_node_dataset`); that rank also writes
#: the node's TRL caches (see ``troupe.train.dpo.node_local_dpo_trainer``).
NODE_WRITER = False


def _node_dataset(cfg: dict[str, Any]):
    """The training examples as a ``datasets.Dataset`` saved once per node and loaded by its ranks.

    One rank per node (the first to create the node's writer marker; a marker per worker-group start,
    so a restarted group writes afresh) saves the examples to ``<node scratch>/dataset-<method>`` and
    every rank loads it after a barrier, so the cache files TRL writes while preprocessing (DPO's
    precomputed reference log-probs) land in a directory every rank on that node can open. No
    directory is shared between nodes. The writer is chosen by the file system, not by Ray's local
    rank: Ray numbers local ranks per node IP, and nodes can share an IP.
    """
    import shutil

    import torch.distributed as dist
    from datasets import Dataset, load_from_disk

    global NODE_WRITER
    if not (dist.is_available() and dist.is_initialized()):
        NODE_WRITER = True
        return Dataset.from_list(cfg["examples"])
    token = [os.urandom(6).hex() if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(token, src=0)
    d = node_scratch(cfg) / f"dataset-{cfg['method']}"
    try:
        os.close(os.open(d.parent / f".dataset-writer-{token[0]}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        NODE_WRITER = True
    except FileExistsError:
        NODE_WRITER = False
    if NODE_WRITER:
        shutil.rmtree(d, ignore_errors=True)
        Dataset.from_list(cfg["examples"]).save_to_disk(str(d))
    dist.barrier()
    return load_from_disk(str(d))


def training_attention(train: dict[str, Any], padding_free: bool) -> str | None:
    """Attention implementation to train with, from ``train.attn_implementation`` (default ``auto``).

    ``auto``: padding-free (packed) batches train with ``varlen``, :data:`troupe.train.attention.VARLEN_ATTENTION`
    (per-sequence SDPA, FlashAttention's varlen semantics without the flash-attn package); anything else
    keeps the model's default (``None``). An explicit name (``sdpa``, ``eager``, ``flash_attention_2``
    where flash-attn is installed) is used as given. The saved checkpoint is unaffected.
    """
    name = str(train.get("attn_implementation") or "auto")
    if name == "varlen" or (name == "auto" and padding_free):
        from troupe.train.attention import register_varlen_attention

        return register_varlen_attention()
    return None if name == "auto" else name


def build_trainer(cfg: dict[str, Any], common: dict[str, Any]):
    """A TRL trainer (SFT or DPO by ``cfg["method"]``) with Troupe's progress callback.

    ``common`` are the shared TrainingArguments (:func:`training_args_common`). The method module's
    ``make_trainer_args`` returns ``(TRL config, trainer class)``; the config (and with it a ZeRO-3
    DeepSpeed config) exists before ``from_pretrained`` so weights load partitioned.
    """
    import importlib

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    mod = importlib.import_module(f"troupe.train.{cfg['method']}")
    args, trainer_cls = mod.make_trainer_args(cfg, common)
    tok = AutoTokenizer.from_pretrained(cfg["base_model_dir"])
    from troupe.train import lora

    # lora/qlora: TRL wraps the model in PEFT adapters (peft_config); qlora loads a 4-bit base
    model = AutoModelForCausalLM.from_pretrained(cfg["base_model_dir"], **lora.load_kwargs(cfg["train"]))
    attn = training_attention(cfg["train"], padding_free=bool(getattr(args, "padding_free", False)))
    if attn:
        model.set_attn_implementation(attn)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=_node_dataset(cfg),
        processing_class=tok,
        **lora.trainer_kwargs(cfg["train"]),
        callbacks=[
            make_progress_callback(
                cfg["method"], args.max_steps, cfg.get("mlflow_run_id"), cfg.get("tracking_uri")
            )
        ],
    )
    trainer.remove_callback(PrinterCallback)  # ProgressCallback prints one line per step instead
    if checkpoint_every(cfg["train"]) > 0:
        trainer.add_callback(_report_checkpoint_callback())  # each HF checkpoint -> Ray storage (local or S3)
    if int(cfg["train"].get("fault_injection_step", 0)) > 0:
        trainer.add_callback(_fault_injection_callback(cfg))
    return trainer


def _fault_injection_callback(cfg: dict[str, Any]):
    """Drill/test hook: the last rank SIGKILLs itself once at ``train.fault_injection_step``.

    A marker file in the scratch dir makes it fire only on the first attempt, so the restarted
    worker group (Ray Train ``FailureConfig``) resumes from the last checkpoint and finishes.
    Before the kill it waits (``ray.train.get_all_reported_checkpoints``) until the controller has
    registered every checkpoint this worker reported: the controller collects reports on its health
    check poll (every 2 s by default), so a worker that dies sooner after a report would take that
    checkpoint with it and the restart would begin from step 0.
    """
    import signal

    from transformers import TrainerCallback

    step = int(cfg["train"]["fault_injection_step"])
    marker = node_scratch(cfg) / "fault-injected"

    class FaultInjection(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            import ray.train

            ctx = ray.train.get_context()
            last = ctx.get_world_rank() == ctx.get_world_size() - 1
            if state.global_step == step and last and not marker.exists():
                ray.train.get_all_reported_checkpoints(timeout_s=120)
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"killed rank {ctx.get_world_rank()} at step {step}\n")
                print(
                    f"[{cfg['method']}] fault injection: killing rank {ctx.get_world_rank()} at step {step}",
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGKILL)

    return FaultInjection()


#: Files of one rank in a DeepSpeed + HF checkpoint: ZeRO partitions (``zero_pp_rank_<r>_mp_rank_00_*``,
#: ``bf16_zero_pp_rank_<r>_*``) and HF's RNG state (``rng_state_<r>.pth``). Everything else (weights
#: config, ``trainer_state.json``, scheduler, DeepSpeed's ``latest``) is common and written by rank 0.
RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_)(\d+)")


def own_checkpoint_file(relpath: str, rank: int) -> bool:
    """True when ``relpath`` (a file of a checkpoint) belongs to ``rank``: its own shard or a common file."""
    m = RANK_FILE.search(relpath.rsplit("/", 1)[-1])
    return m is None or int(m.group(1)) == rank


def _report_checkpoint_callback():
    """A ``TrainerCallback`` that reports each HF checkpoint to Ray Train storage from every rank.

    Each rank trains with its own ``output_dir`` (:func:`train_loop`), so its ``checkpoint-<step>``
    holds only what that rank wrote: its ZeRO partition and RNG state, plus the common files on rank
    0. Ray Train merges the ranks' uploads into one checkpoint directory in storage: every rank
    uploads only its own shard (not the whole checkpoint, as with one output dir per node).
    """
    from transformers import TrainerCallback

    class ReportCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            import ray.train

            d = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            ray.train.report(
                {"step": state.global_step, **({"loss": float(losses[-1])} if losses else {})},
                checkpoint=ray.train.Checkpoint.from_directory(str(d)),
                checkpoint_dir_name=f"checkpoint-{state.global_step:06d}",
            )

    return ReportCheckpoint()


def _resume_dir(cfg: dict[str, Any], rank: int) -> tuple[str | None, int | None]:
    """(local HF checkpoint dir, its global step) of Ray Train's latest checkpoint, or (None, None).

    Downloads only this rank's files (its ZeRO partition, its RNG state and the common files, see
    :func:`own_checkpoint_file`) into node-local scratch; other ranks' partitions stay in storage.
    """
    import pyarrow.fs as pafs
    import ray.train

    from troupe import storage

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, None
    local = node_scratch(cfg) / f"resume-rank{rank}"
    fs, base = ckpt.filesystem, ckpt.path.rstrip("/")
    files = storage.files_under(fs, base)
    mine = [f for f in files if own_checkpoint_file(f, rank)]
    for rel in mine:
        dst = local / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            f"{base}/{rel}", str(dst), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
    (local / "troupe_resume.json").write_text(
        json.dumps({"rank": rank, "downloaded": mine, "in_storage": files})
    )
    state = json.loads((local / "trainer_state.json").read_text())
    return str(local), int(state["global_step"])


def _write_train_log(trainer, result, resumed_step: int | None, out_dir: Path) -> None:
    hist = [h for h in trainer.state.log_history if "loss" in h]
    (out_dir / "train_log.json").write_text(
        json.dumps(
            {
                "log_history": hist,
                "train_runtime_s": result.metrics.get("train_runtime"),
                "tokens_seen": trainer.state.num_input_tokens_seen,
                "global_step": trainer.state.global_step,
                "resumed_from_step": resumed_step,
            },
            indent=1,
        )
    )


#: warnings repeated on every collective call that we cannot act on: DeepSpeed ZeRO-3 calls the torch
#: collectives torch 2.13 deprecated (~10,650 lines in the Ray log of 10 SFT steps before this filter;
#: the registry that would show each once is reset whenever any library changes warning filters)
KNOWN_NOISY_WARNINGS = (
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base|_reduce_scatter_base)` is deprecated",
)


def quiet_known_warnings() -> None:
    """Ignore :data:`KNOWN_NOISY_WARNINGS` (FutureWarning/DeprecationWarning, by message) in this
    process; every other warning still shows. Called first in each Ray Train worker."""
    import warnings

    for pattern in KNOWN_NOISY_WARNINGS:
        for cat in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", message=pattern, category=cat)


def train_loop(cfg: dict[str, Any]) -> None:
    """Per-worker loop for SFT and DPO (runs inside a Ray Train worker).

    Reads only locations every node can reach: the base model (``cfg["base_model"]``, a path or
    URI) is downloaded into this node's scratch; each rank trains with its own ``output_dir`` in
    node scratch (local checkpoints); every rank joins the ZeRO-3 16-bit weight gather in
    ``save_model`` and rank 0 writes the model, the tokenizer and ``train_log.json`` to node scratch
    and uploads them to ``cfg["out"]`` (a path on one machine, ``s3://...`` on a cluster).
    """
    quiet_known_warnings()
    import ray.train

    from troupe import storage

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cfg = dict(cfg)
    cfg["base_model_dir"] = str(storage.local_copy(cfg["base_model"], what=cfg["base_model_setting"]))
    cfg["scratch"] = str(node_scratch(cfg) / f"rank{rank}")
    join_deepspeed(cfg["train"])
    common = training_args_common(cfg["train"])
    common["gradient_checkpointing"] = gradient_checkpointing(cfg)
    sp = sequence_parallel_config(cfg["train"], cfg["method"])
    if sp is not None:
        common["parallelism_config"] = sp
    trainer = build_trainer(cfg, common)
    resume, resumed_step = _resume_dir(cfg, rank)
    if resume:
        print(f"[{cfg['method']}] rank {rank} resuming from checkpoint at step {resumed_step}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    local_out = node_scratch(cfg) / "model"
    from troupe.train import lora

    adapter = lora.uses_adapter(cfg["train"])
    # ZeRO-3: every rank gathers, rank 0 writes 16-bit weights (LoRA: the adapter, into adapter/)
    trainer.save_model(str(local_out / lora.ADAPTER_DIR if adapter else local_out))
    if rank == 0:
        if adapter:
            lora.finish_adapter_step(local_out, cfg)  # note of the base + merged checkpoint in local_out
        trainer.processing_class.save_pretrained(str(local_out))
        _write_train_log(trainer, result, resumed_step, local_out)
        storage.upload(local_out, cfg["out"])
    ray.train.report(
        {"loss": float(result.training_loss), "tokens_seen": int(trainer.state.num_input_tokens_seen)}
    )


def run_identity(params: dict[str, Any], method: str) -> str:
    """The Ray Train run name of a training step: ``<method>-<pipeline run key>``.

    Stable across retries of the same run (``$TROUPE_PIPELINE_RUN`` = the KFP run id or RayJob
    name, else a hash of params and data, :func:`troupe.tracking.pipeline_run_key`), so a retried job
    finds its checkpoints; never an id minted per attempt.
    """
    from troupe.tracking import pipeline_run_key

    return f"{method}-{pipeline_run_key(params)}"


def run_training_step(
    params: dict[str, Any],
    method: str,
    examples: list[dict[str, Any]],
    base_model: str,
    out: str,
    extra_metrics: dict[str, float],
    *,
    base_model_setting: str = "paths.base_model",
) -> str:
    """Driver side of SFT/DPO: MLflow child run ``method``, Ray Train fit, loss plot + log artifacts.

    Args:
        params: the params dict.
        method: ``sft`` or ``dpo``.
        examples: tokenized/conversational examples (travel to the workers inside the Ray config).
        base_model: the model to start from, a path or URI every worker can read.
        out: where the trained model goes, a path or URI (``s3://...``); receives the HF checkpoint,
            ``train_log.json``, ``loss.png`` and ``loss.csv``.
        extra_metrics: logged on the step's MLflow run.
        base_model_setting: the params key that named ``base_model`` (for error messages).

    Returns:
        ``out``.

    Raises:
        troupe.storage.StorageError: ``base_model`` unreadable, checked before any worker starts.
    """
    import shutil

    import mlflow

    from troupe import storage
    from troupe.tracking import step_run, tracking_uri
    from troupe.train.lora import check_method, clear_adapter
    from troupe.train.plots import plot_loss

    train = params["train"]
    check_method(train)  # qlora without a GPU stops here, before any storage or Ray work
    if not storage.is_remote(base_model):
        base_model = str(Path(base_model).resolve())
    if not storage.is_remote(out):
        out = str(Path(out).resolve())
    storage.check_readable(base_model, base_model_setting, kind="dir")
    sequence_parallel_config(train, method)  # an unsupported Ulysses setting stops before Ray starts
    name = run_identity(params, method)
    ckpt_root = checkpoint_storage(train, out)
    with step_run(params, method, (method, "train", "data", "model")) as run:
        mlflow.log_metrics(extra_metrics)
        mlflow.set_tags(
            {
                "troupe.ray_run": name,
                "troupe.checkpoints": storage.join(ckpt_root, name),
                "troupe.output": out,
            }
        )
        cfg = dict(
            method=method,
            hp=params[method],
            train=train,
            cutoff_len=int(params["data"]["cutoff_len"]),
            base_model=base_model,
            base_model_setting=base_model_setting,
            out=out,
            run_name=name,
            examples=examples,
            mlflow_run_id=run.info.run_id,
            tracking_uri=tracking_uri(),
        )
        # what the driver downloaded (splits, tokenizer) is its own: workers fetch their inputs on
        # their own node, so they must not find the driver's copies even when they share its node
        storage.clear_downloads()
        t0 = time.time()
        clear_adapter(out)  # a previous LoRA run's adapter/ must not outlive this run's model
        run_on_ray(train_loop, cfg, train, name=name, storage_uri=ckpt_root)
        mlflow.log_metric("wall_s", time.time() - t0)
        log = json.loads(storage.read_text(storage.join(out, "train_log.json")))
        local = storage.scratch_root() / "runs" / name / "driver"
        local.mkdir(parents=True, exist_ok=True)
        png = plot_loss(log["log_history"], local / "loss.png", method.upper())
        for f in (png, local / "loss.csv"):
            if f.is_file():
                mlflow.log_artifact(str(f))
                storage.upload(f, storage.join(out, f.name))
        mlflow.log_dict(log, "train_log.json")
    # the run finished and its model is published: its checkpoints are no longer a resume point
    # (a later run with the same identity must train, not restore the finished one)
    fs, path = storage.filesystem(storage.join(ckpt_root, name))
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass
    shutil.rmtree(local, ignore_errors=True)
    return out
