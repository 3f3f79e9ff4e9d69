"""Ray Train + DeepSpeed ZeRO-3 training on a local Ray cluster (2 CPU workers, gloo): a worker is
killed mid-run (SIGKILL) and the restarted worker group resumes from the last checkpoint."""

from __future__ import annotations

import json

from tests.serve_fixtures import forget_stale_handles
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


def test_worker_killed_mid_run_resumes_from_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """Each rank downloads only its own ZeRO partition on resume; storage keeps ``checkpoint_num_to_keep``."""
    import ray
    from transformers import AutoTokenizer

    ray.shutdown()  # the local cluster started below inherits TROUPE_SCRATCH (node scratch)
    forget_stale_handles()  # earlier sessions' handles must not drop refs to this session's actors
    monkeypatch.setenv("TROUPE_SCRATCH", str(tmp_path / "scratch"))

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
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
        base_model=str(tiny_model_dir),
        base_model_setting="paths.base_model",
        out=str(tmp_path / "model"),
        run_name="resume-test",
        examples=_examples(tok),
    )
    run_on_ray(train_loop, cfg, train, name="resume-test", storage_uri=str(tmp_path / "ray"))
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
