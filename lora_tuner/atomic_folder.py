"""Output folders (runs, merge exports) appear only when complete: work happens in a hidden sibling that is
renamed into place, so a crash at any moment leaves the previous state readable."""
import os
import shutil
import time
from pathlib import Path

from .errors import fail


class AtomicFolder:
    def __init__(self, final: Path, source: str, field: str, what: str, resumable: bool = False):
        self.final = final.expanduser().resolve()
        self.partial = self.final.parent / f".{self.final.name}.partial"
        self.source, self.field, self.what = source, field, what  # for error lines: file, option, noun
        self.resumable = resumable

    def check_free(self, force: bool, resume: bool = False) -> None:
        """Before anything is written: refuse to clobber a finished or unfinished output without --force."""
        if self.final.exists() and not force:
            raise fail(self.source, self.field, f"{str(self.final)!r} already holds a {self.what}",
                       f"choose another {self.field}, or pass --force to replace it")
        if resume and not self.partial.exists():
            raise fail(self.source, "--resume", f"no unfinished {self.what} in {str(self.partial)!r}",
                       "run without --resume to start one")
        if self.partial.exists() and not (force or resume):
            again = "pass --resume to continue it, or --force to start over" if self.resumable else \
                "delete that folder, or pass --force to start over"
            raise fail(self.source, self.field, f"an unfinished {self.what} is in {str(self.partial)!r}", again)

    def start(self, resume: bool = False) -> Path:
        if resume:
            return self.partial
        if self.partial.exists():  # only reachable with --force (see check_free)
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        return self.partial

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
