"""What adapts a frozen model: LoRA and its family (``lora/``), VeRA, the Houlsby bottleneck adapter."""
