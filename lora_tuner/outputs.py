"""The one output guard. Every command that writes files (run, merge, export in every format, import-gguf, eval's
report) names its output and every input it reads here, before anything is written; this module alone decides
whether that output may be written and how it appears:

- never onto an input: an output that is, holds or lies inside any input of the command is refused, with or without
  --force (a model written into RUN/base-model would replace the run's base);
- never over something that exists, without --force; never through a link (the link's target would be replaced);
- whole or not at all: the work happens under a hidden temporary name beside the output and is renamed into place
  when complete, so a crash at any moment leaves the previous state readable;
- a disk that fills up is one line, and nothing half-written is left behind.

Every path it hands out is announced as the audit event `lora_tuner.output` (sys.audit), so a test can hold every
write a command makes to the paths this guard granted (tests/test_output_guard.py)."""
import errno
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import current, fail

AUDIT_EVENT = "lora_tuner.output"


def resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def grant(path: Path) -> Path:
    """A path this guard lets the command write (or create, or remove) at and below."""
    sys.audit(AUDIT_EVENT, str(path))
    return path


class Output:
    """One output path of a command and the inputs it must never touch.

    Args:
        path: where the output appears when complete.
        field: the option that named it (--out, output), for error lines.
        what: what it is, for error lines ("model export", "GGUF file", "run").
        inputs: name -> path of everything the command reads (None: not used this time).
        beside: suffixes of files written next to a file output (".Modelfile"): each is an output too.
    """

    def __init__(self, path: str | Path, field: str, what: str, inputs: dict[str, str | Path | None],
                 beside: tuple[str, ...] = ()):
        self.source, self.field, self.what = current(), field, what  # what the command is about, for error lines
        if str(path).strip() == "":
            raise fail(field, "is empty", f"give {field} a path")
        try:
            if Path(path).expanduser().is_symlink():
                raise fail(field, f"{str(path)!r} is a symbolic link; writing there would replace what it points "
                           "at", f"give {field} a real path")
            self.final = resolved(path)
            self.beside = [self.final.with_suffix(suffix) for suffix in beside]
            self.partial = self.final.parent / f".{self.final.name}.partial"
            self._refuse_inputs({name: resolved(p) for name, p in inputs.items()
                                 if p is not None and str(p) != "" and Path(p).expanduser().exists()})
            self.final.exists()  # a name the file system cannot hold fails here, not half-way through the work
        except (OSError, RuntimeError) as exc:  # too long a name, a loop of links
            raise fail(field, f"{str(path)[:80]!r} cannot be used as a path ({getattr(exc, 'strerror', None) or exc})",
                       f"give {field} a shorter, plain path") from None

    def _refuse_inputs(self, inputs: dict[str, Path]) -> None:
        """An output may be replaced (--force) or written into: it must be none of the inputs, hold none of them and
        lie inside none of them; the files written beside it likewise."""
        for out in [self.final, *self.beside]:
            for name, path in inputs.items():
                if out == path or path.is_relative_to(out) or out.is_relative_to(path):
                    where = "is" if out == path else "holds" if path.is_relative_to(out) else "is inside"
                    raise fail(self.field, f"{str(out)!r} {where} the {name} {str(path)!r}, which this "
                               "command reads", f"choose {self.field} outside it", source=self.source)

    def temporary(self, tag: str) -> Path:
        """A hidden working path beside the output (removed by the caller when done)."""
        return grant(self.final.parent / f".{self.final.name}.{tag}")

    def check_new(self, force: bool) -> None:
        """Refuse to replace an existing output (and the files beside it) without --force."""
        for existing in [self.final, *self.beside]:
            if existing.exists() and not force:
                raise fail(self.field, f"{str(existing)!r} already exists", f"choose another "
                           f"{self.field}, or pass --force to replace it", source=self.source)
        if not self.final.parent.is_dir():
            raise fail(self.field, f"folder {str(self.final.parent)!r} does not exist",
                       f"create it, or choose another {self.field}", source=self.source)


