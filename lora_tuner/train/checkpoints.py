"""Crash safety for training: sealed checkpoints, resuming from the newest complete one, stopping on a signal."""
import errno
import os
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from accelerate import PartialState
from transformers import TrainerCallback

from ..errors import fail

SEAL = "COMPLETE"  # written last, after every file of the checkpoint is on disk
STEP = re.compile(r"^checkpoint-(\d+)$")


def seal(folder: Path) -> None:
    """fsync every file, then atomically add the marker: a checkpoint without it was cut off mid-write."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    marker = folder / (SEAL + ".tmp")
    with marker.open("w") as handle:
        handle.write("ok\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(marker, folder / SEAL)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def newest_complete(checkpoints: Path, log: Callable[[str], None]) -> Path | None:
    found = sorted((int(m.group(1)), p) for p in checkpoints.glob("checkpoint-*") if (m := STEP.match(p.name)))
    for _, folder in reversed(found):
        if (folder / SEAL).is_file():
            return folder
        log(f"resume: skipping {folder.name}, it was not completely written")
    return None


class Interrupted(Exception):
    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")


def resume_point(partial: Path, recipe_text: str, source: str, log: Callable[[str], None]) -> Path:
    """The checkpoint to continue from; the unfinished run must have been started by the same recipe."""
    saved = partial / "recipe.yaml"
    if saved.is_file() and saved.read_text(encoding="utf-8") != recipe_text:
        raise fail(source, "--resume", f"the unfinished run in {str(partial)!r} was started with another recipe "
                   f"(see its recipe.yaml)", "resume with that recipe, or pass --force to start over")
    checkpoint = newest_complete(partial / "checkpoints", log)
    if checkpoint is None:
        raise fail(source, "--resume", f"no complete checkpoint in {str(partial / 'checkpoints')!r}",
                   "pass --force to start over")
    log(f"resume: continuing from {checkpoint.name}")
    return checkpoint


class SealCheckpoints(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()  # every rank has written its part (e.g. its RNG state)
        if state.is_world_process_zero:
            seal(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class StopOnSignal(TrainerCallback):
    """Ctrl-C or SIGTERM: finish the current step, save a checkpoint, stop. The caller reports `.received`."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; a worker thread keeps the defaults
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _note(self, signum, frame):
        self.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True


@contextmanager
def disk_full_is_a_user_error(work: Path, source: str):
    """ENOSPC surfaces from torch.save, safetensors or plain writes, often wrapped in another exception type;
    whichever it is, the user gets one line, and the sealed checkpoints stay as they were."""
    try:
        yield
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        newest = newest_complete(work / "checkpoints", lambda message: None)
        kept = f"{newest.name} is intact" if newest else "no checkpoint was completed"
        again = "run again with --resume" if newest else "run again"
        raise fail(source, "output", f"no space left on the device of {str(work)!r} while saving; {kept}",
                   f"free some space, then {again}") from None


def _is_disk_full(exc: BaseException | None) -> bool:
    while exc is not None:
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
