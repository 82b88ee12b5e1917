"""PEFT's ModulesToSaveWrapper: layers trained in full, one copy per adapter (e.g. a task's head; a head
tied to the embedding gets an untied copy of its own, as in PEFT)."""
from __future__ import annotations

import copy

import numpy as np

from ...models.llama.modeling import TiedLMHead
from ...nn.device import get_array_module
from ...nn.layers import Dense
from ...nn.module import Module
from .mixed import BASE, rows_for


def trainable_copy(module: Module) -> Module:
    """A trainable deep copy of ``module``. A tied head (which borrows the embedding's weight and owns no
    Parameter) becomes a bias-free Dense with its own copy of that weight (V, d), as PEFT's copy of a tied
    nn.Linear does: the copy trains and is saved, the embedding stays frozen."""
    if isinstance(module, TiedLMHead):
        W = module.weight                                               # (V, d)
        head = Dense(W.shape[1], W.shape[0], bias=False, dtype=W.dtype, backend=module.backend)
        head.weight.data = W.data.copy()
        return head.requires_grad_(True)
    return copy.deepcopy(module).requires_grad_(True)


class ModuleDict(Module):
    """Child modules keyed by name (one copy per adapter)."""

    def __getitem__(self, key) -> Module:
        return self._modules[key]

    def __setitem__(self, key, module: Module):
        setattr(self, key, module)

    def __delitem__(self, key):
        delattr(self, key)

    def __contains__(self, key):
        return key in self._modules

    def keys(self):
        return self._modules.keys()


class ModulesToSave(Module):
    """PEFT's ModulesToSaveWrapper: the frozen ``original_module`` plus a trainable copy per
    adapter in ``modules_to_save``; the active adapter's copy runs (the original when none)."""

    row_adapters = None    # one name per sequence, set from outside for one mixed batch (``mixed.mixed_batch``)

    def __init__(self, module: Module, adapter_name: str):
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = ModuleDict()
        self.active_adapter = None
        self.update(adapter_name)

    def update(self, adapter_name: str):
        self.modules_to_save[adapter_name] = trainable_copy(self.original_module)

    def set_adapter(self, name):
        self.active_adapter = name if name in self.modules_to_save else None

    def delete_adapter(self, name):
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def _module_for(self, name):
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def forward(self, x, adapter_names=None):
        if adapter_names is None and self.row_adapters is not None:
            adapter_names = rows_for(self.row_adapters, x.shape[0], self.label)   # a decoder's head: B·T rows
        names = adapter_names
        if names is None:
            module = self._module_for(self.active_adapter)
            self._cache = ("single", module)
            return module.forward(x)
        groups = {}                                     # module name -> rows using it
        for i, n in enumerate(names):
            groups.setdefault(n if n in self.modules_to_save else BASE, []).append(i)
        xp = get_array_module(x)
        parts = []
        for n, rows in groups.items():
            rows = xp.asarray(np.array(rows))
            parts.append((n, rows, self._module_for(n).forward(x[rows])))
        y = xp.empty((x.shape[0], parts[0][2].shape[1]), x.dtype)
        for _, rows, yr in parts:
            y[rows] = yr
        self._cache = ("mixed", [(n, rows) for n, rows, _ in parts], x.shape)
        return y

    def backward(self, dy):
        cache = self._need_cache()
        self._cache = None
        if cache[0] == "single":
            return cache[1].backward(dy)
        _, groups, x_shape = cache
        dx = get_array_module(dy).empty(x_shape, dy.dtype)
        for n, rows in groups:
            dx[rows] = self._module_for(n).backward(dy[rows])
        return dx
