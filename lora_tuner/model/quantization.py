"""bitsandbytes settings from a recipe, and the one CPU fix 4-bit needs."""
import logging

import torch
from transformers import BitsAndBytesConfig

from ..config.schema import QuantizationSection


def bnb_config(quantization: QuantizationSection, sharded: bool = False) -> BitsAndBytesConfig | None:
    if quantization.mode == "none":
        return None
    if quantization.mode == "8bit":
        # bitsandbytes logs "MatMul8bitLt: inputs will be cast" on every CPU call; it is expected, not news.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
        # FSDP shards parameters of one dtype; storing the packed 4-bit bytes as the compute dtype makes the
        # quantized layers shardable with the rest (QLoRA + FSDP)
        bnb_4bit_quant_storage=getattr(torch, quantization.compute_dtype) if sharded else torch.uint8,
    )


def keep_4bit_weights_unpacked(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place on the first no-grad forward;
    afterwards training silently stops learning and dequantize (merge) returns wrong values. Opting out of
    the packed layout per layer keeps eval, training and merging correct; it is a no-op on CUDA."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
