"""What every training method builds its trainer from: one object instead of seven values passed to each method."""
from dataclasses import dataclass

from peft import PeftModel

from ..config.schema import Recipe
from ..data.prepare import PreparedData
from ..run_folder import RunFolder


@dataclass
class TrainerSetup:
    recipe: Recipe
    model: PeftModel
    tokenizer: object  # a transformers tokenizer
    data: PreparedData
    folder: RunFolder  # the unfinished run folder: checkpoints, metrics
    callbacks: list
    fresh: bool  # not resumed: the validation loss is also measured before the first step
