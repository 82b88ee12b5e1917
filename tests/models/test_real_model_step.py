"""The decoder's training step at a real model's scale, on tiny shapes: the loss without logits
(``forward(ids, labels=...)``, ``backward()``) equals the logits path through CausalLMLoss (float64, loss and
every trainable gradient to 1e-10, with padding and masked labels) and never allocates (B·T, V); gradient
checkpointing gives the same gradients (LoRA with dropout included) at a lower peak; the backward stops
where nothing below needs a gradient."""
import tracemalloc

import numpy as np
import pytest

import lowrank as lr
from lowrank.kernels import config as kernel_config
from lowrank.models.llama import LlamaForCausalLM
from lowrank.models.llama.modeling import LlamaDecoderLayer
from lowrank.nn import Embedding
from lowrank.nn.losses_lm import CausalLMLoss, LinearCrossEntropyLoss

pytestmark = pytest.mark.filterwarnings(r"ignore:.*exceeds min\(:UserWarning")


def tiny(tie=True, layers=2, V=11, d=8, dtype="float64", seed=0, **kw):
    config = lr.LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=12, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=tie, initializer_range=0.5, **kw)
    return LlamaForCausalLM(config, dtype=dtype, seed=seed)


def batch(V, B=3, T=7, seed=1):
    """ids, a padding mask (row 0 right-padded, row 2 left-padded) and labels ignoring the padding and a few more."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[0, T - 2:] = 0
    mask[2, :2] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[1, 3] = -100                                                  # a masked label inside a sequence
    return ids, mask, labels


def lora(model, targets=("q_proj", "v_proj"), dropout=0.0, **kw):
    wrapped = lr.get_lora_model(model, lr.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                     lora_dropout=dropout, **kw))
    rng = np.random.default_rng(5)
    for name, p in wrapped.named_parameters():                           # B = 0 at init would hide a wrong dA
        if ".lora_" in name:
            p.data = (0.5 * rng.standard_normal(p.shape)).astype(p.dtype)
    return wrapped


def grads(model):
    return {name: p.grad.copy() for name, p in model.named_parameters() if p.trainable}


def logits_step(model, ids, mask, labels):
    loss_fn = CausalLMLoss()
    model.zero_grad()
    loss = loss_fn.forward(model.forward(ids, attention_mask=mask), labels)
    model.backward(loss_fn.backward())
    return loss, grads(model)


def fused_step(model, ids, mask, labels):
    model.zero_grad()
    loss = model.forward(ids, attention_mask=mask, labels=labels)
    model.backward()
    return loss, grads(model)


def assert_same(got, want, rtol):
    assert got.keys() == want.keys() and got
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol * np.abs(want[name]).max(), err_msg=name)


# -- the loss without logits ----------------------------------------------------------------------------
CASES = {
    "full, tied": lambda: tiny(tie=True),
    "full, untied": lambda: tiny(tie=False),
    "lora q/v, tied": lambda: lora(tiny(tie=True)),
    "lora q/v + embedding, untied": lambda: lora(tiny(tie=False), ("q_proj", "v_proj", "embed_tokens")),
    "lora on lm_head (logits path)": lambda: lora(tiny(tie=False), ("q_proj", "lm_head")),
    "modules_to_save lm_head (logits path)": lambda: lora(tiny(tie=False), ("v_proj",), modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_loss_from_labels_equals_the_logits_path(case, monkeypatch):
    monkeypatch.setattr(kernel_config, "LOSS_CHUNK_ROWS", 4)             # 3·6 rows cross chunk borders
    model = CASES[case]()
    ids, mask, labels = batch(11)
    want_loss, want = logits_step(model, ids, mask, labels)
    loss, got = fused_step(model, ids, mask, labels)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    assert_same(got, want, 1e-10)


def test_an_adapted_head_takes_the_logits_path_and_a_plain_one_does_not():
    ids, mask, labels = batch(11)
    for model, fused in ((tiny(tie=True), True), (tiny(tie=False), True), (lora(tiny(tie=False), ("lm_head",)), False)):
        base = getattr(model, "model", model) if not isinstance(model, LlamaForCausalLM) else model
        model.forward(ids, attention_mask=mask, labels=labels)
        assert isinstance(base._cache.loss, LinearCrossEntropyLoss if fused else CausalLMLoss)
        model.backward()


def test_backward_refuses_the_wrong_kind_of_start():
    model = tiny()
    ids, mask, labels = batch(11)
    model.forward(ids, labels=labels)
    with pytest.raises(ValueError, match="nothing after one with labels"):
        model.backward(np.zeros((3, 7, 11)))
    model.forward(ids)
    with pytest.raises(ValueError, match="backward takes dlogits"):
        model.backward()


def traced_peak(step) -> int:
    """The peak of bytes traced while ``step()`` runs (NumPy reports its arrays to tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        step()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_step_with_labels_never_allocates_the_logits(dtype, monkeypatch):
    monkeypatch.setattr(kernel_config, "LOSS_CHUNK_ROWS", 16)
    V, d, B, T, H, H_kv, h, I, r = 16384, 8, 2, 128, 4, 2, 2, 12, 4
    model = lora(tiny(tie=True, V=V, d=d, dtype=dtype))
    ids = np.random.default_rng(0).integers(0, V, (B, T))
    f, N = np.dtype(dtype).itemsize, B * T
    logits_bytes = N * V * f                                               # 16 MiB in float32
    per_layer = 2 * (N * d + N) + B * H * T * T + N * h * (H + 2 * H_kv) + N * d + 2 * N * r + 2 * N * I
    activations = 2 * 2 * per_layer * f                                   # two layers' caches, twice over
    fused_step(model, ids, None, ids)                                      # compile and warm up first
    fused = traced_peak(lambda: fused_step(model, ids, None, ids))
    plain = traced_peak(lambda: logits_step(model, ids, None, ids))
    assert plain > logits_bytes                                            # the measure sees a (B·T, V) array
    assert fused < 4 * 16 * V * f + activations < logits_bytes / 2         # a few (16, V) chunks plus the caches


# -- gradient checkpointing ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["full, tied", "lora q/v with dropout", "lora q/v/down with dropout, labels"])
def test_checkpointing_gives_the_same_gradients(case):
    def build():
        model = tiny(tie=True, layers=3)
        if case == "full, tied":
            return model, model
        return lora(model, ("q_proj", "v_proj", "down_proj"), dropout=0.3), model

    ids, mask, labels = batch(11)
    step = fused_step if "labels" in case else logits_step
    plain, _ = build()
    checkpointed, base = build()
    base.gradient_checkpointing_enable()
    assert base.is_gradient_checkpointing
    for _ in range(2):                                # the second step checks the dropout streams went on alike
        want_loss, want = step(plain, ids, mask, labels)
        loss, got = step(checkpointed, ids, mask, labels)
        assert loss == want_loss
        assert_same(got, want, 1e-12)
    base.gradient_checkpointing_disable()
    assert not base.is_gradient_checkpointing


def test_checkpointing_recomputes_each_layer_once_and_keeps_only_its_input(monkeypatch):
    model = tiny(layers=3)
    model.gradient_checkpointing_enable()
    ids, mask, labels = batch(11)
    model.forward(ids, attention_mask=mask, labels=labels)
    for i in range(3):
        layer = model.model.layers[i]
        assert layer._cache.x.shape == (3, 7, 8)
        assert all(m._cache is None for name, m in layer.named_modules() if name)
    calls = []
    forward = LlamaDecoderLayer.forward
    monkeypatch.setattr(LlamaDecoderLayer, "forward", lambda self, *a, **k: calls.append(self) or forward(self, *a, **k))
    model.backward()
    assert len(calls) == 3
    model.eval()
    model.forward(ids, attention_mask=mask)                                 # eval forwards are not checkpointed
    assert all(model.model.layers[i]._cache is None for i in range(3))


def test_checkpointing_lowers_the_peak_of_a_step():
    model = lora(tiny(tie=True, layers=12, d=32, dtype="float32"), ("q_proj", "v_proj"))
    ids = np.random.default_rng(0).integers(0, 11, (2, 48))
    fused_step(model, ids, None, ids)
    plain = traced_peak(lambda: fused_step(model, ids, None, ids))
    model.get_base_model().gradient_checkpointing_enable()
    fused_step(model, ids, None, ids)
    checkpointed = traced_peak(lambda: fused_step(model, ids, None, ids))
    # each layer keeps (B, T, d) instead of its norms, attention (P is (B, H, T, T)), MLP and LoRA caches
    assert checkpointed < 0.5 * plain


# -- compute only what the step needs -------------------------------------------------------------------
def spy_backwards(monkeypatch, cls):
    called = []
    backward = cls.backward
    monkeypatch.setattr(cls, "backward", lambda self, dy: called.append(self) or backward(self, dy))
    return called


def test_a_frozen_embedding_gets_no_backward_nor_do_the_frozen_layers_below_the_lowest_trainable_one(monkeypatch):
    model = tiny(tie=False, layers=4)
    for name, p in model.named_parameters():
        p.trainable = not name.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))
    layers = spy_backwards(monkeypatch, LlamaDecoderLayer)
    embeddings = spy_backwards(monkeypatch, Embedding)
    ids, mask, labels = batch(11)
    want_loss, want = logits_step(model, ids, mask, labels)
    assert [model.model.layers[i] for i in (3, 2)] == layers and not embeddings
    assert all(m._cache is None for _, m in model.named_modules())      # the skipped layers' caches are gone
    model.model.embed_tokens.weight.trainable = True
    layers.clear()
    logits_step(model, ids, mask, labels)
    assert len(layers) == 4 and embeddings == [model.model.embed_tokens]


def test_a_frozen_tied_head_gets_no_weight_gradient_from_the_loss(monkeypatch):
    calls = []
    forward = LinearCrossEntropyLoss.forward
    monkeypatch.setattr(LinearCrossEntropyLoss, "forward",
                        lambda self, h, w, *a, **k: calls.append(w.trainable) or forward(self, h, w, *a, **k))
    model = lora(tiny(tie=True))
    ids, mask, labels = batch(11)
    fused_step(model, ids, mask, labels)
    assert calls == [False] and model.get_base_model().model.embed_tokens.weight.grad is None
