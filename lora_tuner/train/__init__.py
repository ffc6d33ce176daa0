"""Training: SFTTrainer driven by a recipe, writing a complete run folder."""
from .run import RunResult, run

__all__ = ["RunResult", "run"]
