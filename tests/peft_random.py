"""Random, non-zero adapter weights on both sides of an interop test (B is zero at init, which would
make every comparison trivially pass); DoRA magnitudes moved off their initial row norms."""
import numpy as np
import torch


def randomize_peft(pm, is_adapter, seed=1, scale=0.5):
    """Every parameter of PEFT model ``pm`` whose name ``is_adapter`` says so: scale · N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)
            elif is_adapter(name):
                p.copy_(scale * torch.randn(p.shape, generator=g))


def randomize_lowrank(lm, is_adapter, seed=1, scale=0.5):
    """As randomize_peft, on lowrank's parameters (every adapter, trainable or not)."""
    rng = np.random.default_rng(seed)
    for name, p in lm.named_parameters():
        if "lora_magnitude_vector" in name:
            p.data = (p.data * rng.uniform(0.5, 1.5, p.shape)).astype(p.dtype)
        elif is_adapter(name):
            p.data = (scale * rng.standard_normal(p.shape)).astype(p.dtype)
