"""`lora-tune run`: recipe -> checked data -> base model + LoRA -> trainer -> a complete run folder."""
import json
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import PartialState
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from ..config import Recipe, dump_recipe
from ..data.prepare import prepare_data
from ..data.reading import BUILTIN, is_local
from ..data.tokenize import training_chat_template
from ..errors import UserError, about, fail
from ..model.compile import compile_decoder_layers
from ..model.loading import build_random_base, load_base
from ..model.lora import attach_lora
from ..model.lora_function import fused_lora_layers
from ..model.packing_check import packing_is_isolated
from ..model.source import check_base_source
from ..model.tokenizer import load_tokenizer
from ..outputs import OutputFolder
from ..preflight import check_environment, check_init_adapter, check_model_fit
from ..run_folder import BaseModelRecord, RunFolder, RunManifest, TrainRecord
from ..weights.fingerprint import fingerprint
from .checkpoints import Interrupted, StopOnSignal, completed, disk_full_is_a_user_error, resume_point
from .fast_path import resolve_fast_path
from .manifest import data_record, device, git_commit, loss_record, now, pin, sha256, versions
from .methods import make_trainer
from .plot import plot_loss


@dataclass
class RunResult:
    folder: Path
    manifest: RunManifest | None  # None on ranks other than 0 of a multi-process run: rank 0 speaks for the run
    model: PeftModel  # the trained model, still in memory, for use right away from Python

    def summary(self) -> str:
        m, f = self.manifest, self.folder
        evals = [f"eval {m.loss.eval:.4f}" if m.loss.eval is not None else "",
                 f"(before training {m.loss.eval_start:.4f})" if m.loss.eval_start is not None else ""]
        return "\n".join([
            f"run       {f}   ({m.train.runtime_s:.0f} s of training on {m.device})",
            f"steps     {m.train.steps}   tokens {m.train.tokens:,}   tokens/s {m.train.tokens_per_s:,.0f}   "
            f"global batch {m.global_batch} on {m.world_size} process(es)",
            f"loss      first {_number(m.loss.first)} -> last {_number(m.loss.last)}   " + " ".join(evals).strip(),
            f"data      {m.data.train_rows:,} train / {m.data.eval_rows:,} validation rows, "
            f"{m.data.dropped_rows} dropped",
            f"fast path {'; '.join(m.fast_path)}",
            f"adapter   {f / RunFolder.ADAPTER_WEIGHTS}",
            f"plot      {f / RunFolder.PLOT}   metrics {f / RunFolder.METRICS}   tensorboard {f / RunFolder.TENSORBOARD}",
        ])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def run(recipe: Recipe, output: str | None = None, force: bool = False, resume: bool = False,
        log: Callable[[str], None] = print, callbacks: list = ()) -> RunResult:
    """Train a LoRA adapter as the recipe says, into a complete run folder. Under torchrun / accelerate launch every
    rank calls this; only rank 0 writes the run folder.

    Args:
        recipe: the recipe (load_recipe); its file is what error lines name.
        output: the run folder (default: <output.root>/<output.name>).
        force: replace an existing run folder of that name.
        resume: continue an unfinished run of the same recipe from its newest sealed checkpoint.
        log: where progress lines go.
        callbacks: extra transformers TrainerCallbacks (e.g. to measure or stop the run).

    Example:
        result = run(load_recipe("demo-tiny-cpu"), output="adapters/my-run")
        print(result.summary())
    """
    with about(recipe.file):
        return TrainingRun(recipe, output, force, resume, log, list(callbacks)).execute()


