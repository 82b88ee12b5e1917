"""Training memory of one decoder step (LlamaForCausalLM + CausalLMLoss), LoRA against full fine-tuning.

Every expected byte count is computed here from the architecture's shapes (letters of
lowrank/nn/attention.py: B, T, N = B·T, d, I, V, H, H_kv, h, L layers; r the LoRA rank; f the float's
itemsize) and compared with what ``measure_step`` counts from the arrays that exist.
"""
import numpy as np
import pytest

import lowrank as lr
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.training.accounting import activation_bytes, measure_step

V, d, I, L, H, H_kv, h = 64, 32, 80, 2, 4, 2, 8
B, T, r = 3, 6, 8
N = B * T


def llama(dtype):
    config = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=I, num_hidden_layers=L, num_attention_heads=H,
                         num_key_value_heads=H_kv, max_position_embeddings=16)
    return LlamaForCausalLM(config, dtype=dtype, seed=0)


def parameter_count():
    """Embedding, per layer q/k/v/o, gate/up/down and two norms, the final norm, an untied lm_head."""
    per_layer = d * H * h + 2 * d * H_kv * h + H * h * d + 3 * d * I + 2 * d
    return V * d + L * per_layer + d + V * d


def lora_count():
    """r·(D_in + D_out) for q_proj (d -> H·h) and v_proj (d -> H_kv·h) in each layer."""
    return L * (r * (d + H * h) + r * (d + H_kv * h))


def attention_keeps():
    """The figure in lowrank/nn/attention.py's docstring, in floats: rotated q, k, v, RoPE tables (no P, B·H·T²:
    backward recomputes it)."""
    return B * T * h * (H + 2 * H_kv) + 2 * T * h


def activations(full: bool):
    """Floats kept between forward and backward, module by module (frozen Dense layers keep nothing)."""
    norm = N * d + N                                       # RMSNorm: x̂ (B, T, d) and 1/rms (B, T, 1)
    mlp = 2 * N * I                                        # g and u (silu_and_mul recomputes σ(g))
    if full:                                               # every Dense keeps its input (q/k/v share one,
        dense = N * d + N * H * h + N * d + N * I          # gate/up share one): q/k/v, o, gate/up, down
        head = N * d                                       # lm_head's input
    else:                                                  # LoRA on q, v: their shared x and h = x Aᵀ each
        dense, head = N * d + 2 * N * r, 0
    return L * (2 * norm + attention_keeps() + dense + mlp) + norm + head


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lora_step_keeps_far_fewer_gradient_and_optimizer_bytes_than_full_fine_tuning(dtype):
    f = np.dtype(dtype).itemsize
    ids = np.random.default_rng(0).integers(0, V, (B, T))
    full = llama(dtype)
    full_mem = measure_step(full, lr.Adam(full.parameters(), lr=1e-3), ids, ids, lr.CausalLMLoss())
    lora = lr.get_lora_model(llama(dtype), lr.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    lora_mem = measure_step(lora, lr.Adam(lora.parameters(trainable_only=True), lr=1e-3), ids, ids,
                            lr.CausalLMLoss())
    P, P_lora = parameter_count(), lora_count()
    assert (full_mem.weights, full_mem.gradients, full_mem.optimizer) == (f * P, f * P, 2 * f * P)   # Adam: m, v
    assert (lora_mem.weights, lora_mem.gradients, lora_mem.optimizer) == (f * (P + P_lora), f * P_lora,
                                                                         2 * f * P_lora)
    assert full_mem.activations == f * activations(full=True) + 8 * B * T         # + the int64 ids for dW_embed
    assert lora_mem.activations == f * activations(full=False)
    kept = lambda m: m.gradients + m.optimizer
    assert kept(lora_mem) < kept(full_mem) / 10                                    # 5,376 of 77,280 floats


def test_attention_docstring_figure_is_what_the_accounting_measures():
    """Frozen projections keep nothing, so the attention module's caches are exactly the docstring's figure, and
    the attention_mask it was given (int64 here)."""
    model = llama("float32").requires_grad_(False)
    model.forward(np.random.default_rng(1).integers(0, V, (B, T)), attention_mask=np.ones((B, T), np.int64))
    attn = model.model.layers[0].self_attn
    assert activation_bytes(attn) == 4 * attention_keeps() + 8 * B * T
    model.requires_grad_(True)                             # trainable: + the shared (N, d) input and o_proj's
    model.forward(np.random.default_rng(1).integers(0, V, (B, T)))
    assert activation_bytes(attn) == 4 * (attention_keeps() + N * d + N * H * h)


def test_measure_step_passes_the_attention_mask_to_the_model():
    ids = np.random.default_rng(2).integers(0, V, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[0, :2] = 0
    model = lr.get_lora_model(llama("float32"), lr.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    step = measure_step(model, lr.Adam(model.parameters(trainable_only=True)), ids, ids, lr.CausalLMLoss(),
                        attention_mask=mask)
    assert step.gradients == 4 * lora_count()
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        measure_step(model, lr.Adam(model.parameters(trainable_only=True)), ids, ids, lr.CausalLMLoss(),
                     attention_mask=mask[:, :2])
