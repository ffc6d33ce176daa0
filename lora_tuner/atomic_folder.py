"""Output folders (runs, merge exports) appear only when complete: work happens in a hidden sibling that is
renamed into place, so a crash at any moment leaves the previous state readable."""
import errno
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import fail


class AtomicFolder:
    def __init__(self, final: Path, source: str, field: str, what: str,
                 resumable: Callable[[Path], bool] | None = None):
        """resumable: for outputs that can be continued (runs), whether an unfinished one holds anything to
        continue from; one that does not is stale and simply started over."""
        self.final = final.expanduser().resolve()
        self.partial = self.final.parent / f".{self.final.name}.partial"
        self.source, self.field, self.what = source, field, what  # for error lines: file, option, noun
        self.resumable = resumable

    def check_not_input(self, inputs: dict[str, Path]) -> None:
        """The output may be replaced (--force) or written into: it must be none of the command's inputs, hold none of
        them, and lie inside none of them (a model written into RUN/base-model would replace the run's base)."""
        for name, path in inputs.items():
            path = Path(path).expanduser().resolve()
            if self.final == path or path.is_relative_to(self.final) or self.final.is_relative_to(path):
                where = "is" if self.final == path else "holds" if path.is_relative_to(self.final) else "is inside"
                raise fail(self.source, self.field, f"{str(self.final)!r} {where} the {name} {str(path)!r}, which "
                           "this command reads", f"choose an {self.field} outside it")

    def check_free(self, force: bool, resume: bool = False) -> None:
        """Before anything is written: refuse to clobber a finished or unfinished output without --force."""
        if self.final.exists() and not force:
            raise fail(self.source, self.field, f"{str(self.final)!r} already holds a {self.what}",
                       f"choose another {self.field}, or pass --force to replace it")
        if resume and not self.partial.exists():
            raise fail(self.source, "--resume", f"no unfinished {self.what} in {str(self.partial)!r}",
                       "run without --resume to start one")
        if not self.partial.exists() or force or resume:
            return
        if self.resumable is None:
            raise fail(self.source, self.field, f"an unfinished {self.what} is in {str(self.partial)!r}",
                       "delete that folder, or pass --force to start over")
        if self.resumable(self.partial):
            raise fail(self.source, self.field, f"an unfinished {self.what} is in {str(self.partial)!r}",
                       "pass --resume to continue it, or --force to start over")

    def start(self, resume: bool = False) -> Path:
        if resume:
            return self.partial
        try:
            if self.partial.exists():  # --force, or a stale unfinished output with nothing to continue from
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
        except OSError as exc:
            raise fail(self.source, self.field, f"cannot write in {str(self.final.parent)!r} ({exc.strerror})",
                       f"choose a writable {self.field}") from None
        return self.partial

    @contextmanager
    def writing(self):
        """The started partial folder, removed again if the block ends in an exception or Ctrl-C: nothing
        half-written is left to block the next attempt. A disk that fills up is one line."""
        try:
            yield self.start()
        except BaseException as exc:
            self.discard()
            if disk_full(exc):
                raise no_space(self.final.parent, self.source, self.field) from None
            raise

    def discard(self) -> None:
        """Drop the unfinished output: the work was refused before producing anything worth keeping."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def finish(self) -> Path:
        """Swap the completed folder into place; a replaced one is removed only after the swap succeeded."""
        retired = None
        if self.final.exists():
            retired = self.final.parent / f".{self.final.name}.replaced-{int(time.time())}"
            os.rename(self.final, retired)
        os.rename(self.partial, self.final)
        if retired:
            shutil.rmtree(retired)
        return self.final


def disk_full(exc: BaseException) -> bool:
    """Whether a failed write ran out of disk: an OSError says so by errno, safetensors' writer in its message
    ("No space left on device"), numpy's tofile as a short write ("N requested and M written") without an errno."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or (isinstance(exc, OSError) and exc.errno is None
                                                 and "requested and" in text)


def no_space(folder: Path, source: str, field: str):
    """The one line for a disk that filled up while an output was written (nothing of it is left in place)."""
    return fail(source, field, f"no space left on the device of {str(folder)!r}; nothing was put in place",
                f"free some space or choose another {field}, then run again")
