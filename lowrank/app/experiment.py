"""The demo's experiment, piece by piece: pretrain an MLP, derive a downstream task, and
fine-tune it by each method on the same frozen start.

Methods (all start from a deep copy of the same pretrained model):
    full      every parameter trainable
    head      only the classifier head (the article's "conventional" fine-tuning)
    adapter   Houlsby bottleneck adapters after each hidden activation, plus the head
    lora      LoRA on every hidden Dense layer (lora_alpha = 2r, so scaling = 2 at
              every rank), plus the head as a module to save
    qlora     the same LoRA over hidden layers quantized to 4-bit NF4 (QLoRA)
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

from ..training.accounting import measure_step, release, stored_bytes
from ..tuners.bottleneck import insert_bottleneck_adapters
from ..training.data import Dataset, TaskSpec, downstream_task, make_task
from ..nn.layers import MLP, Dense
from ..tuners.lora.config import LoraConfig
from ..nn.losses import BCEWithLogitsLoss
from ..nn.module import Module
from ..nn.optim import Adam
from ..tuners.lora.model import get_lora_model
from ..tuners.lora.qlora import quantize_model
from ..training.loop import History, evaluate, fit

METHODS = ("full", "head", "adapter", "lora", "qlora")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedule of the demo; ``DemoConfig.quick()`` runs in seconds (CI)."""

    dataset: str = "moons"
    n_features: int = 32            # 2 informative dimensions + 30 of noise, rotated together
    hidden: tuple = (200, 2000, 200)  # the article's scale: W of 2000 x 200
    n_samples: int = 3000
    noise: float = 0.1
    downstream: str = "rotate"      # how the downstream task differs: rotate | shift | relabel
    pretrain_epochs: int = 15
    finetune_epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3                # full fine-tuning and pretraining
    peft_lr: float = 3e-3           # head, adapter and LoRA
    r: int = 8                      # the LoRA rank of the headline run
    ranks: tuple = (1, 2, 4, 8, 16)
    bottleneck: int = 8             # Houlsby adapter width
    seed: int = 0
    dtype: str = "float32"

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        small = dict(n_features=8, hidden=(32, 64, 32), n_samples=600, pretrain_epochs=8,
                     finetune_epochs=6, ranks=(1, 4), r=4, bottleneck=4)
        return cls(**{**small, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def sizes(self) -> list[int]:
        return [self.n_features, *self.hidden, 1]


def task_spec(cfg: DemoConfig) -> TaskSpec:
    return TaskSpec(name=cfg.dataset, n_samples=cfg.n_samples, n_features=cfg.n_features, noise=cfg.noise,
                    seed=cfg.seed, dtype=cfg.dtype)


def dense_names(model: Module) -> list[str]:
    """Dotted names of the Dense layers, in order (the last one is the classifier head)."""
    return [n for n, m in model.named_modules() if isinstance(m, Dense)]


def pretrain(cfg: DemoConfig) -> tuple[Module, Dataset, History]:
    """The 'pretrained model': an MLP trained on the original task."""
    ds = make_task(task_spec(cfg))
    model = MLP(cfg.sizes, dtype=cfg.dtype, seed=cfg.seed)
    history = fit(model, Adam(model.parameters(), lr=cfg.lr), BCEWithLogitsLoss(), ds.X_train, ds.y_train,
                  X_val=ds.X_val, y_val=ds.y_val, epochs=cfg.pretrain_epochs, batch_size=cfg.batch_size,
                  seed=cfg.seed, desc="pretrain")
    return model, ds, history


def downstream(cfg: DemoConfig, ds: Dataset, kind: str | None = None) -> Dataset:
    return downstream_task(ds, kind or cfg.downstream)


def lora_config(cfg: DemoConfig, model: Module, r: int | None = None, **overrides) -> LoraConfig:
    """LoRA on every hidden Dense layer, the head trained in full as a module to save."""
    r = r or cfg.r
    names = dense_names(model)
    return LoraConfig(**{"r": r, "lora_alpha": 2 * r, "target_modules": names[:-1],
                         "modules_to_save": [names[-1]], **overrides})


def prepare(method: str, pretrained: Module, cfg: DemoConfig, r: int | None = None, **lora_overrides) -> Module:
    """A fresh copy of ``pretrained`` set up for ``method`` (see the module docstring);
    ``lora_overrides`` (lora_alpha, lora_dropout, target_modules, ...) go to LoRA's config."""
    model = release(copy.deepcopy(pretrained))
    head = dense_names(model)[-1]
    if method == "full":
        return model.requires_grad_(True)
    if method == "head":
        model.requires_grad_(False)
        model.get_submodule(head).requires_grad_(True)
        return model
    if method == "adapter":
        activations = [n for n, m in model.named_children() if not isinstance(m, Dense)]
        adapted = insert_bottleneck_adapters(model, activations, cfg.bottleneck, seed=cfg.seed)
        dense_names(adapted) and adapted.get_submodule(_last_child(adapted)).requires_grad_(True)
        return adapted
    if method == "lora":
        return get_lora_model(model, lora_config(cfg, model, r, **lora_overrides))
    if method == "qlora":                      # the frozen hidden layers in 4-bit NF4, LoRA on top
        config = lora_config(cfg, model, r, **lora_overrides)
        return get_lora_model(quantize_model(model, skip=(head,)), config)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def _last_child(model) -> str:
    return list(model._modules)[-1]


def finetune(model: Module, ds: Dataset, cfg: DemoConfig, lr: float | None = None, epochs: int | None = None,
             optimizer=None) -> History:
    """Train ``model``'s trainable parameters on ``ds``."""
    optimizer = optimizer or Adam(model.parameters(trainable_only=True), lr=cfg.peft_lr if lr is None else lr)
    return fit(model, optimizer, BCEWithLogitsLoss(), ds.X_train, ds.y_train, X_val=ds.X_val, y_val=ds.y_val,
               epochs=cfg.finetune_epochs if epochs is None else epochs, batch_size=cfg.batch_size, seed=cfg.seed + 1, desc="finetune")


def test_accuracy(model: Module, ds: Dataset) -> float:
    """Accuracy on the test split."""
    return evaluate(model, BCEWithLogitsLoss(), ds.X_test, ds.y_test)[1]


test_accuracy.__test__ = False      # a library function, not a pytest test when imported into one


def method_row(name: str, model, ds, cfg: DemoConfig, history, **extra) -> dict:
    """One line of the demo's comparison table (memory counted on one training step)."""
    probe = copy.deepcopy(model)
    memory = measure_step(probe, Adam(probe.parameters(trainable_only=True)),
                          ds.X_train[:cfg.batch_size], ds.y_train[:cfg.batch_size])
    return {"method": name, "test_acc": test_accuracy(model, ds),
            "trainable_params": model.num_parameters(trainable_only=True), "all_params": model.num_parameters(),
            "stored_bytes": stored_bytes(model), "frozen_bytes": memory.weights - stored_bytes(model),
            "memory": memory.to_dict(), "seconds_per_epoch": history.seconds_per_epoch, **extra}


def with_overrides(cfg: DemoConfig, **kw) -> DemoConfig:
    return replace(cfg, **kw)
