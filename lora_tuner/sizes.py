"""Byte sizes as users write and read them ("5GB", "500MB": decimal units, as Hugging Face's shard sizes)."""
from .errors import fail

UNITS = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def parse(text: str | int, field: str) -> int:
    """A size of at least one byte (a shard, body or budget of nothing is never meant)."""
    count = text if isinstance(text, int) else _bytes(text)
    if count is None:
        raise fail(field, f"{text!r} is not a size", "write e.g. 5GB or 500MB")
    if count < 1:
        raise fail(field, f"{text!r} is less than one byte", "write e.g. 5GB or 500MB")
    return count


def _bytes(text: str) -> int | None:
    value = text.strip().upper()
    if value.isdigit():  # bytes
        return int(value)
    for unit, factor in (*UNITS, ("B", 1)):
        if value.endswith(unit) and value[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(value[: -len(unit)]) * factor)
    return None


def show(count: int) -> str:
    for unit, factor in UNITS:
        if count >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count} bytes"
