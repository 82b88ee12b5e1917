"""All-or-nothing model changes.

``all_or_nothing(module)`` snapshots every module's attributes and every parameter's
(data, grad, trainable) and puts them back exactly if the block raises, so a load or an
injection that fails midway leaves the model as it was, down to object identity.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np


def _snapshot_value(v):
    """Containers are copied one level deep; random generators fully (their state advances)."""
    if isinstance(v, np.random.Generator):
        return copy.deepcopy(v)
    if isinstance(v, (dict, list, set)):
        return copy.copy(v)
    return v


@contextmanager
def all_or_nothing(*modules):
    """Run the block; if it raises, put every module reachable from ``modules`` back exactly.

    Restores each module's attributes (children, parameter tables, per-adapter dicts,
    paths, training flags) and each parameter's data, grad and trainable flag.
    """
    saved_modules = {id(m): (m, {k: _snapshot_value(v) for k, v in m.__dict__.items()})
                     for root in modules for _, m in root.named_modules()}
    saved_params = {id(p): (p, p.data, p.grad, p.trainable)
                    for root in modules for _, p in root.named_parameters()}
    try:
        yield
    except BaseException:
        for m, state in saved_modules.values():
            m.__dict__.clear()
            m.__dict__.update(state)
        for p, data, grad, trainable in saved_params.values():
            p.data, p.grad, p.trainable = data, grad, trainable
        raise
