"""The fast path: recipe 'auto' switches resolved for this device, each choice explained in the run summary and
run.json. The response loss is decided by the trainer itself, after checking it on the loaded model."""
import importlib.util

import torch

from ..config.schema import Recipe
from ..errors import fail
from ..model.dtypes import native_dtype
from ..plan.estimate import anatomy, fit_to_memory, usable_memory

CPU_BATCH = 2  # packed rows: measured fastest on CPU (benchmarks/train_throughput.py), larger ones thrash caches


def resolve_fast_path(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe with every 'auto' replaced by a decision, and one line per decision."""
    train, cuda = recipe.train, torch.cuda.is_available()
    notes = []
    if cuda and not torch.cuda.is_bf16_supported():
        for field, value in (("model.dtype", recipe.model.dtype),
                             ("quantization.compute_dtype", recipe.quantization.compute_dtype)):
            if value == "bfloat16":
                raise fail(field, f"'bfloat16', which {torch.cuda.get_device_name()} does not compute",
                           f"set {field}: auto (float16 there) or float16")
    dtype, why = (recipe.model.dtype, "recipe") if recipe.model.dtype != "auto" else native_dtype()
    compute = dtype if recipe.quantization.compute_dtype == "auto" else recipe.quantization.compute_dtype
    recipe = recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"dtype": dtype}),
        "quantization": recipe.quantization.model_copy(update={"compute_dtype": compute})})
    notes.append(f"{dtype} compute ({'auto: ' if why != 'recipe' else ''}{why}; LoRA weights and Adam state fp32)")
    notes.append(f"packing {'on' if recipe.data.packing else 'off'} (data.packing)" if train.method == "sft" else
                 f"packing off ({train.method}: a pair's sequences are padded side by side, as TRL runs them)")
    automatic = [name for name in ("batch_size", "gradient_checkpointing") if getattr(train, name) == "auto"]
    if cuda and automatic:
        available = torch.cuda.get_device_properties(0).total_memory
        recipe = fit_to_memory(recipe, anatomy(recipe), usable_memory(available))
        why = f"auto: fits {usable_memory(available) / 2**30:.1f} GiB usable per lora-tune plan"
    else:  # on CPU, or nothing left to decide
        recipe = recipe.model_copy(update={"train": train.model_copy(update={
            "batch_size": CPU_BATCH if train.batch_size == "auto" else train.batch_size,
            "gradient_checkpointing": train.gradient_checkpointing is True})})
        why = "auto: CPU, where memory is not the limit and recomputing or big batches only cost time"
    train = recipe.train
    notes.append(f"batch {train.batch_size} ({why if 'batch_size' in automatic else 'recipe'})")
    notes.append(f"gradient checkpointing {'on' if train.gradient_checkpointing else 'off'} "
                 f"({why if 'gradient_checkpointing' in automatic else 'recipe'})")
    compiled = train.compile is True
    notes.append(f"torch.compile {'on' if compiled else 'off'} (" + ("recipe" if train.compile != "auto" else
                 "auto: on CPU it is no faster per step and takes a minute to compile; unmeasured on GPUs") + ")")
    fused = train.fused_lora
    if fused == "auto":
        fused = recipe.quantization.mode == "none"
        notes.append(f"fused LoRA layers {'on' if fused else 'off'} (auto: "
                     + ("16-bit base" if fused else "peft's 4/8-bit bitsandbytes layers") + ")")
    else:
        notes.append(f"fused LoRA layers {'on' if fused else 'off'} (recipe)")
    liger = train.liger
    if liger == "auto":
        installed = importlib.util.find_spec("liger_kernel") is not None
        liger = cuda and installed
        why = "CUDA and liger-kernel installed" if liger else ("no CUDA" if not cuda else "liger-kernel not installed")
        notes.append(f"liger kernels {'on' if liger else 'off'} (auto: {why})")
    else:
        notes.append(f"liger kernels {'on' if liger else 'off'} (recipe)")
    return recipe.model_copy(update={"train": train.model_copy(update={
        "liger": liger, "compile": compiled, "fused_lora": fused})}), notes
