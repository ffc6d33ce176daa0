"""The Trainer arguments every method shares, from the recipe (every knob from the recipe, none from TRL's defaults);
each method's config adds its own on top (sft.py, preference.py)."""
import torch

from ..config.schema import Recipe


def trainer_arguments(recipe: Recipe, checkpoints, has_eval: bool, eval_first: bool = True) -> dict:
    """eval_first: validate before the first step, so the loss curve shows where training started. (Inside train():
    a trainer.evaluate() before it registers the model with accelerate unwrapped, and DDP then never syncs.)"""
    train = recipe.train
    return dict(
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
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=train.eval_steps,
        eval_on_start=has_eval and eval_first,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        # tensorboard is attached by the caller so its logs land in the run folder, not under checkpoints/.
        report_to=[name for name in train.report_to if name != "tensorboard"] or "none",
        bf16=recipe.model.dtype == "bfloat16",
        fp16=recipe.model.dtype == "float16",
        use_cpu=not torch.cuda.is_available(),
        # Row lengths in steps of 64: on CPU, bf16 matmuls keep ~2 MB of kernel state per distinct shape they have
        # seen, so every new length would otherwise grow the process (+750 MB over 400 lengths, measured).
        pad_to_multiple_of=64,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,  # train.progress shows the run's progress
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
