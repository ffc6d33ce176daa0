"""The run folder: the one module that knows its layout and file formats. Training writes it; merge, eval, export and
AdapterPool read it; nothing else names its files.

    adapter_config.json, adapter_model.safetensors   the adapter (standard PEFT layout)
    tokenizer files                                   with a chat template that renders the training prompt
    recipe.yaml        the resolved recipe            run.json       the manifest (RunManifest)
    metrics.jsonl      one row per log step           loss.png       train and validation loss
    validation.jsonl   the rows eval and merge verification score (held out, unless the run had no split); a
                       preference run's keep their chosen and rejected replies
    checkpoints/       sealed Trainer checkpoints     tensorboard/   event files
    base-model/        the random base, for model.init: random
    eval.json, eval.md written by `lora-tune eval`
    process.json       while a run trains: its process, locked (flock) until it ends, however it ends
"""
import fcntl
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from .config import Recipe, dump_recipe, load_recipe
from .config.schema import QuantizationSection
from .data.formats import response_example
from .errors import fail

SEAL = "COMPLETE"  # written last into a checkpoint, after every file of it is on disk
CHECK_ROWS_WITHOUT_SPLIT = 32  # rows kept for eval and merge checks when the recipe holds none out


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelRecord(Record):
    name_or_path: str  # where the base is (for model.init: random, the run folder's base-model/)
    revision: str
    init: str
    quantization: QuantizationSection


class DataRecord(Record):
    path: str
    sha256: str
    rows_read: int
    train_rows: int
    eval_rows: int  # held out for validation
    dropped_rows: int
    dropped: dict[str, list[int]]  # reason -> row numbers


class TrainRecord(Record):
    steps: int
    tokens: int  # real (non-padding) tokens trained on
    runtime_s: float  # training only: evaluations are not counted
    tokens_per_s: float


class LossRecord(Record):
    first: float | None
    last: float | None
    eval_start: float | None  # validation loss before the first step
    eval: float | None  # validation loss of the saved adapter


class RunManifest(Record):
    """run.json: what is needed to reproduce or audit a run."""
    name: str
    recipe: str
    recipe_sha256: str
    command: str
    versions: dict[str, str | None]
    git_commit: str | None
    seed: int
    base_model: BaseModelRecord
    data: DataRecord
    train: TrainRecord
    loss: LossRecord
    device: str
    fast_path: list[str]
    resumed_from: str | None
    world_size: int
    global_batch: int
    started_at: str
    finished_at: str