class OutputFolder(Output):
    """A folder output (a run, a merged export, an imported model). resumable: for outputs that can be continued
    (runs), whether an unfinished one holds anything to continue from; one that does not is stale and started over."""

    def __init__(self, path: str | Path, field: str, what: str, inputs: dict[str, str | Path | None],
                 resumable: Callable[[Path], bool] | None = None):
        super().__init__(path, field, what, inputs)
        if self.final.exists() and not self.final.is_dir():
            raise fail(field, f"{str(self.final)!r} is a file, and the {what} is a folder",
                       f"give {field} a folder path")
        self.resumable = resumable

    def check_free(self, force: bool, resume: bool = False) -> None:
        """Before anything is written: refuse to clobber a finished or unfinished output without --force."""
        if self.final.exists() and not force:
            raise fail(self.field, f"{str(self.final)!r} already holds a {self.what}",
                       f"choose another {self.field}, or pass --force to replace it", source=self.source)
        if resume and not self.partial.exists():
            raise fail("--resume", f"no unfinished {self.what} in {str(self.partial)!r}",
                       "run without --resume to start one", source=self.source)
        if not self.partial.exists() or force or resume:
            return
        if self.resumable is None:
            raise fail(self.field, f"an unfinished {self.what} is in {str(self.partial)!r}",
                       "delete that folder, or pass --force to start over", source=self.source)
        if self.resumable(self.partial):
            raise fail(self.field, f"an unfinished {self.what} is in {str(self.partial)!r}",
                       "pass --resume to continue it, or --force to start over", source=self.source)

    def start(self, resume: bool = False) -> Path:
        grant(self.partial)
        if resume:
            return self.partial
        try:
            if self.partial.exists():  # --force, or a stale unfinished output with nothing to continue from
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
        except OSError as exc:
            raise fail(self.field, f"cannot write in {str(self.final.parent)!r} ({exc.strerror})",
                       f"choose a writable {self.field}", source=self.source) from None
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
                raise no_space(self.final.parent, self.field, self.source) from None
            raise

    def discard(self) -> None:
        """Drop the unfinished output: the work was refused before producing anything worth keeping."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def finish(self) -> Path:
        """Swap the completed folder into place; a replaced one is removed only after the swap succeeded."""
        grant(self.final)
        retired = None
        if self.final.exists():
            retired = self.temporary(f"replaced-{int(time.time())}")
            os.rename(self.final, retired)
        os.rename(self.partial, self.final)
        if retired:
            shutil.rmtree(retired)
        return self.final


class OutputFile(Output):
    """A file output (a GGUF) and the files written beside it (its Modelfile and report)."""

    def __init__(self, path: str | Path, field: str, what: str, inputs: dict[str, str | Path | None],
                 beside: tuple[str, ...] = ()):
        super().__init__(path, field, what, inputs, beside)
        if self.final.is_dir():
            raise fail(field, f"{str(self.final)!r} is a folder, and the {what} is a file",
                       f"give {field} a file path, e.g. {str(self.final / 'model.gguf')!r}")
        grant(self.partial)
        for path in self.beside:
            grant(path)

    @contextmanager
    def writing(self):
        """The partial file to write, removed again however the block ends; a full disk is one line."""
        try:
            yield self.partial
        except OSError as exc:
            if disk_full(exc):
                raise no_space(self.final.parent, self.field, self.source) from None
            raise
        finally:
            self.partial.unlink(missing_ok=True)

    def aside(self, suffix: str) -> Path:
        """A file of this command beside the output that never blocks a later attempt (a failed export's report)."""
        return grant(self.final.with_suffix(suffix))

    def finish(self) -> Path:
        """Last: the file appears only when complete (and verified)."""
        os.replace(grant(self.partial), grant(self.final))
        return self.final


def write_text(path: Path, text: str) -> None:
    """A small file (a report) written under a temporary name and renamed: a reader never sees half of it."""
    temporary = grant(path.with_name(f".{path.name}.tmp"))
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, grant(path))


FULL_BELOW = 16 * 2**20  # bytes free: a failed write with this little room left was the disk filling up


def disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """Whether a failed write ran out of disk, anywhere in the chain of exceptions it caused: an OSError says so by
    errno, safetensors' writer in its message ("No space left on device"), numpy's tofile as a short write ("N
    requested and M written") without an errno. torch.save says only "basic_ios::clear: iostream error" or "enforce
    fail", so for a folder given the disk itself is asked too."""
    first = exc
    while exc is not None:
        text = str(exc)
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text:
            return True
        if isinstance(exc, OSError) and exc.errno is None and "requested and" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return folder is not None and isinstance(first, (OSError, RuntimeError)) and folder.exists() and \
        shutil.disk_usage(folder).free < FULL_BELOW


def no_space(folder: Path, field: str, source: str | None = None):
    """The one line for a disk that filled up while an output was written (nothing of it is left in place)."""
    return fail(field, f"no space left on the device of {str(folder)!r}; nothing was put in place",
                f"free some space or choose another {field}, then run again", source=source)
