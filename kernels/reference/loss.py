"""NumPy reference loss kernel: a language model's head and cross-entropy, fused.

Letters: N rows (positions), d hidden size, V vocabulary. x (N, d) the final hidden states, W (V, d)
the head's weight (the embedding when tied), labels (N,) ints, ``ignore_index`` where not counted.

    z_i      = x_i Wᵀ                                    (V,) the logits of row i
    loss_sum = Σ_counted  logsumexp(z_i) − z_i[labels_i]
    g_i      = scale · (softmax(z_i) − onehot(labels_i))  on counted rows, 0 on the others   (N, V)
    dx       = g W   (N, d),      dW = gᵀ x   (V, d)

``config.LOSS_CHUNK_ROWS`` rows at a time, so that at most (chunk, V) logits exist, never (N, V); the
gradients come out of the same pass (the logits are never recomputed), each only when asked for.
``scale`` is 1/n for a mean over n counted tokens. The logits are computed in float32 or wider.
"""
import numpy as np

from .. import config, validate
from ..common import xp as array_module


# -- the LM head and cross-entropy --------------------------------------------------------------
def linear_cross_entropy(x, W, labels, scale=1.0, ignore_index=-100, need_dx=True, need_dW=True):
    """Semantics: loss_sum = Σ_counted logsumexp(x_i Wᵀ) − (x_i Wᵀ)[labels_i]; g = scale (softmax(x Wᵀ) − onehot)
    on counted rows; dx = g W, dW = gᵀ x.  x (N, d), W (V, d), labels (N,) -> (loss_sum (), dx or None, dW or None)."""
    N, V = validate.linear_cross_entropy(x, W, labels, ignore_index)
    xp = array_module(x)
    compute = np.promote_types(np.float32, x.dtype)
    loss = xp.zeros((), compute)
    dx = xp.zeros(x.shape, x.dtype) if need_dx else None
    dW = xp.zeros(W.shape, compute) if need_dW else None
    for r0 in range(0, N, config.LOSS_CHUNK_ROWS):
        r1 = min(r0 + config.LOSS_CHUNK_ROWS, N)
        xc, yc = x[r0:r1].astype(compute), labels[r0:r1]
        counted = yc != ignore_index                                          # (n,)
        target = xp.where(counted, yc, 0)
        z = xc @ W.T.astype(compute)                                          # (n, d) @ (d, V)
        z -= z.max(axis=1, keepdims=True)
        log_z = xp.log(xp.exp(z).sum(axis=1))                                 # (n,)
        picked = xp.take_along_axis(z, target[:, None], axis=1)[:, 0]
        loss += ((log_z - picked) * counted).sum()
        if need_dx or need_dW:
            g = xp.exp(z - log_z[:, None])                                    # softmax (n, V)
            g[xp.arange(r1 - r0), target] -= 1
            g *= (scale * counted)[:, None]
            if need_dx:
                dx[r0:r1] = g @ W.astype(compute)                             # (n, V) @ (V, d)
            if need_dW:
                dW += g.T @ xc                                                # (V, n) @ (n, d)
    return loss.astype(x.dtype), dx, None if dW is None else dW.astype(W.dtype)
