"""The base weights as a QLoRA adapter saw them in training: each 4-bit-quantized linear weight round-tripped
through bitsandbytes' quantize/dequantize with the run's settings, one tensor at a time."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from ..config.schema import QuantizationSection

BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which transformers uses


def quantized_weight_names(base_folder: str) -> set[str]:
    """Names of the weights transformers quantizes when loading this base in 4-bit, decided by transformers' own
    rules on a weightless (meta-device) copy of the model."""
    config = AutoConfig.from_pretrained(base_folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = list(set(get_keys_to_not_convert(model)) | set(model._keep_in_fp32_modules or []))
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and should_convert_module(name, skip)}


def round_trip_4bit(weight: torch.Tensor, quantization: QuantizationSection, load_dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnb

    packed, state = bnb.quantize_4bit(weight.to(load_dtype), blocksize=BLOCKSIZE,
                                      compress_statistics=quantization.double_quant,
                                      quant_type=quantization.quant_type)
    return bnb.dequantize_4bit(packed, state).to(getattr(torch, quantization.compute_dtype))
