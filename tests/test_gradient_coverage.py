"""Every backward in lowrank is checked against finite differences, and a test says which does.

GRADIENT_TESTS maps each class with a ``backward`` (Modules and Losses) to the test that
gradchecks it; the gradient checks that had no home elsewhere (BottleneckAdapter, the mixed
batch of ModulesToSave, LoraModel) are here. A class added without an entry fails
``test_every_backward_has_a_gradient_check``: write its gradient check, then map it.
"""
import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowrank
import lowrank as lr
from lowrank.nn.gradcheck import check_module
from lowrank.nn.losses import Loss
from lowrank.nn.module import Module
from lowrank.tuners.bottleneck import BottleneckAdapter
from lowrank.tuners.lora.modules_to_save import ModulesToSave

HERE = "test_gradient_coverage.py"
GRADIENT_TESTS = {      # class (module.qualname) -> "file::test" whose body runs a finite-difference check
    "lowrank.nn.layers.Dense": "test_layers.py::test_dense_gradients_match_finite_differences",
    **{f"lowrank.nn.layers.{a}": "test_layers.py::test_activation_gradients_match_finite_differences"
       for a in ("ReLU", "Tanh", "Sigmoid", "GELU")},
    "lowrank.nn.module.Sequential": "test_layers.py::test_mlp_gradients_match_finite_differences",
    **{f"lowrank.nn.losses.{c}": "test_losses.py::test_loss_value_and_gradient"
       for c in ("BCEWithLogitsLoss", "CrossEntropyLoss", "MSELoss")},
    "lowrank.nn.nf4_dense.NF4Dense": "test_qlora.py::test_nf4dense_gradients_match_finite_differences_of_the_dequantized_layer",
    "lowrank.nn.layers.QuantizedDense":      # NF4Dense's and GGUFDense's backward (their tests below)
        "test_qlora.py::test_nf4dense_gradients_match_finite_differences_of_the_dequantized_layer",
    "lowrank.nn.gguf_dense.GGUFEmbedding":
        "test_gguf_dense.py::test_a_layer_over_ggufembedding_matches_finite_differences_and_the_lookup_passes_nothing_back",
    "lowrank.nn.gguf_dense.GGUFDense":
        "test_gguf_dense.py::test_ggufdense_gradients_match_finite_differences_of_the_dequantized_layer",
    "lowrank.nn.activations.SiLU": "test_llama_layers.py::test_silu_matches_finite_differences",
    "lowrank.nn.embedding.Embedding": "test_llama_layers.py::test_embedding_gradient_is_a_scatter_add",
    "lowrank.nn.norm.RMSNorm": "test_llama_layers.py::test_rmsnorm_matches_formula_and_finite_differences",
    "lowrank.nn.attention.LlamaAttention": "test_llama_layers.py::test_attention_matches_naive_loops_and_finite_differences",
    "lowrank.nn.mlp.LlamaMLP": "test_llama_layers.py::test_swiglu_mlp_matches_formula_and_finite_differences",
    "lowrank.nn.losses_lm.CausalLMLoss":
        "test_llama_layers.py::test_causal_lm_loss_matches_shifted_cross_entropy_and_finite_differences",
    "lowrank.nn.losses_lm.LinearCrossEntropyLoss": "test_linear_cross_entropy_loss.py::test_gradients_match_finite_differences",
    **{f"lowrank.models.llama.modeling.{c}": "test_llama_layers.py::test_two_layer_decoder_gradients_match_finite_differences"
       for c in ("LlamaDecoderLayer", "LlamaModel", "TiedLMHead", "LlamaForCausalLM")},
    "lowrank.tuners.lora.layer.LoraLinear": "test_lora_layer.py::test_lora_gradients_match_finite_differences",
    "lowrank.tuners.lora.dora.DoraLinear": "test_dora.py::test_exact_gradients_match_finite_differences",
    "lowrank.tuners.lora.embedding.LoraEmbedding":
        "test_llama_lora.py::test_lora_embedding_matches_its_formula_and_finite_differences",
    "lowrank.tuners.vera.VeraLinear": "test_vera.py::test_gradients_match_finite_differences",
    "lowrank.tuners.vera.VeraModel": "test_vera.py::test_gradients_match_finite_differences",
    "lowrank.analysis.intrinsic.SubspaceModel": "test_intrinsic.py::test_dz_matches_finite_differences",
    "lowrank.tuners.bottleneck.BottleneckAdapter": f"{HERE}::test_bottleneck_adapter_gradients_match_finite_differences",
    "lowrank.tuners.lora.modules_to_save.ModulesToSave": f"{HERE}::test_modules_to_save_mixed_batch_gradients",
    "lowrank.tuners.lora.model.LoraModel": f"{HERE}::test_lora_model_gradients_match_finite_differences",
}
CHECKS = re.compile(r"check_module|gradcheck|numerical_gradient|finite_diff|_check\w*\(")


