"""`lora-tune run`: recipe -> checked data -> base model + LoRA -> trainer -> a complete run folder."""
import json
import signal
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
from ..data.prepare import PreparedData, prepare_data
from ..data.reading import BUILTIN, is_local
from ..data.tokenize import training_chat_template
from ..errors import UserError, fail
from ..model.compile import compile_decoder_layers
from ..model.loading import build_random_base, load_base
from ..model.lora import attach_lora
from ..model.lora_function import fused_lora_layers
from ..model.packing_check import packing_is_isolated
from ..model.source import check_base_source
from ..model.tokenizer import load_tokenizer
from ..outputs import OutputFolder
from ..preflight import check_environment, check_init_adapter, check_model_fit
from ..run_folder import RunFolder, RunManifest
from ..weights.fingerprint import fingerprint
from .checkpoints import Interrupted, StopOnSignal, completed, disk_full_is_a_user_error, resume_point
from .fast_path import resolve_fast_path
from .manifest import now, run_manifest
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


def run(recipe: Recipe, source: str = "recipe", output: str | None = None, force: bool = False,
        resume: bool = False, log: Callable[[str], None] = print, callbacks: list = ()) -> RunResult:
    """Train a LoRA adapter as the recipe says; the finished run folder is returned (and printed by the CLI).
    With resume, an unfinished run of the same recipe continues from its newest complete checkpoint.
    callbacks: extra transformers TrainerCallbacks (e.g. to measure or stop the run).
    Under torchrun / accelerate launch every rank calls this; only rank 0 writes the run folder."""
    ranks = PartialState(cpu=not torch.cuda.is_available())  # on CPU, torchrun ranks talk over gloo
    log = log if ranks.is_main_process else _quiet
    check_base_source(recipe.model, source)  # read-only checks run on every rank, so all ranks stop on bad input
    check_environment(recipe, source)
    check_init_adapter(recipe, source)
    folder = OutputFolder(Path(output) if output else Path(recipe.output.root) / recipe.output.name, "output", "run",
                          run_inputs(recipe), source,
                          resumable=lambda partial: RunFolder(partial).newest_sealed_checkpoint(_quiet) is not None)
    folder.check_free(force, resume)
    recipe, fast_path = resolve_fast_path(recipe, source)
    work = RunFolder(folder.partial)
    checkpoint = resume_point(work, dump_recipe(recipe), source, log) if resume else None
    tokenizer = load_tokenizer(recipe.model, source)
    check_model_fit(recipe, source, tokenizer)
    data = prepare_data(recipe, tokenizer, source)
    if data.dropped:
        log(f"data: dropped {data.dropped_summary()} (set data.bad_rows: fail to stop instead)")
    try:  # from the first byte written: a stop or a refusal at any point leaves nothing behind
        with ranks.main_process_first():
            if ranks.is_main_process and not resume:
                folder.start()
                work.write_recipe(recipe)
                work.write_validation(data.eval or data.train, held_out=bool(data.eval))
        with work.training() if ranks.is_main_process else nullcontext():
            model, manifest = _train(recipe, source, tokenizer, data, work, folder.final, fast_path, checkpoint, ranks,
                                     list(callbacks))
    except (UserError, KeyboardInterrupt) as stopped:
        newest = work.newest_sealed_checkpoint(_quiet) if work.path.exists() else None
        if ranks.is_main_process and not resume and newest is None:
            folder.discard()  # refused or stopped before the first checkpoint: leave nothing behind
        if isinstance(stopped, KeyboardInterrupt) and newest is not None:
            raise Interrupted(signal.SIGINT, int(newest.name.removeprefix("checkpoint-")), saved=False) from None
        raise
    if ranks.is_main_process:
        folder.finish()
    ranks.wait_for_everyone()
    return RunResult(folder.final, manifest, model)


def run_inputs(recipe: Recipe) -> dict[str, str | None]:
    """What a run reads from disk, which its run folder must never replace or lie inside."""
    model = recipe.model
    local = {"base": model.name_or_path if model.init == "pretrained" else None, "tokenizer": model.tokenizer,
             "data file": recipe.data.path if recipe.data.path not in BUILTIN else None}
    return {"start adapter": recipe.init.adapter,
            **{name: path for name, path in local.items() if path and path != "bytes" and is_local(path)}}


def _quiet(message: str) -> None:
    """Ranks other than 0 say nothing; rank 0 speaks for the run."""


