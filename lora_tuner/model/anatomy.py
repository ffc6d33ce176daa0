"""A model's structure without its weights (meta device): exact parameter counts and which linear layers
bitsandbytes would quantize, decided by transformers' own rules."""
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def quantized_linears(model: PreTrainedModel) -> dict[str, torch.nn.Linear]:
    """name -> Linear for every layer that loading in 4/8-bit replaces (all linear layers but the output head
    and modules the architecture keeps in fp32)."""
    skip = list(set(get_keys_to_not_convert(model)) | set(model._keep_in_fp32_modules or []))
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and should_convert_module(name, skip)}


def module_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """name.weight -> [out, in] of every linear layer of a loaded model (under peft's wrappers, the base layer's)."""
    shapes = {}
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", module)
        if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
            shapes[f"{name}.weight"] = [layer.out_features, layer.in_features]
    return shapes