class TrainingRun:
    """One `lora-tune run` in named phases: prepare (every check, the data tokenized: nothing written yet), start (the
    unfinished run folder), load (base + LoRA), train, save. What the phases share lives here."""

    def __init__(self, recipe: Recipe, output: str | None, force: bool, resume: bool, log: Callable[[str], None],
                 callbacks: list):
        self.ranks = PartialState(cpu=not torch.cuda.is_available())  # on CPU, torchrun ranks talk over gloo
        self.main = self.ranks.is_main_process
        self.recipe, self.force, self.resume, self.callbacks = recipe, force, resume, callbacks
        self.log = log if self.main else _quiet
        self.output = Path(output) if output else Path(recipe.output.root) / recipe.output.name
        self.started = now()

    def execute(self) -> RunResult:
        self.prepare()
        try:  # from the first byte written: a stop or a refusal at any point leaves nothing behind
            with self.ranks.main_process_first():
                if self.main and not self.resume:
                    self.start()
            with self.work.training() if self.main else nullcontext():
                model = self.load()
                trainer, progress = self.train(model)
                model, manifest = self.save(trainer, progress)
        except (UserError, KeyboardInterrupt) as stopped:
            self._clean_up(stopped)
            raise
        if self.main:
            self.folder.finish()
        self.ranks.wait_for_everyone()
        return RunResult(self.folder.final, manifest, model)

    def prepare(self) -> None:
        """Everything that can refuse the run, before anything is written; read-only, so every rank runs it and all
        stop on bad input."""
        recipe = self.recipe
        check_base_source(recipe.model)
        check_environment(recipe)
        check_init_adapter(recipe)
        self.folder = OutputFolder(self.output, "output", "run", run_inputs(recipe), resumable=lambda partial: RunFolder(
            partial).newest_sealed_checkpoint(_quiet) is not None)
        self.folder.check_free(self.force, self.resume)
        self.recipe, self.fast_path = resolve_fast_path(recipe)
        self.work = RunFolder(self.folder.partial)
        self.checkpoint = resume_point(self.work, dump_recipe(self.recipe), self.log) if self.resume else None
        self.tokenizer = load_tokenizer(self.recipe.model)
        check_model_fit(self.recipe, self.tokenizer)
        self.data = prepare_data(self.recipe, self.tokenizer)
        if self.data.dropped:
            self.log(f"data: dropped {self.data.dropped_summary()} (set data.bad_rows: fail to stop instead)")

    def start(self) -> None:
        self.folder.start()
        self.work.write_recipe(self.recipe)
        self.work.write_validation(self.data.eval or self.data.train, held_out=bool(self.data.eval))

    def load(self) -> PeftModel:
        """The base (the recipe's, or a random one built into the run folder) with LoRA attached."""
        recipe, ranks = self.recipe, self.ranks
        sharded = ranks.num_processes > 1 and recipe.distributed.strategy in ("fsdp", "deepspeed-zero3")
        if recipe.model.init == "random":
            built = self.work / RunFolder.BASE_MODEL  # already there when resuming; rebuilt identically otherwise
            with ranks.main_process_first():
                if self.main and not (built / "config.json").is_file():
                    build_random_base(recipe.model, recipe.train.seed, built)
            base = load_base(recipe.model, recipe.quantization, str(built), sharded)
            self.base_path = str(self.folder.final / RunFolder.BASE_MODEL)  # where it lives once the run is in place
            self.pinned = fingerprint(built) if self.main else None
        else:
            self.base_path, self.pinned = pin_base(recipe.model.name_or_path)
            base = load_base(recipe.model, recipe.quantization, self.base_path, sharded)
        self.fast_path = self.fast_path + [attention_note(recipe, base)]
        if recipe.data.packing and not packing_is_isolated(base, len(self.tokenizer)):
            raise fail("data.packing", f"{type(base).__name__} with attn_implementation "
                       f"{recipe.model.attn_implementation!r} lets packed examples attend to each other",
                       "set data.packing: false, or try another model.attn_implementation")
        model = attach_lora(base, recipe, self.base_path)
        if recipe.train.compile:
            compile_decoder_layers(model.get_base_model())
        return model

    def train(self, model: PeftModel):
        """(trainer, its Progress callback) after training, or after finishing from a checkpoint that holds the last
        step (a run stopped while saving its adapter: train() would take one step more)."""
        checkpoint = self.checkpoint
        trainer, progress = make_trainer(self.recipe, model, self.tokenizer, self.data, self.work, self.ranks,
                                         fresh=checkpoint is None)
        for callback in self.callbacks:
            trainer.add_callback(callback)
        if checkpoint and self.main:
            self.work.forget_metrics_after(int(checkpoint.name.removeprefix("checkpoint-")))
        if checkpoint and completed(checkpoint):
            trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
            set_peft_model_state_dict(model, load_file(str(checkpoint / RunFolder.ADAPTER_WEIGHTS)))
            return trainer, progress
        with StopOnSignal() as stop, disk_full_is_a_user_error(self.work), \
                fused_lora_layers(model) if self.recipe.train.fused_lora else nullcontext():
            trainer.add_callback(stop)
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if stop.received is not None:
            raise Interrupted(stop.received, trainer.state.global_step)
        return trainer, progress

    def save(self, trainer, progress) -> tuple[PeftModel, RunManifest | None]:
        """The adapter, tokenizer, plot and run.json into the run folder (rank 0); the plain trained model back."""
        # accelerate wraps forward in mixed-precision autocast for training; hand back the plain model.
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        if not self.main:
            return model, None  # rank 0 writes the run folder and its manifest
        manifest = self.manifest(trainer, progress)
        work, recipe = self.work, self.recipe
        with disk_full_is_a_user_error(work):
            # save_pretrained, not trainer.save_model: that also pickles training_args.bin into the folder. Only the
            # trained adapter: a preference run also holds its frozen reference copy (train/preference.py).
            model.save_pretrained(work.path, selected_adapters=[model.active_adapter])
            _point_adapter_at(work, self.base_path)
            self.tokenizer.chat_template = training_chat_template(recipe.data, self.tokenizer)
            self.tokenizer.save_pretrained(work.path)
            plot_loss(work.metrics(), work / RunFolder.PLOT, title=recipe.output.name)
            work.write_manifest(manifest)
        return model, manifest

    def manifest(self, trainer, progress) -> RunManifest:
        recipe, state = self.recipe, trainer.state
        metrics = self.work.metrics()
        return RunManifest(
            name=recipe.output.name, recipe=recipe.file, recipe_sha256=sha256(dump_recipe(recipe)),
            command=" ".join(sys.argv), versions=versions(), git_commit=git_commit(), seed=recipe.train.seed,
            base_model=BaseModelRecord(name_or_path=self.base_path, revision=recipe.model.revision,
                                       init=recipe.model.init, quantization=recipe.quantization,
                                       fingerprint=self.pinned),
            init_adapter=pin(recipe.init.adapter), data=data_record(recipe, self.data),
            train=TrainRecord(steps=state.global_step, tokens=int(state.num_input_tokens_seen),
                              runtime_s=progress.train_seconds, tokens_per_s=progress.session_tokens /
                              progress.train_seconds if progress.train_seconds else 0.0),
            loss=loss_record(metrics), device=device(), fast_path=self.fast_path + trainer.fast_path_notes(),
            resumed_from=self.checkpoint.name if self.checkpoint else None, world_size=self.ranks.num_processes,
            global_batch=recipe.train.batch_size * recipe.train.gradient_accumulation * self.ranks.num_processes,
            started_at=self.started, finished_at=now())

    def _clean_up(self, stopped: BaseException) -> None:
        """Refused or stopped before the first checkpoint: leave nothing behind. Stopped later: the newest sealed
        checkpoint stays, to resume from."""
        newest = self.work.newest_sealed_checkpoint(_quiet) if self.work.path.exists() else None
        if self.main and not self.resume and newest is None:
            self.folder.discard()
        if isinstance(stopped, KeyboardInterrupt) and newest is not None:
            raise Interrupted(signal.SIGINT, int(newest.name.removeprefix("checkpoint-")), saved=False) from None


