"""User-facing errors: one line per problem, naming file, field, value and the fix.

The file a problem is in is usually the one the command was pointed at (the recipe, the run folder): each command
and public function states it once, `with about(path):`, and every error raised inside names it, however deep; an
error about another file names that file itself (`fail(..., source=path)`). The label is a context variable, so it
never travels as a parameter through the functions in between, and threads and tasks each see their own."""
import reprlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

_ABOUT: ContextVar[str] = ContextVar("lora_tuner_about", default="lora-tune")


@dataclass(frozen=True)
class Problem:
    source: str  # the file (recipe, data set, model folder) the problem is in
    field: str  # dotted key path, or a row reference for data problems
    message: str  # what is wrong, including the offending value
    fix: str  # what the user should do about it

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.message}; {self.fix}"


class UserError(Exception):
    """Bad input from the user. The CLI prints each problem on its own line and exits 2, no traceback."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@contextmanager
def about(source: str | Path):
    """Errors raised inside name `source` as the file they are in."""
    token = _ABOUT.set(str(source))
    try:
        yield
    finally:
        _ABOUT.reset(token)


def current() -> str:
    """The file errors raised here name (see about)."""
    return _ABOUT.get()


def fail(field: str, message: str, fix: str, source: str | Path | None = None) -> UserError:
    """One problem: `field` of `source` (default: what the command is about) is wrong as `message` says; `fix`."""
    return UserError([Problem(current() if source is None else str(source), field, message, fix)])


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 2, 4, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = 50


def show(value, limit: int = 60) -> str:
    """repr() of a value, shortened so an error stays on one readable line: a huge or deeply nested value is never
    rendered whole (reprlib stops at a few items and levels)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
