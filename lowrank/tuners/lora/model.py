"""LoraModel, PEFT's LoraModel/PeftModel surface: injection, adapter management, mixed batches, generation.

``get_lora_model(model, config)`` replaces each targeted layer by a LoRA layer (``_create_and_replace``),
wraps each ``modules_to_save`` module so that every adapter trains its own copy, freezes the rest,
and returns a LoraModel. Module paths follow PyTorch naming ("0", "2", "4" for the Dense layers of
an MLP), so a PEFT user's target_modules mean the same here. What LoRA may wrap:

    linear layers     Dense, a layer already carrying LoRA (LoraLinear, DoraLinear), or any type
                      that declares ``lora_targetable = True`` (NF4Dense, say)
    embeddings        Embedding, or a LoraEmbedding already wrapping one
    "all-linear"      PEFT's meaning: every linear layer but the model's output head, the module
                      ``get_output_embeddings()`` returns or else the one named ``lm_head`` (a plain
                      MLP has neither, so its last layer is adapted too, as in PEFT). A tied head
                      (``TiedLMHead``) is no Dense layer: it is never wrapped, even by name.

Files (PEFT's format, both ways) are ``save_and_load``'s; mixed batches are ``mixed``'s.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager

from ...models.llama.generation import generate as generate_ids
from ...models.llama.modeling import TiedLMHead
from ...nn.embedding import Embedding
from ...nn.layers import Dense
from ...nn.module import Module
from ...nn.snapshot import all_or_nothing
from . import save_and_load
from .config import LoraConfig, matches
from .dora import DoraLinear
from .embedding import LoraEmbedding
from .layer import LoraLinear
from .mixed import frozen_stacks, mixed_batch
from .modules_to_save import ModulesToSave
from .qlora import merge_nf4
from .save_and_load import check_adapter_name

LORA_LAYERS = (LoraLinear, LoraEmbedding)
ADAPTER_PARTS = ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "original_module", "modules_to_save")     # names inside an injected layer, never targets themselves


def linear(module) -> bool:
    """A layer "all-linear" adapts (the output head aside)."""
    return isinstance(module, (Dense, LoraLinear)) or getattr(type(module), "lora_targetable", False)


def adaptable(module) -> bool:
    """A layer target_modules may name: a linear layer or a token embedding."""
    return linear(module) or isinstance(module, (Embedding, LoraEmbedding))


def output_head(model) -> str | None:
    """The dotted name of ``model``'s output head (PEFT: the output embedding), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _is_adapter_part(name: str) -> bool:
    return any(p in ADAPTER_PARTS for p in name.split("."))


def _seed(adapter_name: str, layer_name: str, r: int) -> int:
    """A stable seed per (adapter, layer, rank): injection is deterministic, and adapters of
    different ranks do not start with the same first rows of A."""
    return zlib.crc32(f"{adapter_name}/{layer_name}/r={r}".encode())


def layers_to_adapt(model: Module, config: LoraConfig) -> list[str]:
    """Dotted names of the layers of base ``model`` that ``config`` injects LoRA into (computed without building
    anything: loading checks a file's tensors against them before a factor is allocated)."""
    saved = saved_modules(model, config)
    return [n for n in _targets(model, config) if n not in saved or config.target_modules != "all-linear"]


def _targets(model: Module, config: LoraConfig) -> list[str]:
    """Dotted names of the layers ``config`` targets; a clear error for names that match nothing."""
    if config.target_modules is None:
        raise ValueError("LoraConfig.target_modules is None: name the layers to adapt "
                         f"(e.g. ['0', '2'] or 'all-linear'); this model's layers: {_layer_names(model)}")
    names = [n for n, _ in model.named_modules() if n and not _is_adapter_part(n)]
    if isinstance(config.target_modules, list):
        unmatched = [t for t in config.target_modules if not any(matches([t], n) for n in names)]
        if unmatched:
            raise ValueError(f"target_modules {unmatched} match no layer; this model's layers: {_layer_names(model)}")
    hits = [n for n in names if matches(config.target_modules, n)]
    if config.target_modules == "all-linear":       # PEFT: every linear layer but the output head
        head = output_head(model)
        hits = [n for n in hits if linear(model.get_submodule(n)) and n != head]
    bad = [n for n in hits if not adaptable(model.get_submodule(n))]
    if bad:
        raise TypeError(f"target_modules selects {bad}, which are not Dense layers or embeddings "
                        f"({[type(model.get_submodule(n)).__name__ for n in bad]})")
    if not hits:
        raise ValueError(f"target_modules {config.target_modules!r} match no layer; this model's layers: "
                         f"{_layer_names(model)}")
    return hits


