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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from .config import Recipe, dump_recipe, load_recipe
from .config.schema import QuantizationSection
from .formats.registry import example_shape, response_example
from .errors import UserError, fail
from .weights.fingerprint import fingerprint

SEAL = "COMPLETE"  # written last into a checkpoint, after every file of it is on disk
CHECK_ROWS_WITHOUT_SPLIT = 32  # rows kept for eval and merge checks when the recipe holds none out


@dataclass
class JsonLines:
    rows: list[dict]
    torn: int  # a last line cut off mid-write (a killed run's), skipped


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelRecord(Record):
    name_or_path: str  # where the base is: a hub id, or a resolved absolute path (model.init random: base-model/)
    revision: str
    init: str
    quantization: QuantizationSection
    fingerprint: str | None = None  # of a local base's weights (weights/fingerprint.py); None: a hub id


class PinRecord(Record):
    """A folder the run read, pinned: merge, eval and export use this one and refuse it once its weights changed."""
    path: str  # resolved, absolute
    fingerprint: str


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
    init_adapter: PinRecord | None = None  # the adapter the run started from (init.adapter)
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

    # reading: every file of the run through one confined, tolerant reader
    def file(self, name: str) -> Path | None:
        """A file of this run, or None when it is not there. Refused when it is a link leading out of the folder
        (lora-tune writes none; its content would be quoted in error lines `serve` sends to clients, and the page
        shows it) or not a regular file (a named pipe would block its reader)."""
        path = self.path / name
        try:
            real = path.resolve()
        except (OSError, RuntimeError):  # a loop of links
            real = None
        if path.is_symlink() and (real is None or not real.is_relative_to(self.path.resolve())):
            raise self.damaged(name, "is a link to a file outside the run folder", "replace the link with the run's own "
                               "file")
        if not path.exists():
            return None
        if not path.is_file():
            raise self.damaged(name, "is not a regular file", "replace it with the run's own file")
        return path

    def read_text(self, name: str) -> str | None:
        path = self.file(name)
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise self.damaged(name, f"is not UTF-8 text (byte {exc.start})", "restore the file, or re-run") from None

    def read_json(self, name: str, fix: str = "restore the file, or re-run"):
        text = self.read_text(name)
        return None if text is None else self._json(name, text, fix)

    def read_jsonl(self, name: str) -> JsonLines:
        """Every row of a JSON-lines file. A torn last line (what a killed writer leaves) is skipped and counted;
        a bad line before it means the file is damaged."""
        text = self.read_text(name)
        lines = [] if text is None else text.splitlines()
        rows, torn = [], 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                if number == len(lines):
                    torn += 1
                    continue
                raise self.damaged(name, f"line {number} is not valid JSON", "restore the file, or re-run") from None
            if not isinstance(row, dict):
                raise self.damaged(name, f"line {number} is not a JSON object", "restore the file, or re-run")
            rows.append(row)
        return JsonLines(rows, torn)

    def _json(self, name: str, text: str, fix: str):
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise self.damaged(name, f"is not valid JSON ({str(exc).splitlines()[0][:80]})" if isinstance(exc, ValueError)
                               else "is nested too deeply", fix) from None

    def check_files(self) -> None:
        """Read every file of the run that readers use, raising UserError for the first that is damaged."""
        for name in (self.RECIPE, self.METRICS, self.VALIDATION, self.EVAL_MD):
            self.read_text(name)
        for name in (self.METRICS, self.VALIDATION):
            self.read_jsonl(name)
        self.read_json(self.EVAL_JSON)
        if self.file(self.MANIFEST) is not None:
            self.manifest()
        if self.file(self.RECIPE) is not None:
            self.recipe()

    def damaged(self, name: str, message: str, fix: str) -> UserError:
        return fail(name, message, fix, source=str(self.path))

    # recipe and manifest
    def recipe(self) -> Recipe:
        if self.file(self.RECIPE) is None:
            raise self.damaged(self.RECIPE, "is missing", "re-run the training")
        return load_recipe(self.path / self.RECIPE)

    def recipe_text(self) -> str | None:
        return self.read_text(self.RECIPE)

    def write_recipe(self, recipe: Recipe) -> None:
        (self.path / self.RECIPE).write_text(dump_recipe(recipe), encoding="utf-8")

    def manifest(self) -> RunManifest:
        text = self.read_text(self.MANIFEST)
        if text is None:
            raise self.damaged(self.MANIFEST, "is missing", "re-run the training")
        try:
            return RunManifest.model_validate_json(text)
        except (ValidationError, ValueError, RecursionError) as exc:
            raise self.damaged(self.MANIFEST, f"not a run manifest of this lora-tune version "
                               f"({str(exc).splitlines()[0][:80]})", "re-run the training, or point at a PEFT adapter "
                               "folder and pass the base explicitly") from None

    def write_manifest(self, manifest: RunManifest) -> None:
        (self.path / self.MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")

    def adapter_config(self) -> dict:
        """adapter_config.json, or one line saying why it cannot be read."""
        config = self.read_json(self.ADAPTER_CONFIG, "re-save the adapter with save_pretrained")
        if not isinstance(config, dict) or not isinstance(config.get("lora_alpha", 0), (int, float)):
            raise fail(self.ADAPTER_CONFIG, "is not a PEFT adapter config",
                       "re-save the adapter with save_pretrained", source=str(self.path))
        return config

    def base_model(self) -> str | None:
        """The base the adapter belongs to: the run's pinned base (refused when its weights changed since), else the
        one the adapter config names."""
        if not self.is_run:
            return self.adapter_config().get("base_model_name_or_path") if self.has_adapter else None
        record = self.manifest().base_model
        if record.init == "random":  # the run folder's own base: wherever the folder has been moved to
            return str(self._pinned(self.path / self.BASE_MODEL, record.fingerprint, "base"))
        if record.fingerprint is None:  # a hub id
            return record.name_or_path
        return str(self._pinned(Path(record.name_or_path), record.fingerprint, "base"))

    def start_adapter(self) -> Path | None:
        """The adapter this run started from (init.adapter), as pinned when it trained."""
        pin = self.manifest().init_adapter if self.is_run else None
        return None if pin is None else self._pinned(Path(pin.path), pin.fingerprint, "start adapter")

    def _pinned(self, path: Path, want: str | None, what: str) -> Path:
        if not path.is_dir():
            raise self.damaged(self.MANIFEST, f"the {what} this run trained on, {str(path)!r}, is not there any more",
                               f"put it back, or pass the {what} explicitly" + (" (--base)" if what == "base" else ""))
        if want is not None and fingerprint(path) != want:
            raise self.damaged(self.MANIFEST, f"the {what} in {str(path)!r} is not the one this run trained on (its "
                               "weights changed since)", f"restore the {what} the run trained on" +
                               (", or pass --base to use this one anyway" if what == "base" else ""))
        return path

    # metrics
    def metrics(self) -> list[dict]:
        return self.read_jsonl(self.METRICS).rows

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
        label, whether they were held out of training). Rows that are not one of those shapes mean the file is
        damaged."""
        rows = self.read_jsonl(self.VALIDATION).rows
        examples = [{key: value for key, value in r.items() if key not in ("row", "held_out")} for r in rows]
        for number, example in enumerate(examples, start=1):
            if not example_shape(example):
                raise self.damaged(self.VALIDATION, f"line {number} is not a prepared example (keys "
                                   f"{sorted(example)[:6]})", "re-run the training, or pass --data FILE")
        return examples, bool(rows) and all(r.get("held_out") is True for r in rows)

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


def same_base(a: str | None, b: str) -> bool:
    """Two names of one base, as runs record them: the same folder, or the same hub id."""
    if a is None:
        return False
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


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
