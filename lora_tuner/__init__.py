"""lora-tune: one-command, reproducible LoRA and QLoRA fine-tuning of open causal language models.

    from lora_tuner import load_recipe, run
    result = run(load_recipe("recipes/demo-tiny-cpu.yaml"))
"""
from .config import Recipe, load_recipe
from .errors import UserError
from .preflight import check_recipe
from .train import RunResult, run

__all__ = ["Recipe", "RunResult", "UserError", "check_recipe", "load_recipe", "run"]