def saved_modules(model: Module, config: LoraConfig) -> list[str]:
    """Names of the layers ``config.modules_to_save`` selects (a clear error for unmatched entries)."""
    saved = []
    for entry in config.modules_to_save or []:
        hits = [n for n, _ in model.named_modules() if n and matches([entry], n) and not _is_adapter_part(n)]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no layer; this model's layers: "
                             f"{_layer_names(model)}")
        saved += [n for n in hits if n not in saved]
    return saved


def _layer_names(model: Module) -> list[str]:
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and not _is_adapter_part(n)]


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
    layers_to_adapt = staticmethod(layers_to_adapt)     # loading reads it from the class it builds

    def add_adapter(self, adapter_name: str, config: LoraConfig):
        """Inject adapter ``adapter_name`` into the layers ``config`` targets (not made active).

        All or nothing: if any layer rejects the config, every change already made is undone.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {list(self.peft_config)}")
        saved = saved_modules(self.model, config)
        targets = layers_to_adapt(self.model, config)
        both = sorted(set(targets) & set(saved))
        if both:
            raise ValueError(f"layers {both} are both in target_modules and modules_to_save; a layer is either "
                             f"adapted with LoRA or trained in full")
        with all_or_nothing(self.model):           # a later layer's refusal undoes earlier layers (PiSSA bases too)
            for name in targets:
                self._create_and_replace(name, adapter_name, config)
            for n in saved:
                m = self.model.get_submodule(n)
                if isinstance(m, ModulesToSave):
                    m.update(adapter_name)
                else:
                    self.model.set_submodule(n, ModulesToSave(m, adapter_name))
        self.peft_config[adapter_name] = config

    def _create_and_replace(self, name: str, adapter_name: str, config: LoraConfig):
        """Add the adapter to layer ``name``, wrapping it in a LoraLinear/DoraLinear/LoraEmbedding first if it
        has no LoRA yet (PEFT's name)."""
        model, layer = self.model, self.model.get_submodule(name)
        kwargs = dict(r=config.rank_for(name), lora_alpha=config.alpha_for(name), lora_dropout=config.lora_dropout,
                      use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
        seed = _seed(adapter_name, name, kwargs["r"])
        if isinstance(layer, (Embedding, LoraEmbedding)):
            if config.use_dora:
                raise ValueError(f"layer {name!r} is an embedding: lowrank implements DoRA for linear layers only; "
                                 f"leave it out of target_modules or set use_dora=False")
            if isinstance(layer, LoraEmbedding):
                layer.update_layer(adapter_name, **kwargs)
                return
            wrapper = LoraEmbedding(layer, adapter_name=adapter_name, seed=seed, **kwargs)
            wrapper.tied_to = tuple(n for n, m in model.named_modules()      # a tied lm_head shares the weight
                                    if m is not layer and getattr(m, "weight", None) is layer.weight)
            model.set_submodule(name, wrapper)
            return
        if config.use_dora:                        # DoRA: a DoraLinear, which also keeps plain adapters
            kwargs["use_dora"] = True
            if isinstance(layer, LoraLinear) and not isinstance(layer, DoraLinear):
                layer = DoraLinear.from_lora(layer)
                model.set_submodule(name, layer)
        if isinstance(layer, LoraLinear):
            layer.update_layer(adapter_name, **kwargs)
            return
        cls = DoraLinear if config.use_dora else LoraLinear
        model.set_submodule(name, cls(layer, adapter_name=adapter_name, seed=seed, **kwargs))

    # -- adapters -------------------------------------------------------------------
    def lora_layers(self) -> list[tuple[str, LoraLinear | LoraEmbedding]]:
        """(name, layer) of every layer carrying LoRA: LoraLinear (DoRA, NF4 too) and LoraEmbedding."""
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
        ``keep_float=True`` keeps those merged layers as exact float Dense layers instead. A tied head
        trained through modules_to_save stays a head of its own: ``config.tie_word_embeddings`` becomes False.
        """
        quantized = {n for n, layer in self.lora_layers() if not layer._fusable}
        for name, layer in self.lora_layers():
            if name in quantized:
                self.model.set_submodule(name, merge_nf4(layer, exact=keep_float))
                continue
            layer.merge([n for n in (adapter_names or [layer.active_adapter]) if n in layer.lora_A])
            self.model.set_submodule(name, layer.base_layer)
        for name, w in [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSave)]:
            kept = w._module_for(w.active_adapter)
            self.model.set_submodule(name, kept)
            if isinstance(w.original_module, TiedLMHead) and kept is not w.original_module:
                self.model.config.tie_word_embeddings = False      # the trained head is a weight of its own now
        return self.model

    def get_base_model(self) -> Module:
        return self.model

    # -- files: PEFT's format (save_and_load) ---------------------------------------
    def save_pretrained(self, save_directory, selected_adapters=None, overwrite: bool = False,
                        dtype: str | None = None):
        """Write each adapter as PEFT does: adapter_config.json + adapter_model.safetensors
        (``dtype`` "bfloat16"/"float16"/"float32" stores the tensors in that type)."""
        return save_and_load.save_pretrained(self, save_directory, selected_adapters=selected_adapters,
                                             overwrite=overwrite, dtype=dtype)

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False,
                     allow_nonfinite: bool = False):
        """Load a saved adapter as ``adapter_name``; on any error the model is left exactly as it was."""
        return save_and_load.load_adapter(self, model_id, adapter_name, is_trainable=is_trainable,
                                          allow_nonfinite=allow_nonfinite)

    @classmethod
    def from_pretrained(cls, model: Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        allow_nonfinite: bool = False) -> "LoraModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (a directory)."""
        return save_and_load.from_pretrained(cls, model, model_id, adapter_name=adapter_name,
                                             is_trainable=is_trainable, allow_nonfinite=allow_nonfinite)

    # -- running --------------------------------------------------------------------
    def forward(self, x, adapter_names=None, **kwargs):
        """The wrapped model's forward(x, **kwargs) (e.g. a decoder's ``attention_mask``); ``adapter_names``
        gives sequence (row) b the adapter adapter_names[b] ("__base__" = none), see ``mixed``."""
        if adapter_names is None:
            return self.model.forward(x, **kwargs)
        with mixed_batch(self, adapter_names, x.shape[0]):
            return self.model.forward(x, **kwargs)

    def generate(self, input_ids, adapter_names=None, **kwargs):
        """The decoder's ``generate`` (``models.llama.generation``: prefill, then one token per step, one KV
        cache for the batch) through the adapters: prompt ids (B, T) -> ids (B, T + n).

        ``adapter_names`` gives prompt b the adapter adapter_names[b] ("__base__" = none) at prefill and at
        every decode step; the KV cache needs nothing per adapter, since row b's keys and values come from
        row b's own adapted projections. The names are checked and handed to the layers once for the whole
        generation rather than at every step as ``forward`` does, because a decode step's model is small and
        two walks of the module tree per step would slow it; the layers stack their factors once too
        (``mixed.frozen_stacks``). None: the active adapter for every row, through the fused kernel.
        """
        if adapter_names is None:
            return generate_ids(self.model, input_ids, **kwargs)
        with mixed_batch(self, adapter_names, len(input_ids), "prompts") as lora_layers, frozen_stacks(lora_layers):
            return generate_ids(self.model, input_ids, **kwargs)     # row b -> adapter_names[b] at every step

    def backward(self, dy=None):
        """The wrapped model's backward: from dy, or from the loss of a forward given ``labels`` (no argument)."""
        return self.model.backward() if dy is None else self.model.backward(dy)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT counts them."""
        return self.num_parameters(trainable_only=True), self.num_parameters()

    def print_trainable_parameters(self):
        """PEFT's exact line: ``trainable params: 1,234 || all params: 56,789 || trainable%: 2.1731``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def get_lora_model(model: Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Wrap ``model`` (modified in place) with LoRA adapters as ``config`` says."""
    return LoraModel(model, config, adapter_name)
