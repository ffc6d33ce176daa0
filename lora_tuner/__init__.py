"""lora-tune: one-command, reproducible LoRA and QLoRA fine-tuning of open causal language models.

    from lora_tuner import load_recipe, run
    result = run(load_recipe("recipes/demo-tiny-cpu.yaml"))
"""
import logging

# bitsandbytes warns on import that an optional CPU kernel package is absent; that changes nothing here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .config import Recipe, load_recipe  # noqa: E402
from .errors import UserError  # noqa: E402
from .merge import merge  # noqa: E402
from .preflight import check_recipe  # noqa: E402
from .train import RunResult, run  # noqa: E402

__all__ = ["Recipe", "RunResult", "UserError", "check_recipe", "load_recipe", "merge", "run"]
