"""Slow, obviously-correct float64 formulas, one scalar sum per element: the kernels' oracle.

Letters as in kernels/reference/: x (N, D_in), W (D_out, D_in), A (r, D_in), B (D_out, r),
s = scaling, mask (N, D_in) or None, index (N,) with −1 = base only. Every output element
is written out as the sum it is; nothing here calls a matrix product.
"""
import numpy as np


def _f64(*arrays):
    return [None if a is None else np.asarray(a, np.float64) for a in arrays]


def dense_forward(x, W, bias=None):
    """y[i, o] = Σ_j x[i, j] W[o, j] + b[o]."""
    x, W, bias = _f64(x, W, bias)
    N, D_in = x.shape
    y = np.zeros((N, W.shape[0]))
    for i in range(N):
        for o in range(W.shape[0]):
            y[i, o] = sum(x[i, j] * W[o, j] for j in range(D_in)) + (0.0 if bias is None else bias[o])
    return y


def dense_backward(dy, x, W):
    """dx[i, j] = Σ_o dy[i, o] W[o, j];  dW[o, j] = Σ_i dy[i, o] x[i, j];  db[o] = Σ_i dy[i, o]."""
    dy, x, W = _f64(dy, x, W)
    N, D_out = dy.shape
    D_in = W.shape[1]
    dx = np.array([[sum(dy[i, o] * W[o, j] for o in range(D_out)) for j in range(D_in)] for i in range(N)])
    dW = np.array([[sum(dy[i, o] * x[i, j] for i in range(N)) for j in range(D_in)] for o in range(D_out)])
    db = np.array([sum(dy[i, o] for i in range(N)) for o in range(D_out)])
    return dx.reshape(N, D_in), dW.reshape(D_out, D_in), db


def lora_forward(x, W, A, B, s, bias=None, mask=None):
    """h[i, t] = Σ_j x[i, j] m[i, j] A[t, j];  y[i, o] = (x Wᵀ)[i, o] + b[o] + s Σ_t h[i, t] B[o, t]."""
    x, W, A, B, bias, mask = _f64(x, W, A, B, bias, mask)
    N, D_in = x.shape
    r, D_out = A.shape[0], B.shape[0]
    m = np.ones_like(x) if mask is None else mask
    h = np.array([[sum(x[i, j] * m[i, j] * A[t, j] for j in range(D_in)) for t in range(r)] for i in range(N)])
    h = h.reshape(N, r)
    y = dense_forward(x, W, bias) if W is not None else np.zeros((N, D_out)) + (0 if bias is None else bias)
    for i in range(N):
        for o in range(D_out):
            y[i, o] += s * sum(h[i, t] * B[o, t] for t in range(r))
    return y, h


def lora_backward(dy, x, W, A, B, s, mask=None):
    """dh = s dy B;  dB[o, t] = s Σ_i dy[i, o] h[i, t];  dA[t, j] = Σ_i dh[i, t] x[i, j] m[i, j];
    dx[i, j] = (dy W)[i, j] + m[i, j] Σ_t dh[i, t] A[t, j]."""
    dy, x, W, A, B, mask = _f64(dy, x, W, A, B, mask)
    N, D_in = x.shape
    r, D_out = A.shape[0], B.shape[0]
    m = np.ones_like(x) if mask is None else mask
    _, h = lora_forward(x, None, A, B, s, mask=mask)
    dh = np.array([[s * sum(dy[i, o] * B[o, t] for o in range(D_out)) for t in range(r)] for i in range(N)])
    dh = dh.reshape(N, r)
    dB = np.array([[s * sum(dy[i, o] * h[i, t] for i in range(N)) for t in range(r)] for o in range(D_out)])
    dA = np.array([[sum(dh[i, t] * x[i, j] * m[i, j] for i in range(N)) for j in range(D_in)] for t in range(r)])
    dx = np.zeros((N, D_in)) if W is None else dense_backward(dy, x, W)[0]
    for i in range(N):
        for j in range(D_in):
            dx[i, j] += m[i, j] * sum(dh[i, t] * A[t, j] for t in range(r))
    return dx, dA.reshape(r, D_in), dB.reshape(D_out, r)


def lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias=None):
    """Row by row: row i is lora_forward with adapter index[i], or the base alone (h = 0) for −1."""
    N, r = x.shape[0], A_stack.shape[1]
    y, h = dense_forward(x, W, bias), np.zeros((N, r))
    for i in range(N):
        k = int(index[i])
        if k >= 0:
            y_i, h_i = lora_forward(x[i:i + 1], W, A_stack[k], B_stack[k], float(scalings[k]), bias)
            y[i], h[i] = y_i[0], h_i[0]
    return y, h


def lora_backward_multi(dy, x, W, A_stack, B_stack, scalings, index):
    """Row by row: each row's lora_backward, its dA and dB summed into its adapter's slot."""
    dx = dense_backward(dy, x, W)[0]
    dA, dB = np.zeros(A_stack.shape), np.zeros(B_stack.shape)
    for i in range(x.shape[0]):
        k = int(index[i])
        if k >= 0:
            dx_i, dA_i, dB_i = lora_backward(dy[i:i + 1], x[i:i + 1], None, A_stack[k], B_stack[k],
                                             float(scalings[k]))
            dx[i] += dx_i[0]
            dA[k] += dA_i
            dB[k] += dB_i
    return dx, dA, dB


