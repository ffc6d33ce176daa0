"""Model: tokenizer, safe base loading (16-bit, 8-bit, 4-bit), LoRA attachment, the packing check."""
from .loading import load_base
from .lora import attach_lora, lora_config
from .tokenizer import byte_tokenizer, load_tokenizer

__all__ = ["attach_lora", "byte_tokenizer", "load_base", "load_tokenizer", "lora_config"]