def run_inputs(recipe: Recipe) -> dict[str, str | None]:
    """What a run reads from disk, which its run folder must never replace or lie inside."""
    model = recipe.model
    local = {"base": model.name_or_path if model.init == "pretrained" else None, "tokenizer": model.tokenizer,
             "data file": recipe.data.path if recipe.data.path not in BUILTIN else None}
    return {"start adapter": recipe.init.adapter,
            **{name: path for name, path in local.items() if path and path != "bytes" and is_local(path)}}


def attention_note(recipe: Recipe, base) -> str:
    attention = base.config._attn_implementation
    why = "recipe" if recipe.model.attn_implementation != "auto" else \
        "auto: each packed example attends over its own span only" if attention == "packed_sdpa" else \
        "auto: transformers' choice for this architecture"
    return f"attention {attention} ({why})"


def _quiet(message: str) -> None:
    """Ranks other than 0 say nothing; rank 0 speaks for the run."""


def pin_base(name: str) -> tuple[str, str | None]:
    """(where the base is, its fingerprint): a local folder resolved to an absolute path and fingerprinted, so merge
    and eval find exactly it from any directory; a hub id as it is."""
    folder = Path(name).expanduser()
    return (str(folder.resolve()), fingerprint(folder)) if folder.is_dir() else (name, None)


def _point_adapter_at(folder: RunFolder, base_path: str) -> None:
    """adapter_config.json names the base as the user will find it (not the temporary path it was loaded from)."""
    config_path = folder / RunFolder.ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_path
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
