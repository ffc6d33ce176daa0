"""TRL's SFTConfig built from a recipe: every training knob comes from the recipe, none from TRL's defaults."""
from pathlib import Path

import torch
from trl import SFTConfig

from ..config.schema import Recipe


def sft_config(recipe: Recipe, checkpoints: Path, has_eval: bool) -> SFTConfig:
    train, data = recipe.train, recipe.data
    return SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optimizer,
        activation_checkpointing=train.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        use_liger_kernel=train.liger,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        # tensorboard is attached by the caller so its logs land in the run folder, not under checkpoints/.
        report_to=[name for name in train.report_to if name != "tensorboard"] or "none",
        bf16=recipe.model.dtype == "bfloat16",
        fp16=recipe.model.dtype == "float16",
        use_cpu=not torch.cuda.is_available(),
        max_length=data.max_length,
        packing=data.packing,
        packing_strategy="bfd",  # whole examples, never split; padding-free rows with restarting position ids
        completion_only_loss=not data.train_on_inputs,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        **parallelism(recipe),
    )


def parallelism(recipe: Recipe) -> dict:
    """SFTConfig fields for the recipe's distributed strategy; they matter only when launched on several ranks."""
    strategy, offload = recipe.distributed.strategy, recipe.distributed.cpu_offload
    if strategy == "ddp":
        return {"ddp_find_unused_parameters": False}  # every LoRA weight gets a gradient: skip the graph walk
    if strategy == "fsdp":
        return {"fsdp": "full_shard auto_wrap" + (" offload" if offload else ""),
                "fsdp_config": {"use_orig_params": True,  # frozen base and trainable LoRA in the same unit
                                "cpu_ram_efficient_loading": True, "sync_module_states": True}}
    stage = 2 if strategy == "deepspeed-zero2" else 3
    zero = {"stage": stage, "overlap_comm": True}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {"deepspeed": {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
                          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                          "train_batch_size": "auto", "gradient_clipping": "auto"}}