class RunFolder:
    ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
    RECIPE, MANIFEST, METRICS, VALIDATION = "recipe.yaml", "run.json", "metrics.jsonl", "validation.jsonl"
    PLOT, TENSORBOARD, CHECKPOINTS, BASE_MODEL = "loss.png", "tensorboard", "checkpoints", "base-model"
    EVAL_JSON, EVAL_MD, PROCESS = "eval.json", "eval.md", "process.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def is_run(self) -> bool:
        """A lora-tune run folder, not a bare PEFT adapter folder."""
        return (self.path / self.MANIFEST).is_file() and (self.path / self.RECIPE).is_file()

    @property
    def has_adapter(self) -> bool:
        return (self.path / self.ADAPTER_CONFIG).is_file() and (self.path / self.ADAPTER_WEIGHTS).is_file()

    # recipe and manifest
    def _own(self, name: str) -> Path:
        """A file of this run, refused when it is a link leading out of the folder (lora-tune writes none): its
        content would be quoted in error messages, which `serve` sends to its clients."""
        path = self.path / name
        if path.is_symlink() and not path.resolve().is_relative_to(self.path.resolve()):
            raise fail(str(self.path), name, "is a link to a file outside the run folder",
                       "replace the link with the run's own file")
        return path

    def recipe(self) -> Recipe:
        return load_recipe(self._own(self.RECIPE))

    def recipe_text(self) -> str | None:
        path = self._own(self.RECIPE)
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def write_recipe(self, recipe: Recipe) -> None:
        (self.path / self.RECIPE).write_text(dump_recipe(recipe), encoding="utf-8")

    def manifest(self) -> RunManifest:
        path = self._own(self.MANIFEST)
        try:
            return RunManifest.model_validate_json(path.read_text(encoding="utf-8"))
        except (ValidationError, ValueError) as exc:
            raise fail(str(self.path), self.MANIFEST, f"not a run manifest of this lora-tune version "
                       f"({str(exc).splitlines()[0][:80]})", "re-run the training, or point at a PEFT adapter "
                       "folder and pass the base explicitly") from None

    def write_manifest(self, manifest: RunManifest) -> None:
        (self.path / self.MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")

    def adapter_config(self) -> dict:
        """adapter_config.json, or one line saying why it cannot be read."""
        path = self.path / self.ADAPTER_CONFIG
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise fail(str(self.path), self.ADAPTER_CONFIG, f"is not valid JSON ({str(exc).splitlines()[0][:80]})",
                       "re-save the adapter with save_pretrained") from None
        if not isinstance(config, dict) or not isinstance(config.get("lora_alpha", 0), (int, float)):
            raise fail(str(self.path), self.ADAPTER_CONFIG, "is not a PEFT adapter config",
                       "re-save the adapter with save_pretrained")
        return config

    def base_model(self) -> str | None:
        """The base the adapter belongs to: the run's record, else the adapter config's."""
        if self.is_run:
            return self.manifest().base_model.name_or_path
        return self.adapter_config().get("base_model_name_or_path") if self.has_adapter else None

    # metrics
    def metrics(self) -> list[dict]:
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def append_metrics(self, row: dict) -> None:
        """Appended and closed at once, so a crash loses nothing already logged."""
        with (self.path / self.METRICS).open("a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")

    def forget_metrics_after(self, step: int) -> None:
        """On resume, rows logged after the checkpoint are logged again by the resumed run: drop the old ones."""
        kept = [row for row in self.metrics() if row["step"] <= step]
        (self.path / self.METRICS).write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")

    # the rows eval and merge verification score
    def write_validation(self, rows: list, held_out: bool) -> None:
        """rows: prepared rows (number, example); without a validation split, the first training rows."""
        kept = rows if held_out else rows[:CHECK_ROWS_WITHOUT_SPLIT]
        lines = [json.dumps({"row": row.number, "held_out": held_out, **row.example}, ensure_ascii=False) for row in kept]
        (self.path / self.VALIDATION).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def validation(self) -> tuple[list[dict], bool]:
        """(prompt/completion examples, whether they were held out of training). A preference run's are its prompts
        with the chosen (or desirable) replies: what merge verification and eval's response loss score."""
        examples, held_out = self.validation_examples()
        return [e for e in map(response_example, examples) if e is not None], held_out

    def validation_examples(self) -> tuple[list[dict], bool]:
        """(the examples as the run prepared them: prompt/completion, prompt/chosen/rejected or prompt/completion/
        label, whether they were held out of training)."""
        rows = self._validation_rows()
        return ([{key: value for key, value in r.items() if key not in ("row", "held_out")} for r in rows],
                bool(rows) and all(r["held_out"] for r in rows))

    def _validation_rows(self) -> list[dict]:
        path = self.path / self.VALIDATION
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    # the training process
    @contextmanager
    def training(self):
        """Held while a run trains: process.json names the process and stays locked until the block ends, or the
        process dies (the kernel drops the lock even on SIGKILL), so `is_training` needs no guess about stale pids."""
        path = self.path / self.PROCESS
        with path.open("w", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
            handle.flush()
            try:
                yield
            finally:
                path.unlink(missing_ok=True)

    @property
    def is_training(self) -> bool:
        """Whether a process on this machine is training this run now (its process.json is locked)."""
        try:
            with (self.path / self.PROCESS).open("rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except FileNotFoundError:
            return False
        except BlockingIOError:
            return True
        return False

    # checkpoints
    def newest_sealed_checkpoint(self, log: Callable[[str], None]) -> Path | None:
        found = []
        for folder in (self.path / self.CHECKPOINTS).glob("checkpoint-*"):
            step = folder.name.removeprefix("checkpoint-")
            if step.isdigit():
                found.append((int(step), folder))
        for _, folder in sorted(found, reverse=True):
            if (folder / SEAL).is_file():
                return folder
            log(f"resume: skipping {folder.name}, it was not completely written")
        return None

    def has_checkpoints(self) -> bool:
        return any((self.path / self.CHECKPOINTS).glob("checkpoint-*"))

    def write_json(self, name: str, value: dict) -> None:
        """A report file, written under a temporary name and renamed: a reader never sees half of it."""
        write_atomically(self.path / name, json.dumps(value, indent=2) + "\n")


def seal(checkpoint: Path) -> None:
    """fsync every file, then atomically add the marker: a checkpoint without it was cut off mid-write."""
    for path in checkpoint.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    marker = checkpoint / (SEAL + ".tmp")
    with marker.open("w") as handle:
        handle.write("ok\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(marker, checkpoint / SEAL)
    directory = os.open(checkpoint, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
