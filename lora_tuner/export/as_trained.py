"""The base weights as a QLoRA adapter saw them in training: each 4-bit-quantized linear weight round-tripped
through bitsandbytes' quantize/dequantize with the run's settings, one tensor at a time."""
import torch
from transformers import AutoConfig

from ..config.schema import QuantizationSection
from ..model.anatomy import meta_model, quantized_linears

BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which transformers uses


def quantized_weight_names(base_folder: str) -> set[str]:
    """Names of the weights transformers quantizes when loading this base in 4-bit."""
    return {f"{name}.weight" for name in quantized_linears(meta_model(AutoConfig.from_pretrained(base_folder)))}


def round_trip_4bit(weight: torch.Tensor, quantization: QuantizationSection, load_dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnb

    packed, state = bnb.quantize_4bit(weight.to(load_dtype), blocksize=BLOCKSIZE,
                                      compress_statistics=quantization.double_quant,
                                      quant_type=quantization.quant_type)
    return bnb.dequantize_4bit(packed, state).to(getattr(torch, quantization.compute_dtype))