def segments_to_index(indptr, seg_index):
    """Row i lies in the segment s with indptr[s] <= i < indptr[s+1]; its adapter is seg_index[s]."""
    return np.array([seg_index[s] for s in range(len(seg_index)) for _ in range(indptr[s], indptr[s + 1])],
                    dtype=np.int64)


def rope_forward(x, cos, sin, sign=1):
    """Each pair (j, j + h/2) of each row turned by its angle: transformers' x cos + rotate_half(x) sin,
    with rotate_half built as the concatenation it is."""
    x, cos, sin = _f64(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + sign * rotated * sin


def rope_backward(dy, cos, sin):
    return rope_forward(dy, cos, sin, sign=-1)


def causal_softmax(S, key_mask=None, past=0):
    """Row by row: the keys query i sees, listed (j <= past + i, unmasked), and exp / sum over them alone."""
    S = np.asarray(S, np.float64)
    P = np.zeros(S.shape)
    for row in np.ndindex(S.shape[:-1]):
        b, i = row[0], row[-1]
        seen = [j for j in range(S.shape[-1]) if j <= past + i and (key_mask is None or key_mask[b, j])]
        if seen:
            e = np.array([np.exp(S[row][j] - max(S[row][k] for k in seen)) for j in seen])
            P[row][seen] = e / e.sum()
    return P


def causal_attention(q, k, v, key_mask=None, past=0):
    """Query by query: the keys it sees listed, their scores q·k_j as sums, the softmax over them alone, and
    the weighted sum of their v_j; k and v of key/value head m serve each of its G query heads."""
    q, k, v = _f64(q, k, v)
    O = np.zeros(q.shape)
    for b, m, g, i in np.ndindex(q.shape[:-1]):
        seen = [j for j in range(k.shape[2]) if j <= past + i and (key_mask is None or key_mask[b, j])]
        if seen:
            s = [sum(q[b, m, g, i, e] * k[b, m, j, e] for e in range(q.shape[-1])) for j in seen]
            w = np.exp(np.array(s) - max(s))
            O[b, m, g, i] = sum(wj * v[b, m, j] for wj, j in zip(w / w.sum(), seen))
    return O


def causal_softmax_backward(dP, P):
    """dS = J dP with the softmax's Jacobian J = diag(p) − p pᵀ written out, row by row."""
    dP, P = _f64(dP, P)
    dS = np.zeros(P.shape)
    for row in np.ndindex(P.shape[:-1]):
        p = P[row]
        dS[row] = ((np.diag(p) - np.outer(p, p)) * dP[row]).sum(axis=1)          # J symmetric: Σ_k J[j, k] dP[k]
    return dS


def silu_and_mul(g, u):
    """silu(g) u with σ(g) = (1 + tanh(g/2)) / 2, another form of 1 / (1 + e^−g) that never overflows."""
    g, u = _f64(g, u)
    return g * (1 + np.tanh(g / 2)) / 2 * u


def silu_and_mul_backward(dy, g, u):
    """The product rule on g σ(g) u, with σ' = σ (1 − σ)."""
    dy, g, u = _f64(dy, g, u)
    s = (1 + np.tanh(g / 2)) / 2
    return dy * u * (s + g * s * (1 - s)), dy * g * s


def rms_norm(x, weight, eps):
    """Row by row: the root mean square as the sum it is, then each element scaled and weighted."""
    x, weight = _f64(x, weight)
    r = np.zeros(x.shape[:-1] + (1,))
    y = np.zeros(x.shape)
    for row in np.ndindex(x.shape[:-1]):
        r[row] = 1 / np.sqrt(sum(v * v for v in x[row]) / x.shape[-1] + eps)
        y[row] = [weight[j] * x[row][j] * r[row][0] for j in range(x.shape[-1])]
    return y, r


def rms_norm_backward(dy, x, weight, rstd, need_dw=True):
    """The chain rule through r = (mean(x²) + eps)^−½ written per element: ∂y_j/∂x_k = w_j (δ_jk r − x_j x_k r³ / d)."""
    dy, x, weight, rstd = _f64(dy, x, weight, rstd)
    d = x.shape[-1]
    dx = np.zeros(x.shape)
    dw = np.zeros(d)
    for row in np.ndindex(x.shape[:-1]):
        r, xr, g = rstd[row][0], x[row], dy[row]
        dx[row] = [sum(g[j] * weight[j] * ((j == k) * r - xr[j] * xr[k] * r ** 3 / d) for j in range(d))
                   for k in range(d)]
        dw += g * xr * r
    return dx, (dw if need_dw else None)


# -- inputs shared by the kernel tests: O(1) data, so relative tolerances mean something ----------
def lora_inputs(rng, N, D_in, D_out, r, dtype=np.float64, masked=False, K=None):
    """x, W, A, B, bias, dy (and mask, or the stacks/scalings for K adapters) as ``dtype`` arrays."""
    f = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    d = dict(x=f(N, D_in), W=f(D_out, D_in), A=f(r, D_in), B=f(D_out, r), bias=f(D_out), dy=f(N, D_out),
             s=float(rng.uniform(0.25, 2.0)))
    if masked:
        keep = 0.75
        d["mask"] = ((rng.random((N, D_in)) < keep) / keep).astype(dtype)
    if K is not None:
        d.update(A_stack=f(K, r, D_in), B_stack=f(K, D_out, r), scalings=rng.uniform(0.25, 2.0, K).astype(dtype))
    return d
