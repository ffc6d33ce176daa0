"""Attach LoRA adapters with peft."""
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel, set_seed

from ..config.schema import Recipe


def lora_config(recipe: Recipe) -> LoraConfig:
    lora = recipe.lora
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.rslora,
        use_dora=lora.dora,
        task_type="CAUSAL_LM",
    )


def attach_lora(base: PreTrainedModel, recipe: Recipe) -> PeftModel:
    if recipe.quantization.mode != "none":
        # Casts norms/embeddings to fp32 and enables input grads, which training a frozen quantized base needs.
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=recipe.train.gradient_checkpointing
        )
    set_seed(recipe.train.seed)  # LoRA A is initialised randomly: same seed, same adapter
    return get_peft_model(base, lora_config(recipe))
