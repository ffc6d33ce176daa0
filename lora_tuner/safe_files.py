"""Opening safetensors files with a clear error for truncated or corrupt ones (instead of a Rust traceback)."""
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import fail


@contextmanager
def open_safetensors(path: Path, source: str, field: str):
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise fail(source, field, f"{str(path)!r} is truncated or not a safetensors file ({str(exc)[:80]})",
                   "re-download or re-save it") from None
    with handle:
        yield handle