def _train(recipe: Recipe, source: str, tokenizer, data: PreparedData, work: RunFolder, final: Path,
           fast_path: list[str], checkpoint: Path | None, ranks: PartialState, callbacks: list):
    started = now()
    sharded = ranks.num_processes > 1 and recipe.distributed.strategy in ("fsdp", "deepspeed-zero3")
    if recipe.model.init == "random":
        built = work / RunFolder.BASE_MODEL  # already there when resuming; rebuilt identically otherwise
        with ranks.main_process_first():
            if ranks.is_main_process and not (built / "config.json").is_file():
                build_random_base(recipe.model, recipe.train.seed, built, source)
        base = load_base(recipe.model, recipe.quantization, str(built), source, sharded)
        base_path = str(final / RunFolder.BASE_MODEL)  # where it lives once the run folder is in place
        pinned = fingerprint(built) if ranks.is_main_process else None
    else:
        base_path, pinned = pin_base(recipe.model.name_or_path)
        base = load_base(recipe.model, recipe.quantization, base_path, source, sharded)
    attention = base.config._attn_implementation
    why = "recipe" if recipe.model.attn_implementation != "auto" else \
        "auto: each packed example attends over its own span only" if attention == "packed_sdpa" else \
        "auto: transformers' choice for this architecture"
    fast_path = fast_path + [f"attention {attention} ({why})"]
    if recipe.data.packing and not packing_is_isolated(base, len(tokenizer)):
        raise fail(source, "data.packing", f"{type(base).__name__} with attn_implementation "
                   f"{recipe.model.attn_implementation!r} lets packed examples attend to each other",
                   "set data.packing: false, or try another model.attn_implementation")
    model = attach_lora(base, recipe, base_path)
    if recipe.train.compile:
        compile_decoder_layers(model.get_base_model())
    trainer, progress = make_trainer(recipe, model, tokenizer, data, work, ranks, fresh=checkpoint is None)
    for callback in callbacks:
        trainer.add_callback(callback)
    if checkpoint and ranks.is_main_process:
        work.forget_metrics_after(int(checkpoint.name.removeprefix("checkpoint-")))
    if checkpoint and completed(checkpoint):
        # Stopped after its last step was sealed (while saving the adapter): the run is done, so it is finished
        # from that checkpoint; train() would take one step more.
        trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
        set_peft_model_state_dict(model, load_file(str(checkpoint / RunFolder.ADAPTER_WEIGHTS)))
    else:
        with StopOnSignal() as stop, disk_full_is_a_user_error(work, source), \
                fused_lora_layers(model) if recipe.train.fused_lora else nullcontext():
            trainer.add_callback(stop)
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if stop.received is not None:
            raise Interrupted(stop.received, trainer.state.global_step)
    # accelerate wraps forward in mixed-precision autocast for training; hand back the plain model.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if not ranks.is_main_process:
        return model, None  # rank 0 writes the run folder and its manifest
    manifest = run_manifest(
        recipe, source, data, (base_path, pinned), work.metrics(), steps=trainer.state.global_step,
        tokens=int(trainer.state.num_input_tokens_seen), train_seconds=progress.train_seconds,
        session_tokens=progress.session_tokens, fast_path=fast_path + trainer.fast_path_notes(),
        resumed_from=checkpoint.name if checkpoint else None, world_size=ranks.num_processes, started=started)
    with disk_full_is_a_user_error(work, source):
        _save(model, tokenizer, recipe, work, base_path, manifest)
    return model, manifest


def pin_base(name: str) -> tuple[str, str | None]:
    """(where the base is, its fingerprint): a local folder resolved to an absolute path and fingerprinted, so merge
    and eval find exactly it from any directory; a hub id as it is."""
    folder = Path(name).expanduser()
    return (str(folder.resolve()), fingerprint(folder)) if folder.is_dir() else (name, None)


def _save(model: PeftModel, tokenizer, recipe: Recipe, work: RunFolder, base_path: str,
          manifest: RunManifest) -> None:
    # save_pretrained, not trainer.save_model: the latter also pickles training_args.bin into the folder. Only the
    # trained adapter: a preference run also holds its frozen reference copy (train/preference.py).
    model.save_pretrained(work.path, selected_adapters=[model.active_adapter])
    _point_adapter_at(work, base_path)
    tokenizer.chat_template = training_chat_template(recipe.data, tokenizer)
    tokenizer.save_pretrained(work.path)
    plot_loss(work.metrics(), work / RunFolder.PLOT, title=recipe.output.name)
    work.write_manifest(manifest)


def _point_adapter_at(folder: RunFolder, base_path: str) -> None:
    """adapter_config.json names the base as the user will find it (not the temporary path it was loaded from)."""
    config_path = folder / RunFolder.ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_path
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
