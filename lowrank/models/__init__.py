"""Models built from lowrank's engine layers (``lowrank.nn``), checkpoint-compatible with transformers."""
