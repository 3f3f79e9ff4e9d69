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


def test_worker_killed_mid_run_resumes_from_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    train = {
        "accelerator": "cpu",
        "num_workers": 2,
        "zero_stage": 3,
        "checkpoint_every": 2,
        "max_failures": 1,
        "fault_injection_step": 3,
    }
    cfg = dict(
        method="sft",
        hp={"max_steps": 4, "per_device_batch_size": 2, "learning_rate": 1e-3, "packing": True},
        train=train,
        cutoff_len=256,
        base_model=str(tiny_model_dir),
        out_dir=str(tmp_path / "model"),
        scratch=str(tmp_path / "scratch"),
        examples=_examples(tok),
    )
    run_on_ray(train_loop, cfg, train, name="resume-test", storage=tmp_path / "ray")
    assert (tmp_path / "scratch" / "fault-injected").read_text().startswith("killed rank 1 at step 3")
    log = json.loads((tmp_path / "model" / "train_log.json").read_text())
    assert log["resumed_from_step"] == 2
    assert log["global_step"] == 4
    assert [h["step"] for h in log["log_history"]][-2:] == [3, 4]
    assert (tmp_path / "model" / "model.safetensors").is_file()
