"""bitsandbytes settings from a recipe, and the one CPU fix 4-bit needs."""
import torch
from transformers import BitsAndBytesConfig

from ..config.schema import QuantizationSection
from .dtypes import torch_dtype


def bnb_config(quantization: QuantizationSection, model_dtype: str, sharded: bool = False) -> BitsAndBytesConfig | None:
    """model_dtype: what compute_dtype 'auto' follows."""
    if quantization.mode == "none":
        return None
    if quantization.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch_dtype(model_dtype if quantization.compute_dtype == "auto" else quantization.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=compute,
        # FSDP shards parameters of one dtype; storing the packed 4-bit bytes as the compute dtype makes the
        # quantized layers shardable with the rest (QLoRA + FSDP)
        bnb_4bit_quant_storage=compute if sharded else torch.uint8,
    )


def keep_4bit_weights_unpacked(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place on the first no-grad forward;
    afterwards training silently stops learning and dequantize (merge) returns wrong values. Opting out of
    the packed layout per layer keeps eval, training and merging correct; it is a no-op on CUDA."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
