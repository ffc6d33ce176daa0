"""Supervised fine-tuning: TRL's SFTTrainer configured from the recipe (every knob from the recipe, none from TRL's
defaults), with the loss computed by response_loss where it provably equals the model's own."""
import torch
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from ..run_folder import RunFolder
from .arguments import trainer_arguments
from .setup import TrainerSetup
from ..model.response_loss import ChunkedCrossEntropy, captured_output

CHECK_TOLERANCE = 1e-3  # relative; the same arithmetic differs by ~1e-5 in fp32 and ~1e-4 in bf16
CHECK_TOKENS = 256


class LoraTuneSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss runs the LM head on response tokens only (train.response_loss) and whose only per-step
    metric is token accuracy, from the same pass; TRL's per-step entropy and accuracy over all logits are skipped."""

    def __init__(self, *args, response_loss: bool | str, **kwargs):
        super().__init__(*args, **kwargs)
        self._stats = {"train": [0, 0], "eval": [0, 0]}  # [top-1 hits, tokens] since the last log
        self._wanted, self.response_loss, self._why = response_loss, None, "not decided: nothing was computed"

    def fast_path_notes(self) -> list[str]:
        return [f"response loss {'on' if self.response_loss else 'off'} ({self._why})"]

    def _decide_response_loss(self, wanted: bool | str, batch: dict) -> tuple[bool, str]:
        """On the first batch the trainer computes (not at construction: building a trainer runs no model)."""
        if wanted is False:
            return False, "recipe"
        causal = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        head = causal.get_output_embeddings()
        if head is None or any(p.requires_grad for p in head.parameters()):
            return False, "the output head is trained, so its full gradient is needed"
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False, "the head is sharded across processes"
        self._backbone, self._head = causal.base_model, head
        self._dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else head.weight.dtype
        difference = self._check_against_model_loss(batch)
        if difference is None or difference > CHECK_TOLERANCE:
            self._backbone = self._head = None
            found = "the model does not take logits_to_keep" if difference is None else f"differs by {difference:.1e}"
            return False, f"checked against the model's own loss: {found}"
        return True, f"{'auto' if wanted == 'auto' else 'recipe'}: equals the model's own loss to {difference:.0e}"

    def _check_against_model_loss(self, batch: dict) -> float | None:
        """Relative difference between this loss and the model's own on the batch's first examples, without
        dropout. (Only those: the model's own loss builds the full logits this loss exists to avoid.)"""
        batch = _first_tokens(batch, CHECK_TOKENS)
        was_training = self.model.training
        self.model.eval()
        try:
            mixed = self.args.bf16 or self.args.fp16
            with torch.no_grad(), torch.autocast(self.model.device.type, dtype=self._dtype, enabled=mixed):
                own = self.model(**batch, use_cache=False).loss.float()
                ours = self._response_loss(self.model, batch, None)[0]
        except TypeError:  # an architecture whose forward has no logits_to_keep
            return None
        finally:
            self.model.train(was_training)
        return ((own - ours).abs() / own.abs().clamp(min=1e-6)).item()

    def _response_loss(self, model, inputs, num_items_in_batch):
        labels = inputs["labels"]
        targets = labels[:, 1:]
        trained = targets != -100
        keep_none = torch.zeros_like(labels, dtype=torch.bool)  # the head runs on no position inside the model
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with captured_output(self._backbone) as out:
            model(**model_inputs, use_cache=False, logits_to_keep=keep_none)
        hidden = out["hidden"][:, :-1][trained]
        loss_sum, correct = ChunkedCrossEntropy.apply(hidden, self._head.weight, self._head.bias, targets[trained],
                                                      self._dtype)
        count = trained.sum()
        return loss_sum / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)), correct, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.response_loss is None:
            self.response_loss, self._why = self._decide_response_loss(self._wanted, inputs)
        if not self.response_loss or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, correct, count = self._response_loss(model, inputs, num_items_in_batch)
        # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        stats = self._stats["train" if model.training else "eval"]
        stats[0], stats[1] = stats[0] + correct, stats[1] + count  # tensors: no device sync per step
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if self.response_loss:  # every rank logs at the same steps, so every rank joins the reduction
            hits, tokens = (self.accelerator.reduce(torch.as_tensor(x, device=self.model.device), "sum").item()
                            for x in self._stats[mode])
            if tokens:
                logs[f"{'eval_' if mode == 'eval' else ''}token_accuracy"] = hits / tokens
            self._stats[mode] = [0, 0]
        super().log(logs, start_time)


def _first_tokens(batch: dict, count: int) -> dict:
    """The batch cut to its first `count` positions of the first row, when they hold trained tokens."""
    cut = {k: v[:1, :count] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}
    return cut if (cut["labels"][:, 1:] != -100).any() else batch


def make_sft_trainer(setup: TrainerSetup) -> LoraTuneSFTTrainer:
    recipe, data = setup.recipe, setup.data
    return LoraTuneSFTTrainer(
        model=setup.model,
        args=SFTConfig(
            **trainer_arguments(recipe, setup.folder / RunFolder.CHECKPOINTS, has_eval=bool(data.eval),
                                eval_first=setup.fresh),
            max_length=recipe.data.max_length,
            packing=recipe.data.packing,
            packing_strategy="bfd",  # whole examples, never split; padding-free rows with restarting position ids
            use_liger_kernel=recipe.train.liger,
        ),
        train_dataset=data.dataset("train", recipe.data.train_on_inputs),
        eval_dataset=data.dataset("eval", recipe.data.train_on_inputs),
        processing_class=setup.tokenizer,
        callbacks=setup.callbacks,
        response_loss=recipe.train.response_loss,
    )
