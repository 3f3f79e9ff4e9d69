"""The `troupe` console script: every step listed, params errors name the file or key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from troupe.cli import COMMANDS

TROUPE = str(Path(sys.executable).parent / "troupe")


def test_help_lists_every_step():
    out = subprocess.run([TROUPE, "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert f"  {name} " in out
    steps = {
        "data": ["import", "validate", "split"],
        "train": ["sft", "pairs", "dpo"],
        "registry": ["register", "promote"],
        "model": ["prepare"],
    }
    for group, subs in steps.items():
        sub = subprocess.run([TROUPE, group, "--help"], capture_output=True, text=True, check=True).stdout
        for s in subs:
            assert f"  {s} " in sub, (group, s)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--params", "nope.yaml"], "nope.yaml: params file not found"),
        (["--set", "sft.max_steps"], "expected KEY=VALUE"),
        (["--set", "model.base=not-a-model"], "model.base='not-a-model'"),
    ],
)
def test_bad_params_exit_2_with_a_named_cause(args, message, tmp_path):
    r = subprocess.run(
        [TROUPE, "model", "prepare", *args, "--set", f"paths.base_model={tmp_path}/m"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


def test_policies_resolve_from_any_working_directory(tmp_path, monkeypatch) -> None:
    """Ray workers and KFP pods start in other directories: repo-relative policy paths still resolve."""
    from troupe.registry import load_policy
    from troupe.rollout import Policy

    monkeypatch.chdir(tmp_path)
    assert load_policy("configs/gate_policy.yaml")
    assert Policy.load("configs/rollout_policy.yaml")
    import pytest

    from troupe.config import ConfigError

    with pytest.raises(ConfigError, match="configs/nope.yaml: gate policy not found"):
        load_policy("configs/nope.yaml")
