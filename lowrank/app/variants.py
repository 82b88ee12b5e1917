"""DoRA, LoRA+ and VeRA on the demo task: three more rows for the demo's comparison table.

Each starts from a deep copy of the same pretrained model, adapts the hidden Dense layers
and trains the head in full (as the LoRA rows do), and is fine-tuned with Adam:
    dora    LoraConfig(use_dora=True) at the demo's rank, lr = peft_lr (detached norm)
    lora+   plain LoRA at the demo's rank, λ = 16: lora_A (and the head's weight) at
            peft_lr / 4, lora_B (and the head's bias) at 4 × peft_lr. On the default demo,
            validation accuracy picked lr_A = peft_lr / 4 among {1, 1/4, 1/16} × peft_lr;
            lr_A = peft_lr (B at 16 × peft_lr) diverged in the last epochs
    vera    r = 256 shared projections (PEFT's default), lr = 10 × peft_lr: its vectors
            scale frozen random directions and need larger steps; on DemoConfig.quick()
            peft_lr × {1, 3.3, 10, 33} gave test accuracy ≈ 0.57, 0.85, 0.93, 0.94
VeRA's stored bytes count its vectors and the head only: with save_projection=False the
shared A and B are drawn again from projection_prng_key.
"""
from __future__ import annotations

import copy

from .experiment import DemoConfig, dense_names, finetune, lora_config, method_row, prepare
from ..tuners.lora.loraplus import create_loraplus_optimizer
from ..nn.module import Module
from ..nn.optim import Adam
from ..tuners.lora.model import get_lora_model
from .progress import no_stage
from ..tuners.vera import VeraConfig, get_vera_model

LORAPLUS_RATIO = 16.0
LORAPLUS_LR_FACTOR = 0.25       # lr of lora_A relative to cfg.peft_lr
VERA_R = 256
VERA_LR_FACTOR = 10.0


def vera_config(model: Module, r: int = VERA_R) -> VeraConfig:
    """VeRA on every hidden Dense layer, the head trained in full as a module to save."""
    names = dense_names(model)
    return VeraConfig(r=r, target_modules=names[:-1], modules_to_save=[names[-1]], save_projection=False)


def variant_rows(cfg: DemoConfig, pretrained: Module, ds_down, stage=no_stage):
    """Rows {method, test_acc, trainable_params, stored_bytes, seconds_per_epoch, ...} for DoRA,
    LoRA+ and VeRA, in the demo's ``method_row`` format (so its table takes them as they are),
    yielded as each finishes (one ``stage`` line each)."""
    with stage(f"dora r={cfg.r}") as note:
        dora = get_lora_model(copy.deepcopy(pretrained), lora_config(cfg, pretrained, use_dora=True))
        row = method_row(f"dora r={cfg.r}", dora, ds_down, cfg, finetune(dora, ds_down, cfg), r=cfg.r)
        note["result"] = f"test acc {row['test_acc']:.3f}"
    yield row

    with stage(f"lora+ r={cfg.r}") as note:
        plus = prepare("lora", pretrained, cfg)
        optimizer = create_loraplus_optimizer(plus, Adam, lr=LORAPLUS_LR_FACTOR * cfg.peft_lr,
                                              loraplus_lr_ratio=LORAPLUS_RATIO)
        row = method_row(f"lora+ r={cfg.r}", plus, ds_down, cfg, finetune(plus, ds_down, cfg, optimizer=optimizer),
                         r=cfg.r)
        note["result"] = f"test acc {row['test_acc']:.3f}"
    yield row

    with stage(f"vera r={VERA_R}") as note:
        base = copy.deepcopy(pretrained)
        vera = get_vera_model(base, vera_config(base))
        history = finetune(vera, ds_down, cfg, lr=VERA_LR_FACTOR * cfg.peft_lr)
        row = method_row(f"vera r={VERA_R}", vera, ds_down, cfg, history, r=VERA_R)
        note["result"] = f"test acc {row['test_acc']:.3f}"
    yield row
