"""NumPy reference activation kernels: SwiGLU's gate, the elementwise part of Llama's MLP.

Letters: g = gate_proj(x), u = up_proj(x), both (..., I); σ(z) = 1 / (1 + e^−z).

    silu_and_mul      y = silu(g) ⊙ u = g σ(g) u                     (vLLM's name for this fusion)
    backward          dg = dy ⊙ u ⊙ σ(g) (1 + g (1 − σ(g))),   du = dy ⊙ g σ(g)

The backward takes g, not silu(g): the MLP keeps g and u (2 arrays) and recomputes σ, where
keeping silu(g) as well would be a third.
"""
from .. import validate
from ..common import sigmoid, silu_slope


# -- SiLU and multiply (SwiGLU) ---------------------------------------------------------------
def silu_and_mul(g, u):
    """Semantics: y = silu(g) ⊙ u = g σ(g) u, σ(g) = 1 / (1 + e^−g); g, u (..., I) -> y like g."""
    validate.silu_and_mul(g, u)
    y = sigmoid(g)
    y *= g
    y *= u
    return y


def silu_and_mul_backward(dy, g, u):
    """Semantics: dg = dy ⊙ u ⊙ σ(g) (1 + g (1 − σ(g))), du = dy ⊙ g σ(g); dy, g, u (..., I) -> (dg, du)."""
    validate.silu_and_mul(g, u, dy)
    s = sigmoid(g)
    du = dy * g
    du *= s                                    # dy ⊙ silu(g)
    dg = silu_slope(g, s)                      # silu'(g) = σ (1 + g (1 − σ))
    dg *= u
    dg *= dy
    return dg, du
