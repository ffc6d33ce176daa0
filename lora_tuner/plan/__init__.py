"""Planning: memory and time of a recipe on a GPU, from the model config alone (make_plan in .estimate).
Only the GPU table is imported here, so the CLI can offer its names without importing transformers."""
from .gpus import GPUS, Gpu

__all__ = ["GPUS", "Gpu"]
