"""A fair training benchmark: every variant trains on the same pre-packed rows (issue 13, item 6).

Settings (all variants unless a line says otherwise):

* Model ``--model`` (SmolLM2-135M-Instruct), fp32, CPU, lr 5e-5 cosine, seed 17, ``--steps``
  optimizer steps of a global batch ``--batch`` rows x ``--seq-len`` tokens, no gradient accumulation.
* Rows: the ``--data`` dialogues tokenized once with Troupe's encoding (persona card + chat template,
  assistant-only loss mask, each dialogue cut at ``--cutoff`` tokens), BFD-packed once into rows of
  ``--seq-len`` tokens (TRL's ``pack_dataset``), the first ``steps x batch`` rows kept and written to a
  temp JSON file. Each variant reads that file: identical token ids, loss masks and segment layout
  (``seq_lengths``), and one epoch of exactly those rows (DDP ranks split them).
* Troupe variants use Troupe's trainer (``troupe.train.distributed.build_trainer``: TRL SFTTrainer,
  padding-free rows, varlen attention, progress callback) fed the pre-packed rows (``packing`` off so
  TRL does not re-pack, ``padding_free`` on so it keeps the segments). Gradient checkpointing off.
* Threads: ``torch.set_num_threads`` 2 in one-process variants and one Ray worker, 1 per process/rank
  in two-process variants (core contention is one of the separated costs), 2 cores in the machine.

Variants (each in a fresh subprocess; repeats interleaved, variant order fixed within a repeat):

==========  ==================================================================================
1proc       (1) Troupe's trainer, one process, 2 threads
1proc-1t    (1') the same at 1 thread (the reference for core contention)
two-procs   (4) two (1') processes at once, 1 thread each; tokens/s summed
1proc-gc    (1g) (1) with gradient checkpointing on (the equal-settings partner of (8))
ray1        (2) one Ray Train worker, no DeepSpeed, 2 threads
ray1-zero3  (3) one Ray Train worker, DeepSpeed ZeRO-3 (gloo), 2 threads
ray2-ddp    (5) two Ray Train ranks, DDP (no DeepSpeed), 1 thread each
ray2-zero3  (6) two Ray Train ranks, ZeRO-3 - what ``troupe train sft`` runs, 1 thread each
trl         (7) plain TRL ``SFTTrainer`` on the same rows, padded batches (no padding-free), its
            default attention (sdpa; it attends across the segments of a packed row), GC off
trl-gc      (8) (7) with gradient checkpointing on (TRL's default)
trl-pack    (9) plain TRL with its own packing flags (``packing=True``, ``padding_free=True``, bfd)
            from the conversational dialogues (its rows: each dialogue cut at ``--seq-len``, so
            not the pre-packed rows), sdpa, GC off
lora        (10) (1) with ``train.method: lora`` (PEFT defaults of Troupe: r 16, all-linear)
==========  ==================================================================================

Figures:

* tokens/s: real (non-padding) tokens per second after the first optimizer step (steady state,
  ``bench_sft.steady_tokens_per_s``: tokens seen between the first and last step's log / time
  between them). Per variant: median and min-max over ``--repeats`` runs.
* Ratios are taken per repeat (repeat i of A over repeat i of B), then median and min-max.
* Costs: Ray overhead = (2)/(1); ZeRO machinery = (3)/(2); core contention = (4) / (2 x (1'));
  synchronisation = (5)/(4); ZeRO communication = (6)/(5). A figure below 1 is a cost.
* Peak memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the one-process variants' process,
  read after training (Ray variants: not measured).
* FLOP ceiling: achieved training FLOP/s = 6 x N x tokens/s (Kaplan et al. 2020, arXiv:2001.08361;
  N = all parameters, tied embedding counted once; attention score FLOPs and recomputation not
  counted) vs the median of 10 timed fp32 ``torch.matmul`` of two 2048 x 2048 matrices (2 n^3 FLOPs
  each) in the same process and threads, after training; reported for (1).

Targets (issue 13): (1)/(7) >= 1.3x and (1g)/(8) >= 1.3x; Ray overhead (2)/(1) >= 0.95x; (1) >= 40 %
of the ceiling. Defaults (2 x 384-token rows, 3 steps, dialogues cut at 384) fit 12 variants x 2
repeats in ~16 min on 2 cores; the sample's dialogues are 333-512 tokens and the persona card alone
is ~300, so a row holds one dialogue. Usage (``--report FILE.json`` reprints a saved table)::

    python benchmarks/bench_train.py --model work/models/base --data data/sample --repeats 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import _dialogues, _troupe_cfg, steady_tokens_per_s  # noqa: E402

# variant -> (kind, threads, options); the two-process variant is run by the driver
VARIANTS = {
    "1proc": ("troupe", 2, {}),
    "1proc-1t": ("troupe", 1, {}),
    "two-procs": ("pair", 1, {}),
    "1proc-gc": ("troupe", 2, {"gc": True}),
    "ray1": ("ray", 2, {"workers": 1, "zero": 0}),
    "ray1-zero3": ("ray", 2, {"workers": 1, "zero": 3}),
    "ray2-ddp": ("ray", 1, {"workers": 2, "zero": 0}),
    "ray2-zero3": ("ray", 1, {"workers": 2, "zero": 3}),
    "trl": ("trl", 2, {"gc": False}),
    "trl-gc": ("trl", 2, {"gc": True}),
    "trl-pack": ("trl", 2, {"gc": False, "own_packing": True}),
    "lora": ("troupe", 2, {"method": "lora"}),
}
LABELS = {
    "1proc": "(1) Troupe trainer, 1 process, 2 thr",
    "1proc-1t": "(1') same, 1 thread",
    "two-procs": "(4) 2 independent procs x 1 thr (sum)",
    "1proc-gc": "(1g) (1) + grad. checkpointing",
    "ray1": "(2) 1 Ray worker, no DeepSpeed",
    "ray1-zero3": "(3) 1 Ray worker, ZeRO-3",
    "ray2-ddp": "(5) 2 Ray ranks DDP x 1 thr",
    "ray2-zero3": "(6) 2 Ray ranks ZeRO-3 x 1 thr",
    "trl": "(7) plain TRL, same rows, GC off",
    "trl-gc": "(8) plain TRL, same rows, GC on",
    "trl-pack": "(9) plain TRL packing+padding_free",
    "lora": "(10) (1) with LoRA",
}


# ---------------------------------------------------------------------------------------- pre-pack
def prepack(a) -> Path:
    """Tokenize + BFD-pack the dialogues once; the first steps x batch rows -> a temp JSON file."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.data_utils import pack_dataset

    from troupe.contract import write_jsonl
    from troupe.train.sft import build_sft_examples

    chars, ds = _dialogues(Path(a.data))
    split = Path(tempfile.mkdtemp())
    write_jsonl(split / "characters.jsonl", chars.values())
    write_jsonl(split / "train.jsonl", ds)
    examples = build_sft_examples(split, AutoTokenizer.from_pretrained(a.model), a.cutoff)
    packed = pack_dataset(Dataset.from_list(examples), a.seq_len, "bfd")
    n = a.steps * a.batch
    if len(packed) < n:
        raise SystemExit(f"only {len(packed)} packed rows, need {n}: lower --steps/--batch or --cutoff")
    rows = [{k: packed[i][k] for k in ("input_ids", "assistant_masks", "seq_lengths")} for i in range(n)]
    path = Path(tempfile.mkdtemp()) / "rows.json"
    path.write_text(json.dumps(rows))
    segs = [len(r["seq_lengths"]) for r in rows]
    toks = sum(len(r["input_ids"]) for r in rows)
    print(
        f"pre-packed {len(examples)} dialogues -> {len(packed)} rows; kept {n} rows, {toks} tokens, "
        f"{min(segs)}-{max(segs)} segments per row -> {path}",
        flush=True,
    )
    return path


