"""The fast path: recipe 'auto' switches resolved for this device, each choice explained in the run summary."""
import importlib.util

import torch

from ..config.schema import Recipe
from ..errors import fail
from ..plan.estimate import memory_without_checkpointing


def resolve_fast_path(recipe: Recipe, source: str) -> tuple[Recipe, list[str]]:
    """The recipe with every 'auto' replaced by a decision, and one line per decision."""
    train, cuda = recipe.train, torch.cuda.is_available()
    if recipe.distributed.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise fail(source, "distributed.strategy", f"{recipe.distributed.strategy!r} needs the deepspeed package",
                   "pip install deepspeed, or use ddp or fsdp")
    notes = [f"packing {'on' if recipe.data.packing else 'off'} (data.packing)"]
    checkpointing = train.gradient_checkpointing
    if checkpointing == "auto":
        if cuda:
            needed = memory_without_checkpointing(recipe, source)
            available = torch.cuda.get_device_properties(0).total_memory
            checkpointing = needed > 0.9 * available
            why = f"plan needs {needed / 2**30:.1f} of {available / 2**30:.1f} GiB without it"
        else:
            checkpointing, why = False, "CPU: memory is not the limit, recomputing costs ~30%"
        notes.append(f"gradient checkpointing {'on' if checkpointing else 'off'} (auto: {why})")
    else:
        notes.append(f"gradient checkpointing {'on' if checkpointing else 'off'} (recipe)")
    liger = train.liger
    if liger == "auto":
        installed = importlib.util.find_spec("liger_kernel") is not None
        liger = cuda and installed
        why = "CUDA and liger-kernel installed" if liger else ("no CUDA" if not cuda else "liger-kernel not installed")
        notes.append(f"liger kernels {'on' if liger else 'off'} (auto: {why})")
    else:
        notes.append(f"liger kernels {'on' if liger else 'off'} (recipe)")
    resolved = recipe.model_copy(update={"train": train.model_copy(update={
        "gradient_checkpointing": checkpointing, "liger": liger})})
    return resolved, notes
