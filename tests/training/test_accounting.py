"""Accounting: counted memory and parameters against hand computation."""
import numpy as np

import lowrank as lr
from lowrank.training.accounting import lora_parameter_count, measure_step, stored_bytes
from lowrank.app.experiment import DemoConfig, downstream, prepare, pretrain, test_accuracy


def test_one_small_lora_step_counted_by_hand():
    # MLP 4 -> 8 -> 1 in float64, LoRA r=2 on layer "0" only, Adam, batch of 5 rows.
    model = lr.get_lora_model(lr.MLP([4, 8, 1], dtype="float64", seed=0), lr.LoraConfig(r=2, target_modules=["0"]))
    x = np.random.default_rng(0).standard_normal((5, 4))
    y = np.array([0, 1, 1, 0, 1])
    mem = measure_step(model, lr.Adam(model.parameters()), x, y)
    f8 = 8
    base = (8 * 4 + 8) + (1 * 8 + 1)                  # Dense 4->8 and 8->1, weights and biases
    lora = 2 * 4 + 8 * 2                              # lora_A (2, 4) and lora_B (8, 2)
    assert mem.weights == f8 * (base + lora)
    assert mem.gradients == f8 * lora                 # frozen weights get no gradient
    assert mem.optimizer == 2 * f8 * lora             # Adam: exp_avg and exp_avg_sq per trainable array
    # caches: LoraLinear keeps x (5, 4) and h (5, 2); ReLU its mask (5, 8) of bools;
    # the frozen head keeps nothing (it needs no dW)
    assert mem.activations == f8 * 5 * 4 + f8 * 5 * 2 + 1 * 5 * 8
    # the caches all live at the end of the forward, gradients and Adam state at the end of the step
    assert mem.tracemalloc_peak >= max(mem.activations, mem.gradients + mem.optimizer)
    assert stored_bytes(model) == f8 * lora


def test_tracemalloc_sees_no_gradient_of_the_frozen_weight():
    """The measured peak of a LoRA step over a 512x512 frozen weight (2 MiB in float64) stays below the
    counted bytes plus that weight's size: no dW of a frozen weight is ever allocated, even for a moment."""
    base = lr.MLP([512, 512, 1], dtype="float64", seed=0)
    model = lr.get_lora_model(base, lr.LoraConfig(r=2, target_modules=["0"]))
    x, y = np.random.default_rng(0).standard_normal((8, 512)), np.arange(8) % 2
    step = lambda: measure_step(model, lr.Adam(model.parameters(trainable_only=True)), x, y)  # noqa: E731
    step()                                            # first call: one-time allocations (kernel compilation)
    mem = step()
    frozen_W = base[0].base_layer.weight.data.nbytes            # the LoRA layer has replaced base[0]
    counted = mem.activations + mem.gradients + mem.optimizer
    assert frozen_W == 512 * 512 * 8 and counted < frozen_W / 10
    assert max(mem.activations, mem.gradients + mem.optimizer) <= mem.tracemalloc_peak < counted + frozen_W


def test_lora_trains_on_the_demo_task_with_the_closed_form_count():
    cfg = DemoConfig()                               # the demo's own sizes: 32 -> 200 -> 2000 -> 200 -> 1
    pretrained, ds_pre, _ = pretrain(cfg)
    ds = downstream(cfg, ds_pre)
    assert test_accuracy(pretrained, ds) < 0.5       # the downstream task is new to the base
    model = prepare("lora", pretrained, cfg, r=4)
    shapes = [(200, 32), (2000, 200), (200, 2000)]    # (D_out, D_in) of the adapted hidden layers
    head = 200 + 1
    assert model.num_parameters(trainable_only=True) == lora_parameter_count(shapes, 4) + head
    assert lora_parameter_count(shapes, 4) == 4 * (232 + 2200 + 2200)
    from lowrank.app.experiment import finetune
    finetune(model, ds, cfg)
    assert test_accuracy(model, ds) >= 0.95
