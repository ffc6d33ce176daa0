"""Crash safety for training: resuming from the newest sealed checkpoint, sealing them, stopping on a signal, and a
full disk as one line. The checkpoint layout and the seal belong to run_folder."""
import json
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME

from ..errors import fail
from ..outputs import disk_full
from ..run_folder import RunFolder, seal


class Interrupted(Exception):
    """A run stopped by a signal. saved: the stop's own checkpoint was written; else the newest sealed one stands."""

    def __init__(self, signum: int, step: int, saved: bool = True):
        self.signum, self.step, self.saved = signum, step, saved
        where = "a checkpoint was saved" if saved else f"checkpoint-{step} is the newest complete one"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where}")


def resume_point(partial: RunFolder, recipe_text: str, log: Callable[[str], None]) -> Path:
    """The checkpoint to continue from; the unfinished run must have been started by the same recipe."""
    saved = partial.recipe_text()
    if saved is not None and saved != recipe_text:
        raise fail("--resume", f"the unfinished run in {str(partial.path)!r} was started with another recipe "
                   f"(see its recipe.yaml)", "resume with that recipe, or pass --force to start over")
    checkpoint = partial.newest_sealed_checkpoint(log)
    if checkpoint is None:
        raise fail("--resume", f"no complete checkpoint in {str(partial / RunFolder.CHECKPOINTS)!r}",
                   "pass --force to start over")
    log(f"resume: continuing from {checkpoint.name}")
    return checkpoint


def completed(checkpoint: Path) -> bool:
    """Whether the checkpoint holds the run's last step."""
    state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    return state["global_step"] >= state["max_steps"] > 0


class SealCheckpoints(TrainerCallback):
    def __init__(self, ranks: PartialState):
        self.ranks = ranks

    def on_save(self, args, state, control, **kwargs):
        self.ranks.wait_for_everyone()  # every rank has written its part (e.g. its RNG state)
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
        if self.received is not None:  # asked twice: stop now; the newest sealed checkpoint stays the resume point
            raise KeyboardInterrupt
        self.received = signum
        print(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True


@contextmanager
def disk_full_is_a_user_error(work: RunFolder):
    """ENOSPC surfaces from torch.save, safetensors or plain writes, often wrapped in another exception type;
    whichever it is, the user gets one line, and the sealed checkpoints stay as they were."""
    try:
        yield
    except Exception as exc:
        if not disk_full(exc, work.path):
            raise
        newest = work.newest_sealed_checkpoint(lambda message: None)
        kept = f"{newest.name} is intact" if newest else "no checkpoint was completed"
        again = "run again with --resume" if newest else "run again"
        raise fail("output", f"no space left on the device of {str(work.path)!r} while saving; {kept}",
                   f"free some space, then {again}") from None
