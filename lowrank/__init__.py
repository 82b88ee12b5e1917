"""lowrank: LoRA from scratch, every gradient hand-written, with fused kernels.

    import lowrank as lr
    model = lr.MLP([2, 64, 1])
    layer = lr.LoraLinear(model[0], r=4, lora_alpha=8)
"""
from .nn.device import get_array_module, to_device
from .nn.dispatch import get_backend, kernels_for, set_backend, use_backend
from .kernels.backends import register_backend
from .nn.gradcheck import check_module, gradcheck, numerical_gradient
from .nn.layers import GELU, MLP, Dense, ReLU, Sigmoid, Tanh
from .tuners.lora.layer import LoraLinear
from .tuners.lora.embedding import LoraEmbedding
from .tuners.lora.config import LoraConfig
from .tuners.lora.model import LoraModel, get_lora_model
from .tuners.lora.modules_to_save import ModulesToSave
from .training.data import Dataset, TaskSpec, downstream_task, make_task
from .training.loop import History, evaluate, fit, predict
from .io.model_files import FileFormatError, load_model, save_model
from .nn.losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from .nn.module import Module, Parameter, ParameterDict, Sequential
from .nn.optim import SGD, Adam, AdamW
from .nn import CausalLMLoss, Embedding, RMSNorm, SiLU
from .models.llama import LlamaConfig, LlamaForCausalLM

__version__ = "0.1.0"

__all__ = [
    "get_array_module", "to_device", "get_backend", "kernels_for", "set_backend", "use_backend", "register_backend",
    "check_module", "gradcheck", "numerical_gradient",
    "GELU", "MLP", "Dense", "ReLU", "Sigmoid", "Tanh", "LoraLinear", "LoraEmbedding",
    "LoraConfig", "LoraModel", "ModulesToSave", "get_lora_model",
    "Dataset", "TaskSpec", "downstream_task", "make_task", "History", "evaluate", "fit", "predict",
    "FileFormatError", "load_model", "save_model",
    "BCEWithLogitsLoss", "CrossEntropyLoss", "MSELoss",
    "Module", "Parameter", "ParameterDict", "Sequential", "SGD", "Adam", "AdamW",
    "CausalLMLoss", "Embedding", "RMSNorm", "SiLU", "LlamaConfig", "LlamaForCausalLM",
]
