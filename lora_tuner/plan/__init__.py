"""Planning: memory and time of a recipe on a GPU, from the model config alone."""
from .estimate import Plan, make_plan
from .gpus import GPUS

__all__ = ["GPUS", "Plan", "make_plan"]
