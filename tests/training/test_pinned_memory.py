"""A LoRA step over a frozen (D, D) weight allocates memory linear in D: no frozen dW, at any moment.

Every array a correct step allocates is (N, D), (r, D), (D, r) or (D,) for a fixed batch N and rank
r (activations, dy and dx, LoRA gradients, Adam's moments), so the tracemalloc peak of the step is
a + b·D. A gradient of the frozen weight, even one discarded at once or computed at a quiet moment
of the step, is D² floats. Oracle: the peaks at widths 256 and 512 fix the line; the peak at 1024
must lie within 2 % of it (a dW at every width puts it nearly 60 % above), and far below the frozen
weight's own size (a dW alone is 40 times the correct peak). The peak is measured after a first
step, which compiles the kernels.
"""
import numpy as np

import lowrank as lr
from lowrank.training.accounting import measure_step

N, R = 8, 2


def step_peak(D):
    """(tracemalloc peak of the second LoRA step, frozen weight bytes) for MLP [D, D, 1], LoRA on layer 0."""
    base = lr.MLP([D, D, 1], dtype="float64", seed=0)
    model = lr.get_lora_model(base, lr.LoraConfig(r=R, target_modules=["0"]))
    x, y = np.random.default_rng(0).standard_normal((N, D)), np.arange(N) % 2
    for _ in range(2):
        mem = measure_step(model, lr.Adam(model.parameters(trainable_only=True)), x, y)
    assert mem.gradients == 8 * R * 2 * D                                  # dA (r, D) and dB (D, r) alone
    return mem.tracemalloc_peak, base[0].base_layer.weight.data.nbytes


def test_the_step_peak_grows_linearly_with_the_width_of_the_frozen_weight():
    (p256, _), (p512, _), (p1024, frozen_W) = step_peak(256), step_peak(512), step_peak(1024)
    linear = p512 + 2 * (p512 - p256)                                      # the line through 256 and 512, at 1024
    assert abs(p1024 - linear) <= 0.02 * linear, (p256, p512, p1024)
    assert frozen_W == 1024 * 1024 * 8 and p1024 < frozen_W / 20          # 8 MiB frozen; the step's peak ~0.2 MiB
