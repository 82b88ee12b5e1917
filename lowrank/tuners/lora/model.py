"""Adapter injection with PEFT's vocabulary: get_lora_model, LoraModel, ModulesToSave.

``get_lora_model(model, config)`` replaces each targeted Dense with a LoRALinear (and each
targeted Embedding with a LoRAEmbedding: ``.inject``), wraps
each ``modules_to_save`` module so that every adapter trains its own copy, freezes the
rest, and returns a LoraModel. Module paths follow PyTorch naming ("0", "2", "4" for
the Dense layers of an MLP), so a PEFT user's target_modules mean the same here.
"""
from __future__ import annotations

from contextlib import contextmanager

from ...nn.snapshot import all_or_nothing
from ...io.adapter_files import save_pretrained
from .inject import LORA_LAYERS, adaptable, inject, linear, output_head
from .layer import LoRALinear
from .mixed import forward_mixed
from .generation import generate
from .config import LoraConfig, matches
from ...nn.module import Module
from .modules_to_save import ModulesToSave
from .names import check_adapter_name
from .pretrained import from_pretrained, load_adapter

def _adaptable(module) -> bool:
    """Linear layers (Dense, LoRA-carrying, ``lora_targetable``) and token embeddings (``.inject``)."""
    return adaptable(module)


