"""Model: the base's source checked without loading it (source), safe loading in 16, 8 or 4 bits (loading), tokenizers
(tokenizer), LoRA attachment (lora), the packing check. Nothing is imported here: `validate` reads the source checks
without importing torch."""
