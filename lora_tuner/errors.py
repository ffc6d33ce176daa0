"""User-facing errors: one line per problem, naming file, field, value and the fix."""
import reprlib
from dataclasses import dataclass


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


def fail(source: str, field: str, message: str, fix: str) -> UserError:
    return UserError([Problem(source, field, message, fix)])


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 2, 4, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = 50


def show(value, limit: int = 60) -> str:
    """repr() of a value, shortened so an error stays on one readable line: a huge or deeply nested value is never
    rendered whole (reprlib stops at a few items and levels)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
