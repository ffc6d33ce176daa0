"""Training methods, by recipe name (train.method). A method turns the prepared run into a transformers Trainer that
also says what it decided (fast_path_notes): SFT, and the preference methods DPO and KTO."""
from accelerate import PartialState
from transformers.trainer_callback import PrinterCallback

from ..config.schema import Recipe
from ..data.prepare import PreparedData
from ..run_folder import RunFolder
from .callbacks import EvaluateAtEnd, MetricsFile
from .checkpoints import SealCheckpoints
from .progress import Progress
from .preference import make_dpo_trainer, make_kto_trainer
from .setup import TrainerSetup
from .sft import make_sft_trainer

METHODS = {"sft": make_sft_trainer, "dpo": make_dpo_trainer, "kto": make_kto_trainer}


def make_trainer(recipe: Recipe, model, tokenizer, data: PreparedData, folder: RunFolder, ranks: PartialState,
                 fresh: bool = True):
    """(trainer, its Progress callback, which knows the training time and tokens of this session). fresh: not a
    resumed run, so validation loss is measured once before the first step too."""
    progress = Progress()
    callbacks = [MetricsFile(folder), EvaluateAtEnd(), SealCheckpoints(ranks), progress]
    if ranks.is_main_process and "tensorboard" in recipe.train.report_to:
        from torch.utils.tensorboard import SummaryWriter  # ~100 MB of imports: only when asked for
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(str(folder / RunFolder.TENSORBOARD))))
    trainer = METHODS[recipe.train.method](TrainerSetup(recipe, model, tokenizer, data, folder, callbacks, fresh))
    trainer.remove_callback(PrinterCallback)  # Progress prints readable lines instead of raw log dicts
    return trainer, progress
