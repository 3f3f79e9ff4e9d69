"""Ray Train + DeepSpeed ZeRO-3 training on a local Ray cluster (2 CPU workers, gloo): a worker is
killed mid-run (SIGKILL) and the restarted worker group resumes from the last checkpoint."""

from __future__ import annotations

import json

from troupe.contract import Character, Dialogue, Message
from troupe.train.distributed import run_on_ray, train_loop
from troupe.train.encoding import encode_dialogue


def _examples(tok):
    c = Character(id="ann", name="Ann", language="en", profile={"job": "baker"})
    out = []
    for i in range(12):
        d = Dialogue(
            id=f"d{i}",
            character_id="ann",
            messages=[
                Message(role="user", content=f"What do you bake on day {i}?"),
                Message(
                    role="assistant", content=f"Rye bread on day {i}, want a slice?<emotion>happy</emotion>"
                ),
            ],
        )
        e = encode_dialogue(tok, d, c, 256)
        out.append({"input_ids": e.input_ids, "assistant_masks": e.assistant_masks})
    return out


def _train_in_fresh_process(model_dir: str, tmp: str) -> None:
    """The run itself, in a spawned process with its own Ray driver (see the test's docstring)."""
    import os
    from pathlib import Path

    import ray
    from transformers import AutoTokenizer

    os.environ["TROUPE_SCRATCH"] = str(Path(tmp) / "scratch")  # the local cluster inherits it
    tok = AutoTokenizer.from_pretrained(model_dir)
    train = {
        "accelerator": "cpu",
        "num_workers": 2,
        "zero_stage": 3,
        "checkpoint_every": 2,
        "max_failures": 1,
        "fault_injection_step": 3,
        "checkpoint_num_to_keep": 1,
    }
    cfg = dict(
        method="sft",
        hp={"max_steps": 4, "per_device_batch_size": 2, "learning_rate": 1e-3, "packing": True},
        train=train,
        cutoff_len=256,
        base_model=model_dir,
        base_model_setting="paths.base_model",
        out=str(Path(tmp) / "model"),
        run_name="resume-test",
        examples=_examples(tok),
    )
    try:
        run_on_ray(train_loop, cfg, train, name="resume-test", storage_uri=str(Path(tmp) / "ray"))
    finally:
        ray.shutdown()


def test_worker_killed_mid_run_resumes_from_checkpoint(tiny_model_dir, tmp_path):
    """Each rank downloads only its own ZeRO partition on resume; storage keeps ``checkpoint_num_to_keep``.

    The run has a process of its own, as ``troupe train`` has in production: in the shared pytest
    process, after the serving and cluster tests' Ray sessions, Ray cancelled the Train controller
    actor before it ran ("all references to the actor were removed") in CI and in both local runs
    of that module order (canary drill, cluster serving, cluster training, router, serving,
    training); no pair of those modules reproduced it.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_train_in_fresh_process, str(tiny_model_dir), str(tmp_path)).result(timeout=900)
    run_dir = tmp_path / "scratch" / "runs" / "resume-test"
    assert (run_dir / "fault-injected").read_text().startswith("killed rank 1 at step 3")
    for rank in (0, 1):
        got = json.loads((run_dir / f"resume-rank{rank}" / "troupe_resume.json").read_text())
        other = 1 - rank
        assert any(f"zero_pp_rank_{rank}_" in f for f in got["downloaded"]), got
        assert not any(f"zero_pp_rank_{other}_" in f or f"rng_state_{other}" in f for f in got["downloaded"])
        assert any(f"zero_pp_rank_{other}_" in f for f in got["in_storage"])  # it was in storage
    kept = sorted(p.name for p in (tmp_path / "ray" / "resume-test").glob("checkpoint-*"))
    assert kept == ["checkpoint-000004"], kept  # num_to_keep=1: step 2 pruned after step 4
    log = json.loads((tmp_path / "model" / "train_log.json").read_text())
    assert log["resumed_from_step"] == 2
    assert log["global_step"] == 4
    assert [h["step"] for h in log["log_history"]][-2:] == [3, 4]
    assert (tmp_path / "model" / "model.safetensors").is_file()