def classes_with_backward():
    """module.qualname of every Module or Loss subclass defined in lowrank that has a backward."""
    found = set()
    for info in pkgutil.walk_packages(lowrank.__path__, "lowrank."):
        if info.name.startswith("lowrank.kernels"):       # installed inside lowrank; arrays in, arrays out,
            continue                                     # no Module (and cupy_gpu needs CuPy to import)
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if (inspect.isclass(cls) and cls.__module__ == module.__name__ and issubclass(cls, (Module, Loss))
                    and cls not in (Module, Loss) and callable(getattr(cls, "backward", None))):
                found.add(f"{cls.__module__}.{cls.__qualname__}")
    return found


def test_every_backward_has_a_gradient_check():
    missing = sorted(classes_with_backward() - set(GRADIENT_TESTS))
    assert not missing, f"no gradient check is mapped for {missing}: add one and list it in GRADIENT_TESTS"
    stale = sorted(set(GRADIENT_TESTS) - classes_with_backward())
    assert not stale, f"GRADIENT_TESTS names classes that no longer exist: {stale}"


def test_each_mapped_test_exists_and_checks_gradients():
    """The named test is a module-level function of that file whose body runs a gradient check."""
    for cls, target in GRADIENT_TESTS.items():
        file, name = target.split("::")
        src = next(Path(__file__).parent.rglob(file)).read_text()
        body = {n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body if isinstance(n, ast.FunctionDef)}
        assert name in body, f"{cls}: {target} does not exist"
        assert CHECKS.search(body[name]), f"{cls}: {target} runs no finite-difference check"


# -- the gradient checks that lived nowhere else (float64, hypothesis shapes) ------------------------
@given(N=st.integers(1, 5), dim=st.integers(1, 6), data=st.data(),
       activation=st.sampled_from(["tanh", "sigmoid", "gelu"]), seed=st.integers(0, 99))
def test_bottleneck_adapter_gradients_match_finite_differences(N, dim, data, activation, seed):
    """dx = dy + down.backward(act.backward(up.backward(dy))) and dW, db of both Dense layers (smooth
    activations: no kinks); up starts at zero, so random weights make every path carry gradient."""
    bottleneck = data.draw(st.integers(1, dim))
    adapter = BottleneckAdapter(dim, bottleneck, activation, dtype="float64", seed=seed)
    rng = np.random.default_rng(seed)
    adapter.up.weight.data[...] = rng.standard_normal((dim, bottleneck))
    adapter.up.bias.data[...] = rng.standard_normal(dim)
    check_module(adapter, rng.standard_normal((N, dim)))


@given(N=st.integers(1, 6), d_in=st.integers(1, 5), d_out=st.integers(1, 5), seed=st.integers(0, 99))
def test_modules_to_save_mixed_batch_gradients(N, d_in, d_out, seed):
    """Rows of adapters 'a', 'b' and the base (None, an unknown name) in one batch: each copy's dW, db
    come from its own rows only, and dx of every row from the module that ran it."""
    rng = np.random.default_rng(seed)
    wrapper = ModulesToSave(lr.Dense(d_in, d_out, dtype="float64", seed=seed), "a")
    wrapper.update("b")
    for p in wrapper.modules_to_save["b"].parameters():
        p.data[...] = rng.standard_normal(p.data.shape)        # copies that differ from the original
    wrapper.row_adapters = list(rng.choice(np.array(["a", "b", None, "other"], dtype=object), N))
    check_module(wrapper, rng.standard_normal((N, d_in)))


@pytest.mark.filterwarnings("ignore:LoraLinear.*exceeds min")  # r > min(D_in, D_out) is allowed
@given(N=st.integers(1, 4), sizes=st.lists(st.integers(1, 5), min_size=3, max_size=3),
       r=st.integers(1, 3), seed=st.integers(0, 99))
def test_lora_model_gradients_match_finite_differences(N, sizes, r, seed):
    """LoraModel.backward over an MLP: LoRA on the hidden layer, the head a module to save."""
    base = lr.MLP(sizes, "tanh", dtype="float64", seed=seed)
    model = lr.get_lora_model(base, lr.LoraConfig(r=r, target_modules=["0"], modules_to_save=["2"],
                                                  init_lora_weights=False))
    check_module(model, np.random.default_rng(seed).standard_normal((N, sizes[0])))
