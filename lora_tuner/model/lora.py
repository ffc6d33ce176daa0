"""Attach LoRA adapters with peft: a fresh one, or the recipe's init.adapter to train on from where it ended."""
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel, set_seed

from ..config.schema import Recipe
from ..errors import fail
from ..run_folder import RunFolder, same_base
from ..weights.adapter import LoraAdapter
from .anatomy import module_shapes


def lora_config(recipe: Recipe) -> LoraConfig:
    lora = recipe.lora
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      use_rslora=lora.rslora, use_dora=lora.dora, task_type="CAUSAL_LM")


def attach_lora(base: PreTrainedModel, recipe: Recipe, base_id: str | None = None) -> PeftModel:
    """base_id: the base as the run records it, which init.adapter must have been trained on."""
    if recipe.quantization.mode != "none":
        # Casts norms/embeddings to fp32 and enables input grads, which training a frozen quantized base needs.
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=recipe.train.gradient_checkpointing
        )
    if recipe.init.adapter is not None:
        return _start_adapter(base, recipe, base_id)
    set_seed(recipe.train.seed)  # LoRA A is initialised randomly: same seed, same adapter
    return get_peft_model(base, lora_config(recipe))


def _start_adapter(base: PreTrainedModel, recipe: Recipe, base_id: str | None) -> PeftModel:
    """init.adapter loaded trainable, after the checks AdapterPool makes (check_adapter). (That the recipe's lora
    section describes it is checked before anything loads: preflight.check_init_adapter.)"""
    folder = Path(recipe.init.adapter).expanduser().resolve()
    check_adapter(folder, base, base_id)
    return PeftModel.from_pretrained(base, str(folder), is_trainable=True)


def check_adapter(folder: Path, model: torch.nn.Module, base_id: str | None) -> LoraAdapter:
    """The folder holds an accepted adapter (weights/adapter.py) whose every weight fits a module of this loaded base,
    trained (when its run says) on this base: checked before peft sees the pair."""
    run = RunFolder(folder)
    adapter = LoraAdapter(folder)
    trained_on = run.manifest().base_model.name_or_path if run.is_run else None
    if trained_on and base_id and not same_base(trained_on, base_id):
        raise fail("base", f"the adapter was trained on {trained_on!r}, this base is {base_id!r}",
                   "use the adapter on its own base (its run.json says which)", source=str(folder))
    adapter.check_fits(module_shapes(model), str(base_id))
    return adapter