# --------------------------------------------------------------------------- runs (in subprocesses)
def _use_prepacked_rows() -> None:
    """Make Troupe's SFT config train the rows as given: no re-packing, padding-free (segments kept)."""
    from troupe.train import sft

    make = sft.make_trainer_args

    def make_prepacked(cfg, common):
        args, cls = make(cfg, common)
        # rows are at most --seq-len tokens already: no truncation (TRL refuses max_length here)
        args.packing, args.padding_free, args.max_length = False, True, None
        return args, cls

    sft.make_trainer_args = make_prepacked


def _matmul_flops(n: int = 2048, reps: int = 10) -> float:
    """Median FLOP/s of an fp32 n x n @ n x n ``torch.matmul`` (2 n^3 FLOPs), after one warm-up."""
    import torch

    x, y = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(x, y)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(x, y)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def _result(tr, extra: dict | None = None) -> dict:
    params = {id(p): p.numel() for p in tr.model.parameters()}
    return {
        "steady_tok_s": steady_tokens_per_s(tr.state.log_history),
        "tokens_seen": int(tr.state.num_input_tokens_seen),
        "params": sum(params.values()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **(extra or {}),
    }


def run_troupe(a, rows: list[dict], gc: bool = False, method: str = "full", ceiling: bool = False) -> dict:
    """(1), (1'), (1g), (10): Troupe's trainer in this process, no DeepSpeed."""
    from troupe.train.distributed import build_trainer, training_args_common

    cfg, _ = _troupe_cfg(a.model, Path(a.data), a.steps, a.batch, a.seq_len, 1, 0)
    cfg["examples"] = rows
    cfg["train"].update(gradient_checkpointing=gc, method=method)
    common = training_args_common(cfg["train"])
    common.pop("ddp_backend")  # one process, no process group
    _use_prepacked_rows()
    tr = build_trainer(cfg, common)
    tr.train()
    return _result(tr, {"matmul_flop_s": _matmul_flops()} if ceiling else None)


def run_trl(a, rows: list[dict], gc: bool, own_packing: bool = False) -> dict:
    """(7), (8), (9): plain TRL SFTTrainer, one process."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from troupe.train.encoding import chat_messages

    if own_packing:
        chars, ds = _dialogues(Path(a.data))
        data = [{"messages": chat_messages(d, chars[d.character_id])} for d in ds]
    else:
        data = [{k: r[k] for k in ("input_ids", "assistant_masks")} for r in rows]
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=a.steps,
        per_device_train_batch_size=a.batch,
        max_length=a.seq_len,
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        seed=17,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=gc,
        packing=own_packing,
        padding_free=own_packing,
        packing_strategy="bfd",
        dataloader_num_workers=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    tr = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    tr.train()
    return _result(tr, {"attn": model.config._attn_implementation})


def _ray_loop(cfg: dict) -> None:
    """Ray Train worker: quiet the per-call deprecation warnings, set threads, train the rows as given."""
    import warnings

    for cat in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.simplefilter("ignore", cat)
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    from troupe.train.distributed import train_loop

    _use_prepacked_rows()
    train_loop(cfg)


def run_ray(a, rows: list[dict], workers: int, zero: int, threads: int) -> dict:
    """(2), (3), (5), (6): ``troupe.train.distributed.run_on_ray`` with ``train_loop``."""
    from troupe.train.distributed import run_on_ray

    cfg, out = _troupe_cfg(a.model, Path(a.data), a.steps, a.batch, a.seq_len, workers, zero)
    cfg.update(examples=rows, threads=threads, run_name=f"bench-train-{os.getpid()}")
    run_on_ray(_ray_loop, cfg, cfg["train"], name=cfg["run_name"], storage_uri=str(out / "ray"))
    log = json.loads(Path(cfg["out"], "train_log.json").read_text())
    return {"steady_tok_s": steady_tokens_per_s(log["log_history"]), "tokens_seen": log["tokens_seen"]}


def child(a) -> None:
    """One run of one variant in this process; writes its figures as JSON to ``--out``."""
    import torch

    kind, threads, opt = VARIANTS[a.child]
    threads = a.threads or threads
    torch.set_num_threads(threads)
    rows = json.loads(Path(a.rows).read_text())
    if kind == "troupe":
        res = run_troupe(a, rows, ceiling=a.child == "1proc", **opt)
    elif kind == "trl":
        res = run_trl(a, rows, **opt)
    else:
        res = run_ray(a, rows, threads=threads, **opt)
    res["threads"] = threads
    Path(a.out).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------- driver
def spawn(a, variant: str, rows: Path, threads: int = 0) -> tuple[subprocess.Popen, Path]:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--child", variant, "--rows", str(rows), "--out", str(out)]
    cmd += ["--model", a.model, "--data", a.data, "--steps", str(a.steps), "--batch", str(a.batch)]
    cmd += ["--seq-len", str(a.seq_len), "--cutoff", str(a.cutoff), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or VARIANTS[variant][1])}
    log = open(Path(a.logs) / f"{variant}-{time.time():.0f}-{os.urandom(2).hex()}.log", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), out


def run_variant(a, variant: str, rows: Path) -> dict:
    if VARIANTS[variant][0] == "pair":  # two one-thread processes at the same time
        procs = [spawn(a, "1proc-1t", rows, 1) for _ in range(2)]
        parts = []
        for p, out in procs:
            if p.wait() != 0:
                raise RuntimeError(f"{variant}: a process exited {p.returncode} (logs in {a.logs})")
            parts.append(json.loads(out.read_text()))
        return {
            "steady_tok_s": sum(r["steady_tok_s"] for r in parts),
            "parts": [r["steady_tok_s"] for r in parts],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in parts),
        }
    p, out = spawn(a, variant, rows)
    if p.wait() != 0:
        raise RuntimeError(f"{variant}: exited {p.returncode} (logs in {a.logs})")
    return json.loads(out.read_text())


def spread(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def ratio(res: dict, num: str, den: str, den_factor: float = 1.0) -> tuple[float, float, float] | None:
    pairs = zip(res.get(num, []), res.get(den, []), strict=False)
    r = [x["steady_tok_s"] / (den_factor * y["steady_tok_s"]) for x, y in pairs]
    return spread(r) if r else None


def fmt(r: tuple[float, float, float] | None, pct: bool = False) -> str:
    if r is None:
        return "n/a"
    if pct:
        return f"{r[0]:.1%} ({r[1]:.1%}-{r[2]:.1%})"
    return f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f})"


def report(a, res: dict) -> None:
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, model {a.model}, {a.steps} steps x "
        f"{a.batch} rows x {a.seq_len} tokens (dialogues cut at {a.cutoff}), fp32, tokens/s after step 1"
    )
    head = f"| {'variant':<40}| {'n':>2} | {'tok/s median':>12} | {'min-max':>13} | {'vs (1)':>18} | "
    head += f"{'vs (7)':>18} | {'peak RSS MiB':>12} |"
    print(head + "\n|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for v in VARIANTS:
        if not res.get(v):
            print(f"| {LABELS[v]:<40}| {0:>2} | {'not measured':>12} |")
            continue
        med, lo, hi = spread([r["steady_tok_s"] for r in res[v]])
        rss = [r["peak_rss_mib"] for r in res[v] if "peak_rss_mib" in r]
        rss_s = f"{statistics.median(rss):,.0f}" if rss and VARIANTS[v][0] != "ray" else "-"
        print(
            f"| {LABELS[v]:<40}| {len(res[v]):>2} | {med:>12.1f} | {f'{lo:.1f}-{hi:.1f}':>13} | "
            f"{fmt(ratio(res, v, '1proc')):>18} | {fmt(ratio(res, v, 'trl')):>18} | {rss_s:>12} |"
        )
    costs = [
        ("Ray overhead (2)/(1)", ratio(res, "ray1", "1proc"), "target >= 0.95x"),
        ("ZeRO-3 machinery (3)/(2)", ratio(res, "ray1-zero3", "ray1"), ""),
        ("core contention (4)/(2 x (1'))", ratio(res, "two-procs", "1proc-1t", 2.0), ""),
        ("synchronisation (5)/(4)", ratio(res, "ray2-ddp", "two-procs"), ""),
        ("ZeRO-3 communication (6)/(5)", ratio(res, "ray2-zero3", "ray2-ddp"), ""),
        ("Troupe vs plain TRL, GC off (1)/(7)", ratio(res, "1proc", "trl"), "target >= 1.3x"),
        ("Troupe vs plain TRL, GC on (1g)/(8)", ratio(res, "1proc-gc", "trl-gc"), "target >= 1.3x"),
        ("Troupe vs TRL's own packing (1)/(9)", ratio(res, "1proc", "trl-pack"), ""),
        ("troupe train sft vs plain TRL (6)/(7)", ratio(res, "ray2-zero3", "trl"), ""),
        ("LoRA vs full tokens/s (10)/(1)", ratio(res, "lora", "1proc"), ""),
    ]
    print()
    for name, r, target in costs:
        met = ""
        if r and target:
            met = ": met" if r[0] >= float(target.split()[-1][:-1]) else ": NOT met"
        print(f"{name:<40} {fmt(r):>20}  {target}{met}")
    if res.get("1proc"):
        ach = [6 * r["params"] * r["steady_tok_s"] for r in res["1proc"]]
        ceil = [r["matmul_flop_s"] for r in res["1proc"]]
        pct = spread([x / c for x, c in zip(ach, ceil, strict=True)])
        print(
            f"\nFLOP ceiling: N = {res['1proc'][0]['params']:,} params; achieved 6*N*tok/s "
            f"{statistics.median(ach) / 1e9:.1f} GFLOP/s vs fp32 2048^3 matmul "
            f"{statistics.median(ceil) / 1e9:.1f} GFLOP/s ({min(ceil) / 1e9:.1f}-{max(ceil) / 1e9:.1f}) "
            f"-> {fmt(pct, pct=True)} of the ceiling (target >= 40 %: {'met' if pct[0] >= 0.4 else 'NOT met'})"
        )
    if res.get("lora") and res.get("1proc"):
        m = [r["peak_rss_mib"] for r in res["lora"]], [r["peak_rss_mib"] for r in res["1proc"]]
        print(f"peak RSS LoRA {statistics.median(m[0]):,.0f} MiB vs full {statistics.median(m[1]):,.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="work/models/base")
    ap.add_argument("--data", default="data/sample")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (tokens/s over steps 2..N)")
    ap.add_argument("--batch", type=int, default=2, help="global batch: rows per optimizer step")
    ap.add_argument("--seq-len", type=int, default=384, help="tokens per packed row")
    ap.add_argument("--cutoff", type=int, default=384, help="tokens per dialogue before packing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variants to run")
    ap.add_argument("--json", default="", help="write the raw figures here (after every run)")
    ap.add_argument("--report", default="", help="only print the table of a --json file")
    ap.add_argument("--logs", default="", help="subprocess logs (default: a temp dir)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rows", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.model = str(Path(a.model).resolve())  # Ray Train workers run in their own working directory
    a.data = str(Path(a.data).resolve())
    if a.child:
        return child(a)
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        return report(argparse.Namespace(**saved["args"]), saved["results"])
    a.logs = a.logs or tempfile.mkdtemp(prefix="bench-train-logs-")
    Path(a.logs).mkdir(parents=True, exist_ok=True)
    print(f"args {vars(a)}", flush=True)
    rows = prepack(a)
    res: dict[str, list[dict]] = {}
    variants = [v for v in a.variants.split(",") if v]
    t0 = time.time()
    for rep in range(a.repeats):
        for v in variants:
            t = time.time()
            res.setdefault(v, []).append(run_variant(a, v, rows))
            print(
                f"repeat {rep + 1} {v}: {res[v][-1]['steady_tok_s']:.1f} tok/s "
                f"({time.time() - t:.0f} s, total {time.time() - t0:.0f} s)",
                flush=True,
            )
            if a.json:
                Path(a.json).write_text(json.dumps({"args": vars(a), "results": res}, indent=1))
    report(a, res)


if __name__ == "__main__":
    main()
