"""Training steps: SFT and DPO under Ray Train + DeepSpeed ZeRO, and DPO pair building."""
