"""`lora-tune run`: recipe -> checked data -> base model + LoRA -> SFTTrainer -> a complete run folder."""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import PartialState
from peft import PeftModel
from torch.utils.tensorboard import SummaryWriter
from transformers.integrations import TensorBoardCallback
from trl import SFTTrainer

from ..atomic_folder import AtomicFolder
from ..config import Recipe, dump_recipe
from ..data import PreparedData, prepare_data
from ..errors import UserError, fail
from ..model.loading import build_random_base, check_base_source, load_base
from ..model.lora import attach_lora
from ..model.packing_check import packing_is_isolated
from ..model.tokenizer import load_tokenizer
from .callbacks import EvaluateAtEnd, MetricsFile, forget_metrics_after, read_metrics
from .checkpoints import Interrupted, SealCheckpoints, StopOnSignal, disk_full_is_a_user_error, resume_point
from .fast_path import resolve_fast_path
from .manifest import now, run_manifest, write_manifest
from .plot import plot_loss
from .sft import sft_config

BASE_FOLDER = "base-model"  # where a model.init: random base is saved, inside the run folder


@dataclass
class RunResult:
    folder: Path
    manifest: dict
    model: PeftModel  # the trained model, still in memory, for use right away from Python
    # manifest is {} on ranks other than 0 of a multi-process run: rank 0 speaks for the run

    def summary(self) -> str:
        m, f = self.manifest, self.folder
        loss = m["loss"]
        eval_part = f"   eval {loss['eval']:.4f}" if loss["eval"] is not None else ""
        return "\n".join([
            f"run       {f}   ({m['train']['runtime_s']:.0f} s on {m['device']})",
            f"steps     {m['train']['steps']}   tokens {m['train']['tokens']:,}   "
            f"tokens/s {m['train']['tokens_per_s']:,.0f}   global batch {m['global_batch']} on "
            f"{m['world_size']} process(es)",
            f"loss      first {loss['first']:.4f} -> last {loss['last']:.4f}{eval_part}",
            f"data      {m['data']['train_rows']:,} train / {m['data']['eval_rows']:,} validation rows, "
            f"{m['data']['dropped_rows']} dropped",
            f"fast path {'; '.join(m['fast_path'])}",
            f"adapter   {f / 'adapter_model.safetensors'}",
            f"plot      {f / 'loss.png'}   metrics {f / 'metrics.jsonl'}   tensorboard {f / 'tensorboard'}",
        ])


