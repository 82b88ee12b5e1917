"""Adapter names: checked once, where an adapter is added, so every later step (parameter
keys, attributes, sub-directories) can trust them."""
from __future__ import annotations

from ...io.adapter_files import check_folder_name
from ...nn.module import ParameterDict
from .batches import BASE
from .modules_to_save import ModuleDict

# Names that are parts of PEFT's parameter names (an adapter called one would be saved under a
# name that reads as something else), plus "__base__", which means "no adapter" in forward.
RESERVED_NAMES = frozenset({"original_module", "modules_to_save", "base_layer", "lora_A", "lora_B",
                            "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout",
                            "weight", "bias", BASE})


def check_adapter_name(name):
    """An adapter name is a key, an attribute and a directory: letters, digits, '_' and '-', not
    reserved, not a module attribute, at most 128 characters. TypeError/ValueError otherwise."""
    check_folder_name(name)
    if name in RESERVED_NAMES or name.startswith("_") or hasattr(ParameterDict, name) or hasattr(ModuleDict, name):
        raise ValueError(f"adapter name {name!r} is reserved (PEFT's parameter names use it, or it is a module "
                         f"attribute); reserved: {sorted(RESERVED_NAMES)} and names starting with '_'")
