"""LoRA+ (Hayou et al. 2024): train lora_B with λ times the learning rate of lora_A.

The paper argues from wide-network scaling that one step size for both factors learns
features inefficiently, and that η_B should be much larger than η_A (λ = 16 in its
experiments). As in PEFT's ``create_loraplus_optimizer``, the trainable parameters fall in
four groups:

    group A            lora_A and every other matrix (a head's weight, say)   lr,      weight decay
    group B            lora_B, and 1-D parameters that are not biases           λ·lr,    weight decay
                       (DoRA's lora_magnitude_vector, VeRA's λ vectors)
    group B, no decay  1-D biases (PEFT's no-decay names: "bias" in the name)   λ·lr,    no decay
    embedding          LoraEmbedding's factors (PEFT's lora_embedding_A/B)    loraplus_lr_embedding

Empty groups are left out.
"""
from __future__ import annotations

from ...nn.module import check_number
from ...nn.module import Module


def loraplus_param_groups(model: Module, lr: float, loraplus_lr_ratio: float = 16.0,
                          loraplus_weight_decay: float = 0.0, loraplus_lr_embedding: float = 1e-6) -> list[dict]:
    """The param groups (dicts with params, lr, weight_decay) of the module docstring, trainable parameters only."""
    check_number("create_loraplus_optimizer", "loraplus_lr_ratio", loraplus_lr_ratio)
    check_number("create_loraplus_optimizer", "loraplus_lr_embedding", loraplus_lr_embedding)
    groups = {"A": [], "B": [], "B_no_decay": [], "embedding": []}
    for name, p in model.named_parameters():
        if not p.trainable:
            continue
        if "lora_embedding_" in name:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.data.ndim == 1:
            groups["B_no_decay" if "bias" in name else "B"].append(p)
        else:
            groups["A"].append(p)
    settings = {"A": (lr, loraplus_weight_decay), "B": (lr * loraplus_lr_ratio, loraplus_weight_decay),
                "B_no_decay": (lr * loraplus_lr_ratio, 0.0), "embedding": (loraplus_lr_embedding, loraplus_weight_decay)}
    return [{"params": params, "lr": settings[g][0], "weight_decay": settings[g][1], "name": g}
            for g, params in groups.items() if params]


def create_loraplus_optimizer(model: Module, optimizer_cls, lr: float, loraplus_lr_ratio: float = 16.0,
                              loraplus_weight_decay: float = 0.0, loraplus_lr_embedding: float = 1e-6, **kwargs):
    """``optimizer_cls`` (SGD, Adam, AdamW) over LoRA+'s param groups; ``kwargs`` go to the optimizer.

    Example: ``create_loraplus_optimizer(model, AdamW, lr=2e-4, loraplus_lr_ratio=16)``.
    """
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_weight_decay, loraplus_lr_embedding)
    return optimizer_cls(groups, lr=lr, **kwargs)