def run(recipe: Recipe, source: str = "recipe", output: str | None = None, force: bool = False,
        resume: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Train a LoRA adapter as the recipe says; the finished run folder is returned (and printed by the CLI).
    With resume, an unfinished run of the same recipe continues from its newest complete checkpoint.
    Under torchrun / accelerate launch every rank calls this; only rank 0 writes the run folder."""
    ranks = PartialState(cpu=not torch.cuda.is_available())  # on CPU, torchrun ranks talk over gloo
    log = log if ranks.is_main_process else _quiet
    folder = AtomicFolder(Path(output) if output else Path(recipe.output.root) / recipe.output.name, source,
                          field="output", what="run", resumable=True)
    folder.check_free(force, resume)  # read-only checks run on every rank, so all ranks stop on bad input
    check_base_source(recipe.model, source)
    recipe, fast_path = resolve_fast_path(recipe, source)
    checkpoint = resume_point(folder.partial, dump_recipe(recipe), source, log) if resume else None
    tokenizer = load_tokenizer(recipe.model, source)
    data = prepare_data(recipe, tokenizer, source)
    if data.dropped:
        log(f"data: dropped {data.dropped_summary()} (set data.bad_rows: fail to stop instead)")
    with ranks.main_process_first():
        if ranks.is_main_process:
            folder.start(resume)
            (folder.partial / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    try:
        model, manifest = _train(recipe, source, tokenizer, data, folder.partial, folder.final, fast_path, checkpoint)
    except UserError:
        checkpoints = folder.partial / "checkpoints"
        if not resume and ranks.is_main_process and not any(checkpoints.glob("checkpoint-*")):
            shutil.rmtree(folder.partial)  # refused before training: leave nothing behind
        raise
    if ranks.is_main_process:
        folder.finish()
    ranks.wait_for_everyone()
    return RunResult(folder.final, manifest, model)


def _quiet(message: str) -> None:
    """Ranks other than 0 say nothing; rank 0 speaks for the run."""


def make_trainer(recipe: Recipe, model: PeftModel, tokenizer, data: PreparedData, work: Path) -> SFTTrainer:
    """The SFTTrainer a run uses; TRL tokenizes, masks and packs the prompt/completion examples."""
    return SFTTrainer(
        model=model,
        args=sft_config(recipe, work / "checkpoints", has_eval=data.eval is not None),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[MetricsFile(work / "metrics.jsonl"), EvaluateAtEnd(), SealCheckpoints()] + (
            [TensorBoardCallback(SummaryWriter(str(work / "tensorboard")))] if PartialState().is_main_process else []),
    )


def _train(recipe: Recipe, source: str, tokenizer, data: PreparedData, work: Path, final: Path,
           fast_path: list[str], checkpoint: Path | None):
    started, ranks = now(), PartialState()
    sharded = ranks.num_processes > 1 and recipe.distributed.strategy in ("fsdp", "deepspeed-zero3")
    if recipe.model.init == "random":
        built = work / BASE_FOLDER  # already there when resuming; rebuilt identically otherwise
        with ranks.main_process_first():
            if ranks.is_main_process and not (built / "config.json").is_file():
                build_random_base(recipe.model, recipe.train.seed, built, source)
        base = load_base(recipe.model, recipe.quantization, str(built), source, sharded)
        base_path = str(final / BASE_FOLDER)  # where it lives once the run folder is in place
    else:
        base_path = recipe.model.name_or_path
        base = load_base(recipe.model, recipe.quantization, base_path, source, sharded)
    if recipe.data.packing and not packing_is_isolated(base, len(tokenizer)):
        raise fail(source, "data.packing", f"{type(base).__name__} with attn_implementation "
                   f"{recipe.model.attn_implementation!r} lets packed examples attend to each other",
                   "set data.packing: false, or try another model.attn_implementation")
    model = attach_lora(base, recipe)
    trainer = make_trainer(recipe, model, tokenizer, data, work)
    if checkpoint and ranks.is_main_process:
        forget_metrics_after(work / "metrics.jsonl", int(checkpoint.name.removeprefix("checkpoint-")))
    with StopOnSignal() as stop, disk_full_is_a_user_error(work, source):
        trainer.add_callback(stop)
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stop.received is not None:
        raise Interrupted(stop.received, trainer.state.global_step)
    # accelerate wraps forward in mixed-precision autocast for training; hand back the plain model.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if not ranks.is_main_process:
        return model, {}  # rank 0 writes the run folder and its manifest
    manifest = run_manifest(recipe, source, data, trainer, result, read_metrics(work / "metrics.jsonl"), base_path,
                            started)
    manifest.update(fast_path=fast_path, resumed_from=checkpoint.name if checkpoint else None,
                    world_size=ranks.num_processes,
                    global_batch=recipe.train.batch_size * recipe.train.gradient_accumulation * ranks.num_processes)
    with disk_full_is_a_user_error(work, source):
        _save(model, tokenizer, recipe, work, base_path, manifest)
    return model, manifest


def _save(model, tokenizer, recipe: Recipe, work: Path, base_path: str, manifest: dict) -> None:
    # save_pretrained, not trainer.save_model: the latter also pickles training_args.bin into the folder.
    model.save_pretrained(work)
    _point_adapter_at(work, base_path)
    tokenizer.save_pretrained(work)
    plot_loss(read_metrics(work / "metrics.jsonl"), work / "loss.png", title=recipe.output.name)
    write_manifest(work / "run.json", manifest)


def _point_adapter_at(folder: Path, base_path: str) -> None:
    """adapter_config.json names the base as the user will find it (not the temporary path it was loaded from)."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_path
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
