"""Preference tuning: TRL's DPOTrainer and KTOTrainer configured from the recipe, trained on rows lora-tune tokenized
(data/tokenize.py: each reply continues the prompt exactly as an SFT response does, so a DPO run that starts from an
SFT adapter sees its prompts as that run did).

The reference model is never a second copy of the base. TRL gives a PEFT model a frozen "ref" copy of the adapter it
starts from; for a fresh adapter (B = 0) that copy is the base itself, so it is deleted and the reference forward
runs with adapters disabled (the same numbers, without the LoRA arithmetic). train.<method>.reference: base does the
same for a run that starts from init.adapter."""
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from ..config.schema import Recipe
from ..data.prepare import PreparedData, unpaired
from ..data.tokenize import TokenizedPair
from ..run_folder import RunFolder
from .setup import TrainerSetup
from .arguments import trainer_arguments

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of the starting adapter


class _Preference:
    """What lora-tune changes in TRL's preference trainers: the reference (see the module doc), and the rows. TRL
    tokenizes prompt and prompt + reply and cuts at their common prefix (dropping the end of the prompt where a merge
    spans the boundary); lora-tune's rows arrive tokenized, as SFT's do, so each subclass's _prepare_dataset skips
    TRL's own pass."""

    def fast_path_notes(self) -> list[str]:
        return [self._reference_note]

    def _use_reference(self, recipe: Recipe) -> None:
        settings = getattr(recipe.train, recipe.train.method)
        model = self.accelerator.unwrap_model(self.model)
        starts_fresh = recipe.init.adapter is None
        if REFERENCE_ADAPTER in model.peft_config and (starts_fresh or settings.reference == "base"):
            model.delete_adapter(REFERENCE_ADAPTER)
        if REFERENCE_ADAPTER in model.peft_config:
            self._reference_note = "reference: init.adapter as it started, a frozen copy of its LoRA weights"
        else:
            self._reference_note = "reference: the base with adapters disabled" + (
                " (a fresh adapter starts as the base)" if starts_fresh else f" (train.{recipe.train.method}.reference)")


class LoraTuneDPOTrainer(_Preference, DPOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class LoraTuneKTOTrainer(_Preference, KTOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset

        # KTO's KL term pairs each prompt with another row's completion: the completions rotated by one within each
        # batch, as TRL builds them inside its own tokenization pass (which these rows skip).
        def rotated(batch):
            return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

        return dataset.map(rotated, batched=True, batch_size=args.per_device_train_batch_size)


def make_dpo_trainer(setup: TrainerSetup) -> LoraTuneDPOTrainer:
    recipe, data = setup.recipe, setup.data
    dpo = recipe.train.dpo
    args = DPOConfig(**_shared(recipe, setup.folder, data, setup.fresh), beta=dpo.beta, loss_type=[dpo.loss_type],
                     label_smoothing=dpo.label_smoothing)
    trainer = LoraTuneDPOTrainer(model=setup.model, args=args, train_dataset=data.dataset("train", False),
                                 eval_dataset=data.dataset("eval", False), processing_class=setup.tokenizer,
                                 callbacks=setup.callbacks)
    trainer._use_reference(recipe)
    return trainer


def make_kto_trainer(setup: TrainerSetup) -> LoraTuneKTOTrainer:
    recipe, data = setup.recipe, setup.data
    kto = recipe.train.kto
    args = KTOConfig(**_shared(recipe, setup.folder, data, setup.fresh), beta=kto.beta,
                     desirable_weight=kto.desirable_weight, undesirable_weight=kto.undesirable_weight)
    # KTO reads its rows in order (each batch's KL term pairs its rows' prompts and completions), so the order is
    # shuffled here, by the run's seed; the validation rows stay paired for eval (prepare.py) and are unpaired here.
    train = data.dataset("train", False).shuffle(seed=recipe.train.seed)
    trainer = LoraTuneKTOTrainer(model=setup.model, args=args, train_dataset=train, eval_dataset=_unpaired(data),
                                 processing_class=setup.tokenizer, callbacks=setup.callbacks)
    trainer._use_reference(recipe)
    return trainer


def _unpaired(data: PreparedData):
    """The validation rows as KTO's: pairs split into a desirable and an undesirable row, as the training rows were
    (prepare.py keeps validation paired, for eval's preference accuracy)."""
    if not data.eval or not isinstance(data.eval[0].tokens, TokenizedPair):
        return data.dataset("eval", False)
    from datasets import Dataset

    return Dataset.from_list([one.tokens.training_row(False) for row in data.eval for one in unpaired(row)])


def _shared(recipe: Recipe, folder: RunFolder, data: PreparedData, fresh: bool) -> dict:
    return dict(
        **trainer_arguments(recipe, folder / RunFolder.CHECKPOINTS, has_eval=bool(data.eval), eval_first=fresh),
        max_length=recipe.data.max_length,  # rows longer than this were dropped and counted (prepare.py)
        # Policy and reference must be the same network for their log-ratio to mean anything: no dropout (TRL's
        # default, restated here so it is the recipe's decision, not a default's).
        disable_dropout=True,
        precompute_ref_log_probs=False,  # the reference forward is cheap (no second model) and stays exact on resume
        use_liger_kernel=recipe.train.liger,
    )
