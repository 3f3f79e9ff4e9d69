"""``troupe train sft|pairs|dpo``."""

from __future__ import annotations

import click

from troupe.cli import step_options


@click.group("train")
def train() -> None:
    """Full-parameter SFT and DPO on Ray Train + DeepSpeed ZeRO, and DPO pair building."""


@train.command("sft")
@step_options
def sft_cmd(params: dict) -> None:
    """SFT: paths.splits + paths.base_model -> paths.sft_model."""
    from troupe.train.sft import train_sft

    train_sft(params)


@train.command("pairs")
@step_options
def pairs_cmd(params: dict) -> None:
    """Build DPO preference pairs from the SFT model's own samples -> paths.pairs."""
    from troupe.train.pairs import build_pairs

    build_pairs(params)


@train.command("dpo")
@step_options
def dpo_cmd(params: dict) -> None:
    """DPO: paths.pairs + paths.sft_model -> paths.dpo_model."""
    from troupe.train.dpo import train_dpo

    train_dpo(params)
