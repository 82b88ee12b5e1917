"""lowrank: LoRA from scratch, every gradient hand-written, with fused kernels.

    import lowrank as lr
    model = lr.MLP([2, 64, 1])
    layer = lr.LoRALinear(model[0], r=4, lora_alpha=8)
"""
from pathlib import Path as _Path

# Installed, the kernels live at lowrank/kernels (setup.cfg maps the repository's kernels/ there).
# In a source checkout they sit beside this package: let lowrank.kernels resolve to them too,
# so `python -m benchmarks.kernels` and friends work from the repository root.
if not (_Path(__file__).parent / "kernels").is_dir() and (_Path(__file__).parent.parent / "kernels").is_dir():
    __path__.append(str(_Path(__file__).parent.parent))

from .backend import get_array_module, to_device
from .dispatch import get_backend, kernels_for, set_backend, use_backend
from .gradcheck import check_module, gradcheck, numerical_gradient
from .layers import GELU, MLP, Dense, ReLU, Sigmoid, Tanh
from .lora import LoRALinear
from .lora_config import LoraConfig
from .peft_model import LoraModel, ModulesToSave, get_lora_model
from .data import Dataset, TaskSpec, downstream_task, make_task
from .train import History, evaluate, fit, predict
from .model_files import FileFormatError, load_model, save_model
from .losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from .module import Module, Parameter, ParameterDict, Sequential
from .optim import SGD, Adam, AdamW

__version__ = "0.1.0"

__all__ = [
    "get_array_module", "to_device", "get_backend", "kernels_for", "set_backend", "use_backend",
    "check_module", "gradcheck", "numerical_gradient",
    "GELU", "MLP", "Dense", "ReLU", "Sigmoid", "Tanh", "LoRALinear",
    "LoraConfig", "LoraModel", "ModulesToSave", "get_lora_model",
    "Dataset", "TaskSpec", "downstream_task", "make_task", "History", "evaluate", "fit", "predict",
    "FileFormatError", "load_model", "save_model",
    "BCEWithLogitsLoss", "CrossEntropyLoss", "MSELoss",
    "Module", "Parameter", "ParameterDict", "Sequential", "SGD", "Adam", "AdamW",
]