class LoraModel(Module):
    """A base model with LoRA adapters injected; PEFT's LoraModel/PeftModel surface."""

    def __init__(self, model: Module, config: LoraConfig, adapter_name: str = "default"):
        check_adapter_name(adapter_name)
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | None = adapter_name
        model.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # -- injection ------------------------------------------------------------------
    def _targets(self, config: LoraConfig) -> list[str]:
        """Dotted names of the layers ``config`` targets; a clear error for names that match nothing."""
        if config.target_modules is None:
            raise ValueError("LoraConfig.target_modules is None: name the layers to adapt "
                             f"(e.g. ['0', '2'] or 'all-linear'); this model's layers: {self._layer_names()}")
        names = [n for n, _ in self.model.named_modules() if n and not _is_adapter_part(n)]
        if isinstance(config.target_modules, list):
            unmatched = [t for t in config.target_modules if not any(matches([t], n) for n in names)]
            if unmatched:
                raise ValueError(f"target_modules {unmatched} match no layer; this model's layers: "
                                 f"{self._layer_names()}")
        hits = [n for n in names if matches(config.target_modules, n)]
        if config.target_modules == "all-linear":       # PEFT: every linear layer but the output head
            head = output_head(self.model)
            hits = [n for n in hits if linear(self.model.get_submodule(n)) and n != head]
        bad = [n for n in hits if not _adaptable(self.model.get_submodule(n))]
        if bad:
            raise TypeError(f"target_modules selects {bad}, which are not Dense layers or embeddings "
                            f"({[type(self.model.get_submodule(n)).__name__ for n in bad]})")
        if not hits:
            raise ValueError(f"target_modules {config.target_modules!r} match no layer; this model's layers: "
                             f"{self._layer_names()}")
        return hits

    def _layer_names(self):
        return [f"{n} ({type(m).__name__})" for n, m in self.model.named_modules() if n and not _is_adapter_part(n)]

    def add_adapter(self, adapter_name: str, config: LoraConfig):
        """Inject adapter ``adapter_name`` into the layers ``config`` targets (not made active).

        All or nothing: if any layer rejects the config, every change already made is undone.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {list(self.peft_config)}")
        saved = self._saved_modules(config)
        targets = [n for n in self._targets(config) if n not in saved or config.target_modules != "all-linear"]
        both = sorted(set(targets) & set(saved))
        if both:
            raise ValueError(f"layers {both} are both in target_modules and modules_to_save; a layer is either "
                             f"adapted with LoRA or trained in full")
        with all_or_nothing(self.model):           # a later layer's refusal undoes earlier layers (PiSSA bases too)
            for name in targets:
                self._inject(name, adapter_name, config)
            for n in saved:
                m = self.model.get_submodule(n)
                if isinstance(m, ModulesToSave):
                    m.update(adapter_name)
                else:
                    self.model.set_submodule(n, ModulesToSave(m, adapter_name))
        self.peft_config[adapter_name] = config

    def _saved_modules(self, config: LoraConfig) -> list[str]:
        """Names of the layers ``config.modules_to_save`` selects (a clear error for unmatched entries)."""
        saved = []
        for entry in config.modules_to_save or []:
            hits = [n for n, _ in self.model.named_modules() if n and matches([entry], n) and not _is_adapter_part(n)]
            if not hits:
                raise ValueError(f"modules_to_save entry {entry!r} matches no layer; this model's layers: "
                                 f"{self._layer_names()}")
            saved += [n for n in hits if n not in saved]
        return saved

    def _inject(self, name: str, adapter_name: str, config: LoraConfig):
        """Add the adapter to layer ``name``, wrapping it in a LoRALinear/DoraLinear/LoRAEmbedding if needed."""
        inject(self.model, name, adapter_name, config)

    # -- adapters -------------------------------------------------------------------
    def lora_layers(self) -> list[tuple[str, LoRALinear]]:
        """(name, layer) of every layer carrying LoRA: LoRALinear (DoRA, NF4 too) and LoRAEmbedding."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LORA_LAYERS)]

    def _wrappers(self) -> list[ModulesToSave]:
        return [m for _, m in self.model.named_modules() if isinstance(m, ModulesToSave)]

    def set_adapter(self, adapter_name: str):
        """Make ``adapter_name`` active and the only trainable adapter (PEFT's behaviour)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        config = self.peft_config[adapter_name]
        self.model.requires_grad_(False)
        for _, layer in self.lora_layers():
            layer.set_adapter(adapter_name if adapter_name in layer.lora_A else None)
            for name in layer.lora_A:
                layer.lora_A[name].trainable = layer.lora_B[name].trainable = name == adapter_name
            for name in getattr(layer, "lora_magnitude_vector", ()):   # DoRA's m trains with its adapter
                layer.lora_magnitude_vector[name].trainable = name == adapter_name
        for w in self._wrappers():
            w.set_adapter(adapter_name)
            if adapter_name in w.modules_to_save:
                w.modules_to_save[adapter_name].requires_grad_(True)
        if config.bias == "all":
            for name, p in self.model.named_parameters():
                if name.endswith("bias") and "original_module" not in name:
                    p.trainable = True
        elif config.bias == "lora_only":
            for _, layer in self.lora_layers():
                if adapter_name in layer.lora_A and layer.bias is not None:
                    layer.bias.trainable = True
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str):
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        for _, layer in self.lora_layers():
            if adapter_name in layer.lora_A:
                layer.delete_adapter(adapter_name)
        for w in self._wrappers():
            w.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            rest = list(self.peft_config)
            self.active_adapter = None
            if rest:
                self.set_adapter(rest[0])
            else:
                for _, layer in self.lora_layers():
                    layer.set_adapter(None)

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (``with model.disable_adapter(): ...``)."""
        layers, wrappers = self.lora_layers(), self._wrappers()
        saved = [l.active_adapter for _, l in layers], [w.active_adapter for w in wrappers]
        if any(l.merged for _, l in layers):
            raise ValueError("disable_adapter: unmerge the adapters first (they are folded into the weights)")
        for _, l in layers:
            l.set_adapter(None)
        for w in wrappers:
            w.set_adapter(None)
        try:
            yield self
        finally:
            for (_, l), a in zip(layers, saved[0]):
                l.active_adapter = a
            for w, a in zip(wrappers, saved[1]):
                w.active_adapter = a

    def merge_adapter(self, adapter_names=None):
        for _, layer in self.lora_layers():
            names = [n for n in (adapter_names or [self.active_adapter]) if n in layer.lora_A]
            layer.merge(names)

    def unmerge_adapter(self):
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, adapter_names=None, *, keep_float: bool = False) -> Module:
        """Fold the adapters into the base weights and return the plain base model (no LoRA layers).

        Over a 4-bit (NF4) base the merged weight is requantized, which is lossy (as in PEFT);
        ``keep_float=True`` keeps those merged layers as exact float Dense layers instead.
        """
        from .qlora import merge_nf4
        quantized = {n for n, layer in self.lora_layers() if not layer._fusable}
        for name, layer in self.lora_layers():
            if name in quantized:
                self.model.set_submodule(name, merge_nf4(layer, exact=keep_float))
                continue
            layer.merge([n for n in (adapter_names or [layer.active_adapter]) if n in layer.lora_A])
            self.model.set_submodule(name, layer.base_layer)
        for name, w in [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSave)]:
            self.model.set_submodule(name, w._module_for(w.active_adapter))
        return self.model

    def get_base_model(self) -> Module:
        return self.model

    # -- files (PEFT's format: lowrank.io.adapter_files; loading: .pretrained) ----------
    def save_pretrained(self, save_directory, selected_adapters=None, overwrite: bool = False,
                        dtype: str | None = None):
        """Write each adapter as PEFT does: adapter_config.json + adapter_model.safetensors
        (``dtype`` "bfloat16"/"float16"/"float32" stores the tensors in that type)."""
        return save_pretrained(self, save_directory, selected_adapters=selected_adapters, overwrite=overwrite,
                               dtype=dtype)

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False,
                     allow_nonfinite: bool = False):
        """Load a saved adapter as ``adapter_name``; on any error the model is left exactly as it was."""
        return load_adapter(self, model_id, adapter_name, is_trainable=is_trainable,
                            allow_nonfinite=allow_nonfinite)

    @classmethod
    def from_pretrained(cls, model: Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        allow_nonfinite: bool = False) -> "LoraModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (a directory)."""
        return from_pretrained(cls, model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                               allow_nonfinite=allow_nonfinite)

    # -- running --------------------------------------------------------------------
    def forward(self, x, adapter_names=None, **kwargs):
        """The wrapped model's forward(x, **kwargs) (e.g. a decoder's ``attention_mask``); ``adapter_names``
        gives sequence (row) b the adapter adapter_names[b] ("__base__" = none), see ``mixed``."""
        if adapter_names is None:
            return self.model.forward(x, **kwargs)
        return forward_mixed(self, x, adapter_names, **kwargs)

    def generate(self, input_ids, adapter_names=None, **kwargs):
        """The decoder's ``generate`` (prefill, then one token per step) through the adapters; ``adapter_names``
        gives prompt (row) b the adapter adapter_names[b] ("__base__" = none) in one mixed batch (``generation``)."""
        return generate(self, input_ids, adapter_names=adapter_names, **kwargs)

    def backward(self, dy):
        return self.model.backward(dy)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT counts them."""
        return self.num_parameters(trainable_only=True), self.num_parameters()

    def print_trainable_parameters(self):
        """PEFT's exact line: ``trainable params: 1,234 || all params: 56,789 || trainable%: 2.1731``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def _is_adapter_part(name: str) -> bool:
    """Names inside an injected layer (its base_layer, lora_A, copies) are not targets themselves."""
    parts = name.split(".")
    return any(p in ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                     "lora_magnitude_vector", "original_module", "modules_to_save") for p in parts)


def get_lora_model(model: Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Wrap ``model`` (modified in place) with LoRA adapters as ``config`` says."""
    check_adapter_name(adapter_name)
    return LoraModel(model, config, adapter_name)
