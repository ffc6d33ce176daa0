"""safetensors files: their headers read by hand, so that tensors can stream (safetensors itself loads whole dicts of
tensors), and files opened through safetensors with a clear error for truncated or corrupt ones instead of a Rust
traceback. A file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
[start, end) byte range in the data that follows, then the data. No torch here: `lora-tune validate` checks a local
base's files without importing it."""
import json
import struct
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import fail


def read_header(path: Path) -> tuple[int, dict]:
    """(where the data starts in the file, {name: {"dtype", "shape", "data_offsets"}}) without reading any data."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


@contextmanager
def open_safetensors(path: Path, field: str):
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise fail(field, f"{str(path)!r} is truncated or not a safetensors file ({str(exc)[:80]})",
                   "re-download or re-save it") from None
    with handle:
        yield handle
