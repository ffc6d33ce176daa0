"""Load a base model the safe way: safetensors only unless allowed, no remote code unless asked for."""
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..config.schema import ModelSection, QuantizationSection
from ..errors import fail
from .dtypes import torch_dtype
from .packed_attention import register as register_packed_sdpa
from .quantization import bnb_config, keep_4bit_weights_unpacked
from .source import random_config


def build_random_base(model: ModelSection, seed: int, folder: Path) -> str:
    """Save a randomly initialised model of the recipe's config, to be loaded like any real base."""
    config = random_config(model)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch_dtype(model.dtype)).save_pretrained(folder)
    return str(folder)


def load_base(model: ModelSection, quantization: QuantizationSection, path: str, sharded: bool = False) -> PreTrainedModel:
    """sharded: FSDP / ZeRO-3 will split the weights across ranks, so they are not placed on a device here."""
    try:
        base = AutoModelForCausalLM.from_pretrained(
            path,
            revision=model.revision,
            dtype=torch_dtype(model.dtype),
            attn_implementation=attention_for(model, path),
            quantization_config=bnb_config(quantization, model.dtype, sharded),
            trust_remote_code=model.trust_remote_code,
            use_safetensors=None if model.allow_pickle else True,
            device_map=None if sharded else _device_map(quantization),
        )
    except ValueError as exc:
        if "attention implementation" not in str(exc) and "attn_implementation" not in str(exc):
            raise
        raise fail("model.attn_implementation", f"{model.attn_implementation!r} is not supported by "
                   f"this model ({str(exc).splitlines()[0][:100]})", "use auto or eager") from None
    if quantization.mode == "4bit":
        keep_4bit_weights_unpacked(base)
    return base


def attention_for(model: ModelSection, path: str) -> str | None:
    """auto: per-example packed SDPA (model/packed_attention.py) for architectures built on transformers' attention
    interface, else transformers' own choice (None)."""
    if model.attn_implementation != "auto":
        return model.attn_implementation
    config = AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    architecture = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return register_packed_sdpa() if getattr(architecture, "_supports_attention_backend", False) else None


def _device_map(quantization: QuantizationSection):
    # Quantized weights are created on their final device; everything else moves with the Trainer.
    if quantization.mode == "none":
        return None
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
